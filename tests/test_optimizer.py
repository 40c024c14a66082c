"""The optimizer of the DeepSpeed JSON (`optimizer.type`): torch's AdamW, Adam or SGD, built here."""
from __future__ import annotations

import pytest
import torch

from pipeline.dusa.engine import load_ds_config, optimizer_factory


def one_step(optimizer_cls, **kwargs) -> torch.Tensor:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = optimizer_cls([p], **kwargs)
    p.grad = torch.tensor([0.3, -0.1, 0.2])
    optimizer.step()
    return p.detach()


@pytest.mark.parametrize("kind, cls, params", [
    ("AdamW", torch.optim.AdamW, {"betas": [0.9, 0.999], "weight_decay": 0.1}),
    ("Adam", torch.optim.Adam, {"weight_decay": 0.1}),  # L2 in the gradient, not decoupled: torch's Adam
    ("sgd", torch.optim.SGD, {"momentum": 0.5, "nesterov": True}),
])
def test_each_type_is_torchs_optimizer_with_the_files_params(kind, cls, params):
    factory = optimizer_factory({"type": kind, "params": {**params, "lr": 0.01, "torch_adam": True}})
    got = one_step(factory)
    assert torch.equal(got, one_step(cls, lr=0.01, **params))
    assert type(factory([torch.nn.Parameter(torch.zeros(1))])) is cls


def test_adam_is_not_adamw_when_weight_decay_is_set():
    spec = {"params": {"lr": 0.01, "weight_decay": 0.1}}
    adam = one_step(optimizer_factory({"type": "Adam", **spec}))
    adamw = one_step(optimizer_factory({"type": "AdamW", **spec}))
    assert not torch.equal(adam, adamw)


def test_sgd_has_the_references_momentum_by_default():
    factory = optimizer_factory({"type": "SGD", "params": {"lr": 0.1}})
    optimizer = factory([torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("spec, message", [
    ({"type": "Lamb", "params": {"lr": 0.1}}, "not supported"),
    ({"type": "Adam", "params": {"lr": 0.1, "adam_w_mode": True}}, "adam_w_mode"),
    ({"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}, "optimizer.params for SGD"),
])
def test_unknown_types_and_parameters_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        optimizer_factory(spec)


def test_the_config_is_checked_before_any_model_loads_and_sgd_may_use_zero1():
    with pytest.raises(ValueError, match="not supported"):
        load_ds_config({"optimizer": {"type": "RMSprop", "params": {}}}, lr=1e-5)
    config = load_ds_config({"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD", "params": {}}}, lr=1e-5)
    assert config["zero_allow_untested_optimizer"] is True
    assert config["optimizer"]["params"]["lr"] == 1e-5
