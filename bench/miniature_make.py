"""What the miniature benchmark (bench/miniature.py) makes: procedural scenes, and the segmenter, VAE and SD3
transformer trained on them.

Scenes: K = 12 classes, each with its own colour statistics, texture and shape habits (a sky gradient above
a horizon, a mountain ridge, water and ground bands, a road in perspective, objects standing on the ground
and drawn far to near so that near ones occlude far ones), and unlabelled clutter (annotation 0). Annotations
follow ADE20K: 0 ignored, class i is value i + 1. Every image is made from its own seed (split, index), so a
split is the same whatever the number of worker processes.

Models are small configs of the real architectures, trained here and saved with `save_pretrained` in the
layouts the launcher reads: `segformer/` (transformers), `sd3/vae` and `sd3/transformer` (diffusers), and the
class-embedding cache (per-class prompt and pooled embeddings learned with the transformer, saved by
`models.class_embeddings.save_class_embeddings` with its metadata).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.run.folder import write_text_atomic

CLASSES: tuple[str, ...] = ("sky", "mountain", "water", "grass", "sand", "road", "tree", "building", "car",
                            "person", "rock", "flower")
K = len(CLASSES)
V = {name: i + 1 for i, name in enumerate(CLASSES)}  # annotation value of each class (0: ignored)


# ------------------------------------------------------------------------------------------------ scenes
def image_seed(split: str, index: int, seed: int = 0) -> int:
    return int.from_bytes(hashlib.sha256(f"miniature/{seed}/{split}/{index}".encode()).digest()[:8], "little")


def _noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int | None = None) -> np.ndarray:
    """Smooth standard-ish noise [h, w]: a cells_y x cells_x grid of normals, resized bicubically."""
    grid = rng.standard_normal((max(cells_y, 2), max(cells_x or cells_y, 2))).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fractal(rng: np.random.Generator, h: int, w: int, base: int, octaves: int = 3) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    for o in range(octaves):
        out += _noise(rng, h, w, base * 2 ** o, int(base * 2 ** o * w / h)) / 2 ** o
    return out


def _jitter(rng: np.random.Generator, colour, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _paint(img: np.ndarray, label: np.ndarray, mask: np.ndarray, texture: np.ndarray, value: int) -> None:
    img[mask] = texture[mask]
    label[mask] = value


def _shade(colour: np.ndarray, field: np.ndarray, amplitude: float) -> np.ndarray:
    """colour [3] modulated by a noise field [h, w]: [h, w, 3]."""
    return colour[None, None, :] * (1 + amplitude * field[..., None])


def _ridge(rng: np.random.Generator, w: int, top: float, bottom: float) -> np.ndarray:
    """A mountain ridge: a y coordinate per column, by midpoint displacement."""
    n = 65
    y = np.zeros(n, np.float32)
    y[0], y[-1] = rng.uniform(top, bottom, 2)
    step, amp = n - 1, (bottom - top) * 0.6
    while step > 1:
        half = step // 2
        for i in range(half, n - 1, step):
            y[i] = (y[i - half] + y[i + half]) / 2 + rng.uniform(-amp, amp)
        step, amp = half, amp * 0.55
    return np.interp(np.linspace(0, n - 1, w), np.arange(n), np.clip(y, top, bottom)).astype(np.float32)


def render_scene(seed: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [h, w, 3], annotation uint8 [h, w] with 0 ignored and class i as i + 1)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    horizon = rng.uniform(0.28, 0.55) * h

    # Sky: a vertical gradient from a deep top colour to a pale horizon, with soft clouds.
    top, low = _jitter(rng, (0.30, 0.50, 0.88)), _jitter(rng, (0.75, 0.85, 0.96))
    a = np.clip(yy / max(horizon, 1), 0, 1)[..., None]
    sky = top * (1 - a) + low * a
    clouds = np.clip(_noise(rng, h, w, 3, 5) - 0.6, 0, 1)[..., None]
    _paint(img, label, yy < horizon + 2, sky * (1 - clouds) + clouds * 0.97, V["sky"])

    if rng.random() < 0.65:  # mountain: a ridge above the horizon, grey-violet rock with mid-scale relief
        ridge = _ridge(rng, w, horizon - rng.uniform(0.12, 0.3) * h, horizon - 0.02 * h)
        tex = _shade(_jitter(rng, (0.42, 0.40, 0.50)), _fractal(rng, h, w, 6), 0.12)
        tex *= (0.8 + 0.3 * np.clip((yy - ridge[None]) / (0.3 * h), 0, 1))[..., None]  # lighter at the foot
        _paint(img, label, (yy >= ridge[None]) & (yy < horizon + 2), tex, V["mountain"])

    # Ground: grass or sand, a patch of the other, a water band at the horizon, a road in perspective.
    ground = (yy >= horizon)
    kinds = ["grass", "sand"] if rng.random() < 0.6 else ["sand", "grass"]
    tex = {"grass": _shade(_jitter(rng, (0.26, 0.55, 0.20)), _noise(rng, h, w, h // 2, w // 2), 0.25)
           * (1 + 0.1 * _noise(rng, h, w, 8, 11))[..., None],
           "sand": _shade(_jitter(rng, (0.82, 0.72, 0.50)), _noise(rng, h, w, h // 3, w // 3), 0.05)
           * (1 + 0.08 * _noise(rng, h, w, 4, 5))[..., None]}
    _paint(img, label, ground, tex[kinds[0]], V[kinds[0]])
    if rng.random() < 0.5:
        patch = (_noise(rng, h, w, 3, 4) > rng.uniform(0.2, 0.7)) & ground
        _paint(img, label, patch, tex[kinds[1]], V[kinds[1]])
    if rng.random() < 0.45:  # water: horizontal ripples
        depth = rng.uniform(0.08, 0.25) * h
        edge = horizon + depth + 0.03 * h * _noise(rng, 1, w, 1, 6)[0]
        ripples = np.sin(yy * rng.uniform(0.6, 1.0) + 2 * _noise(rng, h, w, 4, 16)) + 0.5 * _noise(rng, h, w, 24, 6)
        _paint(img, label, ground & (yy < edge[None]), _shade(_jitter(rng, (0.16, 0.36, 0.62)), ripples, 0.12),
               V["water"])
    road = None
    if rng.random() < 0.5:  # a road from the bottom edge to a vanishing point on the horizon
        vx, half = rng.uniform(0.3, 0.7) * w, rng.uniform(0.2, 0.35) * w
        bx = vx + rng.uniform(-0.25, 0.25) * w
        road = np.array([[vx - 2, horizon], [vx + 2, horizon], [bx + half, h], [bx - half, h]], np.float32)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(road).astype(np.int32)], 1)
        tex = _shade(_jitter(rng, (0.30, 0.30, 0.32), 0.04), _noise(rng, h, w, h // 2, w // 2), 0.08)
        line = (np.abs(xx - (vx + (bx - vx) * (yy - horizon) / (h - horizon))) < 1 + 3 * (yy - horizon) / h) & \
               (np.sin(yy / (4 + 12 * (yy - horizon) / h)) > 0)
        tex[line] = 0.92
        _paint(img, label, (mask > 0) & ground, tex, V["road"])

    # Objects, far to near (nearer ones occlude), each with its shape habit; sizes grow towards the bottom.
    objects = []
    for _ in range(int(rng.integers(2, 7))):
        kind = rng.choice(["tree", "building", "car", "person", "rock", "flower"], p=[.25, .15, .15, .15, .15, .15])
        base = horizon + 0.02 * h + rng.uniform(0, 1) ** 1.5 * (h - horizon) * 0.95
        if kind == "building":
            base = horizon + rng.uniform(0.0, 0.12) * h
        if kind == "car" and road is not None and rng.random() < 0.7:
            base = horizon + rng.uniform(0.3, 1.0) * (h - horizon)
        objects.append((base, kind, rng.uniform(0.05, 0.95) * w))
    if rng.random() < 0.3:
        objects.append((rng.uniform(horizon, h), "clutter", rng.uniform(0, w)))
    for base, kind, cx in sorted(objects, key=lambda o: o[0]):
        scale = 0.35 + 0.9 * (base - horizon) / max(h - horizon, 1)
        _OBJECTS[kind](rng, img, label, yy, xx, float(base), float(cx), scale * h)

    img *= rng.uniform(0.85, 1.1)  # the scene's light
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), label


def _tree(rng, img, label, yy, xx, base, cx, size):
    h, w = label.shape
    trunk_h, trunk_w = 0.25 * size * rng.uniform(0.7, 1.2), max(2.0, 0.06 * size)
    trunk = (np.abs(xx - cx) < trunk_w / 2) & (yy <= base) & (yy > base - trunk_h)
    _paint(img, label, trunk, _shade(_jitter(rng, (0.36, 0.23, 0.11)), _noise(rng, h, w, h // 4, w // 4), 0.1),
           V["tree"])
    ry, rx = 0.3 * size * rng.uniform(0.8, 1.3), 0.22 * size * rng.uniform(0.8, 1.3)
    cy = base - trunk_h - 0.8 * ry
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + 0.35 * _noise(rng, h, w, 10, 14)
    blotch = _fractal(rng, h, w, 10, 2)
    _paint(img, label, d < 1, _shade(_jitter(rng, (0.10, 0.34, 0.12)), blotch, 0.3), V["tree"])


def _building(rng, img, label, yy, xx, base, cx, size):
    h, w = label.shape
    bh, bw = rng.uniform(0.5, 1.3) * size, rng.uniform(0.3, 0.8) * size
    x0, y0 = cx - bw / 2, base - bh
    body = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < base)
    wall = np.asarray([(0.70, 0.36, 0.28), (0.80, 0.74, 0.62), (0.55, 0.55, 0.58)][rng.integers(3)])
    tex = _shade(_jitter(rng, wall, 0.05), _noise(rng, h, w, h // 3, w // 3), 0.05)
    px, py = rng.uniform(6, 12) * size / h * 2.5 + 4, rng.uniform(7, 12) * size / h * 2.5 + 5
    windows = (((xx - x0) % px) > 0.45 * px) & (((yy - y0) % py) > 0.4 * py) & (yy < base - 0.1 * bh)
    tex[windows] = _jitter(rng, (0.20, 0.26, 0.38), 0.04)
    _paint(img, label, body, tex, V["building"])


def _car(rng, img, label, yy, xx, base, cx, size):
    h, w = label.shape
    cw, ch = 0.55 * size * rng.uniform(0.8, 1.2), 0.18 * size * rng.uniform(0.8, 1.2)
    body = np.zeros((h, w), np.uint8)
    cv2.rectangle(body, (int(cx - cw / 2), int(base - ch)), (int(cx + cw / 2), int(base - 0.2 * ch)), 1, -1)
    cv2.rectangle(body, (int(cx - cw / 3), int(base - 1.7 * ch)), (int(cx + cw / 4), int(base - ch)), 1, -1)
    colour = _jitter(rng, [(0.78, 0.10, 0.10), (0.85, 0.45, 0.08)][rng.integers(2)], 0.06)
    tex = _shade(colour, _noise(rng, h, w, 6, 8), 0.08) * (1.15 - 0.3 * (yy > base - 0.6 * ch))[..., None]
    glass = (yy > base - 1.6 * ch) & (yy < base - 1.1 * ch) & (np.abs(xx - cx + cw / 24) < cw / 3.6)
    tex[glass] = (0.55, 0.7, 0.8)
    for wx in (cx - cw / 3, cx + cw / 3):
        cv2.circle(body, (int(wx), int(base - 0.2 * ch)), max(1, int(0.25 * ch)), 2, -1)
    tex[body == 2] = 0.06
    _paint(img, label, body > 0, tex, V["car"])


def _person(rng, img, label, yy, xx, base, cx, size):
    h, w = label.shape
    ph = 0.5 * size * rng.uniform(0.8, 1.15)
    head_r = 0.08 * ph
    head = (yy - (base - ph + head_r)) ** 2 + (xx - cx) ** 2 < head_r ** 2
    body = ((yy - (base - 0.55 * ph)) / (0.3 * ph)) ** 2 + ((xx - cx) / (0.14 * ph)) ** 2 < 1
    legs = (yy > base - 0.35 * ph) & (yy <= base) & (np.abs(np.abs(xx - cx) - 0.05 * ph) < 0.035 * ph)
    shirt = _jitter(rng, [(0.15, 0.2, 0.6), (0.6, 0.15, 0.45), (0.9, 0.85, 0.2)][rng.integers(3)])
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = shirt
    tex[legs] = (0.15, 0.15, 0.2)
    tex[head] = _jitter(rng, (0.86, 0.66, 0.52), 0.05)
    _paint(img, label, head | body | legs, tex, V["person"])


def _rock(rng, img, label, yy, xx, base, cx, size):
    h, w = label.shape
    r = 0.18 * size * rng.uniform(0.6, 1.3)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    points = np.stack([cx + r * np.cos(angles) * rng.uniform(0.6, 1.2, 9),
                       base - r * 0.8 + 0.8 * r * np.sin(angles) * rng.uniform(0.6, 1.0, 9)], 1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [cv2.convexHull(np.round(points).astype(np.int32))], 1)
    speckle = _noise(rng, h, w, h // 2, w // 2) + 0.5 * _noise(rng, h, w, 12, 16)
    _paint(img, label, mask > 0, _shade(_jitter(rng, (0.52, 0.50, 0.47)), speckle, 0.18), V["rock"])


def _flower(rng, img, label, yy, xx, base, cx, size):
    h, w = label.shape
    ry, rx = 0.12 * size * rng.uniform(0.6, 1.3), 0.3 * size * rng.uniform(0.6, 1.3)
    patch = ((yy - (base - ry)) / ry) ** 2 + ((xx - cx) / rx) ** 2 + 0.4 * _noise(rng, h, w, 12, 16) < 1
    tex = _shade(_jitter(rng, (0.22, 0.48, 0.18)), _noise(rng, h, w, h // 2, w // 2), 0.2)
    dots = _noise(rng, h, w, h // 3, w // 3) > 0.6
    petals = [(0.92, 0.30, 0.72), (0.95, 0.85, 0.20)][rng.integers(2)]
    tex[dots] = _jitter(rng, petals, 0.05)
    _paint(img, label, patch, tex, V["flower"])


def _clutter(rng, img, label, yy, xx, base, cx, size):
    """Unlabelled stuff (annotation 0): a polygon of a random colour."""
    h, w = label.shape
    points = np.stack([cx + rng.uniform(-0.2, 0.2, 5) * size, base - rng.uniform(0, 0.3, 5) * size], 1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [cv2.convexHull(np.round(points).astype(np.int32))], 1)
    _paint(img, label, mask > 0, np.broadcast_to(rng.uniform(0, 1, 3).astype(np.float32), (h, w, 3)), 0)


_OBJECTS: dict[str, Callable] = {"tree": _tree, "building": _building, "car": _car, "person": _person,
                                 "rock": _rock, "flower": _flower, "clutter": _clutter}


def render_split(split: str, count: int, h: int, w: int, workers: int = 1, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, h, w, 3], annotations uint8 [N, h, w]) of a split, the same for any worker count."""
    from concurrent.futures import ProcessPoolExecutor
    seeds = [image_seed(split, i, seed) for i in range(count)]
    images, labels = np.empty((count, h, w, 3), np.uint8), np.empty((count, h, w), np.uint8)
    if workers > 1 and count > 8:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(render_scene, seeds, [h] * count, [w] * count, chunksize=16)
            for i, (image, label) in enumerate(results):
                images[i], labels[i] = image, label
    else:
        for i, s in enumerate(seeds):
            images[i], labels[i] = render_scene(s, h, w)
    return images, labels


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class Sizes:
    """Everything the scale decides: data, model widths, training batches and step caps."""

    height: int
    width: int
    window: int
    train_images: int
    test_images: int
    segformer: dict
    vae: dict
    transformer: dict
    text_tokens: int
    seg_batch: int
    seg_steps: int
    seg_lr: float
    vae_batch: int
    vae_crop: int
    vae_steps: int
    vae_lr: float
    fm_batch: int
    fm_steps: int
    fm_lr: float


