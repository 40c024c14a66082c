"""The embedded demo through the real launcher: `deepspeed --num_gpus 2 launch/tta.py --config ds_configs/demo.json`,
once per method (dusa, source, tent)."""
from __future__ import annotations

import csv
import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.ade20k_c import ADE20KC
from data.classes import ADE20K_CLASSES
from data.metrics import SegmentationMetric
from models.segformer import Segmenter
from pipeline.methods.tent import Tent
from pipeline.run.config import DataConfig
from pipeline.run.images import PreparedImages, predict, task_order
from tests.helpers import demo_command
from tests.test_image_figures import check_image_figures

ROOT = Path(__file__).resolve().parents[1]
# Starts DeepSpeed launcher processes: minutes on a CPU (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow
CORRUPTIONS = ["gaussian_noise", "defocus_blur"]


def launch(tmp: Path, out: str, *overrides: str) -> tuple[dict, str]:
    """Runs the demo into `tmp/out`: (its results.json, the launcher's stdout and stderr)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", HOME=str(tmp), OMP_NUM_THREADS="1")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        env.pop(key, None)  # no credentials: W&B must go offline by itself
    env.pop("WANDB_SILENT", None)  # the run quiets W&B itself
    proc = subprocess.run(demo_command(tmp, out, *overrides), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "average" in proc.stdout  # the results table was printed
    return json.loads((tmp / out / "results.json").read_text()), proc.stdout + proc.stderr


# What the libraries print on their own, which a run without --logging.verbose turns off: DeepSpeed's
# accelerator, seed and topology banners, per-step line and op build, the weight loading/writing bars of
# transformers and diffusers, W&B's banner and summary, torch's NCCL P2P warning.
CHATTER = ("Setting accelerator to", "SEED_LAYERS=", "Using topology:", "built successfully", "Loading weights",
           "Writing model shards", "wandb:", "steps: ", "P2P")


def check_quiet(output: str) -> None:
    """None of the libraries' own lines; the deepspeed launcher's (a process of its own, "[date] [INFO] ...")
    are not the run's."""
    lines = [line for line in output.splitlines() if not line.startswith("[20")]
    assert not [line for line in lines if any(c in line for c in CHATTER)], output[-4000:]


def check_outputs(run: Path, results: dict) -> None:
    """results.csv mirrors results.json; config.json and one picture per 2 images of each task (image_every 2,
    in the task's shuffled order)."""
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == [*CORRUPTIONS, "average"]
    assert list(rows[0])[7:] == [f"IoU/{c}" for c in ADE20K_CLASSES]
    for row in rows[:-1]:
        assert row["mIoU"] == f"{results['tasks'][row['task']]['mIoU']:.2f}"
    assert rows[-1]["mIoU"] == f"{results['average']['mIoU']:.2f}"
    text = (run / "config.json").read_text()
    assert json.loads(text) == results["config"] and text.endswith("}\n")
    data = DataConfig(shuffle=results["config"]["data"]["shuffle"])
    for task in CORRUPTIONS:
        order = task_order(data, results["config"]["seed"], task, 4)  # the 1st and 3rd image adapted
        assert sorted(p.name for p in (run / "pictures" / task).iterdir()) == sorted(
            f"ADE_val_{order[k] + 1:08d}.png" for k in (0, 2))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


