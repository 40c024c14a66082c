"""DUSA's ablations are options of the one method: each is reachable from the launcher's command line, listed in
--help and checked; uniform p against a direct computation."""
from __future__ import annotations

import pytest
import torch

from bench.miniature import DUSA_ABLATIONS
from pipeline.dusa.loss import dusa_loss
from pipeline.methods.dusa import Dusa
from pipeline.run.config import RunConfig

# Each ablation: the command-line options and the config they must give (DUSA's own options, `dusa`).
EXPECTED = {
    "segmenter only": {"update_segmenter": True, "update_generator": False, "norm_only": False},
    "segmenter norm only": {"update_generator": False, "norm_only": True},
    "uniform p": {"candidate_weights": "uniform"},
    "t 0.1": {"timestep_range": (0.1, 0.1)},
    "t 0.5": {"timestep_range": (0.5, 0.5)},
    "topk 5": {"candidates": "topk", "topk": 5, "max_classes": 20},
    "top-5 area 20": {"candidates": "area_k", "area_k": 5, "area_threshold": 20.0},
}


def test_every_declared_ablation_parses_to_its_config_and_is_in_the_help(launcher_main, capsys):
    assert set(DUSA_ABLATIONS) == set(EXPECTED)
    assert tuple(RunConfig().dusa.timestep_range) == (0.25, 0.25)  # t = 0.25: the dusa row itself
    for name, options in DUSA_ABLATIONS.items():
        cfg, _, _ = launcher_main.parse(["--tta.method", "dusa", *options])
        for field, value in EXPECTED[name].items():
            got = getattr(cfg.dusa, field)
            assert (tuple(got) if isinstance(value, tuple) else got) == value, (name, field)
        Dusa.check(cfg, 2)  # each one runs: something adapts
    with pytest.raises(SystemExit):
        launcher_main.make_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for option in {o for options in DUSA_ABLATIONS.values() for o in options if o.startswith("--")}:
        assert option in text, option


def test_uniform_p_weights_every_candidate_alike_and_gives_the_logits_no_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, 5, generator=g, requires_grad=True)
    classes = torch.tensor([1, 4, 6])
    mask = torch.rand(4, 5, generator=g) > 0.3
    velocity = torch.randn(3, 16, 4, 5, generator=g, requires_grad=True)
    target = torch.randn(16, 4, 5, generator=g)
    loss = dusa_loss(logits, classes, mask, velocity, target, uniform=True)
    expected = ((velocity.mean(0) - target) ** 2)[:, mask].mean()  # v_bar = the candidates' mean velocity
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and velocity.grad.abs().sum() > 0
    softmax = dusa_loss(logits, classes, mask, velocity, target)
    assert not torch.isclose(softmax, loss)


def test_uniform_p_without_the_generator_is_refused():
    cfg = RunConfig()
    cfg.dusa.candidate_weights, cfg.dusa.update_generator = "uniform", False
    with pytest.raises(ValueError, match="uniform gives the segmenter no gradient"):
        Dusa.check(cfg, 2)
