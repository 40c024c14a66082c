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


def test_bench_dry_run_writes_every_field_pipeline_equals_single_stage_and_an_oom_ends_every_stage(tmp_path):
    """One run of the three variants at 4 and 6 classes (one bench.py start for both checks, profiled):
    - at 4 classes (the top level of the report) every field is written and the 2-stage pipeline equals the
      1-stage run exactly in float32 (--check);
    - at 6 classes stage 1 of the pipeline runs out of memory (injected: a CPU has no CUDA allocator): stage 0,
      waiting inside the step, records where it was and ends too, long before the variant's timeout."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/bench.py", "--tiny", "--workdir", str(tmp_path / "work"), "--out",
           str(tmp_path / "out"), "--classes", "4", "6", "--steps", "1", "--warmup", "0", "--check",
           "--inject_oom", "1:6", "--timeout", "600", "--profile"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - start < 300  # not the pipeline variant's 600 s timeout
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

    # The out-of-memory stop at 6 classes: only the pipeline's stage 1 failed (the 1-stage and naive runs have no
    # stage 1), and stage 0 ended with it.
    assert report["stopped"] == [{"rank": 1, "stage": 1, "classes": 6, "where": "step 0",
                                  "error": "injected by --inject_oom (test)"}]
    assert report["by_classes"]["4"]["pipeline_s_per_image"] > 0 and not report["by_classes"]["4"]["pipeline_oom"]
    assert report["by_classes"]["6"]["pipeline_oom"] and report["by_classes"]["6"]["pipeline_s_per_image"] is None
    stage0 = json.loads((tmp_path / "work" / "pipeline-rank0.json").read_text())
    assert stage0["results"]["6"]["stopped_by_stage"] == 1
    # The estimate of pipeline/dusa/memory.py sits beside each class count, per stage.
    assert len(report["by_classes"]["4"]["memory_estimate"]["stages"]) == 2
    # --profile: each stage's profile per class count it finished, with its trace beside the report.
    assert set(report["profile"]) == {"stage0, 4 classes", "stage1, 4 classes"}
    assert all(p["breakdown_s_per_step"]["step"] > 0 for p in report["profile"].values())
    assert len(list((tmp_path / "out").glob("*-trace-pipeline-rank[01]-4.json.gz"))) == 2


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


def test_record_dry_run_times_the_launcher_beside_the_step_and_summarises_a_run_folder(tmp_path):
    """bench/record.py end to end on tiny models: the step benchmark and launch/tta.py with --logging.timing over
    3 tasks of the shape mix; the row's fields; --summarise on the run folder gives the same figures."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/record.py", "--tiny", "--workdir", str(tmp_path / "work"), "--tasks", "3",
           "--images", "3", "--steps", "1", "--classes", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(next((tmp_path / "work" / "results").glob("*-cpu-record-tiny.json")).read_text())
    assert row["status"] == "ok" and row["images"] == 9 and (row["replicas"], row["stages"]) == (1, 1)
    assert row["step_s_per_image"] > 0 and row["steady_s_per_image"] > 0 and row["steady_images"] == 3
    assert row["steady_over_step"] > 0 and row["first_image_s"] > 0 and row["startup_s"] > row["startup"]["launcher"] > 0
    assert {"imports", "distributed init", "weights loaded", "deepspeed initialized", "runner ready"} <= set(row["startup"])
    host = row["breakdown"]["host_s"]
    assert {"data wait", "segmenter forward and candidates", "window forwards", "window backwards", "optimizer",
            "scoring and metric", "wait: candidate classes", "wait: NaN guard"} <= set(host)
    assert sum(v["images"] for v in row["steady_by_windows"].values()) == 3 and row["mean_windows_per_image"] >= 1
    outside = row["task_seconds_outside_images"]
    assert list(outside) == [t["task"] for t in row["tasks"]] and all(0 <= v < t["seconds"] for v, t in
                                                                      zip(outside.values(), row["tasks"]))
    run_dir = tmp_path / "work" / "run-1x1-3"
    timing = json.loads((run_dir / "timing-rank0.json").read_text())
    assert len(timing["images"]) == 9 and all(im["windows"] >= 1 for im in timing["images"])
    summary = subprocess.run([sys.executable, "bench/record.py", "--summarise", str(run_dir), "--out",
                              str(tmp_path / "summary")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    (again,) = json.loads(next((tmp_path / "summary").glob("*.json")).read_text())
    assert again["steady_s_per_image"] == row["steady_s_per_image"] and again["steady_by_windows"] == row["steady_by_windows"]


def test_gpu_idle_is_charged_to_the_innermost_host_range_at_each_gap():
    from types import SimpleNamespace

    import torch

    from bench.common import kernel_summary
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, end, device=cpu, annotation=False, thread=1):
        return SimpleNamespace(name=name, device_type=device, thread=thread, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))
    # Host (us): OptimizerStep 0-100 holding aten::item 10-40; ForwardPass 100-200 holding aten::copy_ 150-160;
    # another thread: one range over everything, holding a 7-us op at 151-158.
    # Kernels: 0-10, 40-90 (overlapping 50-60), 95-150 and 160-170: gaps 10-40, 90-95 and 150-160.
    events = [event("OptimizerStep", 0, 100, annotation=True), event("aten::item", 10, 40),
              event("ForwardPass", 100, 200, annotation=True), event("aten::copy_", 150, 160),
              event("autograd thread", 0, 200, thread=2), event("backward op", 151, 158, thread=2),
              event("k1", 0, 10, cuda), event("k2", 40, 90, cuda),
              event("k3", 50, 60, cuda), event("k4", 95, 150, cuda), event("k5", 160, 170, cuda)]
    summary = kernel_summary(SimpleNamespace(events=lambda: events))
    assert summary["kernels"] == 5 and summary["kernel_busy_union_s"] == pytest.approx(125e-6)
    assert summary["idle_gaps"] == 3 and summary["idle_s"] == pytest.approx(45e-6)
    assert summary["idle_s_by_host_annotation"] == pytest.approx({"OptimizerStep": 35e-6, "ForwardPass": 10e-6})
    # Of the threads' innermost operators at a gap's middle, the shortest: the other thread's 7-us op at 155.
    assert summary["idle_s_by_host_operator"] == pytest.approx({"aten::item": 30e-6, "backward op": 10e-6,
                                                                "autograd thread": 5e-6})


