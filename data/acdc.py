"""ACDC (adverse conditions: fog, night, rain, snow) validation sets, annotated in Cityscapes train ids.

Layout under <root> (ACDC's own download, rgb_anon and gt unpacked side by side):
    <root>/rgb_anon/<condition>/val/<sequence>/<sequence>_frame_<n>_rgb_anon.png
    <root>/gt/<condition>/val/<sequence>/<sequence>_frame_<n>_gt_labelTrainIds.png
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.cityscapes import CITYSCAPES_CLASSES, check_limit, pair_files
from data.classes import safe_name
from data.labelled_images import listing, subdirs
from data.labelled_images import LabelledImages
from data.metrics import IGNORE_INDEX

CONDITIONS: tuple[str, ...] = ("fog", "night", "rain", "snow")  # CoTTA's order
IMAGE_SUFFIX, LABEL_SUFFIX = "_rgb_anon", "_gt_labelTrainIds.png"


def train_ids(raw: np.ndarray, num_classes: int = len(CITYSCAPES_CLASSES)) -> torch.Tensor:
    """*_gt_labelTrainIds.png values: 0..18 and 255 (ignored) as they are; ValueError naming any other."""
    values = torch.from_numpy(raw.astype(np.int64))
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)]
    if bad.numel():
        raise ValueError(f"train ids {sorted(set(bad.unique().tolist()))[:5]} are outside 0..{num_classes - 1} "
                         f"and {IGNORE_INDEX} (ignored): not a *_gt_labelTrainIds.png")
    return values


class ACDC(LabelledImages):
    """One condition of ACDC's validation set (`severity` is not used: a condition has none)."""

    image_fix = label_fix = size_fix = "replace it from ACDC's download"

    def __init__(self, root: str | Path, condition: str, severity: int | None = None, limit: int | None = None,
                 num_classes: int = len(CITYSCAPES_CLASSES)) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ACDC root {self.root} does not exist")
        check_limit(limit)
        if num_classes != len(CITYSCAPES_CLASSES):
            raise ValueError(f"ACDC annotations have {len(CITYSCAPES_CLASSES)} train ids, the class list has "
                             f"{num_classes} classes: use --data.classes cityscapes")
        if not safe_name(condition):
            raise ValueError(f"condition {condition!r} is not a task name (letters, digits and _ - . + only)")
        image_root = self.root / "rgb_anon" / condition / "val"
        if not image_root.is_dir():
            found = [c.name for c in subdirs(self.root / "rgb_anon") if (c / "val").is_dir()]
            raise FileNotFoundError(f"no folder {image_root}; conditions under {self.root / 'rgb_anon'}: "
                                    f"{listing(found)}")
        label_root = self.root / "gt" / condition / "val"
        if not label_root.is_dir():
            raise FileNotFoundError(f"no annotation folder {label_root} (ACDC's gt download beside rgb_anon)")
        self.image_dir, self.label_dir, self.num_classes = image_root, label_root, num_classes
        self._images, self._labels = pair_files(image_root, label_root, IMAGE_SUFFIX, LABEL_SUFFIX, "sequence", limit)
        self.corruption, self.severity = condition, None

    def to_train_ids(self, raw: np.ndarray) -> torch.Tensor:
        return train_ids(raw, self.num_classes)
