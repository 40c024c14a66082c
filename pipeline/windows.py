"""Resizing, the square windows that cover an image, and the randomness drawn for each window."""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


def resized_size(height: int, width: int, short_edge: int) -> tuple[int, int]:
    """Size after resizing so the short edge is `short_edge`: the long edge is truncated, as
    torchvision's resize does (`int(short_edge * long / short)`: 640 x 480 -> 682 x 512)."""
    if height <= width:
        return short_edge, max(short_edge, int(short_edge * width / height))
    return max(short_edge, int(short_edge * height / width)), short_edge


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


def _linear_resize_matrix(source: int, target: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[target, source]: PyTorch's 1-D linear resize (align_corners=False) as a matrix, read off the
    operator itself (bilinear resizing is this map along each axis)."""
    eye = torch.eye(source, device=device, dtype=dtype)[None]  # [1, source channels, source length]
    return F.interpolate(eye, size=target, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=256)
def window_resampler(source: int, full: int, start: int, size: int, out: int,
                     device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, source] matrix A with A @ x == resize(resize(x, full)[start:start + size], out) for a
    length-`source` signal x (linear, align_corners=False, up to float rounding).

    Applied along both axes it takes whole-image logits at the segmenter's resolution straight to a
    window's logits at latent resolution, without the full-resolution upsample of the whole image.
    """
    if not 0 <= start <= full - size:
        raise ValueError(f"window [{start}, {start + size}) is outside an edge of {full}")
    up = _linear_resize_matrix(source, full, device, dtype)[start:start + size]
    return _linear_resize_matrix(size, out, device, dtype) @ up


def resample_window(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits [C, h, w] -> [..., C, out, out] with `window_resampler` matrices rows [..., out, h] and
    cols [..., out, w] (a leading dimension: several windows at once)."""
    return torch.einsum("...ih,chw,...jw->...cij", rows, logits, cols)


class WindowDraw(NamedTuple):
    """One window of a step and the randomness drawn for it."""

    corner: tuple[int, int]  # (top, left) in the resized image
    noise: torch.Tensor  # eps [1, ch, h, w] of the flow
    t: torch.Tensor  # [1] flow time in [0, 1]
    seed: int  # seeds the window's candidate sampling


def draw_windows(corners: Sequence[tuple[int, int]], latent_shape: Sequence[int],
                 timestep_range: Sequence[float], generator: torch.Generator) -> list[WindowDraw]:
    """The randomness of one step (noise, flow time, candidate-sampling seed per window) from one seeded
    generator, so the pipeline and a single-process reference see the same values."""
    low, high = timestep_range
    draws = []
    for top, left in corners:
        noise = torch.randn(1, *latent_shape, generator=generator)
        t = low + (high - low) * torch.rand(1, generator=generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        draws.append(WindowDraw((int(top), int(left)), noise, t, seed))
    return draws
