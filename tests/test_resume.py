"""An interrupted sweep loses nothing, and runs repeat exactly (the demo through the launcher, CPU)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run.config import DataConfig
from pipeline.run.images import task_order
from tests.helpers import RunsCode, copy_demo_models, demo_command

ROOT = Path(__file__).resolve().parents[1]


def command(tmp: Path, out: str, *overrides: str) -> list[str]:
    return demo_command(tmp, out, "--logging.wandb.enabled", "false", "--logging.image_every", "0", *overrides)


ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def run(tmp: Path, out: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(tmp, out, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def comparable(out: Path) -> dict:
    """results.json without what a rerun may change (wall-clock seconds, the output folder)."""
    results = json.loads((out / "results.json").read_text())
    for task in results["tasks"].values():
        task.pop("seconds")
    results["config"].pop("output_dir")
    return results


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, demo_models) -> Path:
    folder = tmp_path_factory.mktemp("resume")
    copy_demo_models(demo_models, folder / "assets")  # where demo_command points: the runs build no model
    return folder


@pytest.fixture(scope="module")
def once(tmp) -> Path:
    """An uninterrupted continual sweep."""
    run(tmp, "once", "--tta.continual", "true")
    return tmp / "once"


@pytest.mark.slow  # launcher processes
def test_same_config_and_seed_give_identical_results_across_a_kill_and_a_resume(tmp, once):
    """The same sweep run again in other processes, killed after its first task and resumed, ends with the
    uninterrupted sweep's results: its first task repeats it exactly (determinism), and the second goes on
    from the saved state."""
    out = tmp / "killed"
    proc = subprocess.Popen(command(tmp, "killed", "--tta.continual", "true"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # kill the whole launcher tree once the first task is saved
            results = out / "results.json"
            if results.is_file() and len(json.loads(results.read_text())["tasks"]) == 1:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert list(json.loads((out / "results.json").read_text())["tasks"]) == ["gaussian_noise"]

    rerun = run(tmp, "killed", "--tta.continual", "true")
    assert "gaussian_noise: already done" in rerun.stdout
    # Continual: the second task started from the saved state of the first, so nothing differs.
    assert comparable(out) == comparable(once)


@pytest.mark.slow  # a launch/tta.py process
def test_a_rerun_with_another_configuration_is_refused(tmp, once):
    # One process (no launcher): the stage split is not part of what a resume compares, so the refusal is the
    # launched run's, at a fraction of the start-up.
    cmd = command(tmp, "once", "--tta.continual", "true", "--tta.lr", "0.5")
    proc = subprocess.run([sys.executable, *cmd[cmd.index("launch/tta.py"):]], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "holds results of another configuration (differs in: tta, deepspeed)" in proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before any model loads


@pytest.mark.slow  # a launcher process (2 ranks), refused
def test_a_planted_state_file_is_refused_and_the_other_rank_is_quiet(tmp, once):
    """The uninterrupted continual sweep cut after its first task, a file planted in its DeepSpeed state: the
    rerun refuses before any model loads, with one line from rank 0, and runs nothing of the file."""
    out = tmp / "planted"
    shutil.copytree(once, out)
    results = json.loads((out / "results.json").read_text())
    assert results["state"]["task"] == "gaussian_noise" and results["state"]["files"]
    del results["tasks"]["defocus_blur"]  # as if stopped after the first task
    (out / "results.json").write_text(json.dumps(results))
    marker = tmp / "code-ran"
    planted = out / "state" / "gaussian_noise" / "layer_03-model_states.pt"
    planted.write_bytes(pickle.dumps(RunsCode(marker)))
    before = sorted(p.name for p in out.rglob("*"))
    proc = subprocess.run(command(tmp, "planted", "--tta.continual", "true"), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]  # rank 0's; the other rank is quiet
    assert "layer_03-model_states.pt was changed); it is not loaded" in lines[0]
    assert "Loading weights" not in output
    assert not marker.exists() and sorted(p.name for p in out.rglob("*")) == before


def test_task_order_is_a_seeded_shuffle_per_task_or_file_order():
    shuffled, plain = DataConfig(shuffle=True), DataConfig(shuffle=False)
    a = task_order(shuffled, 0, "fog", 50)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert task_order(shuffled, 0, "fog", 50) == a  # every stage and every rerun: the same order
    assert task_order(shuffled, 0, "snow", 50) != a and task_order(shuffled, 1, "fog", 50) != a
    assert task_order(plain, 0, "fog", 50) == list(range(50))
    assert DataConfig().shuffle  # the reference shuffles
