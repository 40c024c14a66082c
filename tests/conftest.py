"""Shared fixtures: the demo's tiny models, built once per session, and the cleanup of DeepSpeed's CPU
all-reduce buffers (one per rank in /dev/shm, RAM, after every run; tests start many runs, so each test removes
the ones it created)."""
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
    """After each test, the buffers that appeared during it and that no process maps or holds open any more:
    another test suite on the machine may be running ranks whose buffers appeared meanwhile."""
    from pipeline.run.folder import orphaned_shared_memory
    prefix = "deepspeed_allreduce_buffer_"
    before = set(SHM.glob(prefix + "*")) if SHM.is_dir() else set()
    yield
    if SHM.is_dir() and set(SHM.glob(prefix + "*")) - before:
        for leftover in set(orphaned_shared_memory(prefix, min_age_s=0.0)) - before:
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


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """The demo's tiny models (`segformer/`, `sd3/` with its text encoders, `classes.safetensors`), built once;
    tests take copies (`tests.helpers.copy_demo_models`) and never write here."""
    from data.classes import ADE20K_CLASSES
    from models.tiny import ensure_demo_models
    root = tmp_path_factory.mktemp("demo-models")
    ensure_demo_models(str(root / "segformer"), str(root / "sd3"), str(root / "classes.safetensors"), ADE20K_CLASSES)
    return root
