"""The benchmark script runs end to end (tiny models, CPU) and its (a)/(b) gradient check agrees.
Speed itself is measured on GPUs by `bench/bench.py`, never asserted here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def test_out_of_memory_on_one_stage_ends_every_stage_promptly(tmp_path):
    """Stage 1 runs out of memory at the second class count (injected: a CPU has no CUDA allocator): stage 0,
    waiting inside the step, records where it was and ends too, long before the variant's timeout."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/bench.py", "--tiny", "--workdir", str(tmp_path / "work"), "--out",
           str(tmp_path / "out"), "--variants", "pipeline", "--classes", "4", "6", "--steps", "1", "--warmup", "0",
           "--inject_oom", "1:6", "--timeout", "600"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - start < 300  # not the 600 s timeout
    report = json.loads(next((tmp_path / "out").glob("*-cpu-tiny.json")).read_text())
    assert report["stopped"] == [{"rank": 1, "stage": 1, "classes": 6, "where": "step 0",
                                  "error": "injected by --inject_oom (test)"}]
    assert report["by_classes"]["4"]["pipeline_s_per_image"] > 0 and not report["by_classes"]["4"]["pipeline_oom"]
    assert report["by_classes"]["6"]["pipeline_oom"] and report["by_classes"]["6"]["pipeline_s_per_image"] is None
    stage0 = json.loads((tmp_path / "work" / "pipeline-rank0.json").read_text())
    assert stage0["results"]["6"]["stopped_by_stage"] == 1
    # The estimate of pipeline/memory.py sits beside each class count, per stage.
    assert len(report["by_classes"]["4"]["memory_estimate"]["stages"]) == 2


def test_sweep_dry_run_times_both_layouts_of_the_launcher(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/bench.py", "--tiny", "--sweep", "--workdir", str(tmp_path / "work"), "--out",
           str(tmp_path / "out"), "--classes", "4", "--sweep_images", "2", "--timeout", "300"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next((tmp_path / "out").glob("*-cpu-sweep-tiny.json")).read_text())
    assert report["card"] == "cpu" and report["gpus"] == 2 and report["tasks"] == ["gaussian_noise", "defocus_blur"]
    rows = {row["layout"]: row for row in report["layouts"]}
    assert set(rows) == {"1 x 2", "2 x 1"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["images"] == 4 and set(row["task_seconds"]) == {"gaussian_noise", "defocus_blur"}
        assert row["images_per_s"] > 0 and 0 < row["images_per_s_wall"] < row["images_per_s"]
    # One replica runs the tasks one after the other; two run one each.
    assert rows["1 x 2"]["tasks_span_s"] == pytest.approx(sum(rows["1 x 2"]["task_seconds"].values()))
    assert rows["2 x 1"]["tasks_span_s"] == pytest.approx(max(rows["2 x 1"]["task_seconds"].values()))
