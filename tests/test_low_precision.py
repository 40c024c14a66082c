"""Working bf16 copies made once per step compute exactly what bf16 autocast computes with float32 weights."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.dusa.low_precision import WorkingWeights, cast_frozen_layers


class Block(nn.Module):
    """Linear, Conv, a norm with its own weights and an unused layer: what autocast treats differently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.linear = nn.Linear(8, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, x):
        h = self.conv(x).permute(0, 2, 3, 1)
        return self.linear(torch.nn.functional.gelu(self.norm(h))).square().mean()


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def windows(seed: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=g) for _ in range(n)]


def autocast_step(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    for x in inputs:  # one forward and backward per window, each in its own autocast region, as the engine
        with autocast():
            loss = model(x)
        loss.backward()
    return [p.grad for p in model.parameters()]


def working_step(model: nn.Module, working: WorkingWeights, inputs: list[torch.Tensor],
                 update: bool = True) -> list[torch.Tensor]:
    """One image's step as the engine runs it; `update`: the optimizer steps after it (the gradients are
    released before, as the engine does at an update)."""
    working.refresh()
    for x in inputs:
        with autocast(), working.active():
            loss = model(x)
        loss.backward()
        working.fold()
    if update:
        working.release_unused()
    return [p.grad for p in model.parameters()]


def test_gradients_equal_autocast_bit_for_bit_over_several_windows_and_steps():
    torch.manual_seed(0)
    reference = Block()
    model = copy.deepcopy(reference)
    working = WorkingWeights([model])
    assert working.numel == sum(p.numel() for m in (model.conv, model.linear, model.unused) for p in m.parameters())
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        expected = autocast_step(reference, windows(step))
        got = working_step(model, working, windows(step))
        for e, g in zip(expected, got):
            assert (e is None) == (g is None)  # the unused layer has no gradient in either
            if e is not None:
                assert torch.equal(e, g)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
        working.updated()
        for a, b in zip(reference.parameters(), model.parameters()):
            assert torch.equal(a, b)
    # The norm keeps float32 weights and the optimizer's parameters stay float32 (views of one buffer).
    assert model.norm.weight.dtype == torch.float32 and model.linear.weight.dtype == torch.float32
    assert model.linear.weight.untyped_storage().data_ptr() == working.master.untyped_storage().data_ptr()


def test_gradients_accumulate_over_images_until_they_are_consumed_or_dropped():
    torch.manual_seed(1)
    reference = Block()
    model = copy.deepcopy(reference)
    working = WorkingWeights([model])
    autocast_step(reference, windows(0))
    autocast_step(reference, windows(1))  # two images, no update between: the gradients add up
    working_step(model, working, windows(0), update=False)
    got = working_step(model, working, windows(1))
    for e, g in zip([p.grad for p in reference.parameters()], got):
        assert (e is None and g is None) or torch.equal(e, g)
    working.drop()  # the engine drops them with the optimizer's own zero_grad (the norm's)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    fresh = working_step(model, working, windows(2))
    reference.zero_grad()
    for e, g in zip(autocast_step(reference, windows(2)), fresh):
        assert (e is None and g is None) or torch.equal(e, g)


def test_the_layers_use_their_float32_weights_outside_a_window():
    model = Block()
    working = WorkingWeights([model])
    working.refresh()
    with working.active():
        assert model.linear.weight.dtype == torch.bfloat16 and model.linear.weight.requires_grad
        assert model.norm.weight.dtype == torch.float32
    assert isinstance(model.linear.weight, nn.Parameter) and model.linear.weight.dtype == torch.float32


def test_frozen_layers_are_stored_in_bf16_and_compute_the_same():
    torch.manual_seed(2)
    model = Block().requires_grad_(False)
    cast = copy.deepcopy(model)
    assert cast_frozen_layers([cast]) == 6  # conv, linear, unused: weight and bias each
    assert cast.conv.weight.dtype == torch.bfloat16 and cast.norm.weight.dtype == torch.float32
    x = windows(3, 1)[0]
    with autocast():
        assert torch.equal(model(x), cast(x))
