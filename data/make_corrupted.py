"""Build a corrupted benchmark (ADE20K-C, Cityscapes-C) from a validation set under the 15 common
`imagecorruptions` corruptions.

    python data/make_corrupted.py --dataset ade20k --root PATH/ADEChallengeData2016 --out PATH/ade20k_c \
        [--corruptions gaussian_noise fog ...] [--severities 5] [--workers 8] [--format jpg|png]
    python data/make_corrupted.py --dataset cityscapes --root PATH/cityscapes --out PATH/cityscapes \
        [--severities 1 2 3 4 5] ...

(`data/make_ade20k_c.py --ade_root ...` is the same builder.) Writes the layouts the readers read:
    ade20k (`data.ade20k_c.ADE20KC`), from images/validation and annotations/validation:
        <out>/images/validation/<corruption>_<severity>/ADE_val_00000001.jpg
        <out>/annotations/validation/ADE_val_00000001.png   (copied byte for byte)
    cityscapes (`data.cityscapes.CityscapesC`), from leftImg8bit/val/<city> and gtFine/val/<city>:
        <out>/Cityscapes-C/<corruption>/<severity>/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        <out>/gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   (copied byte for byte)
    (--out may be the Cityscapes root itself: the corrupted sets then sit beside leftImg8bit/ and gtFine/.)

Deterministic (numpy is seeded per image, corruption and severity from a stable hash) and
resumable (finished files are skipped; files are written under a temporary name and renamed). The seed and
format are recorded in <out>/.make_ade20k_c.json (.make_cityscapes_c.json): a rerun with others is refused
unless --rebuild is given, which replaces the images it plans (by their exact names) instead of keeping the
old ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.classes import CORRUPTIONS, IMAGE_SUFFIXES, VALIDATION_CORRUPTIONS  # torch-free, for the workers

JPEG_QUALITY = 95
FORMATS: dict[str, str] = {"jpg": "JPEG", "png": "PNG"}
# These two draw from a fresh unseeded generator unless given `seed=`; seeding numpy's global
# RNG alone would leave them random.
_TAKES_SEED = frozenset({"glass_blur", "impulse_noise"})
_MIN_SIDE = 32  # imagecorruptions refuses smaller images
_TMP_SUFFIX = ".tmp"  # not an image suffix: the reader and the skip check never see temp files


class BuildError(ValueError):
    """A user error (bad path or argument): reported as one line, exit code 2."""


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path
    corruption: str
    severity: int
    seed: int


def job_seed(seed: int, name: str, corruption: str, severity: int) -> int:
    """32-bit seed from a stable hash (Python's `hash` of a str is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{name}/{corruption}/{severity}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def fit_size(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3]: crops a larger result top-left (the library's own convention), resizes a smaller one."""
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[:h, :w]
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    assert image.shape == (h, w, 3), f"corrupted image has shape {image.shape}, expected {(h, w, 3)}"
    return image


def corrupt_image(rgb: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] -> the corrupted uint8 [H, W, 3] of the same size; numpy's global RNG is restored."""
    from imagecorruptions import corrupt  # heavy (cv2, skimage, numba): only when used

    h, w = rgb.shape[:2]
    # Tiny images are padded by reflection to the library's minimum and cropped back.
    pad = ((0, max(0, _MIN_SIDE - h)), (0, max(0, _MIN_SIDE - w)), (0, 0))
    src = np.pad(rgb, pad, mode="symmetric") if pad[0][1] or pad[1][1] else rgb
    kwargs = {"seed": seed} if corruption in _TAKES_SEED else {}
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = corrupt(np.ascontiguousarray(src), corruption_name=corruption, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)
    return fit_size(np.asarray(out, dtype=np.uint8), h, w)


RECORD = ".make_ade20k_c.json"  # the seed and format a build of <out> used (ADE20K-C)


