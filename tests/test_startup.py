"""Start-up pieces of the engine: the initial-weights snapshot and DeepSpeed's duplicate-parameter check."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

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


@pytest.mark.parametrize("user, changed, expected", [
    ("", True, "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"),
    ("max_split_size_mb:512", True, "max_split_size_mb:512,pinned_use_cuda_host_register:True,"
                                    "pinned_num_register_threads:8"),
    ("pinned_num_register_threads:4", False, "pinned_num_register_threads:4")])
def test_fast_pinned_allocation_keeps_the_users_allocator_settings(user, changed, expected):
    # In a child process: the allocator's settings are process-wide.
    code = ("import torch; from pipeline.dusa.engine import fast_pinned_allocation as f; "
            "print(f(), torch._C._accelerator_getAllocatorSettings())")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTORCH_ALLOC_CONF": user}, capture_output=True,
                         text=True, check=True).stdout.splitlines()[-1].split()  # (DeepSpeed's import logs first)
    assert out == [str(changed), expected]


def test_fast_pinned_allocation_leaves_a_torch_that_refuses_the_settings_as_it_is(monkeypatch):
    from pipeline.dusa import engine

    def refuse(settings):
        raise RuntimeError(f"Unrecognized key in {settings}")
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert engine.fast_pinned_allocation() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTFORK) is Linux's")
def test_the_snapshot_buffer_is_kept_out_of_forked_processes():
    """Page-locked pages would be copied into every DataLoader worker at fork: the snapshot's whole pages are
    marked not to be inherited (the kernel's `dc` flag on their mapping), and a fork still works."""
    from pipeline.dusa.engine import keep_out_of_forks
    buffer = torch.ones(4 << 20)  # 16 MiB: a mapping of its own
    assert keep_out_of_forks(buffer)
    assert not keep_out_of_forks(torch.ones(3))  # no whole page in it: nothing to mark
    address = buffer.data_ptr() + 2 * os.sysconf("SC_PAGE_SIZE")
    flags, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            low, high = (int(v, 16) for v in head.split("-"))
            inside = low <= address < high
        elif line.startswith("VmFlags") and inside:
            flags = line.split()[1:]
    assert flags is not None and "dc" in flags
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert bool(buffer.eq(1).all())