def test_vae_encoder_and_block_host_dry_runs_write_their_rows(tmp_path):
    """bench/vae_encoder.py and bench/layer_throughput.py --host on tiny widths: every row measured, the latents'
    distances finite and small, the block's host and device figures (no device time on a CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cmd in (["bench/vae_encoder.py", "--tiny", "--repeats", "2"],
                ["bench/layer_throughput.py", "--tiny", "--host", "--classes", "2", "3", "--repeats", "2"]):
        proc = subprocess.run([sys.executable, *cmd, "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    vae = json.loads(next(tmp_path.glob("*-cpu-tiny-vae-encoder.json")).read_text())
    assert [r["form"].split(",")[0] for r in vae["rows"]] == ["eager", "eager", "compiled (eager)"]
    assert all(r["ms_per_window"] > 0 and 0 <= r["latent_vs_float32"] < 0.1 for r in vae["rows"])
    assert vae["rows"][2]["latent_vs_eager"] == 0.0  # dynamo's eager backend runs eager's kernels
    host = json.loads(next(tmp_path.glob("*-cpu-tiny-block-host.json")).read_text())
    assert [r["classes"] for r in host["rows"]] == [2, 3]
    assert all(r["device_ms"] is None and r["host_forward_ms"] > 0 and r["host_backward_ms"] > 0 for r in host["rows"])
