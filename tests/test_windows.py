"""Independent tests of pipeline.dusa.windows against the method's first two steps, restated here:

- resize so the short edge is 512 (bilinear, antialiased), values in [0, 1];
- square windows of `size` covering the image; top-left positions 0, stride, 2 stride, ... while
  the window does not reach the far border, then one last window aligned to the far border.
"""
import pytest
import torch
import torch.nn.functional as F

from pipeline.run.config import DataConfig
from pipeline.dusa.windows import (draw_windows, resample_window, resize_short_edge, resized_size, window_boxes,
                              window_resampler)


# ----------------------------------------------------------------------------------------------
# resized_size
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,short_edge,expected", [
    (512, 683, 512, (512, 683)),      # already there
    (512, 512, 512, (512, 512)),
    (480, 640, 512, (512, 682)),      # 640 * 512 / 480 = 682.67, truncated as torchvision does
    (640, 480, 512, (682, 512)),      # portrait
    (1024, 2048, 512, (512, 1024)),   # downscale
    (2000, 3000, 512, (512, 768)),
    (300, 300, 512, (512, 512)),      # upscale, square
    (256, 341, 512, (512, 682)),      # 341 * 2 = 682
    (375, 500, 512, (512, 682)),      # 500 * 512 / 375 = 682.67
    (500, 375, 512, (682, 512)),
    (3, 5, 2, (2, 3)),                # 3.33 -> 3
    (3, 4, 2, (2, 2)),                # 2.67 -> 2
    (100, 1000, 64, (64, 640)),
])
def test_resized_size(h, w, short_edge, expected):
    assert tuple(resized_size(h, w, short_edge)) == expected


def test_resized_size_properties():
    for h in range(40, 200, 7):
        for w in range(40, 200, 11):
            for s in (16, 32, 64, 100):
                rh, rw = resized_size(h, w, s)
                assert min(rh, rw) == s
                assert isinstance(rh, int) and isinstance(rw, int)
                # the long edge is the scaled long edge, truncated (torchvision's rule)
                if h <= w:
                    assert rh == s and rw == int(s * w / h)
                else:
                    assert rw == s and rh == int(s * h / w)


# ----------------------------------------------------------------------------------------------
# resize_short_edge
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,short_edge", [(48, 64, 32), (64, 48, 32), (30, 45, 64), (50, 50, 20),
                                            (20, 70, 24)])
def test_resize_shapes(h, w, short_edge):
    g = torch.Generator().manual_seed(h * w)
    image = torch.rand(3, h, w, generator=g)
    out = resize_short_edge(image, short_edge)
    assert tuple(out.shape) == (3, *resized_size(h, w, short_edge))
    out4 = resize_short_edge(image.unsqueeze(0), short_edge)
    assert tuple(out4.shape) == (1, 3, *resized_size(h, w, short_edge))
    assert torch.allclose(out4[0], out, atol=1e-6)


@pytest.mark.parametrize("h,w,short_edge", [(48, 64, 32), (30, 45, 64), (41, 37, 13)])
def test_resize_stays_in_unit_range(h, w, short_edge):
    g = torch.Generator().manual_seed(7)
    # extreme content: random 0/1 pixels (worst case for overshoot) and random values
    for image in ((torch.rand(3, h, w, generator=g) > 0.5).float(), torch.rand(3, h, w, generator=g)):
        out = resize_short_edge(image, short_edge)
        assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("h,w,short_edge", [(48, 64, 32), (30, 45, 64)])
def test_resize_constant_image_stays_constant(value, h, w, short_edge):
    image = torch.full((3, h, w), value)
    image[1] = value / 2  # per-channel constants
    out = resize_short_edge(image, short_edge)
    assert torch.allclose(out[0], torch.full_like(out[0], value), atol=1e-6)
    assert torch.allclose(out[1], torch.full_like(out[1], value / 2), atol=1e-6)
    assert torch.allclose(out[2], torch.full_like(out[2], value), atol=1e-6)


def test_resize_is_antialiased():
    # thin lines (one column in four) downscaled by 4: an antialiased filter spreads them to about
    # their mean 0.25; plain bilinear sampling (2 taps between the lines) would miss them entirely.
    h, w = 64, 96
    lines = (torch.arange(w) % 4 == 0).float().expand(3, h, w).contiguous()
    out = resize_short_edge(lines, 16)
    assert tuple(out.shape) == (3, 16, 24)
    assert (out - 0.25).abs().max() < 0.1
    aliased = F.interpolate(lines[None], size=(16, 24), mode="bilinear", align_corners=False)[0]
    assert aliased.abs().max() < 1e-6  # sanity: the test would catch a non-antialiased resize