FULL = Sizes(
    height=256, width=342, window=256, train_images=4000, test_images=200,
    # SegFormer-B0's encoder and a narrower decoder.
    segformer=dict(depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1], hidden_sizes=[32, 64, 160, 256],
                   num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=128,
                   drop_path_rate=0.1, classifier_dropout_prob=0.1),
    # SD3's VAE layout (4 levels: factor 8, 16 latent channels, no quant convs), narrow.
    vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16),
    transformer=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                     attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                     caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=32),
    text_tokens=4, seg_batch=64, seg_steps=6000, seg_lr=6e-4, vae_batch=32, vae_crop=128, vae_steps=6000,
    vae_lr=4e-4, fm_batch=128, fm_steps=12000, fm_lr=4e-4)

TINY = Sizes(
    height=64, width=86, window=64, train_images=12, test_images=4,
    segformer=dict(depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
                   num_attention_heads=[1, 1, 2, 2], mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=32,
                   drop_path_rate=0.1, classifier_dropout_prob=0.1),
    vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8),
    transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                     caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8),
    text_tokens=2, seg_batch=4, seg_steps=3, seg_lr=1e-3, vae_batch=4, vae_crop=32, vae_steps=3, vae_lr=1e-3,
    fm_batch=4, fm_steps=3, fm_lr=1e-3)


