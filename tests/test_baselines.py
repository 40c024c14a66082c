"""bn_adapt, cotta and sar on a tiny SegFormer loaded through the real `from_pretrained`: each method's step
against a direct implementation written here, their resets, saved states and option checks."""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.classes import ADE20K_CLASSES
from models.segformer import Segmenter
from models.tiny import make_tiny_segformer
from pipeline.methods.bn_adapt import BnAdapt, use_image_statistics
from pipeline.methods.cotta import CoTTA, Cotta, CottaOptions, memory_estimate, memory_refusal
from pipeline.methods.sar import SAR, Sar, SarOptions
from pipeline.run.config import RunConfig

C = len(ADE20K_CLASSES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_segformer(tmp_path_factory.mktemp("baselines") / "segformer", ADE20K_CLASSES)


def load(checkpoint: Path, sharpness: float = 100.0) -> Segmenter:
    """The tiny SegFormer in eval behaviour; a larger classifier gives it confident, varied predictions (the
    random one predicts nearly uniform probabilities)."""
    segmenter = Segmenter.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        segmenter.model.decode_head.classifier.weight.mul_(sharpness)
    return segmenter


def image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(64, 96), mode="bilinear")
    return (0.8 * base + 0.2 * torch.rand(1, 3, 64, 96, generator=g)).clamp(0, 1)


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=1)
    return -(p * torch.log(p)).sum(dim=1)


# ----------------------------------------------------------------------------------------------- bn_adapt
def test_bn_adapt_normalises_the_decode_head_with_the_image_statistics(checkpoint):
    segmenter = load(checkpoint)
    bn = segmenter.model.decode_head.batch_norm
    running = (bn.running_mean.clone(), bn.running_var.clone())
    reference = copy.deepcopy(segmenter)
    assert use_image_statistics(segmenter, prior=0.0) == 1  # SegFormer's one BatchNorm
    method = BnAdapt(segmenter, torch.device("cpu"))
    x = image()
    logits = method.step("fog", {"image": x, "name": "a"}).logits
    # Direct: BatchNorm in training behaviour normalises with the batch (this image's) statistics.
    reference.model.decode_head.batch_norm.train()
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])  # untouched
    with torch.no_grad():
        assert not torch.allclose(load(checkpoint)(x), logits)  # not the source model