@dataclass(frozen=True)
class Source:
    """A validation set in its official layout, and where its corrupted copy goes."""

    dataset: str
    record: str  # the build record's file name in <out>
    default_format: str

    def check_root(self, root: str | Path) -> Path:
        return check_ade_root(root) if self.dataset == "ade20k" else check_cityscapes_root(root)

    def pairs(self, root: Path) -> list[tuple[Path, Path, Path]]:
        """(source image, source annotation, annotation target relative to <out>), images sorted."""
        if self.dataset == "ade20k":
            image_dir = root / "images" / "validation"
            images = sorted((p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                            key=lambda p: p.name)
            if not images:
                raise BuildError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {image_dir}")
            labels = root / "annotations" / "validation"
            return [(p, labels / f"{p.stem}.png", Path("annotations", "validation", f"{p.stem}.png")) for p in images]
        image_dir, label_dir = root / "leftImg8bit" / "val", root / "gtFine" / "val"
        found = []
        for city in sorted(p for p in image_dir.iterdir() if p.is_dir()):
            if not (label_dir / city.name).is_dir():
                raise BuildError(f"city {city.name}: no annotation folder {label_dir / city.name}")
            for p in sorted(q for q in city.iterdir() if q.is_file() and q.stem.endswith("_leftImg8bit")
                            and q.suffix.lower() in IMAGE_SUFFIXES):
                name = f"{p.stem.removesuffix('_leftImg8bit')}_gtFine_labelIds.png"
                found.append((p, label_dir / city.name / name, Path("gtFine", "val", city.name, name)))
        if not found:
            raise BuildError(f"no *_leftImg8bit images in the city folders of {image_dir}")
        return found

    def image_target(self, out: Path, image: Path, corruption: str, severity: int, fmt: str) -> Path:
        if self.dataset == "ade20k":
            return out / "images" / "validation" / f"{corruption}_{severity}" / f"{image.stem}.{fmt}"
        return out / "Cityscapes-C" / corruption / str(severity) / "val" / image.parent.name / f"{image.stem}.{fmt}"


SOURCES = {"ade20k": Source("ade20k", RECORD, "jpg"), "cityscapes": Source("cityscapes", ".make_cityscapes_c.json", "png")}


def check_cityscapes_root(root: str | Path) -> Path:
    """The Cityscapes root that holds leftImg8bit/val and gtFine/val, or a BuildError that suggests the path."""
    root = Path(root)
    if (root / "leftImg8bit" / "val").is_dir() and (root / "gtFine" / "val").is_dir():
        return root
    hint = ""
    if root.is_dir():
        inner = sorted(p for p in root.iterdir() if (p / "leftImg8bit" / "val").is_dir())
        if inner:
            hint = f"; did you mean --root {inner[0]}?"
        elif root.name in ("leftImg8bit", "gtFine"):
            hint = f"; did you mean --root {root.parent}?"
    raise BuildError(f"--root {root}: expected the Cityscapes folder with leftImg8bit/val/<city>/ and "
                     f"gtFine/val/<city>/ under it{hint}")


def check_sources(images: list[Path], labels: list[Path]) -> None:
    """Every source image and annotation opens and has pixels (headers only): a damaged or empty file is named
    before any work, not by a traceback in a worker."""
    for path, what in [*((p, "image") for p in images), *((p, "annotation") for p in labels)]:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as exc:  # PIL raises several types for a file that is not an image
            raise BuildError(f"cannot read source {what} {path} ({' '.join(f'{type(exc).__name__}: {exc}'.split())})"
                             f": replace it from the ADE20K download") from None
        if not (w and h):
            raise BuildError(f"source {what} {path} has no pixels ({w}x{h}): replace it from the ADE20K download")


def check_record(out: Path, seed: int, fmt: str, rebuild: bool, record: str = RECORD) -> dict | None:
    """The seed and format <out> was built with (None: a fresh folder); a rerun with others needs --rebuild."""
    path = out / record
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        before = (record["seed"], record["format"])
    except (OSError, ValueError, KeyError, TypeError):
        raise BuildError(f"{path} is damaged: delete it and pass --rebuild to build {out} again") from None
    if before != (seed, fmt) and not rebuild:
        raise BuildError(f"{out} was built with --seed {before[0]} --format {before[1]}, not --seed {seed} --format "
                         f"{fmt}: pass --rebuild to replace its images, or use another --out")
    return record


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename: an interrupted write leaves only a temp file, never a short output."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_done(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def run_job(job: Job) -> None:
    """Corrupt one image at one severity and save it (format from the target's suffix)."""
    try:
        with Image.open(job.source) as im:
            # No EXIF transpose: the annotations match the pixels as stored.
            rgb = np.asarray(im.convert("RGB"))
    except Exception as err:  # a file that changed since the plan checked its header
        raise RuntimeError(f"cannot decode source image {job.source}: {type(err).__name__}: {err}") from None
    try:
        out = corrupt_image(rgb, job.corruption, job.severity, job.seed)
    except Exception as err:  # name the file: a bare library error says nothing about which one
        raise RuntimeError(f"{job.corruption} severity {job.severity} failed on {job.source}: {err}") from err
    fmt = FORMATS[job.target.suffix[1:]]
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    _write_atomic(job.target, lambda tmp: Image.fromarray(out).save(tmp, format=fmt, **options))


def check_ade_root(ade_root: str | Path) -> Path:
    """The root that holds images/validation, or a BuildError that suggests the right path."""
    root = Path(ade_root)
    if (root / "images" / "validation").is_dir():
        return root
    hint = ""
    if root.name == "validation" and root.parent.name == "images":
        hint = f"; did you mean --ade_root {root.parent.parent}?"
    elif (root / "validation").is_dir():
        hint = f"; did you mean --ade_root {root.parent}?"
    elif root.is_dir():
        inner = sorted(p for p in root.iterdir() if (p / "images" / "validation").is_dir())
        if inner:
            hint = f"; did you mean --ade_root {inner[0]}?"
    raise BuildError(f"--ade_root {root}: expected the ADEChallengeData2016 folder with "
                  f"images/validation/ and annotations/validation/ under it{hint}")


def check_arguments(corruptions: list[str], severities: list[int], fmt: str) -> None:
    unknown = [c for c in corruptions if c not in CORRUPTIONS + VALIDATION_CORRUPTIONS]
    if unknown:
        raise BuildError(f"unknown corruption {', '.join(unknown)}; valid: {' '.join(CORRUPTIONS)} (and, held out "
                         f"for tuning: {' '.join(VALIDATION_CORRUPTIONS)})")
    bad = [s for s in severities if not 1 <= s <= 5]
    if bad:
        raise BuildError(f"severity must be in 1..5, got {', '.join(map(str, bad))}")
    if len(set(corruptions)) != len(corruptions) or len(set(severities)) != len(severities):
        raise BuildError("name each corruption and severity once")
    if fmt not in FORMATS:
        raise BuildError(f"format must be one of {', '.join(FORMATS)}, got {fmt}")


def plan(ade_root: str | Path, out: str | Path, corruptions: list[str], severities: list[int],
         fmt: str = "jpg", seed: int = 0, dataset: str = "ade20k") -> tuple[list[Job], list[tuple[Path, Path]]]:
    """All (image, corruption, severity) jobs and (source, target) annotation copies; checks the inputs.
    `ade_root`: the source set's root (`--root`)."""
    source = SOURCES[dataset]
    check_arguments(corruptions, severities, fmt)
    root = source.check_root(ade_root)
    out = Path(out)
    if out.resolve() == root.resolve() and dataset == "ade20k":
        raise BuildError(f"--out must differ from --ade_root ({root})")
    pairs = source.pairs(root)
    images = [p for p, _, _ in pairs]
    labels = [(src, out / target) for _, src, target in pairs]
    missing = [src for src, _ in labels if not src.is_file()]
    if missing:  # checked before any work: the reader would refuse the output later anyway
        raise BuildError(f"{len(missing)} of {len(images)} images have no annotation, e.g. {missing[0]}")
    stems = [p.stem for p in images]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise BuildError(f"{images[0].parent} holds two images named {twice[0]} (one annotation each): keep one")
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a folder")
    check_sources(images, [src for src, _ in labels])
    jobs = [Job(p, source.image_target(out, p, c, s, fmt), c, s, job_seed(seed, p.stem, c, s))
            for c in corruptions for s in severities for p in images]
    return jobs, labels


def build(ade_root: str | Path, out: str | Path, corruptions: list[str] | tuple[str, ...] = CORRUPTIONS,
          severities: list[int] | tuple[int, ...] = (5,), workers: int = 0, fmt: str | None = None,
          seed: int = 0, progress: bool = True, rebuild: bool = False, dataset: str = "ade20k") -> tuple[int, int]:
    """Write the corrupted set of `dataset` (ade20k, cityscapes) from the validation set at `ade_root` under
    `out`; returns (written, skipped) counts of corrupted images. `fmt` None: the dataset's (jpg for ADE20K-C,
    png for Cityscapes-C, as the authors' sets).

    workers 0 or 1 runs in this process. Raises BuildError for bad inputs, and for a rerun with another seed
    or format unless `rebuild`, which first removes the planned images in any format (their exact names).
    """
    if dataset not in SOURCES:
        raise BuildError(f"--dataset {dataset!r}: the builder makes {' or '.join(SOURCES)} corrupted sets")
    fmt = SOURCES[dataset].default_format if fmt is None else fmt
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise BuildError(f"--workers must be a count >= 0, got {workers}")
    jobs, labels = plan(ade_root, out, list(corruptions), list(severities), fmt, seed, dataset)
    out = Path(out)
    record_name = SOURCES[dataset].record
    record = check_record(out, seed, fmt, rebuild, record_name)
    formats = {j.target.parent: set() for j in jobs}
    for folder in formats:  # another format beside the planned one would score an annotation twice
        if folder.is_dir():
            formats[folder] = {p.suffix[1:] for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    mixed = sorted(str(f) for f, found in formats.items() if found - {fmt})
    if mixed and not rebuild:
        raise BuildError(f"{mixed[0]} holds images of another format than --format {fmt}: pass --rebuild to "
                         f"replace them, or use another --out")
    if rebuild:
        for job in jobs:
            for suffix in IMAGE_SUFFIXES:
                job.target.with_suffix(suffix).unlink(missing_ok=True)
    if record != {"seed": seed, "format": fmt}:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / record_name, lambda tmp: tmp.write_text(json.dumps({"seed": seed, "format": fmt}) + "\n"))
    for folder in {j.target.parent for j in jobs} | {dst.parent for _, dst in labels}:
        folder.mkdir(parents=True, exist_ok=True)
        # Temp files of a killed run are never read, but would pile up.
        for stale in folder.glob(f".*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
    for src, dst in labels:
        if not _is_done(dst) and src.resolve() != dst.resolve():  # --out the Cityscapes root: gtFine is there
            _write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))

    todo = [j for j in jobs if not _is_done(j.target)]
    skipped = len(jobs) - len(todo)
    with tqdm(total=len(jobs), initial=skipped, unit="img", disable=not progress) as bar:
        if workers <= 1:
            for job in todo:
                run_job(job)
                bar.update()
        else:
            pool = ProcessPoolExecutor(max_workers=workers)
            try:
                for _ in pool.map(run_job, todo, chunksize=4):
                    bar.update()
            finally:
                # On an error, drop the queued jobs instead of finishing them all first.
                pool.shutdown(wait=True, cancel_futures=True)
    return len(todo), skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build ADE20K-C (from ADEChallengeData2016) or Cityscapes-C (from Cityscapes val) with "
                    "the 15 common corruptions of imagecorruptions. Reruns skip finished files.")
    parser.add_argument("--dataset", default="ade20k", choices=list(SOURCES), help="the source set (default ade20k)")
    parser.add_argument("--root", "--ade_root", dest="root", required=True,
                        help="the source set: ADEChallengeData2016 (holds images/validation and "
                             "annotations/validation) or the Cityscapes root (leftImg8bit/val, gtFine/val)")
    parser.add_argument("--out", required=True, help="output folder (the dataset's corrupted layout)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), metavar="NAME",
                        help="corruptions to build (default: all 15): " + " ".join(CORRUPTIONS)
                        + "; held out for tuning: " + " ".join(VALIDATION_CORRUPTIONS))
    parser.add_argument("--severities", nargs="+", type=int, default=[5], metavar="S",
                        help="severities in 1..5 (default: 5)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes; 0 or 1 runs in process (default: CPU count)")
    parser.add_argument("--format", default=None, choices=list(FORMATS),
                        help="jpg (JPEG quality %d) or png (lossless); default jpg for ade20k, png for "
                             "cityscapes" % JPEG_QUALITY)
    parser.add_argument("--seed", type=int, default=0, help="base seed of the corruption noise")
    parser.add_argument("--rebuild", action="store_true",
                        help="replace the images of an earlier build made with another --seed or --format")
    args = parser.parse_args(argv)
    try:
        written, skipped = build(args.root, args.out, args.corruptions, args.severities,
                                 args.workers, args.format, args.seed, rebuild=args.rebuild, dataset=args.dataset)
    except (BuildError, OSError, RuntimeError) as err:  # RuntimeError: a job's failure, naming its file
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(err).split())}\n")
    title = "ADE20K-C" if args.dataset == "ade20k" else "Cityscapes-C"
    from pipeline.run.log import LOG  # the console's logger (the command line's; the library stays quiet)
    LOG.info(f"written {written}, skipped {skipped} corrupted images; {title} at {Path(args.out)}")


if __name__ == "__main__":
    main()
