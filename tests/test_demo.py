"""The embedded demo through the real launcher: `deepspeed --num_gpus 2 launch/tta.py --config ds_configs/demo.json`."""
from __future__ import annotations

import json
import math
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
from pipeline.tta import PreparedImages, predict
from tests.test_pipeline import free_port

ROOT = Path(__file__).resolve().parents[1]
CORRUPTIONS = ["gaussian_noise", "defocus_blur"]


def launch(tmp: Path, out: str, *overrides: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HOME=str(tmp), WANDB_SILENT="true", OMP_NUM_THREADS="1")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        env.pop(key, None)  # no credentials: W&B must go offline by itself
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/tta.py", "--config", "ds_configs/demo.json", "--output_dir", str(tmp / out),
           "--model.segmenter", str(tmp / "assets/segformer"), "--model.generator", str(tmp / "assets/sd3"),
           "--model.class_embeddings", str(tmp / "assets/classes.safetensors"), "--data.root", str(tmp / "data"),
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "average" in proc.stdout  # the results table was printed
    return json.loads((tmp / out / "results.json").read_text())


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


def test_demo_runs_to_the_end_with_finite_miou_per_task(demo_dir):
    results = launch(demo_dir, "tta")
    assert list(results["tasks"]) == CORRUPTIONS
    for task in results["tasks"].values():
        assert math.isfinite(task["mIoU"]) and 0 <= task["mIoU"] <= 1
        assert task["images"] == 4 and task["seconds"] > 0
        assert len(task["IoU"]) == len(ADE20K_CLASSES)
    assert math.isfinite(results["average"]["mIoU"])
    assert results["config"]["tta"]["forward_mode"] == "tta"
    assert results["config"]["deepspeed"]["optimizer"]["params"]["lr"] == results["config"]["tta"]["lr"]
    # No credentials in this environment: a complete offline W&B run is written beside the results.
    assert list((demo_dir / "tta" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_discriminative_only_scores_the_unchanged_source_model(demo_dir):
    results = launch(demo_dir, "source", "--tta.forward_mode", "discriminative_only",
                     "--logging.wandb.enabled", "false")
    # The same numbers, computed here from the checkpoint on disk: no weight changed during the run.
    segmenter = Segmenter.from_pretrained(str(demo_dir / "assets/segformer")).eval()
    for task in CORRUPTIONS:
        metric = SegmentationMetric(len(ADE20K_CLASSES))
        for item in PreparedImages(ADE20KC(demo_dir / "data", task), 128, 43):
            with torch.no_grad():
                metric.update(predict(segmenter(item["image"]), item["label"].shape), item["label"])
        expected = metric.compute()
        assert results["tasks"][task]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
        assert results["tasks"][task]["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-12)
