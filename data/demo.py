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
                      severity: int = 5, size: tuple[int, int] = (128, 171), seed: int = 0,
                      create: bool = False, sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write the demo dataset under `root` (skipped when a marker with these parameters exists).

    size is (H, W) before the per-image jitter of up to 8 pixels; `sizes`: each image's exact (H, W) instead
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
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if min(min(s) for s in sizes or [size]) < 48:  # imagecorruptions needs >= 32 pixels after the jitter
        raise ValueError(f"image sizes must be at least 48 x 48, got {min(sizes or [size], key=min)}")
    params = {"version": _FORMAT_VERSION, "num_images": num_images, "corruptions": list(corruptions),
              "severity": severity, "size": list(size), "seed": seed}
    if sizes is not None:
        params["sizes"] = [list(s) for s in sizes]
    marker = root / MARKER
    try:
        if json.loads(marker.read_text()) == params:
            return root
    except (OSError, ValueError):
        pass
    # An unfinished marker first: an interrupted build must not look complete later, yet the folder
    # stays recognisably the demo's.
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, {"unfinished": True})

    label_dir = root / "annotations" / "validation"
    image_dirs = {c: root / "images" / "validation" / f"{c}_{severity}" for c in corruptions}
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
            for c, folder in image_dirs.items():
                # Seed from (seed, image, corruption name): independent of the corruption order.
                np.random.seed(np.random.SeedSequence([seed, i, zlib.crc32(c.encode())]).generate_state(1)[0])
                out = np.clip(np.asarray(corrupt(clean, corruption_name=c, severity=severity)), 0, 255)
                Image.fromarray(out.astype(np.uint8)).save(folder / f"{name}.jpg", quality=95)
    finally:
        np.random.set_state(global_state)

    _write_marker(marker, params)  # written last
    return root


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
