"""ADE20KC on damaged files (one-line ValueError naming the file and the fix) and unusual valid ones."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.ade20k_c import ADE20KC, _image_tensor

H, W = 48, 64  # large enough that half of a file cuts into the pixel data, not the header


def make_set(root: Path) -> tuple[Path, Path]:
    """Two valid items a, b under the flat layout; returns (image folder, annotation folder)."""
    image_dir, label_dir = root / "images/validation/fog_5", root / "annotations/validation"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in "ab":
        # Noise does not compress, so the pixel data is most of each file.
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image_dir / f"{name}.jpg", quality=95)
        Image.fromarray(rng.integers(0, 151, (H, W), dtype=np.uint8)).save(label_dir / f"{name}.png")
    return image_dir, label_dir


def error_of(call, path: Path) -> str:
    """The message of the ValueError `call` raises; checks it is one line and names `path`."""
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "re-create" in message, message
    return message


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_unreadable_image(tmp_path, damage):
    image_dir, _ = make_set(tmp_path)
    path = image_dir / "b.jpg"
    if damage == "truncated":
        truncate(path)
        Image.open(path).close()  # the header still parses: only decoding finds the damage
    else:
        path.write_bytes(np.random.default_rng(1).bytes(500) if damage == "random" else b"")
    ds = ADE20KC(tmp_path, "fog")
    assert ds[0]["image"].shape == (3, H, W)  # the other item still reads
    with pytest.raises(ValueError) as err:
        ds[1]
    assert isinstance(err.value.__cause__, OSError)  # chained: the PIL error is kept
    message = error_of(lambda: ds[1], path)
    assert message.startswith(f"cannot read image {path}: ")
    assert message.endswith("; re-create it (data/make_ade20k_c.py skips existing files: delete it first)")
    if damage == "truncated":
        assert "truncated" in message
        assert ds.image_size(1) == (H, W)  # header only
    else:
        assert "cannot identify image file" in message
        error_of(lambda: ds.image_size(1), path)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_unreadable_annotation(tmp_path, damage):
    _, label_dir = make_set(tmp_path)
    path = label_dir / "a.png"
    if damage == "truncated":
        truncate(path)
        Image.open(path).close()
    else:
        path.write_bytes(np.random.default_rng(1).bytes(500) if damage == "random" else b"")
    ds = ADE20KC(tmp_path, "fog")
    message = error_of(lambda: ds[0], path)
    assert message.startswith(f"cannot read annotation {path}: ") and "ADEChallengeData2016" in message
    assert ds[1]["label"].shape == (H, W)


def test_annotation_value_above_150_names_file(tmp_path):
    _, label_dir = make_set(tmp_path)
    bad = np.ones((H, W), np.uint16)
    bad[3, 4] = 300
    Image.fromarray(bad).save(label_dir / "b.png")  # 16-bit, so 300 fits
    Image.fromarray(np.full((H, W), 151, np.uint8)).save(label_dir / "a.png")
    ds = ADE20KC(tmp_path, "fog")
    assert "value 151 is outside 0..150" in error_of(lambda: ds[0], label_dir / "a.png")
    assert "value 300 is outside 0..150" in error_of(lambda: ds[1], label_dir / "b.png")


def test_colour_annotation_names_file(tmp_path):
    _, label_dir = make_set(tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(label_dir / "a.png")
    assert "has mode RGB, expected one channel" in error_of(lambda: ADE20KC(tmp_path, "fog")[0], label_dir / "a.png")


def test_size_mismatch_is_one_line(tmp_path):
    _, label_dir = make_set(tmp_path)
    Image.fromarray(np.ones((10, 20), np.uint8)).save(label_dir / "a.png")
    message = error_of(lambda: ADE20KC(tmp_path, "fog")[0], label_dir / "a.png")
    assert f"is 10x20 (HxW) but image {tmp_path / 'images/validation/fog_5/a.jpg'} is {H}x{W}" in message


def test_16_bit_annotation(tmp_path):
    _, label_dir = make_set(tmp_path)
    values = np.resize(np.array([0, 1, 75, 150], np.uint16), (H, W))
    Image.fromarray(values).save(label_dir / "a.png")
    with Image.open(label_dir / "a.png") as lm:
        assert lm.mode.startswith("I")  # really stored as 16 bits
    label = ADE20KC(tmp_path, "fog")[0]["label"]
    assert label.dtype == torch.long
    assert torch.equal(label, torch.from_numpy(np.where(values == 0, 255, values.astype(np.int64) - 1)))


def test_16_bit_png_image_is_scaled_not_clipped(tmp_path):
    image_dir, _ = make_set(tmp_path)
    values = np.resize(np.array([0, 1000, 32768, 65535], np.uint16), (H, W))
    (image_dir / "a.jpg").unlink()
    Image.fromarray(values).save(image_dir / "a.png")
    image = ADE20KC(tmp_path, "fog")[0]["image"]
    expected = torch.from_numpy(values.astype(np.float32) / 65535).expand(3, H, W)
    assert image.dtype == torch.float32 and image.is_contiguous()
    assert torch.allclose(image, expected)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])  # "I": how older Pillow reads 16-bit PNGs
def test_16_bit_modes(mode):
    values = np.array([[0, 1000], [32768, 65535]])
    im = Image.fromarray(values.astype({"I;16": "<u2", "I;16B": ">u2", "I": np.int32}[mode]))
    assert im.mode == mode
    expected = torch.from_numpy(values.astype(np.float32) / 65535).expand(3, 2, 2)
    assert torch.allclose(_image_tensor(im), expected)


def _palette() -> Image.Image:
    im = Image.fromarray(np.full((H, W), 2, np.uint8), "P")
    im.putpalette([0, 0, 0, 9, 9, 9, 255, 0, 0])  # index 2 is red
    return im


# (image, file name, expected RGB / 255, tolerance): alpha is dropped, not blended.
UNUSUAL = {
    "L": (lambda: Image.fromarray(np.full((H, W), 51, np.uint8), "L"), "a.png", (51, 51, 51), 0),
    "LA": (lambda: Image.fromarray(np.full((H, W, 2), (51, 10), np.uint8), "LA"), "a.png", (51, 51, 51), 0),
    "RGBA": (lambda: Image.fromarray(np.full((H, W, 4), (255, 0, 0, 10), np.uint8), "RGBA"), "a.png",
             (255, 0, 0), 0),
    "P": (_palette, "a.png", (255, 0, 0), 0),
    "CMYK": (lambda: Image.new("CMYK", (W, H), (0, 255, 255, 0)), "a.jpg", (255, 0, 0), 0.03),  # lossy JPEG
}


@pytest.mark.parametrize("mode", UNUSUAL)
def test_unusual_modes_become_rgb(tmp_path, mode):
    image_dir, _ = make_set(tmp_path)
    make, name, rgb, tol = UNUSUAL[mode]
    (image_dir / "a.jpg").unlink()
    make().save(image_dir / name, quality=95)
    with Image.open(image_dir / name) as im:
        assert im.mode == mode
    image = ADE20KC(tmp_path, "fog")[0]["image"]
    expected = torch.tensor(rgb, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, H, W)
    assert image.shape == (3, H, W) and torch.allclose(image, expected, atol=tol + 1e-6)
