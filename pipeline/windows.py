"""Resizing and the square windows that cover an image (DESIGN section 2, steps 1-2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resized_size(height: int, width: int, short_edge: int) -> tuple[int, int]:
    """Size after resizing so the short edge is `short_edge` (aspect kept, rounded)."""
    scale = short_edge / min(height, width)
    return max(short_edge, round(height * scale)), max(short_edge, round(width * scale))


def resize_short_edge(image: torch.Tensor, short_edge: int) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> short edge `short_edge`, bilinear with antialiasing."""
    size = resized_size(image.shape[-2], image.shape[-1], short_edge)
    if tuple(image.shape[-2:]) == size:
        return image
    batched = image if image.dim() == 4 else image.unsqueeze(0)
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0, 1) if image.dim() == 4 else out[0].clamp_(0, 1)


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    # Regular steps, then one window flush with the far border.
    return list(range(0, length - size, stride)) + [length - size]


def window_boxes(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (top, left) of the size x size windows covering a height x width image."""
    if not 1 <= stride <= size:
        raise ValueError(f"window stride must be in [1, window size {size}] so windows cover the image, got {stride}")
    if min(height, width) < size:
        raise ValueError(f"image {height}x{width} is smaller than the {size}x{size} window")
    return [(top, left) for top in _starts(height, size, stride) for left in _starts(width, size, stride)]
