import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.ade20k_c import ADE20KC, CORRUPTIONS
from data.classes import ADE20K_CLASSES, ADE20K_PALETTE
from data.demo import DEMO_ROOT, MARKER, check_demo_root, make_demo_dataset

DEMO_CORRUPTIONS = ("gaussian_noise", "defocus_blur")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_images=4, corruptions=DEMO_CORRUPTIONS)


def files_of(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_classes_and_palette():
    assert len(ADE20K_CLASSES) == 150 and len(ADE20K_PALETTE) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")
    assert len(set(ADE20K_PALETTE)) == 150
    assert all(0 <= v <= 255 for rgb in ADE20K_PALETTE for v in rgb)
    assert len(CORRUPTIONS) == 15 and CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"


@pytest.mark.parametrize("corruption", DEMO_CORRUPTIONS)
def test_reader_on_demo(demo, corruption):
    ds = ADE20KC(demo, corruption, severity=5)
    assert len(ds) == 4
    assert ds.names == [f"ADE_val_{i:08d}" for i in range(1, 5)]
    orientations = set()
    for i in range(len(ds)):
        item = ds[i]
        image, label = item["image"], item["label"]
        assert item["name"] == ds.names[i]
        assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert float(image.std()) > 0.02  # not a flat picture
        assert label.dtype == torch.long and label.shape == image.shape[1:]
        values = set(label.unique().tolist())
        assert values <= set(range(150)) | {255}
        assert 255 in values and len(values - {255}) >= 3  # ignored border and a few classes
        assert ds.image_size(i) == tuple(image.shape[1:])
        orientations.add(image.shape[1] > image.shape[2])
    assert orientations == {True, False}  # portrait and landscape both occur
    assert len(ADE20KC(demo, corruption, limit=2)) == 2


def test_demo_is_deterministic(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_images=2, corruptions=DEMO_CORRUPTIONS, seed=3, create=True)
    b = make_demo_dataset(tmp_path / "b", num_images=2, corruptions=DEMO_CORRUPTIONS, seed=3, create=True)
    assert files_of(a) == files_of(b) and len(files_of(a)) == 1 + 2 + 2 * 2
    for rel in files_of(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = make_demo_dataset(tmp_path / "c", num_images=2, corruptions=DEMO_CORRUPTIONS, seed=4, create=True)
    rel = Path("annotations/validation/ADE_val_00000001.png")
    assert not np.array_equal(np.asarray(Image.open(a / rel)), np.asarray(Image.open(c / rel)))


def test_demo_is_idempotent_and_rebuilds_on_new_parameters(tmp_path):
    root = make_demo_dataset(tmp_path, num_images=3, corruptions=("gaussian_noise",))
    mtimes = {p: (root / p).stat().st_mtime_ns for p in files_of(root)}
    make_demo_dataset(tmp_path, num_images=3, corruptions=("gaussian_noise",))
    assert {p: (root / p).stat().st_mtime_ns for p in files_of(root)} == mtimes
    # Fewer images: the stale third image must go, or the reader would list it.
    make_demo_dataset(tmp_path, num_images=2, corruptions=("gaussian_noise",))
    assert len(ADE20KC(root, "gaussian_noise")) == 2
    # An interrupted build (its marker says unfinished) is redone.
    (root / MARKER).write_text('{"unfinished": true}')
    label = root / "annotations/validation/ADE_val_00000001.png"
    label.unlink()
    make_demo_dataset(tmp_path, num_images=2, corruptions=("gaussian_noise",))
    assert label.is_file()


def test_the_launchers_demo_build_writes_only_into_a_demo_folder(tmp_path, monkeypatch):
    typo = tmp_path / "ade20k-typo"
    with pytest.raises(ValueError, match=f"data.root {typo} does not exist"):
        make_demo_dataset(typo, num_images=1)
    assert not typo.exists()  # nothing made at a mistyped path
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="not an empty folder and holds no demo build"):
        make_demo_dataset(real, num_images=1)
    assert files_of(real) == []
    check_demo_root(tmp_path / "real" / "images")  # an empty folder the user made
    monkeypatch.chdir(tmp_path)  # the demo's own folder, relative to where the run starts
    make_demo_dataset(DEMO_ROOT, num_images=1, corruptions=("gaussian_noise",))
    check_demo_root(tmp_path / DEMO_ROOT)
    assert len(ADE20KC(tmp_path / DEMO_ROOT, "gaussian_noise")) == 1
    # The rule's default folder is the demo config's.
    config = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "demo.json").read_text())
    assert Path(config["data"]["root"]) == DEMO_ROOT


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ADE20KC(tmp_path / "nope", "gaussian_noise")


def test_unknown_corruption_lists_existing(demo):
    with pytest.raises(FileNotFoundError, match="fog_5") as err:
        ADE20KC(demo, "fog")
    assert "defocus_blur_5" in str(err.value) and "gaussian_noise_5" in str(err.value)


def test_empty_folder(tmp_path):
    (tmp_path / "images/validation/fog_5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no .* images"):
        ADE20KC(tmp_path, "fog")


def test_missing_annotation(demo, tmp_path):
    root = shutil.copytree(demo, tmp_path / "copy")
    (root / "annotations/validation/ADE_val_00000003.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000003"):
        ADE20KC(root, "gaussian_noise")
    assert len(ADE20KC(root, "gaussian_noise", limit=2)) == 2  # only the kept images are checked


def test_size_mismatch(demo, tmp_path):
    root = shutil.copytree(demo, tmp_path / "copy")
    Image.fromarray(np.ones((10, 20), np.uint8)).save(root / "annotations/validation/ADE_val_00000002.png")
    ds = ADE20KC(root, "gaussian_noise")
    h, w = ds.image_size(1)
    with pytest.raises(ValueError, match=rf"ADE_val_00000002\.png is 10x20 .* is {h}x{w}"):
        ds[1]


def test_grayscale_rgba_png_images(tmp_path):
    image_dir = tmp_path / "images/validation/contrast_3"
    label_dir = tmp_path / "annotations/validation"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    gray = np.full((6, 8), 51, np.uint8)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10  # red; alpha is dropped, not blended
    Image.fromarray(gray, "L").save(image_dir / "a.png")
    Image.fromarray(rgba, "RGBA").save(image_dir / "b.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(image_dir / "c.jpeg")
    (image_dir / "notes.txt").write_text("not an image")  # ignored by suffix
    for name in "abc":
        Image.fromarray(np.full((6, 8), 13, np.uint8)).save(label_dir / f"{name}.png")
    ds = ADE20KC(tmp_path, "contrast", severity=3)
    assert ds.names == ["a", "b", "c"]
    a, b = ds[0]["image"], ds[1]["image"]
    assert a.shape == b.shape == (3, 6, 8)
    assert torch.allclose(a, torch.full_like(a, 51 / 255))
    assert b[0].eq(1.0).all() and b[1:].eq(0.0).all()
    assert ds[2]["label"].eq(12).all()