def test_demo_runs_to_the_end_with_finite_miou_per_task(demo_dir):
    results, output = launch(demo_dir, "tta")
    assert list(results["tasks"]) == CORRUPTIONS
    for task in results["tasks"].values():
        assert math.isfinite(task["mIoU"]) and 0 <= task["mIoU"] <= 100  # percent
        assert task["images"] == 4 and task["seconds"] > 0
        assert len(task["IoU"]) == len(ADE20K_CLASSES)
    assert math.isfinite(results["average"]["mIoU"])
    assert results["config"]["tta"]["method"] == "dusa"
    assert results["config"]["deepspeed"]["optimizer"]["params"]["lr"] == results["config"]["tta"]["lr"]
    check_outputs(demo_dir / "tta", results)
    assert {r["candidate_recall"] for r in check_image_figures(demo_dir / "tta", results, len(ADE20K_CLASSES))} != {""}
    # The start-up summary (parameters of both stages); outside a terminal, no bar but a line every log_every (2)
    # images with the rate and the sweep's ETA; on a CPU, no planner predictions or GPU memory estimate; no
    # blank line.
    assert "method" in output and "parameters, stage 0" in output and "parameters, stage 1" in output
    assert "\r" not in output and "" not in [line for line in output.split("\n")[:-1] if not line.startswith("[20")]
    assert re.search(r"^\[1/2\] gaussian_noise: 2/4 images, [\d.]+ img/s, mIoU [\d.]+, loss \d\.\d{4}, "
                     r"sweep ETA \d\d:\d\d$", output, re.M)
    assert "partition [0, 4, 7] (pipeline.partition)\n" in output
    assert not any(s in output for s in ("memory per GPU", "predicted", "bench/bench.py --calibrate"))
    check_quiet(output)  # the demo models were built in this run too: their writing bars are off as well
    # No credentials in this environment: a complete offline W&B run is written beside the results,
    # with the pictures in it.
    runs = list((demo_dir / "tta" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert len(list((runs[0] / "files" / "media" / "images").rglob("*.png"))) == 4


def test_source_scores_the_unchanged_source_model(demo_dir):
    results, _ = launch(demo_dir, "source", "--tta.method", "source", "--logging.wandb.enabled", "false")
    assert results["config"]["tta"]["method"] == "source"
    check_outputs(demo_dir / "source", results)
    # The same numbers, computed here from the checkpoint on disk: no weight changed during the run.
    segmenter = Segmenter.from_pretrained(str(demo_dir / "assets/segformer")).eval()
    for task in CORRUPTIONS:
        metric = SegmentationMetric(len(ADE20K_CLASSES))
        for item in PreparedImages(ADE20KC(demo_dir / "data", task), 128, 64):
            with torch.no_grad():
                metric.update(predict(segmenter(item["image"]), item["label"].shape), item["label"])
        expected = metric.compute()
        assert results["tasks"][task]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
        assert results["tasks"][task]["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-12)

    # The same command again, as one process: every task is done, so it says so and loads no model, and
    # results.json stays as it was.
    done = demo_dir / "source" / "results.json"
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    command = demo_command(demo_dir, "source", "--tta.method", "source", "--logging.wandb.enabled", "false")
    rerun = subprocess.run([sys.executable, *command[command.index("launch/tta.py"):]], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.splitlines()[-1] == (f"every task is already done in {done}: nothing to run "
                                             f"(another --output_dir starts a new run)")
    assert "segmenter " not in rerun.stdout and (done.read_bytes(), done.stat().st_mtime_ns) == before


def test_tent_runs_without_a_generator_and_matches_tent_in_one_process(demo_dir):
    absent = demo_dir / "no-generator"
    results, output = launch(demo_dir, "tent", "--tta.method", "tent", "--model.generator", str(absent),
                             "--model.class_embeddings", str(absent / "classes.safetensors"),
                             "--logging.wandb.enabled", "false")
    assert not absent.exists()  # neither built nor loaded
    # tent has no pipeline: the 2 processes are 2 replicas taking the tasks from the shared queue (the numbers
    # below, computed in one process, show that spreading the tasks changes none of them).
    assert "2 (2 replicas x 1 stage: tent, tasks from a shared queue)" in output
    assert "\nparameters, segmenter " in output and "\ngenerator " not in output  # the start-up summary
    check_outputs(demo_dir / "tent", results)
    # The same numbers from the Tent class here: reset between tasks, the adaptation forward scored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched run (OMP_NUM_THREADS=1): the same float reductions
    try:
        for task in CORRUPTIONS:
            tent = Tent(Segmenter.from_pretrained(str(demo_dir / "assets/segformer")), lr=results["config"]["tta"]["lr"])
            metric = SegmentationMetric(len(ADE20K_CLASSES))
            images = PreparedImages(ADE20KC(demo_dir / "data", task), 128, 64)
            # In the run's order: shuffled per task from the seed (Tent's result depends on the order).
            data = DataConfig(shuffle=results["config"]["data"]["shuffle"])
            for i in task_order(data, results["config"]["seed"], task, len(images)):
                item = images[i]
                logits, _ = tent.step(item["image"])
                metric.update(predict(logits, item["label"].shape), item["label"])
            expected = metric.compute()
            assert results["tasks"][task]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
            assert results["tasks"][task]["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-12)
    finally:
        torch.set_num_threads(threads)
