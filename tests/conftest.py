"""Shared fixtures. DeepSpeed's CPU all-reduce leaves a shared-memory buffer per rank in /dev/shm (RAM) after
every run; tests start many runs, so each test removes the ones it created."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
ROOT = Path(__file__).resolve().parents[1]
# One build folder of DeepSpeed's extensions per environment, for this process and every launch it starts
# (shared ~/.cache/torch_extensions made two environments rebuild it in turns, 25-40 s each).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# The scripts the tests start (the launcher, the pipeline worker, the benchmarks) import this checkout's packages,
# whichever checkout the environment's `pip install -e .` points to (worktrees may share one environment).
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(autouse=True)
def release_deepspeed_shared_memory():
    before = set(SHM.glob("deepspeed_allreduce_buffer_*")) if SHM.is_dir() else set()
    yield
    if SHM.is_dir():
        for leftover in set(SHM.glob("deepspeed_allreduce_buffer_*")) - before:
            leftover.unlink(missing_ok=True)


@pytest.fixture
def launcher_main(monkeypatch):
    """launch/tta.py imported in this process, its hard exit turned into SystemExit."""
    import launch.tta as launcher

    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(launcher.os, "_exit", exit_)
    monkeypatch.delenv("DUSA_TRACEBACK", raising=False)
    return launcher
