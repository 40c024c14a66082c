"""Cityscapes and Cityscapes-C: the 19 train-id classes, the official label id -> train id table, and the reader.

Layouts under <root> (the official names; images .png / .jpg):
    clean val, the task `clean` (Cityscapes' own download):
        <root>/leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    corrupted (data/make_corrupted.py --dataset cityscapes writes it; the authors' Cityscapes-C layout):
        <root>/Cityscapes-C/<corruption>/<severity>/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    annotations, for both:
        <root>/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.classes import IMAGE_SUFFIXES, safe_name
from data.labelled_images import LabelledImages, listing, subdirs
from data.metrics import IGNORE_INDEX

# Train ids 0..18 in order: SegFormer's cityscapes `id2label`, cityscapesScripts' trainId order.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# cityscapesScripts' labels.py: label id -> train id of the 19 evaluated classes; every other id in 0..33 is
# ignored (255). Ids above 33 do not exist (license plate, id -1, is not drawn into *_labelIds.png).
TRAIN_ID_OF_LABEL_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_IDS = 34  # 0..33
UNKNOWN = -1


def _lookup() -> np.ndarray:
    table = np.full(256, UNKNOWN, dtype=np.int64)
    table[:LABEL_IDS] = IGNORE_INDEX
    for label_id, train_id in TRAIN_ID_OF_LABEL_ID.items():
        table[label_id] = train_id
    return table


LABEL_ID_TABLE = _lookup()
CORRUPTED_FOLDER = "Cityscapes-C"
CLEAN_TASK = "clean"
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit", "_gtFine_labelIds.png"


def label_ids_to_train_ids(raw: np.ndarray) -> torch.Tensor:
    """Cityscapes label ids (*_gtFine_labelIds.png) -> train ids 0..18, 255 ignored; ValueError naming an id
    outside the official table."""
    values = raw.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"label id {int(values.min() if values.min() < 0 else values.max())} is outside 0..255")
    mapped = LABEL_ID_TABLE[values]
    if values.size and (mapped == UNKNOWN).any():
        bad = sorted(set(np.unique(values[mapped == UNKNOWN]).tolist()))
        raise ValueError(f"label ids {bad[:5]} are not Cityscapes label ids (0..{LABEL_IDS - 1}): not a "
                         f"*_gtFine_labelIds.png")
    return torch.from_numpy(mapped)


def pair_files(image_root: Path, label_root: Path, image_suffix: str, label_suffix: str, what: str,
               limit: int | None) -> tuple[list[Path], list[Path]]:
    """Images in <image_root>/<group>/*<image_suffix>.<ext> and their annotations
    <label_root>/<group>/<stem without image_suffix><label_suffix>, groups (cities, sequences) sorted by name,
    files by name; FileNotFoundError for a group without its annotation folder or an image without its file."""
    groups = subdirs(image_root)
    if not groups:
        raise FileNotFoundError(f"no {what} folders in {image_root}")
    images, labels = [], []
    for group in groups:
        label_dir = label_root / group.name
        if not label_dir.is_dir():
            raise FileNotFoundError(f"{what} {group.name}: no annotation folder {label_dir} for the images in {group}")
        found = sorted((p for p in group.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                        and p.stem.endswith(image_suffix)), key=lambda p: p.name)
        for p in found:
            label = label_dir / f"{p.stem.removesuffix(image_suffix)}{label_suffix}"
            if not label.is_file():
                raise FileNotFoundError(f"image {p} has no annotation {label}")
            images.append(p)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no *{image_suffix}.png images in the {what} folders of {image_root}")
    stems = [p.stem for p in images]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"{image_root} holds two images named {twice[0]} (.png and .jpg, or in two folders): "
                         f"keep one, or it is scored twice")
    return images[:limit], labels[:limit]


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")


class CityscapesC(LabelledImages):
    """One task of Cityscapes-C (a corruption at a severity), or the clean val set (the task `clean`)."""

    image_fix = "re-create it (data/make_corrupted.py --dataset cityscapes skips existing files: delete it first)"
    label_fix = "replace it from Cityscapes' gtFine download"
    size_fix = "re-create the image (data/make_corrupted.py keeps sizes and skips existing files: delete it first)"

    def __init__(self, root: str | Path, task: str, severity: int = 5, limit: int | None = None,
                 num_classes: int = len(CITYSCAPES_CLASSES)) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Cityscapes root {self.root} does not exist")
        check_limit(limit)
        if num_classes != len(CITYSCAPES_CLASSES):
            raise ValueError(f"Cityscapes annotations have {len(CITYSCAPES_CLASSES)} train ids, the class list has "
                             f"{num_classes} classes: use --data.classes cityscapes")
        if not safe_name(task):  # it names a folder under the root: never `..` or a separator
            raise ValueError(f"corruption {task!r} is not a task name (letters, digits and _ - . + only)")
        label_root = self.root / "gtFine" / "val"
        if task == CLEAN_TASK:
            image_root = self.root / "leftImg8bit" / "val"
        else:
            corrupted = self.root / CORRUPTED_FOLDER
            image_root = corrupted / task / str(severity) / "val"
            if not image_root.is_dir():
                available = [f"{c.name}/{s.name}" for c in subdirs(corrupted) for s in subdirs(c)]
                raise FileNotFoundError(f"no folder {image_root}; corruptions under {corrupted}: {listing(available)}")
        if not image_root.is_dir():
            raise FileNotFoundError(f"no folder {image_root} (Cityscapes' leftImg8bit/val)")
        if not label_root.is_dir():
            raise FileNotFoundError(f"no annotation folder {label_root} (Cityscapes' gtFine/val)")
        self.image_dir, self.label_dir = image_root, label_root
        self._images, self._labels = pair_files(image_root, label_root, IMAGE_SUFFIX, LABEL_SUFFIX, "city", limit)
        self.corruption, self.severity = task, severity

    def to_train_ids(self, raw: np.ndarray) -> torch.Tensor:
        return label_ids_to_train_ids(raw)
