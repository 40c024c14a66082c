"""Synthetic ADE20K-C for the embedded demo, written in the real layout so `ADE20KC` reads it.

Each image is a label map of a few ADE20K classes (rectangles, ellipses, bands, an ignored
border) rendered with the class colours plus smooth shading and grain, then corrupted with
`imagecorruptions` like the real benchmark.

    python data/demo.py --root PATH

Where it writes: the launcher's `data.build_demo_data` builds only into the demo's own folder
(`DEMO_ROOT`), a folder this builder made before, or an existing empty folder; any other `data.root`
is an error, so a typo in the path creates nothing and real data is never overwritten. Only an
explicit output folder (`--root` here, `create=True`) is made wherever it is asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.classes import ADE20K_PALETTE  # noqa: E402

MARKER = ".demo_complete"
_FORMAT_VERSION = 1  # bump when the rendering changes so old demo folders are rebuilt
# ds_configs/demo.json's data.root; relative, like the demo's other paths, to where the run starts.
DEMO_ROOT = Path("demo_assets/ade20k_c")


def _label_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] of ADE values: a background class, 2-4 shapes of other classes, 0 border."""
    classes = rng.choice(np.arange(1, 151), size=int(rng.integers(3, 6)), replace=False)
    label = np.full((h, w), classes[0], dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for c in classes[1:]:
        kind = rng.integers(3)
        if kind == 0:  # rectangle
            y0, x0 = rng.integers(0, h * 2 // 3), rng.integers(0, w * 2 // 3)
            y1, x1 = y0 + rng.integers(h // 5, h // 2), x0 + rng.integers(w // 5, w // 2)
            mask = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        elif kind == 1:  # ellipse
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:  # slanted band, like a road or a horizon
            slope, offset = rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.8) * h
            width = rng.uniform(0.1, 0.25) * h
            mask = np.abs(yy - (offset + slope * (xx - w / 2))) < width / 2
        label[mask] = c
    label[:2, :] = label[-2:, :] = label[:, :2] = label[:, -2:] = 0  # "other": ignored
    return label


def _render(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3]: palette colour per class (grey for 0), smooth shading, fine grain."""
    h, w = label.shape
    palette = np.array([(128, 128, 128), *ADE20K_PALETTE], dtype=np.float32)
    base = palette[label]
    # Low-frequency field upsampled from a coarse grid: shading that is not flat per region.
    coarse = torch.from_numpy(rng.normal(size=(1, 3, 6, 8)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    smooth = smooth.permute(1, 2, 0).numpy()
    img = base * (1.0 + 0.15 * smooth) + 20.0 * smooth + rng.normal(0.0, 4.0, size=base.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _image_size(rng: np.random.Generator, index: int, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if index == 1:  # the second image is portrait, so both orientations occur
        h, w = w, h
    jitter = rng.integers(-8, 9, size=2)  # slightly different sizes, like the real set
    return int(h + jitter[0]), int(w + jitter[1])


def check_demo_root(root: str | Path) -> None:
    """Raises unless `data.build_demo_data` may build in `root`: the demo's own folder (`DEMO_ROOT`), a
    folder the demo built before (its marker), or an existing empty folder."""
    root = Path(root)
    if root.resolve() == DEMO_ROOT.resolve() or (root / MARKER).is_file():
        return
    if not root.exists():
        raise ValueError(f"data.root {root} does not exist: the demo builds its data only in {DEMO_ROOT}, "
                         f"an empty folder or a folder it built before (fix the path, or create the folder)")
    if not root.is_dir() or any(root.iterdir()):
        raise ValueError(f"data.root {root} is not an empty folder and holds no demo build ({MARKER}): the demo "
                         f"does not write into it (use {DEMO_ROOT}, an empty folder, or data.build_demo_data false)")


def make_demo_dataset(root: str | Path, num_images: int = 4,
                      corruptions: tuple[str, ...] = ("gaussian_noise", "defocus_blur"),
                      severity: int | Sequence[int] = 5, size: tuple[int, int] = (128, 171), seed: int = 0,
                      create: bool = False, sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write the demo dataset under `root` (skipped when a marker with these parameters exists).

    `severity`: one, or several (the gradual protocol's). size is (H, W) before the per-image jitter of up to 8 pixels; `sizes`: each image's exact (H, W) instead
    (a benchmark's mix of shapes; `num_images` is then its length). Deterministic for a seed. Without
    `create`, `root` must pass `check_demo_root`; with it (an output folder the user named), it is made.
    """
    if sizes is not None:
        sizes = [(int(h), int(w)) for h, w in sizes]
        num_images = len(sizes)
    if not create:
        check_demo_root(root)
    # Heavy (scipy, skimage, cv2): imported only when a dataset is actually built.
    from imagecorruptions import corrupt, get_corruption_names

    root = Path(root)
    corruptions = tuple(corruptions)
    unknown = [c for c in corruptions if c not in get_corruption_names("all")]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; known: {get_corruption_names('all')}")
    levels = (severity,) if isinstance(severity, int) else tuple(severity)
    if not levels or not all(1 <= s <= 5 for s in levels):
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if min(min(s) for s in sizes or [size]) < 48:  # imagecorruptions needs >= 32 pixels after the jitter
        raise ValueError(f"image sizes must be at least 48 x 48, got {min(sizes or [size], key=min)}")
    params = {"version": _FORMAT_VERSION, "num_images": num_images, "corruptions": list(corruptions),
              "severity": severity if isinstance(severity, int) else list(levels), "size": list(size), "seed": seed}
    if sizes is not None:
        params["sizes"] = [list(s) for s in sizes]
    marker = root / MARKER
    if _built_before(root, marker, params):
        return root

    label_dir = root / "annotations" / "validation"
    image_dirs = {(c, s): root / "images" / "validation" / f"{c}_{s}" for c in corruptions for s in levels}
    names = [f"ADE_val_{i:08d}" for i in range(1, num_images + 1)]
    for folder in (label_dir, *image_dirs.values()):
        folder.mkdir(parents=True, exist_ok=True)
        # Files of an earlier, larger build would otherwise be read as part of this one.
        for old in folder.glob("ADE_val_*"):
            if old.stem not in names:
                old.unlink()

    global_state = np.random.get_state()  # imagecorruptions draws from numpy's global RNG
    try:
        for i, name in enumerate(names):
            rng = np.random.default_rng([seed, i])  # per image: independent of num_images
            h, w = _image_size(rng, i, size) if sizes is None else sizes[i]
            label = _label_map(rng, h, w)
            clean = _render(rng, label)
            Image.fromarray(label).save(label_dir / f"{name}.png")
            for (c, s), folder in image_dirs.items():
                # Seed from (seed, image, corruption name): independent of the corruption order.
                np.random.seed(np.random.SeedSequence([seed, i, zlib.crc32(c.encode())]).generate_state(1)[0])
                out = np.clip(np.asarray(corrupt(clean, corruption_name=c, severity=s)), 0, 255)
                Image.fromarray(out.astype(np.uint8)).save(folder / f"{name}.jpg", quality=95)
    finally:
        np.random.set_state(global_state)

    _write_marker(marker, params)  # written last
    return root


# ACDC's conditions drawn as corruptions of the clean picture (night: a dark, noisy picture).
_CONDITION_LOOKS = {"fog": "fog", "rain": "motion_blur", "snow": "snow"}
DEMO_CITIES = ("aachen", "bremen")


def _street_label(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] of Cityscapes train ids: sky, buildings, road, a few objects; 255 (ignored) border."""
    label = np.full((h, w), 2, dtype=np.uint8)  # building
    yy, xx = np.mgrid[:h, :w]
    label[yy < rng.uniform(0.2, 0.35) * h] = 10  # sky
    label[yy > rng.uniform(0.6, 0.7) * h] = 0  # road
    for c in rng.choice([5, 8, 11, 13, 18], size=int(rng.integers(2, 4)), replace=False):  # pole, vegetation, ...
        cy, cx = rng.uniform(0.4, 0.8) * h, rng.uniform(0.1, 0.9) * w
        ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.05, 0.15) * w
        label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = c
    label[:2, :] = label[-2:, :] = label[:, :2] = label[:, -2:] = 255
    return label


def make_demo_street(root: str | Path, dataset: str, tasks: Sequence[str], severities: Sequence[int] = (5,),
                     num_images: int = 3, size: tuple[int, int] = (96, 192), seed: int = 0,
                     create: bool = False) -> Path:
    """Synthetic street scenes in the official Cityscapes (`dataset` cityscapes: the clean val set, its
    corruptions `tasks` at `severities`, and gtFine label ids) or ACDC layout (`acdc`: `tasks` are conditions,
    gt in train ids), images spread over two cities or sequences. Same rules as `make_demo_dataset` for where
    it writes; skipped when its marker holds these parameters."""
    if not create:
        check_demo_root(root)
    from imagecorruptions import corrupt  # heavy: only when a dataset is actually built

    from data.cityscapes import TRAIN_ID_OF_LABEL_ID
    if dataset not in ("cityscapes", "acdc"):
        raise ValueError(f"the street demo is for cityscapes or acdc, not {dataset!r}")
    root = Path(root)
    params = {"version": _FORMAT_VERSION, "dataset": dataset, "tasks": list(tasks), "severities": list(severities),
              "num_images": num_images, "size": list(size), "seed": seed}
    marker = root / MARKER
    if _built_before(root, marker, params):
        return root
    label_id = np.zeros(256, dtype=np.uint8)  # train id -> a label id of it (255 -> 0, "unlabeled")
    for lid, tid in TRAIN_ID_OF_LABEL_ID.items():
        label_id[tid] = lid
    palette = np.array([*ADE20K_PALETTE[:19], *[(0, 0, 0)] * 237], dtype=np.uint8)
    global_state = np.random.get_state()
    try:
        for i in range(num_images):
            rng = np.random.default_rng([seed, i])
            group = DEMO_CITIES[i % len(DEMO_CITIES)]
            h, w = size
            label = _street_label(rng, h, w)
            clean = _render(rng, np.zeros_like(label))  # shading and grain, then the classes' colours
            clean = np.clip(clean.astype(np.int16) - 128 + palette[label], 0, 255).astype(np.uint8)
            if dataset == "cityscapes":
                stem = f"{group}_000000_{i:06d}"
                _save(root / "gtFine" / "val" / group / f"{stem}_gtFine_labelIds.png", label_id[label])
                _save(root / "leftImg8bit" / "val" / group / f"{stem}_leftImg8bit.png", clean)
                for c in tasks:
                    for s in severities:
                        np.random.seed(np.random.SeedSequence([seed, i, zlib.crc32(c.encode())]).generate_state(1)[0])
                        out = np.clip(np.asarray(corrupt(clean, corruption_name=c, severity=s)), 0, 255)
                        _save(root / "Cityscapes-C" / c / str(s) / "val" / group / f"{stem}_leftImg8bit.png",
                              out.astype(np.uint8))
            else:
                stem = f"{group}_frame_{i:06d}"
                for c in tasks:
                    np.random.seed(np.random.SeedSequence([seed, i, zlib.crc32(c.encode())]).generate_state(1)[0])
                    if c in _CONDITION_LOOKS:
                        out = np.asarray(corrupt(clean, corruption_name=_CONDITION_LOOKS[c], severity=3))
                    else:  # night, and any other condition: dark and noisy
                        out = clean * 0.3 + np.random.normal(0.0, 6.0, size=clean.shape)
                    _save(root / "rgb_anon" / c / "val" / group / f"{stem}_rgb_anon.png",
                          np.clip(out, 0, 255).astype(np.uint8))
                    _save(root / "gt" / c / "val" / group / f"{stem}_gt_labelTrainIds.png", label)
    finally:
        np.random.set_state(global_state)
    _write_marker(marker, params)
    return root


def make_demo_data(dataset: str, root: str | Path, domains: Sequence[str], severities: Sequence[int]) -> Path:
    """`data.build_demo_data`: the synthetic set of `dataset` with these tasks (corruptions at `severities`, or
    ACDC conditions) at `root`."""
    if dataset == "ade20k":
        levels = sorted(set(severities))
        return make_demo_dataset(root, corruptions=tuple(domains), severity=levels[0] if len(levels) == 1 else levels)
    return make_demo_street(root, dataset, list(domains), sorted(set(severities)) or [5])


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _built_before(root: Path, marker: Path, params: dict) -> bool:
    """Whether `root` holds a finished build with these parameters; else an unfinished marker is written
    first, so that an interrupted build never looks complete later, yet the folder stays recognisably the
    demo's."""
    try:
        if json.loads(marker.read_text()) == params:
            return True
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, {"unfinished": True})
    return False


def _write_marker(marker: Path, content: dict) -> None:
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, marker)  # atomically


def main() -> None:
    from pipeline.run.log import LOG  # the console's logger (the command line's; the library stays quiet)
    parser = argparse.ArgumentParser(description="Build the synthetic ADE20K-C demo dataset.")
    parser.add_argument("--root", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--corruptions", nargs="+", default=["gaussian_noise", "defocus_blur"])
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=[128, 171], metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        if args.num_images < 1:
            raise ValueError(f"--num-images {args.num_images} must be >= 1")
        if Path(args.root).exists() and not Path(args.root).is_dir():
            raise ValueError(f"--root {args.root} is a file, not a folder")
        root = make_demo_dataset(args.root, args.num_images, tuple(args.corruptions), args.severity,
                                 (args.size[0], args.size[1]), args.seed, create=True)
    except (ValueError, OSError) as exc:
        LOG.error(f"error: {' '.join(str(exc).split())}")
        sys.exit(2)
    LOG.info(f"demo dataset ready at {root}")


if __name__ == "__main__":
    main()
