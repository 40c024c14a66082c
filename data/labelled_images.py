"""What every dataset reader shares: a list of (image, annotation) files, decoded into
dict(image=float [3, H, W] in [0, 1] RGB, label=long [H, W] train ids (255 ignored), name=str).

A reader lists its files up front (so that a missing file fails at start, not hours into a task) and says how
its annotation values become train ids (`to_train_ids`); decoding, checks and error lines are here.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# One-channel 16-bit PNG modes (older Pillow reads them as "I", which no 8-bit .jpg/.png gives).
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")
LABEL_MODES = ("L", "P", *SIXTEEN_BIT)


@contextmanager
def reading(path: Path, what: str, fix: str):
    """Turn any failure to open or decode `path` into one ValueError naming the file and the fix."""
    try:
        yield
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, zlib.error, ... for bad files
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        raise ValueError(f"cannot read {what} {path}: {reason}; {fix}") from exc


def image_tensor(im: Image.Image) -> torch.Tensor:
    """float [3, H, W] in [0, 1] RGB from a decoded PIL image."""
    if im.mode in SIXTEEN_BIT:
        # convert("RGB") would clip every value above 255 to white: scale by the 16-bit range.
        gray = torch.from_numpy(np.asarray(im).astype(np.float32) / 65535.0).clamp_(0.0, 1.0)
        return gray.expand(3, -1, -1).contiguous()
    # convert handles 1, L, LA, RGBA (alpha dropped), P and CMYK alike.
    rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


def subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name) if folder.is_dir() else []


def listing(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


class LabelledImages(Dataset):
    """Items of `_images` / `_labels` (set by the reader, one annotation per image, in file order).

    Readers set `image_fix`, `label_fix` and `size_fix` (how to repair a bad file, ending its error line) and
    implement `to_train_ids` (raw annotation array -> long train ids; ValueError for values it does not know).
    """

    image_fix = label_fix = size_fix = "re-create it"
    _images: list[Path]
    _labels: list[Path]

    def to_train_ids(self, raw: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._images)

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self._images]

    def image_size(self, i: int) -> tuple[int, int]:
        """(H, W) from the file header only: PIL opens lazily and decodes no pixels here, so a file
        cut after its header passes here and fails in __getitem__."""
        with reading(self._images[i], "image", self.image_fix), Image.open(self._images[i]) as im:
            w, h = im.size
        return h, w

    def __getitem__(self, i: int) -> dict:
        image_path, label_path = self._images[i], self._labels[i]
        # load() decodes here, so a truncated file fails now with its name, not later without it.
        with reading(image_path, "image", self.image_fix), Image.open(image_path) as im:
            im.load()
            image = image_tensor(im)
        with reading(label_path, "annotation", self.label_fix), Image.open(label_path) as lm:
            lm.load()
            mode, raw = lm.mode, np.asarray(lm)
        if mode not in LABEL_MODES:
            raise ValueError(f"annotation {label_path} has mode {mode}, expected one channel; {self.label_fix}")
        if raw.shape != image.shape[1:]:
            raise ValueError(f"annotation {label_path} is {raw.shape[0]}x{raw.shape[1]} (HxW) but "
                             f"image {image_path} is {image.shape[1]}x{image.shape[2]}; {self.size_fix}")
        try:
            label = self.to_train_ids(raw)
        except ValueError as exc:  # its message does not name the file
            raise ValueError(f"annotation {label_path}: {exc}; {self.label_fix}") from exc
        return {"image": image, "label": label, "name": image_path.stem}
