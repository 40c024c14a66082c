import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.make_ade20k_c as mk
from data.ade20k_c import ADE20KC
from data.ade20k_c import CORRUPTIONS as READER_CORRUPTIONS
from data.make_ade20k_c import BuildError, build, corrupt_image, fit_size, job_seed, main

CORRS = ["gaussian_noise", "zoom_blur", "glass_blur"]  # noise keeps size trivially; the blurs do not
SEVS = [2, 5]
# name -> (H, W, PIL mode, suffix): small, non-square, both orientations, odd modes.
SOURCES = {
    "ADE_val_00000001": (48, 64, "RGB", ".jpg"),
    "ADE_val_00000002": (64, 40, "L", ".jpg"),
    "ADE_val_00000003": (40, 56, "RGBA", ".png"),
    "ADE_val_00000004": (36, 50, "P", ".png"),
}


def make_ade(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "images/validation").mkdir(parents=True)
    (root / "annotations/validation").mkdir(parents=True)
    for name, (h, w, mode, suffix) in SOURCES.items():
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        im = rgb.quantize(16) if mode == "P" else rgb.convert(mode)
        im.save(root / "images/validation" / f"{name}{suffix}")
        Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(
            root / "annotations/validation" / f"{name}.png")
    return root


def files_of(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def source_rgb(ade: Path, name: str) -> np.ndarray:
    suffix = SOURCES[name][3]
    with Image.open(ade / "images/validation" / f"{name}{suffix}") as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_ade(tmp_path_factory.mktemp("ADEChallengeData2016"))


@pytest.fixture(scope="module")
def built(ade, tmp_path_factory) -> tuple[Path, tuple[int, int]]:
    out = tmp_path_factory.mktemp("ade20k_c")
    return out, build(ade, out, CORRS, SEVS, workers=0, progress=False)


def test_corruption_names_match_reader_and_library():
    from imagecorruptions import get_corruption_names

    assert mk.CORRUPTIONS == READER_CORRUPTIONS == tuple(get_corruption_names("common"))


def test_layout_sizes_and_annotations(ade, built):
    out, counts = built
    assert counts == (len(SOURCES) * len(CORRS) * len(SEVS), 0) == (24, 0)
    expected = [Path("annotations/validation") / f"{n}.png" for n in SOURCES]
    expected += [Path("images/validation") / f"{c}_{s}" / f"{n}.jpg" for c in CORRS for s in SEVS for n in SOURCES]
    expected.append(Path(mk.RECORD))  # the seed and format of the build
    assert files_of(out) == sorted(expected)  # no temp files left behind either
    for name, (h, w, _, _) in SOURCES.items():
        label = f"annotations/validation/{name}.png"
        assert (out / label).read_bytes() == (ade / label).read_bytes()
        clean = source_rgb(ade, name).astype(np.float32)
        for c in CORRS:
            for s in SEVS:
                with Image.open(out / "images/validation" / f"{c}_{s}" / f"{name}.jpg") as im:
                    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (w, h))
                    diff = np.abs(np.asarray(im, np.float32) - clean).mean()
                assert diff > 5.0, (c, s, name)  # really corrupted, not a copy


def test_reader_reads_the_build(ade, built):
    out, _ = built
    for c in CORRS:
        ds = ADE20KC(out, c, severity=5)
        assert ds.layout == "flat" and len(ds) == 4 and ds.names == list(SOURCES)
        for i, (name, (h, w, _, _)) in enumerate(SOURCES.items()):
            item = ds[i]
            assert item["image"].shape == (3, h, w) and ds.image_size(i) == (h, w)
            raw = np.asarray(Image.open(ade / "annotations/validation" / f"{name}.png")).astype(np.int64)
            assert np.array_equal(item["label"].numpy(), np.where(raw == 0, 255, raw - 1))


def test_rerun_writes_nothing(ade, built):
    out, _ = built
    mtimes = {p: (out / p).stat().st_mtime_ns for p in files_of(out)}
    assert build(ade, out, CORRS, SEVS, workers=0, progress=False) == (0, 24)
    assert {p: (out / p).stat().st_mtime_ns for p in files_of(out)} == mtimes


def test_deterministic_across_folders_and_workers(ade, built, tmp_path):
    out, _ = built
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    other = tmp_path / "other"
    assert build(ade, other, CORRS, SEVS, workers=2, progress=False) == (24, 0)
    assert np.random.rand() == expected_next  # the caller's global RNG is left alone
    assert files_of(other) == files_of(out)
    for rel in files_of(out):
        assert (other / rel).read_bytes() == (out / rel).read_bytes(), rel
    # Another seed gives other noise.
    reseeded = tmp_path / "seed1"
    build(ade, reseeded, ["gaussian_noise"], [5], seed=1, progress=False)
    rel = Path("images/validation/gaussian_noise_5/ADE_val_00000001.jpg")
    assert (reseeded / rel).read_bytes() != (out / rel).read_bytes()


