"""Replicas x stages (pipeline/run/replicas.py): the layout rules, the shared queue and the feed to rank 0 in one
process; then the launcher on the CPU: 2 x 2 gives every task exactly what one pipeline gives, and a sweep of
2 x 1 with a replica killed mid-sweep, rerun as 4 x 1, ends with what one process gives. (tent spread over 2
processes: tests/test_demo.py; a continual run over several replicas refused: test_layout_rules here and
tests/test_datasets_launch.py.)"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist
from PIL import Image

from pipeline.run.config import RunConfig
from pipeline.run.image_figures import IMAGES_FILE
from pipeline.run.replicas import ReplicaFeed, Replicas, layout_error, task_result
from pipeline.run.resume import finished_tasks
from tests.helpers import copy_demo_models, demo_command

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["gaussian_noise", "defocus_blur", "fog", "contrast"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline")


# ----------------------------------------------------------------------------- in one process
def test_layout_rules():
    assert layout_error(4, 2, False) is None and layout_error(2, 2, True) is None and layout_error(1, 1, True) is None
    assert "cannot form pipelines of pipeline.num_stages=2" in layout_error(3, 2, False)
    assert "--num_gpus 2" in layout_error(3, 2, False)
    assert "tta.continual" in layout_error(4, 2, True) and "--num_gpus 2" in layout_error(4, 2, True)
    # The launcher refuses such a run with this line (exit 2, nothing written): tests/test_datasets_launch.py, with
    # data.gradual (a continual run too) naming the sequence.
    assert layout_error(2, 1, True) == (
        "tta.continual is one sequence of tasks and cannot be spread over 2 replicas: run it with 1 process "
        "(`deepspeed --num_gpus 1 ...`), or set --pipeline.num_stages 2")


def test_replica_arithmetic():
    r = Replicas(rank=5, world=8, stages=2)
    assert (r.count, r.index, r.stage, r.leader, r.members, r.root) == (4, 2, 1, 4, [4, 5], False)
    assert Replicas(rank=0, world=4, stages=4).describe() == "1 replica x 4 stages"
    assert Replicas(rank=3, world=4, stages=1).describe() == "4 replicas x 1 stage"
    assert list(Replicas().tasks(TASKS)) == TASKS  # one replica: the run's order, no store


def stores() -> tuple[dist.TCPStore, dist.TCPStore]:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    return master, dist.TCPStore("127.0.0.1", master.port, is_master=False, wait_for_workers=False)


def test_the_shared_queue_hands_out_each_task_once():
    master, client = stores()
    a, b = Replicas(0, 2, 1, store=master), Replicas(1, 2, 1, store=client)
    ta, tb = a.tasks(TASKS), b.tasks(TASKS)
    taken = [next(ta), next(tb), next(tb), next(ta)]
    assert taken == TASKS  # in the order asked for, whoever asks
    assert list(ta) == [] and list(tb) == []


def test_the_feed_reaches_rank_0_in_order_with_pictures_and_undefined_values():
    master, client = stores()
    root, other = Replicas(0, 4, 2, store=master), Replicas(2, 4, 2, store=client)
    feed = ReplicaFeed(other)
    feed.log_step("fog", 0, 1.25, running_miou=None)
    picture = Image.new("RGB", (6, 4), (10, 20, 30))
    feed.log_picture("fog", picture, "caption")
    feed.log_task("fog", {"mIoU": 12.5, "aAcc": 50.0, "IoU": [float("nan"), 25.0], "images": 2, "seconds": 1.0,
                          "nonfinite_steps": 0, "loss": 0.5, "image_rows": [{"task": "fog", "loss": "nan"}]})
    events = list(root.collect())
    assert [(r, e["kind"]) for r, e, _ in events] == [(1, "step"), (1, "picture"), (1, "result")]
    assert events[0][1]["loss"] == 1.25 and events[0][1]["step"] == 0
    got = Image.open(io.BytesIO(events[1][2]))
    assert got.size == (6, 4) and got.getpixel((0, 0)) == (10, 20, 30) and events[1][1]["caption"] == "caption"
    result = task_result(events[2][1])
    assert math.isnan(result["IoU"][0]) and result["IoU"][1] == 25.0 and result["mIoU"] == 12.5
    assert result["image_rows"] == [{"task": "fog", "loss": "nan"}]  # images.csv's rows travel with the result
    assert list(root.collect()) == []  # consumed once, and removed from the store
    assert not master.check(["dusa/feed/1/0"])


def test_resume_takes_any_finished_tasks_unless_continual(tmp_path):
    cfg = RunConfig()
    cfg.output_dir, cfg.data.corruptions = str(tmp_path), TASKS
    record = {**json.loads(json.dumps(dataclasses.asdict(cfg))), "deepspeed": {}}  # the launcher's: the JSON read
    names = ["a"]
    done = {"mIoU": 1.0, "aAcc": 2.0, "IoU": {"a": 1.0}, "images": 1, "seconds": 1.0}
    (tmp_path / "results.json").write_text(json.dumps({"metric_unit": "percent", "config": record, "tasks": {
        "defocus_blur": done, "contrast": done}}))
    assert list(finished_tasks(cfg, record, names)) == ["defocus_blur", "contrast"]  # replicas finish in any order
    cfg.tta.continual = True
    record["tta"]["continual"] = True
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["config"] = record
    (tmp_path / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="not a beginning of this run's"):
        finished_tasks(cfg, record, names)


# ----------------------------------------------------------------------------- through the launcher
def launch(tmp: Path, out: str, gpus: int, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    command = demo_command(tmp, out, "--data.corruptions", f"[{','.join(TASKS)}]", "--data.limit", "2",
                           "--logging.progress", "false", *overrides)
    command[command.index("--num_gpus") + 1] = str(gpus)
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


ONE_STAGE = ("--pipeline.num_stages", "1", "--pipeline.partition", "[0,7]")


def tasks_of(out: Path) -> dict:
    """Every task's results but its wall-clock seconds, in the file's order."""
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    return {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in tasks.items()}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory, demo_models) -> Path:
    folder = tmp_path_factory.mktemp("replicas")
    copy_demo_models(demo_models, folder / "assets")  # where demo_command points: the runs build no model
    return folder


@pytest.mark.slow  # 2 + 4 launcher processes
def test_two_replicas_of_two_stages_give_what_one_pipeline_gives(tmp):
    launch(tmp, "1x2", 2, "--logging.wandb.enabled", "false")  # the reference: its numbers only
    run = launch(tmp, "2x2", 4)
    assert "4 (2 replicas x 2 stages: dusa, tasks from a shared queue)" in run.stdout
    assert "replica 1)" in run.stdout  # the other replica ran tasks, and rank 0 heard of them
    reference = tasks_of(tmp / "1x2")
    assert list(reference) == TASKS and all(r["loss"] is not None for r in reference.values())
    assert tasks_of(tmp / "2x2") == reference  # losses, IoU per class, mIoU: exactly
    assert (tmp / "2x2" / IMAGES_FILE).read_text() == (tmp / "1x2" / IMAGES_FILE).read_text()  # every image, in order
    # One W&B run holds every task's steps and pictures, the other replica's included.
    runs = list((tmp / "2x2" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = next(runs[0].glob("run-*.wandb")).read_bytes()
    media = runs[0] / "files" / "media" / "images"
    for task in TASKS:
        assert f"{task}/loss".encode() in history and f"{task}/mIoU".encode() in history
        assert list((media / task).glob("picture_*.png")), task


@pytest.mark.slow  # 1 + 2 launcher processes, killed; then 4
def test_a_replica_killed_mid_sweep_and_the_sweep_rerun_by_four_replicas_give_what_one_process_gives(tmp):
    """2 replicas of one stage, one killed once a first task is saved; the rerun, 4 replicas of one stage, runs
    the rest: every task, whichever layout ran it, equals the one-process run's exactly."""
    launch(tmp, "1x1", 1, *ONE_STAGE, "--logging.wandb.enabled", "false")
    out = tmp / "killed"
    command = demo_command(tmp, "killed", "--data.corruptions", f"[{','.join(TASKS)}]", "--data.limit", "2",
                           "--logging.progress", "false", "--logging.wandb.enabled", "false", *ONE_STAGE)
    launcher = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        # Replica 1 (rank 1), killed once a first task is saved: found while the run starts, so that the kill
        # follows the first saved task at once (a tiny task takes under a second).
        deadline, victim, killed = time.time() + 600, None, False
        while time.time() < deadline and not killed:
            if victim is None:
                for child in psutil.Process(launcher.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1" and "launch/tta.py" in " ".join(child.cmdline()):
                            victim = child
                    except psutil.Error:
                        pass
            assert launcher.poll() is None, "the run ended before a replica could be killed"
            results = out / "results.json"
            if victim is not None and results.is_file() and json.loads(results.read_text())["tasks"]:
                victim.send_signal(signal.SIGKILL)
                killed = True
            time.sleep(0.02)
        assert killed
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0, output[-3000:]
    kept = tasks_of(out)
    assert 1 <= len(kept) < len(TASKS), output[-3000:]

    rerun = launch(tmp, "killed", 4, *ONE_STAGE, "--logging.wandb.enabled", "false")
    assert "4 (4 replicas x 1 stage: dusa, tasks from a shared queue)" in rerun.stdout
    assert all(f"{task}: already done" in rerun.stdout for task in kept)
    assert tasks_of(out) == tasks_of(tmp / "1x1")
    assert (out / IMAGES_FILE).read_text() == (tmp / "1x1" / IMAGES_FILE).read_text()  # no row lost or repeated
