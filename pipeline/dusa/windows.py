"""Resizing, the square windows that cover an image, and the randomness drawn for each window."""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

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


def window_count(height: int, width: int, size: int, stride: int, short_edge: int | None = None) -> int:
    """How many windows `window_boxes` places on a height x width image once its short edge is resized to
    `short_edge` (None: `size`; the image's header is enough), computed without listing them (an extreme
    aspect ratio is counted, not listed, before it is refused)."""
    h, w = resized_size(height, width, size if short_edge is None else short_edge)

    def along(length: int) -> int:
        return 1 if length <= size else len(range(0, length - size, stride)) + 1
    return along(h) * along(w)


def _linear_resize_matrix(source: int, target: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[target, source]: PyTorch's 1-D linear resize (align_corners=False) as a matrix, read off the
    operator itself (bilinear resizing is this map along each axis)."""
    eye = torch.eye(source, device=device, dtype=dtype)[None]  # [1, source channels, source length]
    return F.interpolate(eye, size=target, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=256)
def window_resampler(source: int, full: int, start: int, size: int, out: int,
                     device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                     scaled: int | None = None) -> torch.Tensor:
    """[out, source] matrix A with A @ x == resize(resize(resize(x, full)[start:start + size], scaled), out)
    for a length-`source` signal x (linear, align_corners=False, up to float rounding; `scaled` None: no
    middle resize, as for a window of the generator's size).

    Applied along both axes it takes whole-image logits at the segmenter's resolution straight to a
    window's logits at latent resolution, without the full-resolution upsample of the whole image.
    """
    if not 0 <= start <= full - size:
        raise ValueError(f"window [{start}, {start + size}) is outside an edge of {full}")
    with float32_math(device):  # cached for every later call: never made under an autocast's bf16
        up = _linear_resize_matrix(source, full, device, dtype)[start:start + size]
        if scaled is not None and scaled != size:  # an adaptive window, resized to the generator's size
            up = _linear_resize_matrix(size, scaled, device, dtype) @ up
            size = scaled
        return up if out == size else _linear_resize_matrix(size, out, device, dtype) @ up


def float32_math(device: torch.device | str):
    """Autocast off: resizing the segmenter's logits, candidates and weights run in float32 (as the
    reference's interpolations do) also when the step runs under bf16 autocast."""
    return torch.autocast(torch.device(device).type, enabled=False)


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
    side: int | None = None  # an adaptive window's side in the image (resized to the window size); None: that size


# With adaptive windows the runner hands the front this instead of draws: the windows chosen from the
# step's own forward -> their draws.
WindowSampler = Callable[[Sequence[Sequence[int]]], "list[WindowDraw]"]


def draw_windows(corners: Sequence[Sequence[int]], latent_shape: Sequence[int],
                 timestep_range: Sequence[float], generator: torch.Generator) -> list[WindowDraw]:
    """The randomness of one step (noise, flow time, candidate-sampling seed per window) from one seeded
    generator, so the pipeline and a single-process reference see the same values. A corner is
    (top, left), or (top, left, side) for an adaptive window."""
    low, high = timestep_range
    draws = []
    for top, left, *side in corners:
        noise = torch.randn(1, *latent_shape, generator=generator)
        t = low + (high - low) * torch.rand(1, generator=generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        draws.append(WindowDraw((int(top), int(left)), noise, t, seed, int(side[0]) if side else None))
    return draws


class AdaptiveWindows(NamedTuple):
    """The entropy-guided window placement (`data.windows adaptive`): its seven numbers (defaults and
    meaning: the `adaptive_*` options of `DataConfig`)."""

    std: float
    dilation: int
    min_size: int
    max_size: int
    min_distance: float
    max_windows: int
    min_windows: int


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy (natural log) of softmax over classes, [C, ...] raw logits -> [...], float32."""
    log_p = torch.log_softmax(logits.float(), dim=0)
    return -(log_p.exp() * log_p).sum(dim=0)


def adaptive_boxes(entropy: torch.Tensor, rule: AdaptiveWindows) -> list[tuple[int, int, int]]:
    """Square windows (top, left, side) around the most uncertain regions of an image's entropy map [H, W];
    an empty list when fewer than `rule.min_windows` are found (the caller covers the image by the grid).

    Hot pixels: entropy > mean + std * standard deviation (unbiased) of the map; dilated by
    `dilation` rounds of 3 x 3 max-pooling; 4-connected components; each component's bounding box scored
    by the mean (undilated) entropy inside the box, highest first. A window's side is the box's longer
    side clamped to [min_size, max_size] (and to the image), centred on the box (centre rounded down)
    and shifted inside the image; a window whose centre lies closer than `min_distance` to an accepted
    window's centre is dropped; at most `max_windows`.
    """
    from scipy import ndimage  # the reference's components: 4-connected labelling

    height, width = entropy.shape
    entropy = entropy.detach().float()
    hot = (entropy > entropy.mean() + rule.std * entropy.std()).float()[None, None]
    for _ in range(rule.dilation):
        hot = F.max_pool2d(hot, 3, stride=1, padding=1)
    labels, _ = ndimage.label(hot[0, 0].bool().cpu().numpy())
    scored = []
    for rows, cols in ndimage.find_objects(labels):
        score = float(entropy[rows, cols].mean())
        scored.append((score, rows.start, rows.stop, cols.start, cols.stop))
    scored.sort(key=lambda box: -box[0])  # stable: equal scores keep raster order
    largest = min(rule.max_size, height, width)
    boxes: list[tuple[int, int, int]] = []
    centres: list[tuple[float, float]] = []
    for _, top, bottom, left, right in scored:
        side = max(min(max(bottom - top, right - left), largest), min(rule.min_size, largest))
        y = min(max((top + bottom) // 2 - side // 2, 0), height - side)
        x = min(max((left + right) // 2 - side // 2, 0), width - side)
        centre = (y + side / 2, x + side / 2)
        if any(math.dist(centre, c) < rule.min_distance for c in centres):
            continue
        boxes.append((y, x, side))
        centres.append(centre)
        if len(boxes) == rule.max_windows:
            break
    return boxes if len(boxes) >= rule.min_windows else []
