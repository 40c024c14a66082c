"""bn_adapt, cotta and sar through the real launcher on the demo: results, W&B, and a continual sweep
interrupted after its first task that resumes from the saved state to the uninterrupted results."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.run.image_figures import IMAGES_FILE
from tests.helpers import copy_demo_models, demo_command
from tests.test_image_figures import check_image_figures

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # launches DeepSpeed processes
# No credentials: W&B goes offline by itself (as in tests/test_demo.py).
ENV = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_SILENT")}
ENV.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def launch(tmp: Path, out: str, gpus: int, *overrides: str) -> tuple[dict, str]:
    command = demo_command(tmp, out, *overrides)
    command[command.index("--num_gpus") + 1] = str(gpus)
    proc = subprocess.run(command, cwd=ROOT, env=dict(ENV, HOME=str(tmp)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((tmp / out / "results.json").read_text()), proc.stdout + proc.stderr


def test_new_methods_run_resume_and_report(tmp_path, demo_models):
    copy_demo_models(demo_models, tmp_path / "assets")  # where demo_command points: the runs build no model
    # bn_adapt: two replicas taking tasks from the queue, W&B offline, per-class IoU per task.
    results, output = launch(tmp_path, "bn_adapt", 2, "--tta.method", "bn_adapt", "--bn_adapt.prior", "2")
    assert results["config"]["tta"]["method"] == "bn_adapt" and results["config"]["bn_adapt"] == {"prior": 2.0}
    assert "bn_adapt: 1 BatchNorm layer(s) normalise with the image's statistics" in output
    for task in results["tasks"].values():
        assert math.isfinite(task["mIoU"]) and task["loss"] is None and len(task["IoU"]) == 150
    assert list((tmp_path / "bn_adapt" / "wandb").glob("offline-run-*"))
    check_image_figures(tmp_path / "bn_adapt", results, 150)  # both replicas' images, in the run's order

    for method, options in (("cotta", ["--cotta.scales", "[0.5, 1.0]"]), ("sar", ["--sar.margin", "0.9"])):
        args = ["--tta.method", method, "--tta.continual", "true", "--logging.wandb.enabled", "false", *options]
        whole, output = launch(tmp_path, method, 1, *args)
        assert f"{method} (lr {whole['config'][method]['lr']:g}, continual)" in output
        first, last = list(whole["tasks"])
        assert all(math.isfinite(t["loss"]) for t in whole["tasks"].values())
        check_image_figures(tmp_path / method, whole, 150)
        images = (tmp_path / method / IMAGES_FILE).read_text()
        # As a sweep that stopped during its last task leaves it: the state after the first task is on disk,
        # results.json names only that task.
        saved = json.loads((tmp_path / method / "results.json").read_text())
        assert saved["state"]["task"] == first
        del saved["tasks"][last]
        (tmp_path / method / "results.json").write_text(json.dumps(saved))
        resumed, output = launch(tmp_path, method, 1, *args)
        assert f"{first}: already done" in output
        assert resumed["tasks"][last]["mIoU"] == whole["tasks"][last]["mIoU"]
        assert resumed["tasks"][last]["IoU"] == whole["tasks"][last]["IoU"]
        assert resumed["tasks"][last]["loss"] == whole["tasks"][last]["loss"]
        assert (tmp_path / method / IMAGES_FILE).read_text() == images  # the last task's rows again, once