def test_job_seed_is_stable():
    seeds = {job_seed(a, n, c, s) for a in (0, 1) for n in ("x", "y") for c in ("fog", "snow") for s in (1, 5)}
    assert len(seeds) == 16 and all(0 <= v < 2**32 for v in seeds)
    # Defined by sha256, not Python's per-process salted `hash`.
    assert job_seed(0, "x", "fog", 5) == int.from_bytes(hashlib.sha256(b"0/x/fog/5").digest()[:4], "little")


def test_png_format_is_lossless(ade, tmp_path):
    assert build(ade, tmp_path, ["glass_blur"], [3], fmt="png", progress=False) == (4, 0)
    for name in SOURCES:
        with Image.open(tmp_path / "images/validation/glass_blur_3" / f"{name}.png") as im:
            assert im.format == "PNG"
            saved = np.asarray(im)
        expected = corrupt_image(source_rgb(ade, name), "glass_blur", 3, job_seed(0, name, "glass_blur", 3))
        assert np.array_equal(saved, expected)
    assert len(ADE20KC(tmp_path, "glass_blur", severity=3)) == 4


def test_interrupted_write_is_not_a_finished_output(ade, tmp_path, monkeypatch):
    target = tmp_path / "images/validation/gaussian_noise_5/ADE_val_00000002.jpg"
    real_save = Image.Image.save

    def dying_save(self, fp, *args, **kwargs):  # half a file, then the process "dies"
        Path(fp).write_bytes(b"\xff\xd8\xff partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build(ade, tmp_path, ["gaussian_noise"], [5], progress=False)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert not target.parent.joinpath("ADE_val_00000001.jpg").exists()
    assert [p.name for p in target.parent.iterdir()] == []  # the temp file was removed too
    # A temp file left by a killed process (no cleanup ran) is neither read nor taken as done.
    stale = target.with_name(f".{target.name}.99999.tmp")
    stale.write_bytes(b"\xff\xd8\xff partial")
    with pytest.raises(FileNotFoundError, match="no .* images"):
        ADE20KC(tmp_path, "gaussian_noise")
    assert build(ade, tmp_path, ["gaussian_noise"], [5], progress=False) == (4, 0)
    assert not stale.exists() and Image.open(target).size == (40, 64)


def test_fit_size():
    big = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    assert np.array_equal(fit_size(big, 4, 6), big[:4, :6])  # larger: cropped top-left
    small = np.full((3, 4, 3), 200, np.uint8)
    assert np.array_equal(fit_size(small, 6, 9), np.full((6, 9, 3), 200, np.uint8))  # smaller: resized
    gray = np.full((4, 6), 7, np.uint8)
    assert np.array_equal(fit_size(gray, 4, 6), np.full((4, 6, 3), 7, np.uint8))


@pytest.mark.parametrize("corruption", ["zoom_blur", "frost", "elastic_transform", "pixelate"])
@pytest.mark.parametrize("size", [(33, 97), (20, 45)])  # odd non-square; below the library's 32 minimum
def test_corrupt_image_keeps_odd_sizes(corruption, size):
    rgb = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = corrupt_image(rgb, corruption, 5, seed=7)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    assert np.array_equal(out, corrupt_image(rgb, corruption, 5, seed=7))
    assert np.abs(out.astype(np.int16) - rgb).mean() > 1.0


def run_main(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback, no usage block
    return err


def test_main_errors(ade, tmp_path, capsys):
    out = str(tmp_path / "out")
    parent = tmp_path / "parent"
    shutil.copytree(ade, parent / "ADEChallengeData2016")
    err = run_main(capsys, ["--ade_root", str(parent), "--out", out])
    assert "expected the ADEChallengeData2016 folder" in err
    assert f"did you mean --ade_root {parent / 'ADEChallengeData2016'}?" in err
    err = run_main(capsys, ["--ade_root", str(ade / "images/validation"), "--out", out])
    assert f"did you mean --ade_root {ade}?" in err
    err = run_main(capsys, ["--ade_root", str(ade / "images"), "--out", out])
    assert f"did you mean --ade_root {ade}?" in err
    err = run_main(capsys, ["--ade_root", str(tmp_path / "nope"), "--out", out])
    assert "expected the ADEChallengeData2016 folder" in err and "did you mean" not in err

    err = run_main(capsys, ["--ade_root", str(ade), "--out", out, "--corruptions", "fog", "gausian_noise"])
    assert "unknown corruption gausian_noise; valid: gaussian_noise shot_noise" in err and "jpeg_compression" in err
    for bad in ("0", "6"):
        err = run_main(capsys, ["--ade_root", str(ade), "--out", out, "--severities", "3", bad])
        assert f"severity must be in 1..5, got {bad}" in err
    empty = tmp_path / "empty"
    (empty / "images/validation").mkdir(parents=True)
    err = run_main(capsys, ["--ade_root", str(empty), "--out", out])
    assert "no .jpg/.jpeg/.png images in" in err
    assert not Path(out).exists()  # nothing written on a bad call

    # A missing annotation is found before any work.
    (parent / "ADEChallengeData2016/annotations/validation/ADE_val_00000003.png").unlink()
    with pytest.raises(BuildError, match="1 of 4 images have no annotation, e.g. .*ADE_val_00000003.png"):
        build(parent / "ADEChallengeData2016", out, ["fog"], [5], progress=False)


def test_main_builds_and_reports(ade, tmp_path, capsys):
    out = tmp_path / "c"
    main(["--ade_root", str(ade), "--out", str(out), "--corruptions", "contrast", "--workers", "0"])
    assert capsys.readouterr().out.strip() == f"written 4, skipped 0 corrupted images; ADE20K-C at {out}"
    main(["--ade_root", str(ade), "--out", str(out), "--corruptions", "contrast", "--workers", "1"])
    assert capsys.readouterr().out.strip() == f"written 0, skipped 4 corrupted images; ADE20K-C at {out}"


# --- reader: layout (b) <root>/<corruption>/<severity>/*.jpg with annotations beside ---

def make_nested(root: Path, label_dir: str) -> Path:
    rng = np.random.default_rng(2)
    for corruption, severity, suffix in (("fog", 5, ".jpg"), ("fog", 3, ".png"), ("snow", 5, ".jpg")):
        folder = root / corruption / str(severity)
        folder.mkdir(parents=True)
        for i, (h, w) in enumerate([(6, 8), (8, 5)], start=1):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"ADE_val_{i:08d}{suffix}")
    (root / label_dir).mkdir(parents=True)
    for i, (h, w) in enumerate([(6, 8), (8, 5)], start=1):
        Image.fromarray(np.full((h, w), 10 * i, np.uint8)).save(root / label_dir / f"ADE_val_{i:08d}.png")
    return root


@pytest.mark.parametrize("label_dir", ["annotations", "annotations/validation"])
def test_reader_nested_layout(tmp_path, label_dir):
    root = make_nested(tmp_path, label_dir)
    ds = ADE20KC(root, "fog", severity=5)
    assert ds.layout == "nested" and ds.label_dir == root / label_dir and ds.image_dir == root / "fog/5"
    assert len(ds) == 2 and ds.names == ["ADE_val_00000001", "ADE_val_00000002"]
    assert ds[0]["image"].shape == (3, 6, 8) and ds[1]["image"].shape == (3, 8, 5)
    assert ds[0]["label"].eq(9).all() and ds[1]["label"].eq(19).all()
    png = ADE20KC(root, "fog", severity=3, limit=1)
    assert len(png) == 1 and png.image_size(0) == (6, 8)


def test_reader_nested_prefers_annotations_validation(tmp_path):
    root = make_nested(tmp_path, "annotations/validation")
    # A stray flat file with wrong values must not be read when annotations/validation exists.
    Image.fromarray(np.full((6, 8), 99, np.uint8)).save(root / "annotations/ADE_val_00000001.png")
    assert ADE20KC(root, "snow")[0]["label"].eq(9).all()  # 10 from annotations/validation, not 99


def test_reader_nested_missing_corruption_lists_available(tmp_path):
    root = make_nested(tmp_path, "annotations")
    with pytest.raises(FileNotFoundError, match="fog/1") as err:
        ADE20KC(root, "fog", severity=1)
    assert "corruptions under" in str(err.value) and "fog/3, fog/5, snow/5" in str(err.value)
    with pytest.raises(FileNotFoundError, match="fog/3, fog/5, snow/5"):
        ADE20KC(root, "frost")
    shutil.rmtree(root / "annotations")
    with pytest.raises(FileNotFoundError, match="no annotation folder"):
        ADE20KC(root, "fog")


# --- reader: the reference's layout <root>/ADE20K_val-c/<corruption>/<severity>/validation/*.jpg ---

def test_reader_reference_layout(tmp_path):
    nested = make_nested(tmp_path / "nested", "annotations/validation")
    root = tmp_path / "reference"
    for corruption, severity in (("fog", 5), ("fog", 3), ("snow", 5)):
        shutil.copytree(nested / corruption / str(severity),
                        root / "ADE20K_val-c" / corruption / str(severity) / "validation")
    shutil.copytree(nested / "annotations", root / "annotations")
    ds = ADE20KC(root, "fog", severity=5)
    assert ds.layout == "reference" and ds.image_dir == root / "ADE20K_val-c/fog/5/validation"
    same = ADE20KC(nested, "fog", severity=5)
    assert ds.names == same.names
    for i in range(len(ds)):
        assert torch.equal(ds[i]["image"], same[i]["image"]) and torch.equal(ds[i]["label"], same[i]["label"])
    with pytest.raises(FileNotFoundError, match="fog/3, fog/5, snow/5"):
        ADE20KC(root, "frost")
    shutil.rmtree(root / "annotations")
    with pytest.raises(FileNotFoundError, match="no annotation folder"):
        ADE20KC(root, "fog")
