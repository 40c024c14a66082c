"""ds_configs/cityscapes_c.json and ds_configs/acdc.json through the launcher (2 processes, CPU) on the
synthetic Cityscapes and ACDC layouts with tiny models, once per protocol: episodic, gradual, continual rounds
(with a resume inside a round); and their bad input: one line, exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.cityscapes import CITYSCAPES_CLASSES
from data.classes import ADE20K_CLASSES
from data.demo import make_demo_street
from models.tiny import ensure_demo_models
from tests.helpers import free_port, refused_runs

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
ENV.pop("DUSA_TRACEBACK", None)
CORRUPTIONS = ["gaussian_noise", "fog"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("street")
    ensure_demo_models(str(root / "segformer"), str(root / "sd3"), str(root / "classes.safetensors"),
                       CITYSCAPES_CLASSES)
    ensure_demo_models(str(root / "segformer"), str(root / "sd3"), str(root / "ade.safetensors"), ADE20K_CLASSES)
    make_demo_street(root / "cityscapes", "cityscapes", CORRUPTIONS, (1, 2, 3, 4, 5), num_images=2, size=(64, 128),
                     create=True)
    make_demo_street(root / "acdc", "acdc", ["fog", "night", "rain", "snow"], num_images=2, size=(64, 128),
                     create=True)
    return root


def command(assets: Path, config: str, out: Path, *overrides: str, processes: int = 2) -> list[str]:
    """The config's own command, on the tiny models and the synthetic layout, with the demo's small sizes."""
    dataset = "cityscapes" if "cityscapes" in config else "acdc"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
                str(free_port())] if processes > 1 else [sys.executable]
    return [*launcher, "launch/tta.py", "--config", f"ds_configs/{config}", "--output_dir", str(out),
            "--model.segmenter", str(assets / "segformer"), "--model.generator", str(assets / "sd3"),
            "--model.class_embeddings", str(assets / "classes.safetensors"), "--data.root", str(assets / dataset),
            "--data.short_edge", "64", "--data.window_size", "64", "--data.window_stride", "64",
            "--data.num_workers", "0", "--tta.lr", "1e-4", "--dusa.max_classes", "8", "--deepspeed",
            "ds_configs/ds_demo.json", "--pipeline.partition", "[0, 4, 7]", "--logging.wandb.enabled", "false",
            "--logging.image_every", "0", "--logging.progress", "false", *overrides]


def run(assets: Path, config: str, out: Path, *overrides: str) -> dict:
    proc = subprocess.run(command(assets, config, out, *overrides), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def without_seconds(results: dict) -> dict:
    return {task: {k: v for k, v in entry.items() if k != "seconds"} for task, entry in results["tasks"].items()}


@pytest.mark.slow  # a launcher process
def test_cityscapes_c_episodic_covers_each_image_with_rows_and_columns_of_windows(assets, tmp_path):
    results = run(assets, "cityscapes_c.json", tmp_path / "episodic", "--data.corruptions", json.dumps(CORRUPTIONS),
                  "--data.short_edge", "96")  # 96 x 192: 2 x 3 windows of 64
    assert list(results["tasks"]) == CORRUPTIONS and "rounds" not in results
    assert all(t["images"] == 2 and t["severity"] == 5 and t["loss"] is not None for t in results["tasks"].values())
    assert results["config"]["data"]["dataset"] == "cityscapes" and len(results["tasks"]["fog"]["IoU"]) == 19


@pytest.mark.slow  # a launcher process
def test_cityscapes_c_gradual_goes_up_and_down_the_severities(assets, tmp_path):
    results = run(assets, "cityscapes_c.json", tmp_path / "gradual", "--data.corruptions", '["fog"]',
                  "--data.gradual", "true", "--tta.continual", "true", "--data.limit", "1")
    assert [(t["domain"], t["severity"]) for t in results["tasks"].values()] == \
        [("fog", s) for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    assert list(results["tasks"])[4:6] == ["fog_5", "fog_4_down"]


@pytest.mark.slow  # launcher processes
def test_acdc_continual_rounds_and_a_resume_inside_the_second_round(assets, tmp_path):
    whole = run(assets, "acdc.json", tmp_path / "whole", "--data.rounds", "2", "--data.limit", "1")
    keys = [f"r{r}.{c}" for r in (1, 2) for c in ("fog", "night", "rain", "snow")]
    assert list(whole["tasks"]) == keys and [r["tasks"] for r in whole["rounds"]] == [4, 4]
    assert whole["state"]["task"] == "r2.rain"  # the latest state kept: after the last task but one
    # The folder as a crash right after r2.rain would leave it; the rerun runs r2.snow alone, from that state.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    saved = json.loads((cut / "results.json").read_text())
    del saved["tasks"]["r2.snow"]
    (cut / "results.json").write_text(json.dumps(saved))
    resumed = run(assets, "acdc.json", cut, "--data.rounds", "2", "--data.limit", "1")
    assert without_seconds(resumed) == without_seconds(whole)


def refusal_line(proc, out: Path) -> str:
    """The error line of a run that must refuse its input (exit 2, one `error:` line, no traceback, no task in a
    results file)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not (out / "results.json").exists() or not json.loads((out / "results.json").read_text())["tasks"]
    return lines[0]


@pytest.mark.slow  # a process that runs the one-process refusals, and launcher processes
def test_bad_input_for_the_datasets_and_protocols_is_one_line(assets, tmp_path):
    # (In-process, with their messages: gradual without continual, a gradual dataset without severities, a
    # label map of unknown ids: test_protocol.py and test_datasets.py.)
    broken = tmp_path / "broken"
    shutil.copytree(assets / "cityscapes", broken)
    shutil.rmtree(broken / "gtFine" / "val" / "bremen")
    one_process = {"a": ["--data.rounds", "0"], "b": ["--model.class_embeddings", str(assets / "ade.safetensors")],
                   "c": ["--data.root", str(broken)]}
    # `python launch/tta.py` on one stage, each case run by tests/refusals_worker.py in one process.
    runs = refused_runs({case: [*command(assets, "cityscapes_c.json", tmp_path / case, "--data.corruptions",
                                         '["fog"]', *overrides, processes=1)[2:],
                                "--pipeline.num_stages", "1", "--pipeline.partition", "null"]
                         for case, overrides in one_process.items()}, ENV)
    assert "--data.rounds 0 is outside its domain" in refusal_line(runs["a"], tmp_path / "a")
    line = refusal_line(runs["b"], tmp_path / "b")
    assert "was made for the ade20k classes (150), not the run's cityscapes classes (19)" in line
    assert "city bremen: no annotation folder" in refusal_line(runs["c"], tmp_path / "c")
    # Through the launcher: 2 processes of one stage are 2 replicas, which one sequence of tasks cannot use.
    proc = subprocess.run(command(assets, "cityscapes_c.json", tmp_path / "d", "--data.corruptions", '["fog"]',
                                  "--data.gradual", "true", "--tta.continual", "true", "--pipeline.num_stages", "1",
                                  "--pipeline.partition", "null"), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    line = refusal_line(proc, tmp_path / "d")
    assert "data.gradual is one sequence of tasks and cannot be spread over 2 replicas" in line
