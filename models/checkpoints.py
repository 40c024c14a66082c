"""Clear errors for checkpoint locations: a local folder, or a hub id such as `org/name`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def load_checkpoint(name_or_path: str, what: str, load: Callable[[str], T]) -> T:
    """`load(name_or_path)`, with a one-line error naming the checkpoint when it cannot be found."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1
    if not path.exists() and looks_local:
        raise FileNotFoundError(f"{what} checkpoint {name} does not exist (a local folder or a hub id like org/name)")
    from safetensors import SafetensorError
    try:
        return load(str(path) if path.exists() else name)
    # hub: offline, gated, invalid id; folder: wrong layout, a damaged weights file
    except (OSError, ValueError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{what} checkpoint {name} could not be loaded: {first}") from exc