def test_bn_adapt_prior_mixes_the_source_statistics(checkpoint):
    prior = 4.0
    segmenter, reference = load(checkpoint), load(checkpoint)
    use_image_statistics(segmenter, prior)
    bn = reference.model.decode_head.batch_norm

    def mixed(x):  # (N source + image) / (N + 1), mean and biased variance over batch and pixels
        mean = (prior * bn.running_mean + x.mean(dim=(0, 2, 3))) / (prior + 1)
        var = (prior * bn.running_var + x.var(dim=(0, 2, 3), unbiased=False)) / (prior + 1)
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) \
            + bn.bias.view(shape)
    bn.forward = mixed
    x = image(1)
    with torch.no_grad():
        torch.testing.assert_close(segmenter(x), reference(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- cotta
SCALES = [0.5, 1.0, 1.5]


def cotta_options(threshold: float, scales: list[float] = SCALES) -> CottaOptions:
    return CottaOptions(lr=1e-3, ema=0.9, restore_probability=0.3, confidence_threshold=threshold, scales=scales,
                        flip=True)


def median_confidence(segmenter: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.softmax(segmenter(x), dim=1).amax(dim=1).median())


def direct_cotta_step(student, teacher, anchor, optimizer, x, o: CottaOptions, seed: int) -> torch.Tensor:
    """CoTTA's step as the paper and the authors' segmentation code describe it, written out."""
    with torch.no_grad():
        logits = teacher(x)
        h, w = logits.shape[-2:]
        plain = torch.softmax(logits, dim=1)
        views = []
        for s in o.scales:
            size = (round(x.shape[-2] * s), round(x.shape[-1] * s))
            scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True):
                out = teacher(torch.flip(scaled, [3]) if flipped else scaled)
                out = torch.flip(out, [3]) if flipped else out
                views.append(F.interpolate(torch.softmax(out, dim=1), size=(h, w), mode="bilinear",
                                           align_corners=False))
        averaged = torch.stack(views).mean(0)
        confident = torch.softmax(anchor(x), dim=1).max(dim=1, keepdim=True).values > o.confidence_threshold
        scores = confident * plain + (~confident) * averaged
    loss = F.cross_entropy(student(x), scores.argmax(1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(o.ema * t + (1 - o.ema) * s)
        for s, a in zip(student.parameters(), anchor.parameters()):
            keep = (torch.rand(s.shape, generator=g) < o.restore_probability).float()
            s.copy_(a * keep + s * (1 - keep))
    return scores


@pytest.mark.parametrize("scales", [SCALES, [0.75, 1.25]])  # with and without the plain image among the views
def test_cotta_steps_match_a_direct_implementation(checkpoint, scales):
    x0, x1 = image(0), image(1)
    threshold = median_confidence(load(checkpoint), x0)  # half the pixels confident: both branches are taken
    o = cotta_options(threshold, scales)
    cotta = CoTTA(load(checkpoint), o)
    student, teacher, anchor = load(checkpoint), load(checkpoint), load(checkpoint)
    optimizer = torch.optim.Adam(student.parameters(), lr=o.lr, betas=(0.9, 0.999))
    for seed, x in ((5, x0), (6, x1)):
        scores, loss = cotta.step(x, torch.Generator().manual_seed(seed))
        expected = direct_cotta_step(student, teacher, anchor, optimizer, x, o, seed)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(loss) and not cotta.skipped
    for mine, theirs in ((cotta.student, student), (cotta.teacher, teacher)):
        for (name, p), q in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    source = load(checkpoint)
    moved = [not torch.equal(p, q) for p, q in zip(cotta.student.parameters(), source.parameters())]
    assert all(moved)  # every parameter adapts (the authors' segmentation setting)
    restored = sum(int((p == q).sum()) for p, q in zip(cotta.student.parameters(), source.parameters()))
    assert restored > 0  # some elements went back to the source exactly
    assert all(torch.equal(p, q) for p, q in zip(cotta.anchor.parameters(), source.parameters()))


def test_cotta_reset_and_saved_state(checkpoint):
    o = cotta_options(0.5)
    cotta = CoTTA(load(checkpoint), o)
    first, _ = cotta.step(image(0), torch.Generator().manual_seed(1))
    state = copy.deepcopy(cotta.state_dict())
    after_second, _ = cotta.step(image(1), torch.Generator().manual_seed(2))
    other = CoTTA(load(checkpoint), o)
    other.load_state_dict(state)  # a resumed run goes on exactly as the uninterrupted one
    again, _ = other.step(image(1), torch.Generator().manual_seed(2))
    assert torch.equal(again, after_second)
    cotta.reset()
    source = load(checkpoint)
    for model in (cotta.student, cotta.teacher):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), source.parameters()))
    assert not cotta.optimizer.state
    repeat, _ = cotta.step(image(0), torch.Generator().manual_seed(1))
    assert torch.equal(repeat, first)


def test_cotta_memory_estimate_refuses_a_device_too_small(checkpoint):
    small = memory_estimate(str(checkpoint), (64, 96), [1.0], "fp32")
    large = memory_estimate(str(checkpoint), (64, 96), SCALES, "fp32")
    parameters = sum(p.numel() for p in load(checkpoint).parameters())
    assert large > small > 24 * parameters  # 6 float32 copies of the weights, then activations
    assert memory_refusal(large, "GPU", 100 * large) is None
    assert memory_refusal(large, "GPU", None) is None  # no GPU: nothing to refuse
    message = memory_refusal(large, "Tiny GPU", large)  # 85 % of it usable
    assert message.startswith("cotta needs about") and "Tiny GPU has" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------- sar
def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) for p in m.parameters(False)]