def test_resize_matches_bilinear_antialiased_interpolation():
    g = torch.Generator().manual_seed(3)
    for (h, w, s) in ((40, 60, 24), (24, 36, 48)):  # down and up
        image = torch.rand(3, h, w, generator=g)
        size = resized_size(h, w, s)
        want = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                             antialias=True)[0].clamp(0, 1)
        assert torch.allclose(resize_short_edge(image, s), want, atol=1e-5)


def test_resize_upscale_of_a_ramp_is_monotone_and_smooth():
    ramp = torch.linspace(0, 1, 30).view(1, 1, 30).expand(3, 20, 30).contiguous()
    out = resize_short_edge(ramp, 40)
    assert tuple(out.shape) == (3, 40, 60)
    row = out[0, 5]
    assert (row[1:] - row[:-1] >= -1e-6).all()  # monotone
    assert (row[1:] - row[:-1]).max() < 0.025    # no jumps (nearest-neighbour would step by 1/29)
    assert torch.allclose(out[:, 0], out[:, -1], atol=1e-6)  # rows identical (vertical constancy)


def test_resize_same_size_keeps_values():
    image = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(1))
    out = resize_short_edge(image, 32)
    assert tuple(out.shape) == (3, 32, 40)
    assert torch.allclose(out, image, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# window_boxes
# ----------------------------------------------------------------------------------------------
def test_windows_spec_examples():
    # The default stride 256 (the reference's ADE20K-C setting): 512 x 683 and 512 x 768 give 2 windows.
    assert list(window_boxes(512, 683, 512, 256)) == [(0, 0), (0, 171)]
    assert list(window_boxes(512, 768, 512, 256)) == [(0, 0), (0, 256)]
    assert list(window_boxes(512, 682, 512, 256)) == [(0, 0), (0, 170)]
    assert DataConfig().window_stride == 256 and DataConfig().window_size == 512
    # The earlier stride 171 stays available.
    assert list(window_boxes(512, 768, 512, 171)) == [(0, 0), (0, 171), (0, 256)]
    assert list(window_boxes(512, 683, 512, 171)) == [(0, 0), (0, 171)]
    assert list(window_boxes(512, 512, 512, 171)) == [(0, 0)]
    assert list(window_boxes(683, 512, 512, 171)) == [(0, 0), (171, 0)]
    assert list(window_boxes(512, 700, 512, 171)) == [(0, 0), (0, 171), (0, 188)]


def test_windows_more_cases():
    # width - size an exact multiple of the stride: no duplicate last window
    assert list(window_boxes(512, 854, 512, 171)) == [(0, 0), (0, 171), (0, 342)]
    # the first regular position beyond the border is never used
    assert list(window_boxes(512, 513, 512, 171)) == [(0, 0), (0, 1)]
    assert list(window_boxes(512, 1024, 512, 512)) == [(0, 0), (0, 512)]
    assert list(window_boxes(512, 1025, 512, 512)) == [(0, 0), (0, 512), (0, 513)]
    assert list(window_boxes(10, 10, 4, 3)) == [(t, l) for t in (0, 3, 6) for l in (0, 3, 6)]
    assert set(window_boxes(700, 700, 512, 171)) == {(t, l) for t in (0, 171, 188) for l in (0, 171, 188)}
    assert set(window_boxes(6, 9, 4, 2)) == {(t, l) for t in (0, 2) for l in (0, 2, 4, 5)}
    assert len(window_boxes(6, 9, 4, 2)) == 8


def expected_starts(length, size, stride):
    """Spec rule, written independently: 0, stride, ... while p + size < length, then length - size."""
    starts = []
    p = 0
    while p + size < length:
        starts.append(p)
        p += stride
    starts.append(length - size)
    return starts


@pytest.mark.parametrize("size,stride", [(512, 171), (512, 256), (512, 512), (64, 1), (64, 17),
                                         (64, 64), (8, 3)])
def test_windows_cover_and_follow_the_rule(size, stride):
    for extra in list(range(0, 3 * size // 2 + 3)):
        for height, width in ((size, size + extra), (size + extra, size),
                              (size + extra // 2, size + extra)):
            boxes = list(window_boxes(height, width, size, stride))
            assert len(boxes) == len(set(boxes))
            tops = sorted({t for t, _ in boxes})
            lefts = sorted({l for _, l in boxes})
            assert tops == expected_starts(height, size, stride)
            assert lefts == expected_starts(width, size, stride)
            assert set(boxes) == {(t, l) for t in tops for l in lefts}
            # all windows inside the image
            assert all(0 <= t and t + size <= height and 0 <= l and l + size <= width for t, l in boxes)
            # every pixel covered (1-D coverage per axis suffices for a product grid; check it)
            rows = torch.zeros(height, dtype=torch.bool)
            cols = torch.zeros(width, dtype=torch.bool)
            for t in tops:
                rows[t:t + size] = True
            for l in lefts:
                cols[l:l + size] = True
            assert rows.all() and cols.all()
            if height * width <= 40_000:
                cover = torch.zeros(height, width, dtype=torch.bool)
                for t, l in boxes:
                    cover[t:t + size, l:l + size] = True
                assert cover.all()


def test_windows_full_coverage_2d_for_a_range_of_widths():
    for width in range(512, 1400, 37):
        cover = torch.zeros(512, width, dtype=torch.bool)
        boxes = list(window_boxes(512, width, 512, 171))
        for t, l in boxes:
            assert t == 0
            cover[t:t + 512, l:l + 512] = True
        assert cover.all(), width
        assert boxes[-1] == (0, width - 512)


@pytest.mark.parametrize("height,width", [(511, 683), (683, 511), (100, 100), (511, 511)])
def test_windows_image_smaller_than_window(height, width):
    with pytest.raises(ValueError):
        window_boxes(height, width, 512, 171)


@pytest.mark.parametrize("stride", [0, -1, -171])
def test_windows_invalid_stride(stride):
    with pytest.raises(ValueError):
        window_boxes(512, 683, 512, stride)


# ----------------------------------------------------------------------------------------------
# a window's logits at latent resolution, without upsampling the whole image
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,height,width,size,out", [
    (128, 171, 512, 683, 512, 64),   # SegFormer-B5 at 512 x 683: logits 128 x 171
    (171, 128, 683, 512, 512, 64),   # portrait
    (128, 256, 512, 1024, 512, 64),
    (16, 24, 64, 96, 64, 8),         # the tests' tiny windows
    (33, 17, 130, 67, 64, 8),        # odd sizes: the segmenter's output is not exactly 1/4
])
def test_window_resampler_equals_full_upsample_then_crop_then_downsample(h, w, height, width, size, out):
    g = torch.Generator().manual_seed(h * w)
    logits = torch.randn(150, h, w, generator=g)
    full = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    for top, left in window_boxes(height, width, size, size // 3):
        crop = full[:, top:top + size, left:left + size]
        reference = F.interpolate(crop[None], size=(out, out), mode="bilinear", align_corners=False)[0]
        got = resample_window(logits, window_resampler(h, height, top, size, out),
                              window_resampler(w, width, left, size, out))
        assert got.shape == (150, out, out)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_window_resampler_batches_windows_and_passes_gradients_like_the_full_upsample():
    logits = torch.randn(150, 128, 171, dtype=torch.float64, requires_grad=True)
    corners = window_boxes(512, 683, 512, 171)
    double = dict(dtype=torch.float64)
    rows = torch.stack([window_resampler(128, 512, top, 512, 64, **double) for top, _ in corners])
    cols = torch.stack([window_resampler(171, 683, left, 512, 64, **double) for _, left in corners])
    weights = torch.randn(len(corners), 150, 64, 64, dtype=torch.float64)
    (resample_window(logits, rows, cols) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    full = F.interpolate(logits[None], size=(512, 683), mode="bilinear", align_corners=False)[0]
    total = 0
    for k, (top, left) in enumerate(corners):
        crop = full[:, top:top + 512, left:left + 512]
        total = total + (F.interpolate(crop[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
                         * weights[k]).sum()
    total.backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-9, atol=1e-12)


def test_window_resampler_refuses_a_window_outside_the_image():
    with pytest.raises(ValueError, match="outside"):
        window_resampler(128, 512, 10, 512, 64)


def test_draw_windows_repeats_with_the_seed_and_differs_per_window():
    corners = [(0, 0), (0, 171)]
    a = draw_windows(corners, (16, 8, 8), (0.2, 0.6), torch.Generator().manual_seed(3))
    b = draw_windows(corners, (16, 8, 8), (0.2, 0.6), torch.Generator().manual_seed(3))
    for x, y in zip(a, b):
        assert x.corner == y.corner and x.seed == y.seed and torch.equal(x.noise, y.noise) and torch.equal(x.t, y.t)
    assert a[0].seed != a[1].seed and not torch.equal(a[0].noise, a[1].noise)
    assert all(0.2 <= d.t.item() <= 0.6 and d.noise.shape == (1, 16, 8, 8) for d in a)
