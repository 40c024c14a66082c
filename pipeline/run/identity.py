"""What a run's results depend on besides its options: the class list, the models, the class-embedding cache
and every task's image files, each as a digest recorded in results.json (`config.inputs`).

A resume compares them with the record of the run that wrote the results, so that a class list edited in
place, a checkpoint or cache replaced in place, or images added to a task do not mix two sets of inputs
in one results.json. Cheap by design: model and cache files are known by their configs, their
safetensors headers (tensor names, dtypes, shapes, offsets, metadata) and their sizes and modification
times, never by reading their weights.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

_LARGEST_HEADER = 100 * 2**20  # safetensors' own limit


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _header_bytes(path: Path) -> bytes:
    """The raw JSON header of a safetensors file (the first bytes of a damaged one)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (length,) = struct.unpack("<Q", head)
        return head + f.read(min(length, _LARGEST_HEADER))


def files_identity(folder: Path, files: Sequence[Path]) -> dict[str, Any]:
    """{digest of the configs and safetensors headers, files: {relative path: [size, mtime_ns]}}."""
    content, stats = {}, {}
    for path in sorted(files):
        name = path.relative_to(folder).as_posix() if path != folder else path.name
        stat = path.stat()
        stats[name] = [stat.st_size, stat.st_mtime_ns]
        if path.suffix == ".json":
            content[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".safetensors":
            content[name] = hashlib.sha256(_header_bytes(path)).hexdigest()
    return {"digest": _sha(content), "files": stats}


_MODEL_FILES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".model", ".txt")


def _model_files(folder: Path, parts: Sequence[str]) -> list[Path]:
    """The files of a checkpoint folder that a run reads: configs and weights of `parts` ("" the folder's top)."""
    found = []
    for part in parts:
        sub = folder / part if part else folder
        if sub.is_dir():
            found += [p for p in sub.iterdir() if p.is_file() and p.suffix in _MODEL_FILES]
    return found


def _hub_snapshot(repo: str) -> Path | None:
    """The local snapshot of a hub id in the HF cache (no download), or None when it is not there yet."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id, or no hub library: nothing to digest yet
        return None


def checkpoint_identity(name: str, parts: Sequence[str] = ("",)) -> dict[str, Any]:
    """A model given as a local folder or a hub id: where it came from, and `files_identity` of its configs and
    weights (the HF cache's snapshot for a hub id; none when it is not downloaded yet)."""
    local = Path(name).expanduser()
    if local.exists():
        record: dict[str, Any] = {"source": "local", "path": str(local.resolve())}
        folder = local
    else:
        folder = _hub_snapshot(name)
        record = {"source": "hub", "id": name, "revision": folder.name if folder else None}
        if folder is None:
            return {**record, "digest": None, "files": None}
    return {**record, **files_identity(folder, _model_files(folder, parts))}


def file_identity(path: str) -> dict[str, Any]:
    """A single file (the class-embedding cache): its header's digest, size and modification time."""
    file = Path(path).expanduser()
    if not file.is_file():
        return {"path": str(file), "digest": None, "files": None}
    return {"path": str(file.resolve()), **files_identity(file.parent, [file])}


def images_identity(dataset) -> str:
    """Digest of a task's image list: every image's and annotation's name, size and modification time."""
    def stat(path: Path) -> list:
        found = path.stat()
        return [path.name, found.st_size, found.st_mtime_ns]
    return _sha([[*stat(p), *stat(q)] for p, q in zip(dataset._images, dataset._labels)])


def input_identity(model, class_names: Sequence[str], datasets: Mapping[str, Any], generator: bool) -> dict:
    """The record of everything a run reads besides its options (results.json `config.inputs`)."""
    inputs = {"classes": _sha(list(class_names)), "segmenter": checkpoint_identity(model.segmenter)}
    if generator:
        inputs["generator"] = checkpoint_identity(model.generator, ("vae", "transformer"))
        inputs["class_embeddings"] = file_identity(model.class_embeddings)
    inputs["images"] = {task: images_identity(dataset) for task, dataset in datasets.items()}
    return inputs


_WHAT = {"classes": "the class list (data.classes)", "segmenter": "the segmenter (model.segmenter)",
         "generator": "the generator (model.generator)",
         "class_embeddings": "the class-embedding cache (model.class_embeddings)"}


def _changed_file(before: Mapping, now: Mapping) -> str:
    """How a model's or cache's record changed, in a few words."""
    if before.get("source") != now.get("source"):
        return f"it was a {before.get('source')} model, it is a {now.get('source')} one now"
    old, new = before.get("files") or {}, now.get("files") or {}
    if set(old) != set(new):
        added, gone = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        return ", ".join([*(f"{n} added" for n in added[:2]), *(f"{n} gone" for n in gone[:2])])
    replaced = sorted(n for n in new if old[n] != new[n])
    if replaced:
        return f"{replaced[0]} was replaced or changed{f' (and {len(replaced) - 1} more)' if len(replaced) > 1 else ''}"
    if before.get("revision") != now.get("revision"):
        return f"hub revision {before.get('revision')} became {now.get('revision')}"
    return "its configs or tensor headers differ"


def changed_inputs(before: Mapping | None, now: Mapping, tasks: Sequence[str]) -> str | None:
    """What differs between the inputs recorded with earlier results and this run's (None: nothing), for the
    finished `tasks`. A hub model that was not downloaded at the time is compared by its id."""
    if not isinstance(before, Mapping):
        return "results.json records no digests of its inputs (written by an older version)"
    for key in ("classes", "segmenter", "generator", "class_embeddings"):
        if key not in now:
            continue
        old, new = before.get(key), now[key]
        if key == "classes":
            if old != new:
                return f"{_WHAT[key]} changed (names or order)"
            continue
        if not isinstance(old, Mapping):
            return f"{_WHAT[key]} was not recorded"
        if old.get("digest") is None or new.get("digest") is None:
            if (old.get("id"), old.get("path")) != (new.get("id"), new.get("path")):
                return f"{_WHAT[key]} is another one"
            continue
        if old.get("digest") != new.get("digest") or old.get("files") != new.get("files") \
                or old.get("source") != new.get("source"):
            return f"{_WHAT[key]} changed: {_changed_file(old, new)}"
    images = before.get("images") if isinstance(before.get("images"), Mapping) else {}
    for task in tasks:
        if task in now.get("images", {}) and images.get(task) != now["images"][task]:
            return f"the images of task {task} changed (files added, removed or replaced)"
    return None
