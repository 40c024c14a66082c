"""The benchmark script runs end to end (tiny models, CPU) and its (a)/(b) gradient check agrees.
Speed itself is measured on GPUs by `bench/bench.py`, never asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bench/bench.py end to end, pipeline and single stage: a minute on a CPU (`-m 'not slow'` skips it).
pytestmark = pytest.mark.slow


def test_bench_dry_run_writes_every_field_and_pipeline_equals_single_stage(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/bench.py", "--tiny", "--workdir", str(tmp_path / "work"), "--out",
           str(tmp_path / "out"), "--classes", "4", "--steps", "1", "--warmup", "0", "--check"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next((tmp_path / "out").glob("*-cpu-tiny.json")).read_text())
    for key in ("card", "classes", "windows", "pipeline_s_per_image", "single_gpu_s_per_image",
                "naive_split_s_per_image", "stage_busy_s", "bubble_fraction", "peak_mem_gib", "matmul_tflops",
                "model_tflops"):
        assert key in report, key
    assert report["classes"] == 4 and report["windows"] == 2 and len(report["stage_busy_s"]) == 2
    assert all(report[k] > 0 for k in ("pipeline_s_per_image", "single_gpu_s_per_image", "naive_split_s_per_image"))
    assert report["flops_per_image"] > 0
    # Same inputs, same weights: the 2-stage pipeline and the 1-stage run agree exactly in float32.
    check = report["check"]
    assert check["same_parameters"] and check["tensors_compared"] > 100
    assert check["loss_rel_err"] < 1e-6 and check["grad_rel_err_max"] < 1e-5
