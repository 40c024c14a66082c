"""Clear errors for checkpoint locations: a local folder, or a hub id such as `org/name`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def umask_file_mode() -> int:
    """0666 less the process's umask: the mode of any file the user creates (read from /proc without setting
    the umask: os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def readable_weights(path: str | Path) -> Path:
    """Gives every .safetensors file at `path` (a file or a folder tree) the mode of a new file under the
    user's umask: safetensors writes its files 0600, which the user's group could not read."""
    path, mode = Path(path), umask_file_mode()
    for file in [path] if path.is_file() else path.rglob("*.safetensors"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)
    return path


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
