"""Start-up pieces of the engine: the initial-weights snapshot and DeepSpeed's duplicate-parameter check."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from pipeline.dusa.deepspeed_seam import check_for_duplicates_in_linear_time
from pipeline.dusa.engine import HostSnapshot


def test_host_snapshot_restores_every_tensor_bit_for_bit_across_dtypes():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g).bfloat16(),
               torch.randn(2, 2, 2, generator=g), torch.randn(7, generator=g).bfloat16(), torch.randn(1, generator=g)]
    kept = [t.clone() for t in tensors]
    snapshot = HostSnapshot(tensors)
    assert [len(group) for group, _ in snapshot.groups] == [3, 2]  # one buffer per dtype
    for t in tensors:
        t.mul_(3).add_(1)
    snapshot.restore()
    assert all(t.dtype == k.dtype and torch.equal(t, k) for t, k in zip(tensors, kept))


def test_the_linear_time_duplicate_check_has_deepspeeds_outcome_and_message():
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    engine = types.SimpleNamespace(module=module)
    weights, biases = [m.weight for m in module], [m.bias for m in module]
    check_for_duplicates_in_linear_time(engine, torch.optim.SGD([{"params": weights}, {"params": biases}], lr=1.0))
    twice = types.SimpleNamespace(param_groups=[{"params": weights}, {"params": [module[0].weight, *biases]}])
    with pytest.raises(AssertionError, match="^Parameter with name: 0.weight occurs multiple times in "
                                             "optimizer.param_groups. Make sure it only appears once"):
        check_for_duplicates_in_linear_time(engine, twice)
