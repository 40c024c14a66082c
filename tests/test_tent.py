"""Tent on a tiny SegFormer loaded through the real `from_pretrained` path: the step, what it adapts, the reset."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.classes import ADE20K_CLASSES
from models.segformer import Segmenter
from models.tiny import make_tiny_segformer
from pipeline.methods.tent import Tent, mean_entropy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_segformer(tmp_path_factory.mktemp("tent") / "segformer", ADE20K_CLASSES)


def load(checkpoint: Path) -> Segmenter:
    segmenter = Segmenter.from_pretrained(str(checkpoint))
    # Random init gives logits near 0, i.e. uniform predictions, where entropy has no gradient to
    # speak of; a larger classifier gives the tiny model a confident, non-uniform prediction.
    with torch.no_grad():
        segmenter.model.decode_head.classifier.weight.mul_(100)
    return segmenter


def image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(64, 96), mode="bilinear")
    return (0.8 * base + 0.2 * torch.rand(1, 3, 64, 96, generator=g)).clamp(0, 1)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def norm_affine_names(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) for p in ("weight", "bias")}


def test_adapts_exactly_the_norm_affine_parameters(checkpoint):
    segmenter = load(checkpoint)
    tent = Tent(segmenter, lr=1e-3)
    trainable = {n for n, p in segmenter.named_parameters() if p.requires_grad}
    assert trainable == norm_affine_names(segmenter)
    assert "model.decode_head.batch_norm.weight" in trainable  # SegFormer's one BatchNorm
    assert any("layernorm" in n or "layer_norm" in n for n in trainable)
    assert len(tent.params) == len(trainable)


def test_step_lowers_entropy_and_updates_nothing_but_norm_parameters(checkpoint):
    segmenter = load(checkpoint)
    x = image()
    with torch.no_grad():
        before_logits = segmenter.eval()(x)
    before = snapshot(segmenter)
    tent = Tent(segmenter, lr=1e-3)
    logits, loss = tent.step(x)

    # The scored logits are those of the adaptation forward, in eval behaviour (no dropout/drop-path).
    assert torch.equal(logits, before_logits)
    assert loss.item() == pytest.approx(mean_entropy(before_logits).item(), rel=1e-6)
    with torch.no_grad():
        after_entropy = mean_entropy(segmenter(x)).item()
    assert after_entropy < loss.item() - 1e-4

    after = snapshot(segmenter)
    norms = norm_affine_names(segmenter)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= norms  # BatchNorm running statistics are state_dict entries: unchanged
    assert len(changed) > len(norms) // 2


def test_reset_is_bit_exact_and_the_next_step_repeats_the_first(checkpoint):
    segmenter = load(checkpoint)
    initial = snapshot(segmenter)
    tent = Tent(segmenter, lr=1e-3)
    first_logits, first_loss = tent.step(image(0))
    tent.step(image(1))
    tent.reset()
    assert all(torch.equal(v, segmenter.state_dict()[k]) for k, v in initial.items())
    assert not tent.optimizer.state  # fresh Adam moments and step counts
    logits, loss = tent.step(image(0))
    assert torch.equal(logits, first_logits) and torch.equal(loss, first_loss)
    assert all(p.grad is None for p in segmenter.parameters())


def test_bf16_autocast_keeps_float32_weights(checkpoint):
    segmenter = load(checkpoint)
    tent = Tent(segmenter, lr=1e-3, autocast_dtype=torch.bfloat16)
    logits, loss = tent.step(image())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in segmenter.parameters())


def test_a_model_without_norm_layers_is_refused():
    with pytest.raises(ValueError, match="no normalization layer"):
        Tent(nn.Conv2d(3, 4, 1), lr=1e-3)


def test_gradient_accumulation_updates_every_k_images_from_their_mean_gradient(checkpoint):
    """accumulation_steps 2: nothing moves after the 1st image; the 2nd updates with Adam on the mean of
    both images' gradients (each from its own forward at the same weights); a leftover is dropped."""
    tent = Tent(load(checkpoint), lr=1e-3, accumulation_steps=2)
    reference = load(checkpoint)
    ref_params = [p for n, p in reference.named_parameters()
                  if n in {m for m, q in tent.segmenter.named_parameters() if q.requires_grad}]
    before = [p.detach().clone() for p in tent.params]
    tent.step(image(0))
    assert all(torch.equal(p, b) for p, b in zip(tent.params, before))
    tent.step(image(1))
    losses = [mean_entropy(reference(image(seed))) / 2 for seed in (0, 1)]
    grads = torch.autograd.grad(sum(losses), ref_params)
    with torch.no_grad():
        expected = [p.detach().clone() for p in ref_params]
        adam = torch.optim.Adam(expected, lr=1e-3, betas=(0.9, 0.999))
        for e, g in zip(expected, grads):
            e.grad = g
        adam.step()
    for p, e in zip(tent.params, expected):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-7)
    after_update = [p.detach().clone() for p in tent.params]
    tent.step(image(2))
    tent.discard_accumulated()  # the task's end
    assert all(p.grad is None for p in tent.params)
    assert all(torch.equal(p, a) for p, a in zip(tent.params, after_update))