def make_segformer(sizes: Sizes, seed: int):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    torch.manual_seed(seed)
    config = SegformerConfig(num_encoder_blocks=4, **sizes.segformer, num_labels=K, id2label=dict(enumerate(CLASSES)),
                             label2id={n: i for i, n in enumerate(CLASSES)})
    return SegformerForSemanticSegmentation(config)


def make_vae(sizes: Sizes, seed: int):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    levels = len(sizes.vae["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=16, sample_size=sizes.window,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
                         **sizes.vae)


def make_transformer(sizes: Sizes, seed: int):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**sizes.transformer)


# ------------------------------------------------------------------------------------------------ training
class Schedule:
    """Stops at `steps` or after `seconds`, whichever comes first; the learning rate follows a linear warm-up
    and a cosine decay over the progress max(step / steps, elapsed / seconds), so a run cut by time still
    ends annealed."""

    def __init__(self, steps: int, seconds: float, lr: float, warmup: int = 100):
        self.steps, self.seconds, self.lr, self.warmup = steps, seconds, lr, min(warmup, max(steps // 10, 1))
        self.start, self.step = time.perf_counter(), 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def progress(self) -> float:
        return max(self.step / self.steps, self.elapsed / self.seconds)

    def done(self) -> bool:
        return self.progress >= 1

    def rate(self) -> float:
        warm = min(1.0, (self.step + 1) / self.warmup)
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * min(self.progress, 1.0)))

    def set(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.rate()

    def summary(self) -> dict:
        return {"steps": self.step, "seconds": round(self.elapsed, 1), "step_cap": self.steps,
                "time_cap_s": round(self.seconds, 1), "stopped_by": "steps" if self.step >= self.steps else "time"}


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_train_ids(annotation: torch.Tensor) -> torch.Tensor:
    """ADE convention -> train ids: 0 -> 255 (ignored), i + 1 -> i."""
    annotation = annotation.long()
    return torch.where(annotation == 0, torch.full_like(annotation, 255), annotation - 1)


def random_crops(images: torch.Tensor, labels: torch.Tensor | None, batch: int, size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of random size x size crops (and horizontal flips) of uint8 [N, H, W, 3] images on their device:
    float [B, 3, size, size] in [0, 1] and the annotations' crops. The generator is on the same device: no
    host-device copy, so a GPU's queue is never drained to wait for one."""
    n, h, w = images.shape[:3]
    device = images.device
    idx = torch.randint(n, (batch,), generator=generator, device=device)
    top = torch.randint(h - size + 1, (batch,), generator=generator, device=device)
    left = torch.randint(w - size + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    rows = top[:, None] + torch.arange(size, device=device)[None]  # [B, size]
    cols = left[:, None] + torch.arange(size, device=device)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    pick = (idx[:, None, None], rows[:, :, None], cols[:, None, :])
    crops = images[pick].permute(0, 3, 1, 2).float().div_(255)
    return crops, (labels[pick] if labels is not None else None)


def train_segmenter(images: torch.Tensor, labels: torch.Tensor, sizes: Sizes, seconds: float, device: torch.device,
                    seed: int, log: Callable[[str], None] = print):
    """SegFormer from scratch on random window-size crops: cross-entropy of the logits upsampled to the crop
    (annotation 0 ignored), AdamW, bf16 autocast on a GPU. Returns (model, training record)."""
    from models.segformer import Segmenter
    model = make_segformer(sizes, seed)
    segmenter = Segmenter(model).to(device).train()
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=sizes.seg_lr, weight_decay=0.01)
    generator = torch.Generator(device).manual_seed(seed)
    schedule = Schedule(sizes.seg_steps, seconds, sizes.seg_lr)
    while not schedule.done():
        schedule.set(optimizer)
        x, y = random_crops(images, labels, sizes.seg_batch, sizes.window, generator)
        with _autocast(device):
            logits = segmenter(x)
        logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, to_train_ids(y), ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step += 1
        if schedule.step % 500 == 0:
            log(f"segmenter step {schedule.step}: loss {float(loss):.4f} ({schedule.elapsed:.0f} s)")
    record = schedule.summary()
    record["final_loss"] = float(loss.detach())
    return model.eval(), record


def train_vae(images: torch.Tensor, sizes: Sizes, seconds: float, device: torch.device, seed: int,
              log: Callable[[str], None] = print):
    """The autoencoder on random crops: L1 + MSE reconstruction of a posterior sample, KL weight 1e-6 (SD's
    autoencoders keep the KL term tiny). Then shift and scale are set, as SD3's VAE config has them, so that
    (mean - shift) * scale has zero mean and unit variance over the training windows' latents."""
    vae = make_vae(sizes, seed).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=sizes.vae_lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(seed + 1)
    schedule = Schedule(sizes.vae_steps, seconds, sizes.vae_lr)
    while not schedule.done():
        schedule.set(optimizer)
        x, _ = random_crops(images, None, sizes.vae_batch, sizes.vae_crop, generator)
        x = 2 * x - 1
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=device)
            recon = vae.decode(z).sample.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step += 1
        if schedule.step % 500 == 0:
            log(f"vae step {schedule.step}: loss {float(loss):.4f} ({schedule.elapsed:.0f} s)")
    record = schedule.summary()
    record["final_loss"] = float(loss.detach())
    vae.eval()
    with torch.no_grad():
        gen = torch.Generator(device).manual_seed(seed + 2)
        x, _ = random_crops(images, None, min(256, 8 * sizes.vae_batch), sizes.window, gen)
        means = torch.cat([vae.encode(2 * part - 1).latent_dist.mean for part in x.split(32)])
        recon = torch.cat([vae.decode(mean).sample for mean in means.split(32)]).float()
        means = means.float()
    shift, std = float(means.mean()), float(means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    record.update(shift_factor=shift, scaling_factor=1.0 / std,
                  reconstruction_psnr_db=float(10 * torch.log10(4 / (recon - (2 * x - 1)).square().mean())))
    return vae, record


def latent_labels(annotation: torch.Tensor, factor: int) -> torch.Tensor:
    """Train id of every latent pixel: the majority class of its factor x factor block of the annotation
    (ignored pixels do not vote; a block with no labelled pixel is 255). uint8 [B, H, W] -> long [B, H/f, W/f]."""
    one_hot = F.one_hot(annotation.long(), K + 1).permute(0, 3, 1, 2).float()[:, 1:]  # value 0 dropped
    votes = F.avg_pool2d(one_hot, factor)
    best = votes.argmax(1)
    return torch.where(votes.amax(1) > 0, best, torch.full_like(best, 255))


@torch.no_grad()
def encode_windows(vae, images: torch.Tensor, labels: torch.Tensor, window: int, stride: int, device: torch.device,
                   batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """z0 = (E(2x - 1).mean - shift) * scale of every grid window of every image (the TTA windows) and of their
    mirror images, with the latent pixels' labels (`latent_labels`). -> (float16 [M, 16, s, s], uint8 [M, s, s])."""
    from pipeline.dusa.windows import window_boxes
    n, h, w = images.shape[:3]
    boxes = window_boxes(h, w, window, stride)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
    latents, latent_ids = [], []
    for start in range(0, n, batch):
        x = images[start:start + batch].to(device).permute(0, 3, 1, 2).float().div_(255)
        y = labels[start:start + batch].to(device)
        for top, left in boxes:
            for flip in (False, True):
                xw = x[:, :, top:top + window, left:left + window]
                yw = y[:, top:top + window, left:left + window]
                if flip:
                    xw, yw = xw.flip(-1), yw.flip(-1)
                with _autocast(device):
                    mean = vae.encode(2 * xw - 1).latent_dist.mean
                latents.append(((mean.float() - shift) * scale).half())
                latent_ids.append(latent_labels(yw, factor).to(torch.uint8))
    return torch.cat(latents), torch.cat(latent_ids)


def logit_normal(batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Flow times t = sigmoid(n), n ~ N(mean, std): SD3's logit-normal sampling (m = 0, s = 1), on the
    generator's device."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=generator.device))


def flow_matching_pair(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's rectified flow: x_t = (1 - t) z0 + t eps, and the velocity target eps - z0."""
    t = t.view(-1, *([1] * (z0.dim() - 1)))
    return (1 - t) * z0 + t * eps, eps - z0


def class_masked_mse(prediction: torch.Tensor, target: torch.Tensor, ids: torch.Tensor,
                     classes: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the latent pixels whose label is each sample's conditioning class only
    (every channel of those pixels); other pixels do not count. prediction/target [B, C, h, w], ids long
    [B, h, w], classes long [B]."""
    mask = (ids == classes[:, None, None]).unsqueeze(1).to(prediction.dtype)  # [B, 1, h, w]
    err = (prediction.float() - target.float()).square() * mask
    return err.sum() / (mask.sum() * prediction.shape[1]).clamp(min=1)


def pick_present_classes(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One class per sample, uniformly among the classes present in its latent label map. ids long [B, h, w]."""
    present = F.one_hot(torch.where(ids == 255, torch.full_like(ids, K), ids), K + 1).flatten(1, 2).amax(1)[:, :K]
    scores = torch.rand(present.shape, generator=generator, device=ids.device) * present  # absent classes score 0
    return scores.argmax(1)


def train_transformer(latents: torch.Tensor, ids: torch.Tensor, sizes: Sizes, seconds: float, device: torch.device,
                      seed: int, log: Callable[[str], None] = print):
    """SD3's transformer by flow matching as SD3 is trained (`flow_matching_pair`, timestep 1000 t, t logit-normal),
    conditioned per sample on one class present in its window through learned per-class prompt and pooled
    embeddings, with the loss on that class's latent pixels only (`class_masked_mse`): v_c is then the
    class-conditional velocity where class c is. Returns (transformer, prompt [K, L, D], pooled [K, P], record)."""
    transformer = make_transformer(sizes, seed).to(device).train()
    cfg = transformer.config
    gen = torch.Generator(device).manual_seed(seed + 3)
    prompt = torch.randn(K, sizes.text_tokens, cfg.joint_attention_dim, generator=gen, device=device)
    prompt = torch.nn.Parameter(prompt)
    pooled = torch.nn.Parameter(torch.randn(K, cfg.pooled_projection_dim, generator=gen, device=device))
    optimizer = torch.optim.AdamW([*transformer.parameters(), prompt, pooled], lr=sizes.fm_lr, weight_decay=0.0)
    keep = (ids != 255).flatten(1).any(1)  # windows with at least one labelled latent pixel
    latents, ids = latents[keep], ids[keep]
    schedule = Schedule(sizes.fm_steps, seconds, sizes.fm_lr)
    while not schedule.done():
        schedule.set(optimizer)
        idx = torch.randint(len(latents), (sizes.fm_batch,), generator=gen, device=device)
        z0, y = latents[idx].to(device).float(), ids[idx].to(device).long()
        classes = pick_present_classes(y, gen)
        t = logit_normal(sizes.fm_batch, gen)
        eps = torch.randn(z0.shape, generator=gen, device=device)
        x_t, target = flow_matching_pair(z0, eps, t)
        with _autocast(device):
            velocity = transformer(hidden_states=x_t, encoder_hidden_states=prompt[classes],
                                   pooled_projections=pooled[classes], timestep=1000 * t, return_dict=False)[0]
        loss = class_masked_mse(velocity, target, y, classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step += 1
        if schedule.step % 500 == 0:
            log(f"transformer step {schedule.step}: loss {float(loss):.4f} ({schedule.elapsed:.0f} s)")
    record = schedule.summary()
    record["final_loss"] = float(loss.detach())
    return transformer.eval(), prompt.detach().cpu(), pooled.detach().cpu(), record


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def sizes_record(sizes: Sizes) -> dict:
    return asdict(sizes)
