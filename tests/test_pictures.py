"""Pictures (pipeline/run/pictures.py) and the DUSA candidate classes shown in them (pipeline/run/loop.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.classes import ADE20K_CLASSES, ADE20K_PALETTE
from models.sd3 import LatentEncoder
from models.segformer import Segmenter
from models.tiny import make_tiny_sd3, make_tiny_segformer
from pipeline.dusa.layers import SegmenterFront, unpack
from pipeline.dusa.loss import area_k_candidates, area_scores, select_candidates
from pipeline.run.pictures import GAP, classes_present, colorize, make_picture, save_picture
from pipeline.dusa.windows import draw_windows, resize_short_edge, window_boxes


def test_colorize_uses_the_ade_palette_and_black_for_ignored():
    label = torch.tensor([[0, 1], [149, 255]])
    rgb = np.asarray(colorize(label))
    assert rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == ADE20K_PALETTE[0] and tuple(rgb[0, 1]) == ADE20K_PALETTE[1]
    assert tuple(rgb[1, 0]) == ADE20K_PALETTE[149] and tuple(rgb[1, 1]) == (0, 0, 0)


def test_classes_present_most_pixels_first_without_ignored():
    prediction = torch.tensor([[3, 3, 3], [5, 5, 255]])
    label = torch.tensor([[7, 7, 7], [7, 255, 255]])
    assert classes_present(prediction, label, num_classes=150) == [7, 3, 5]


def test_picture_shows_input_prediction_and_ground_truth_side_by_side(tmp_path: Path):
    h, w = 40, 60
    image = torch.rand(1, 3, 64, 96)  # the resized input: drawn at the label's size
    prediction = torch.full((h, w), 2)
    label = torch.full((h, w), 4)
    label[:, :10] = 255
    picture = make_picture(image, prediction, label, ADE20K_CLASSES, notes=["dusa, fog, x", "window 1: sky, tree"])
    assert picture.width == 3 * w + 4 * GAP and picture.height > h
    rgb = np.asarray(picture)
    top = next(y for y in range(picture.height) if tuple(rgb[y, GAP + w + GAP]) == ADE20K_PALETTE[2])
    assert tuple(rgb[top + h // 2, GAP + w + GAP + w // 2]) == ADE20K_PALETTE[2]  # prediction panel
    assert tuple(rgb[top + h // 2, GAP + 2 * (w + GAP) + w // 2]) == ADE20K_PALETTE[4]  # ground truth panel
    assert tuple(rgb[top + h // 2, GAP + 2 * (w + GAP) + 2]) == (0, 0, 0)  # ignored pixels
    # A legend below the panels: a swatch of each class present.
    below = rgb[top + h:]
    for c in (2, 4):
        assert (below == np.array(ADE20K_PALETTE[c], dtype=np.uint8)).all(-1).any()

    path = save_picture(picture, tmp_path, "fog", "ADE_val_00000001")
    assert path == tmp_path / "pictures" / "fog" / "ADE_val_00000001.png" and path.is_file()


def test_picture_refuses_a_prediction_of_another_size():
    with pytest.raises(ValueError, match="prediction"):
        make_picture(torch.rand(3, 8, 8), torch.zeros(4, 4), torch.zeros(8, 8), ADE20K_CLASSES)


def tiny_front_and_step(tmp_path: Path, window: int = 64, stride: int = 21):
    """A SegmenterFront of tiny models (topk 2, a small budget and a minimum: every selection rule,
    sampling included), a 64 x 96 image with structure and its windows' draws."""
    segformer = make_tiny_segformer(tmp_path / "segformer", ADE20K_CLASSES)
    sd3 = make_tiny_sd3(tmp_path / "sd3", num_layers=1)
    front = SegmenterFront(Segmenter.from_pretrained(str(segformer)).eval(), LatentEncoder.from_pretrained(str(sd3)),
                           window, topk=2, max_classes=6, min_classes=3)
    g = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(80, 120), mode="bilinear")
    image = resize_short_edge(0.8 * image + 0.2 * torch.rand(1, 3, 80, 120, generator=g), window)
    corners = window_boxes(image.shape[-2], image.shape[-1], window, stride)
    return front, image, draw_windows(corners, (16, window // 8, window // 8), (0.2, 0.6), g)


def test_window_candidates_are_the_ones_the_front_used(tmp_path: Path):
    front, image, draws = tiny_front_and_step(tmp_path)
    with torch.no_grad():
        prepared = front.begin_image(image, draws)
        used = [unpack(front(inputs))[3] for inputs in prepared.inputs]
    assert len(used) == 3
    assert [c.tolist() for c in prepared.candidates] == [c.tolist() for c in used]


def test_ignored_classes_are_never_candidates_and_leave_the_prediction_alone(tmp_path: Path):
    segformer = make_tiny_segformer(tmp_path / "segformer", ADE20K_CLASSES)
    sd3 = make_tiny_sd3(tmp_path / "sd3", num_layers=1)
    window, stride = 64, 21
    g = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(80, 120), mode="bilinear")
    image = resize_short_edge(0.8 * image + 0.2 * torch.rand(1, 3, 80, 120, generator=g), window)
    corners = window_boxes(image.shape[-2], image.shape[-1], window, stride)
    draws = draw_windows(corners, (16, window // 8, window // 8), (0.2, 0.6), g)

    def run(ignore):
        front = SegmenterFront(Segmenter.from_pretrained(str(segformer)).eval(),
                               LatentEncoder.from_pretrained(str(sd3)), window, topk=2, max_classes=6, min_classes=3,
                               ignore_classes=ignore)
        with torch.no_grad():
            prepared = front.begin_image(image, draws)
            outputs = [unpack(front(inputs)) for inputs in prepared.inputs]
        return prepared, outputs

    plain, plain_outputs = run([])
    ignored = sorted({int(c) for classes in plain.candidates for c in classes[:2]})  # classes that were chosen
    prepared, outputs = run(ignored)
    assert torch.equal(prepared.logits, plain.logits)  # the scored prediction is unchanged
    for k, (out, before) in enumerate(zip(outputs, plain_outputs)):
        logits = out[2]
        assert torch.isinf(logits[ignored]).all() and (logits[ignored] < 0).all()
        keep = [c for c in range(logits.shape[0]) if c not in ignored]
        assert torch.equal(logits[keep], before[2][keep])
        assert not set(prepared.candidates[k].tolist()) & set(ignored)
        # the same choice as the rule applied directly to the window's logits with those set to -inf
        direct, _ = select_candidates(logits, 2, 6, 3, torch.Generator().manual_seed(draws[k].seed))
        assert torch.equal(direct, prepared.candidates[k])


def test_area_k_rule_in_the_front_chooses_from_the_raw_logits_probabilities(tmp_path: Path):
    segformer = make_tiny_segformer(tmp_path / "segformer", ADE20K_CLASSES)
    sd3 = make_tiny_sd3(tmp_path / "sd3", num_layers=1)
    window, stride = 64, 21
    g = torch.Generator().manual_seed(0)
    image = resize_short_edge(F.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(80, 120), mode="bilinear"),
                              window)
    draws = draw_windows(window_boxes(image.shape[-2], image.shape[-1], window, stride),
                         (16, window // 8, window // 8), (0.2, 0.6), g)
    segmenter = Segmenter.from_pretrained(str(segformer)).eval()
    front = SegmenterFront(segmenter, LatentEncoder.from_pretrained(str(sd3)), window, topk=1, max_classes=20,
                           min_classes=0, area_k=5, area_threshold=3.0)
    with torch.no_grad():
        prepared = front.begin_image(image, draws)
        raw = F.interpolate(segmenter(image), size=image.shape[-2:], mode="bilinear", align_corners=False)
    for k, draw in enumerate(draws):
        top, left = draw.corner
        small = F.interpolate(raw[:, :, top:top + window, left:left + window], size=(8, 8), mode="bilinear",
                              align_corners=False)
        want = area_k_candidates(area_scores(small, 5)[0], 3.0)
        assert prepared.candidates[k].tolist() == want.tolist()
        assert prepared.inputs[k][-1].bool().all()  # no pixel mask


def test_under_bf16_autocast_the_window_logits_stay_float32(tmp_path: Path):
    """The autocast preset runs the step under bf16 autocast: SegFormer computes in bf16 there, but the
    LogitNorm, the window resampling (and its cached matrices) and the candidates stay float32, as the
    reference's interpolations of the logits do."""
    from pipeline.dusa.windows import resample_window, window_resampler
    window = 64
    front, image, draws = tiny_front_and_step(tmp_path, window)
    window_resampler.cache_clear()  # the matrices are made (and cached) under autocast here
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        prepared = front.begin_image(image, draws)
        logits = [unpack(front(inputs))[2] for inputs in prepared.inputs]
    leaf = front._leaf[0]
    assert leaf.dtype == torch.float32
    for (top, left), got in zip((d.corner for d in draws), logits):
        assert got.dtype == torch.float32
        rows = window_resampler(leaf.shape[-2], image.shape[-2], top, window, 8)
        cols = window_resampler(leaf.shape[-1], image.shape[-1], left, window, 8)
        assert rows.dtype == torch.float32
        torch.testing.assert_close(got, resample_window(leaf, rows, cols), rtol=0, atol=0)
