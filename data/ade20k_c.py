"""ADE20K-C reader: one corruption at one severity of the ADE20K validation set.

Three layouts, detected from the folders under <root> (images: .jpg / .jpeg / .png):
    "flat"   (data/make_ade20k_c.py writes this one):
        <root>/images/validation/<corruption>_<severity>/ADE_val_00000001.jpg
        <root>/annotations/validation/ADE_val_00000001.png
    "reference" (the authors' data folder):
        <root>/ADE20K_val-c/<corruption>/<severity>/validation/ADE_val_00000001.jpg
        <root>/annotations/validation/ADE_val_00000001.png
    "nested":
        <root>/<corruption>/<severity>/ADE_val_00000001.jpg
        <root>/annotations/validation/ADE_val_00000001.png   (or flat: <root>/annotations/)
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np
import torch

from data.classes import CORRUPTIONS, IMAGE_SUFFIXES, safe_name  # noqa: F401 (CORRUPTIONS: the reader's API)
from data.labelled_images import LabelledImages, image_tensor as _image_tensor, listing as _listing  # noqa: F401
from data.labelled_images import subdirs as _subdirs
from data.metrics import ADE_NUM_CLASSES, ade_label_to_train_id

_IMAGE_FIX = "re-create it (data/make_ade20k_c.py skips existing files: delete it first)"
_LABEL_FIX = ("re-create it (data/make_ade20k_c.py copies it from ADEChallengeData2016 and skips "
              "existing files: delete it first)")


def _did_you_mean(corruption: str, folders: list[str], severity: int) -> str:
    """The corruption found at this severity nearest to the one asked for (a typo's likely fix), or ''.
    `folders`: `<corruption>/<severity>` or `<corruption>_<severity>` names, as the layout has them."""
    found = [name[:-len(f"/{severity}")] for name in folders if re.fullmatch(rf".+[/_]{severity}", name)]
    near = difflib.get_close_matches(corruption, found, n=1)
    return f" (did you mean {near[0]}?)" if near else ""


REFERENCE_FOLDER = "ADE20K_val-c"


def _locate(root: Path, corruption: str, severity: int) -> tuple[str, Path, Path]:
    """(layout, image folder, annotation folder); FileNotFoundError listing what exists."""
    reference = root / REFERENCE_FOLDER
    if reference.is_dir():
        image_dir = reference / corruption / str(severity) / "validation"
        if not image_dir.is_dir():
            available = [f"{c.name}/{s.name}" for c in _subdirs(reference) for s in _subdirs(c)]
            raise FileNotFoundError(f"no folder {image_dir}; corruptions under {reference}: {_listing(available)}"
                                    f"{_did_you_mean(corruption, available, severity)}")
        label_dir = root / "annotations" / "validation"
        if not label_dir.is_dir():
            raise FileNotFoundError(f"no annotation folder {label_dir} (beside {reference})")
        return "reference", image_dir, label_dir
    image_root = root / "images" / "validation"
    if image_root.is_dir():
        image_dir = image_root / f"{corruption}_{severity}"
        if not image_dir.is_dir():
            available = [p.name for p in _subdirs(image_root)]
            raise FileNotFoundError(f"no folder {image_dir}; corruptions under {image_root}: {_listing(available)}"
                                    f"{_did_you_mean(corruption, available, severity)}")
        return "flat", image_dir, root / "annotations" / "validation"
    image_dir = root / corruption / str(severity)
    if not image_dir.is_dir():
        available = [f"{c.name}/{s.name}" for c in _subdirs(root) if c.name not in ("annotations", "images")
                     for s in _subdirs(c)]
        raise FileNotFoundError(
            f"no folder {image_dir} (nor {image_root}); corruptions under {root}: {_listing(available)}"
            f"{_did_you_mean(corruption, available, severity)}")
    label_dir = root / "annotations" / "validation"
    if not label_dir.is_dir():
        label_dir = root / "annotations"
        if not label_dir.is_dir():
            raise FileNotFoundError(f"no annotation folder {label_dir}/validation or {label_dir}")
    return "nested", image_dir, label_dir


class ADE20KC(LabelledImages):
    """Items: dict(image=float [3, H, W] in [0, 1] RGB, label=long [H, W] train ids, name=str)."""

    image_fix, label_fix = _IMAGE_FIX, _LABEL_FIX
    size_fix = "re-create the wrong one (data/make_ade20k_c.py keeps sizes and skips existing files: delete it first)"

    def __init__(self, root: str | Path, corruption: str, severity: int = 5,
                 limit: int | None = None, num_classes: int = ADE_NUM_CLASSES) -> None:
        self.root, self.num_classes = Path(root), num_classes
        if not self.root.is_dir():
            raise FileNotFoundError(f"ADE20K-C root {self.root} does not exist (`python data/make_ade20k_c.py "
                                    f"--ade_root PATH/ADEChallengeData2016 --out {self.root}` makes it)")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be None or >= 1, got {limit}")
        if not safe_name(corruption):  # it names a folder under the root: never `..` or a separator
            raise ValueError(f"corruption {corruption!r} is not a task name (letters, digits and _ - . + only)")
        # layout: "flat" (<corruption>_<severity> folders), "reference" (ADE20K_val-c/<corruption>/<severity>/
        # validation) or "nested" (<corruption>/<severity>).
        self.layout, self.image_dir, self.label_dir = _locate(self.root, corruption, severity)
        paths = sorted((p for p in self.image_dir.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
        if not paths:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {self.image_dir}")
        stems: dict[str, Path] = {}
        for p in paths:  # X.jpg and X.png would score annotation X twice
            if p.stem in stems:
                raise ValueError(f"{self.image_dir} holds {stems[p.stem].name} and {p.name}: two images of one "
                                 f"annotation ({p.stem}.png) would be scored twice; keep one (data/make_ade20k_c.py "
                                 f"--format: build each root in one format)")
            stems[p.stem] = p
        self._images = paths[:limit]
        # Checked up front so that a missing file fails at start, not hours into a task.
        self._labels = [self.label_dir / f"{p.stem}.png" for p in self._images]
        for image, label in zip(self._images, self._labels):
            if not label.is_file():
                raise FileNotFoundError(f"image {image} has no annotation {label}")
        self.corruption, self.severity = corruption, severity

    def to_train_ids(self, raw: np.ndarray) -> torch.Tensor:
        return ade_label_to_train_id(raw, self.num_classes)