def direct_sar_step(model, x, o: SarOptions, margin: float, momentum: list, ema):
    """SAR's step (paper, Algorithm 1; pixels as samples), with SGD's momentum written out; returns the ema."""
    params = norm_parameters(model)
    ent = entropy_map(model(x))
    keep = ent < margin
    grads = torch.autograd.grad(ent[keep].mean(), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    origin = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(o.rho * g / (norm + 1e-12))
    ent2 = entropy_map(model(x))[keep]
    second = ent2[ent2 < margin].mean()
    grads2 = torch.autograd.grad(second, params)
    ema = second.item() if ema is None else o.ema_momentum * ema + (1 - o.ema_momentum) * second.item()
    with torch.no_grad():
        for k, (p, p0, g) in enumerate(zip(params, origin, grads2)):
            momentum[k] = g.clone() if momentum[k] is None else o.momentum * momentum[k] + g
            p.copy_(p0 - o.lr * momentum[k])
    return ema


def sar_margin(segmenter: nn.Module, x: torch.Tensor) -> float:
    """The `margin` factor that makes half the pixels reliable: its threshold halfway between the two middle
    entropies (at the median itself, the two implementations' last-bit differences in the entropy would
    decide the median pixel each their own way)."""
    with torch.no_grad():
        values = entropy_map(segmenter(x)).flatten().sort().values
    middle = values.numel() // 2
    return float(values[middle - 1] + values[middle]) / 2 / math.log(C)


def test_sar_steps_match_a_direct_implementation(checkpoint):
    x0, x1 = image(0), image(1)
    factor = sar_margin(load(checkpoint), x0)
    o = SarOptions(lr=0.05, margin=factor, reset_threshold=0.0)
    sar = SAR(load(checkpoint), o, C)
    reference = load(checkpoint)
    momentum, ema = [None] * len(norm_parameters(reference)), None
    for x in (x0, x1):
        with torch.no_grad():
            before = reference(x)
        logits, loss = sar.step(x)
        torch.testing.assert_close(logits, before, rtol=1e-5, atol=1e-5)  # the first forward is scored
        ent = entropy_map(before)
        assert 0 < sar.reliable < 1
        assert loss.item() == pytest.approx(ent[ent < factor * math.log(C)].mean().item(), rel=1e-5)
        ema = direct_sar_step(reference, x, o, factor * math.log(C), momentum, ema)
        assert sar.ema == pytest.approx(ema, rel=1e-5)
    for p, q in zip(sar.params, norm_parameters(reference)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(sar.params, norm_parameters(load(checkpoint))))


def test_sar_recovers_the_source_when_the_entropy_average_collapses(checkpoint):
    factor = sar_margin(load(checkpoint), image(0))
    sar = SAR(load(checkpoint), SarOptions(lr=0.05, margin=factor, reset_threshold=1e9), C)
    sar.step(image(0))  # any average is below the threshold: weights and optimizer back to the source
    assert sar.recoveries == 1 and sar.ema is None and not sar.optimizer.state
    assert all(torch.equal(p, q) for p, q in zip(sar.params, norm_parameters(load(checkpoint))))


def test_sar_without_reliable_pixels_does_not_move(checkpoint):
    sar = SAR(load(checkpoint), SarOptions(lr=0.05, margin=1e-9), C)
    logits, loss = sar.step(image(0))
    assert sar.reliable == 0 and loss.item() == 0 and not sar.skipped and sar.ema is None
    assert all(torch.equal(p, q) for p, q in zip(sar.params, norm_parameters(load(checkpoint))))


def test_sar_reset_and_saved_state(checkpoint):
    factor = sar_margin(load(checkpoint), image(0))
    o = SarOptions(lr=0.05, margin=factor, reset_threshold=0.0)
    sar = SAR(load(checkpoint), o, C)
    first, _ = sar.step(image(0))
    state = copy.deepcopy(sar.state_dict())
    second, _ = sar.step(image(1))
    third, _ = sar.step(image(2))
    other = SAR(load(checkpoint), o, C)
    other.load_state_dict(state)
    other.step(image(1))
    again, _ = other.step(image(2))
    assert torch.equal(again, third) and other.ema == sar.ema
    sar.reset()
    assert sar.ema is None and not sar.optimizer.state
    repeat, _ = sar.step(image(0))
    assert torch.equal(repeat, first)


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("method, section, values, message", [
    (Cotta, "cotta", {"ema": 1.5}, "--cotta.ema 1.5 is outside its domain: a number in [0, 1]"),
    (Cotta, "cotta", {"scales": []}, "--cotta.scales [] is outside its domain"),
    (Sar, "sar", {"rho": -1.0}, "--sar.rho -1.0 is outside its domain: a finite number >= 0"),
    (Sar, "sar", {"momentum": 1.0}, "--sar.momentum 1.0 is outside its domain: a number in [0, 1)"),
    (BnAdapt, "bn_adapt", {"prior": -1.0}, "--bn_adapt.prior -1.0 is outside its domain"),
])
def test_bad_options_are_refused_in_one_line(method, section, values, message):
    cfg = RunConfig()
    setattr(cfg, section, replace(getattr(cfg, section), **values))
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        method.check(cfg, 1)


@pytest.mark.parametrize("method", [Cotta, Sar])
def test_gradient_accumulation_is_refused(method):
    cfg = RunConfig()
    cfg.tta.accumulation_steps = 2
    with pytest.raises(ValueError, match="updates after every image"):
        method.check(cfg, 1)
