"""Image preparation for the loop: the order of a task's images, per-image seeds, resized images with
their windows, and label maps from logits."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.ade20k_c import ADE20KC
from pipeline.run.config import DataConfig
from pipeline.dusa.windows import resize_short_edge, window_boxes


def image_seed(seed: int, task: str, name: str) -> int:
    """A per-image seed that depends on the image, not on its position in the run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}/{name}".encode()).digest()[:7], "little")


def task_order(data: DataConfig, seed: int, task: str, size: int) -> list[int]:
    """The order in which a task's images are adapted: shuffled (`data.shuffle`, as the reference does),
    seeded from the run's seed and the task so that every stage and every rerun sees the same order;
    else file order."""
    if not data.shuffle:
        return list(range(size))
    generator = torch.Generator().manual_seed(image_seed(seed, task, "image order"))
    return torch.randperm(size, generator=generator).tolist()


class PreparedImages(Dataset):
    """ADE20K-C items resized for the segmenter, with their windows (runs in loader workers)."""

    def __init__(self, dataset: ADE20KC, window_size: int, window_stride: int, short_edge: int | None = None):
        self.dataset, self.size, self.stride = dataset, window_size, window_stride
        self.short_edge = window_size if short_edge is None else short_edge  # None: one row of windows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        image = resize_short_edge(item["image"], self.short_edge).unsqueeze(0)
        item["image"] = image
        item["corners"] = window_boxes(image.shape[-2], image.shape[-1], self.size, self.stride)
        return item


def predict(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Whole-image logits [1, C, h, w] -> label map [H, W] at the annotation's size."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False).argmax(1)[0]
