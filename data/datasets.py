"""The datasets a run can adapt on (`--data.dataset`): each one's classes, tasks, reader, and the defaults of the
options left unset (checkpoint, class-embedding cache, root, image short edge, window stride). docs/datasets.md
names where each default comes from (the authors' configs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from data.classes import ADE20K_CLASSES, CORRUPTIONS


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    class_list: str  # a name `load_class_names` knows
    tasks: tuple[str, ...]  # the default task sequence: corruptions, or conditions
    severities: bool  # whether a task has severities (corrupted sets), as the gradual protocol needs
    root: str
    segmenter: str
    class_embeddings: str
    short_edge: int | None  # None: the window size (one row of windows along the long edge)
    window_stride: int
    max_windows: int
    aspect: float  # a typical image's long edge over its short one (the memory estimate's image)
    reader: Callable[[], type]  # the reader class, imported when used (torch, PIL)

    def open(self, root: str, task: str, severity: int | None, limit: int | None, num_classes: int):
        """The task's images: reader(root, task, severity, limit, num_classes)."""
        return self.reader()(root, task, severity, limit, num_classes)


def _ade20k():
    from data.ade20k_c import ADE20KC
    return ADE20KC


def _cityscapes():
    from data.cityscapes import CityscapesC
    return CityscapesC


def _acdc():
    from data.acdc import ACDC
    return ACDC


CITYSCAPES_SEGMENTER = "nvidia/segformer-b5-finetuned-cityscapes-1024-1024"
DATASETS: dict[str, DatasetInfo] = {
    "ade20k": DatasetInfo(
        "ade20k", "ADE20K-C", "ade20k", CORRUPTIONS, True, "data/ade20k_c",
        "nvidia/segformer-b5-finetuned-ade-640-640", "class_embeddings/sd3-medium-ade20k.safetensors",
        None, 256, 32, 4 / 3, _ade20k),
    "cityscapes": DatasetInfo(
        "cityscapes", "Cityscapes-C", "cityscapes", CORRUPTIONS, True, "data/cityscapes",
        CITYSCAPES_SEGMENTER, "class_embeddings/sd3-medium-cityscapes.safetensors",
        1024, 171, 64, 2.0, _cityscapes),
    "acdc": DatasetInfo(
        "acdc", "ACDC", "cityscapes", ("fog", "night", "rain", "snow"), False, "data/acdc",
        CITYSCAPES_SEGMENTER, "class_embeddings/sd3-medium-cityscapes.safetensors",
        1080, 171, 64, 16 / 9, _acdc),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"--data.dataset {name!r} is not one of {', '.join(DATASETS)}")
    return DATASETS[name]


def class_list_of(name: str) -> tuple[str, ...] | None:
    """The classes of a class-list name (`ade20k`, `cityscapes`), None for anything else (a file)."""
    if name == "ade20k":
        return ADE20K_CLASSES
    if name == "cityscapes":
        from data.cityscapes import CITYSCAPES_CLASSES
        return CITYSCAPES_CLASSES
    return None
