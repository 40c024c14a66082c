"""Tests of pipeline/run/reporting.py: results document, JSON file, table, and W&B logging (disabled and offline)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.run.config import LoggingConfig, RunConfig, WandbConfig
from pipeline.run.reporting import (RUN_ID_FILE, RunLogger, format_results_table, overridden_ds_keys, read_results,
                                resolve_wandb_mode, startup_summary, summarize, wandb_credentials_configured,
                                warn_overridden_ds_keys, write_results)

CLASSES = ["wall", "sky", "tree"]
TASK_RESULTS = {
    "gaussian_noise": {"mIoU": 30.0, "aAcc": 70.0, "IoU": [20.0, math.nan, 40.0], "images": 4, "seconds": 12.5},
    "fog": {"mIoU": 50.0, "aAcc": 90.0, "IoU": [50.0, 60.0, 40.0], "images": 3, "seconds": 7.25},
}
CONFIG = {"tta": {"lr": 1e-5}, "data": {"severity": 5}}


def test_summarize_averages_and_order() -> None:
    res = summarize(TASK_RESULTS, CONFIG, CLASSES)
    assert list(res["tasks"]) == ["gaussian_noise", "fog"]
    assert res["metric_unit"] == "percent"
    assert res["average"]["mIoU"] == pytest.approx(40.0)
    assert res["average"]["aAcc"] == pytest.approx(80.0)
    g = res["tasks"]["gaussian_noise"]
    assert g["IoU"] == {"wall": 20.0, "sky": None, "tree": 40.0}
    assert g["images"] == 4 and g["seconds"] == 12.5
    assert res["config"] == CONFIG


def test_summarize_rejects_wrong_class_count() -> None:
    with pytest.raises(ValueError):
        summarize({"fog": {**TASK_RESULTS["fog"], "IoU": [0.1]}}, CONFIG, CLASSES)


def test_write_results_nan_to_null_and_atomic(tmp_path: Path) -> None:
    res = summarize(TASK_RESULTS, CONFIG, CLASSES)
    res["config"]["odd"] = math.nan  # NaN anywhere in the document must become null
    out = tmp_path / "run"
    path = write_results(res, out)
    assert path == out / "results.json"
    text = path.read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["tasks"]["gaussian_noise"]["IoU"]["sky"] is None
    assert data["config"]["odd"] is None
    assert data["average"]["mIoU"] == pytest.approx(40.0) and data["metric_unit"] == "percent"
    # Overwriting works and leaves only the final files behind.
    write_results(res, out)
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]


def test_format_results_table() -> None:
    table = format_results_table(summarize(TASK_RESULTS, CONFIG, CLASSES))
    lines = table.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line and not line.startswith("-")}
    assert row["gaussian_noise"][1:] == ["30.00", "70.00", "4", "12.5"]
    assert row["fog"][1:] == ["50.00", "90.00", "3", "7.2"]  # 7.25 rounds half to even
    assert row["average"][1:] == ["40.00", "80.00"]
    assert lines.index(next(line for line in lines if line.startswith("average"))) == len(lines) - 1
    assert lines[-2].startswith("---")


def test_results_csv_one_row_per_task_then_the_average_rounded_as_the_console(tmp_path: Path) -> None:
    tasks = {task: dict(res) for task, res in TASK_RESULTS.items()}
    tasks["gaussian_noise"].update(mIoU=30.004, loss=0.123456, nonfinite_steps=2)
    write_results(summarize(tasks, CONFIG, CLASSES), tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task", "mIoU", "aAcc", "images", "seconds", "loss", "nonfinite_steps",
                             "IoU/wall", "IoU/sky", "IoU/tree"]
    assert [r["task"] for r in rows] == ["gaussian_noise", "fog", "average"]
    assert rows[0] == {"task": "gaussian_noise", "mIoU": "30.00", "aAcc": "70.00", "images": "4", "seconds": "12.5",
                       "loss": "0.1235", "nonfinite_steps": "2", "IoU/wall": "20.00", "IoU/sky": "",  # NaN: empty
                       "IoU/tree": "40.00"}
    assert rows[1]["loss"] == "" and rows[1]["nonfinite_steps"] == "0"  # no loss recorded (source)
    assert rows[2] == {"task": "average", "mIoU": "40.00", "aAcc": "80.00", "images": "7", "seconds": "19.8",
                       "loss": "", "nonfinite_steps": "2", "IoU/wall": "", "IoU/sky": "", "IoU/tree": ""}


def test_startup_summary_names_what_runs() -> None:
    def fields(text: str) -> dict[str, str]:  # "key   value" lines, keys padded to one width
        return dict(re.match(r"(.+?)\s{2,}(.+)$", line).groups() for line in text.splitlines())

    cfg = RunConfig()
    rows = fields(startup_summary(cfg, ["ds_configs/tta.json"], "2 (1 replica x 2 stages: dusa), 2 x cuda visible",
                                  [("stage 0", 84_700_000, 168_000_000), ("stage 1", 1_200_000_000, 1_200_000_000)],
                                  30000))
    assert rows["method"] == "dusa (lr 1e-05, reset before each task)"
    assert rows["generator"] == cfg.model.generator and rows["segmenter"] == cfg.model.segmenter
    assert rows["parameters, stage 0"] == "84.70M trainable / 168.00M"
    assert rows["parameters, stage 1"] == "1.20B trainable / 1.20B"
    assert rows["processes"] == "2 (1 replica x 2 stages: dusa), 2 x cuda visible"
    assert rows["data"] == "data/ade20k_c: 15 corruptions at severity 5, 30000 images"
    assert rows["config"] == "ds_configs/tta.json" and rows["output"] == cfg.output_dir
    cfg.tta.method = "source"
    rows = fields(startup_summary(cfg, [], "1 (1 replica x 1 stage: source), 1 x cuda visible",
                                  [("segmenter", 0, 84_700_000)], 10))
    assert rows["method"] == "source" and rows["config"] == "(defaults)"
    assert "generator" not in rows and rows["parameters, segmenter"] == "0 trainable / 84.70M"


def _clear_wandb_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY",
                "WANDB_NAME", "WANDB_TAGS", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_wandb_env(monkeypatch, tmp_path)
    auto = WandbConfig()
    assert not wandb_credentials_configured()
    assert resolve_wandb_mode(auto) == "offline"

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(auto) == "online"
    monkeypatch.delenv("WANDB_API_KEY")

    # A broken netrc is tolerated (no credentials), a valid entry for the W&B host counts.
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine\n")
    assert resolve_wandb_mode(auto) == "offline"
    netrc_file.write_text("machine example.com login user password pw\n")
    assert resolve_wandb_mode(auto) == "offline"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert resolve_wandb_mode(auto) == "online"
    # A self-hosted server needs an entry for its own host.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert resolve_wandb_mode(auto) == "offline"
    monkeypatch.delenv("WANDB_BASE_URL")

    # $WANDB_MODE wins over auto; the config field wins over everything.
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(auto) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(auto) == "disabled"
    assert resolve_wandb_mode(WandbConfig(mode="online")) == "online"
    netrc_file.unlink()
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode(WandbConfig(mode="online")) == "online"
    assert resolve_wandb_mode(WandbConfig(mode="disabled")) == "disabled"


@pytest.mark.parametrize("cfg", [WandbConfig(enabled=False), WandbConfig(mode="disabled")])
def test_run_logger_disabled_is_noop(cfg: WandbConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clear_wandb_env(monkeypatch, tmp_path / "home")
    logger = RunLogger(LoggingConfig(wandb=cfg), tmp_path / "out", CONFIG, CLASSES)
    assert not logger.enabled and logger.run_dir is None
    logger.log_step("fog", 1, 0.5, running_miou=30.0, extra={"lr": 1e-5})
    logger.log_task("fog", TASK_RESULTS["fog"])
    logger.finish(summarize(TASK_RESULTS, CONFIG, CLASSES))
    assert not (tmp_path / "out" / "wandb").exists()


def test_run_logger_init_failure_continues(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import wandb

    def boom(**kwargs: object) -> None:
        raise RuntimeError("no service")

    _clear_wandb_env(monkeypatch, tmp_path / "home")
    monkeypatch.setattr(wandb, "init", boom)
    logger = RunLogger(LoggingConfig(), tmp_path / "out", CONFIG, CLASSES)
    assert not logger.enabled
    assert "WARNING" in capsys.readouterr().out
    logger.log_step("fog", 1, 0.5)
    logger.finish(summarize(TASK_RESULTS, CONFIG, CLASSES))


def test_run_logger_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    _clear_wandb_env(monkeypatch, tmp_path / "home")
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_DIR", str(out))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_TAGS", "ci, demo")
    logging = LoggingConfig(wandb=WandbConfig(tags=["test"]))
    logger = RunLogger(logging, out, CONFIG, CLASSES)
    assert logger.enabled
    run_dir = logger.run_dir
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    assert "wandb sync" in capsys.readouterr().out
    assert set(logger._run.tags) == {"test", "ci", "demo"}

    picture = Image.new("RGB", (24, 8), "white")
    for task in TASK_RESULTS:
        for step in range(3):
            logger.log_step(task, step, loss=1.0 / (step + 1), running_miou=10.0 * step if step else None)
            if step == 0:
                logger.log_picture(task, picture, caption=f"{task}: input | prediction | ground truth")
        logger.log_task(task, TASK_RESULTS[task])
    logger.finish(summarize(TASK_RESULTS, CONFIG, CLASSES))  # with the bar chart of mIoU per corruption
    assert not logger.enabled and logger.run_dir == run_dir  # kept for the sync instructions
    assert "WARNING" not in capsys.readouterr().out  # no W&B call failed
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 2

    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs == [run_dir]
    assert list(run_dir.glob("run-*.wandb"))


def test_read_results_converts_a_file_of_fractions_and_refuses_unknown_units(tmp_path: Path) -> None:
    path = write_results(summarize(TASK_RESULTS, CONFIG, CLASSES), tmp_path)
    assert read_results(path) == json.loads(path.read_text())
    old = json.loads(path.read_text())  # as written before metric_unit: fractions
    del old["metric_unit"]
    for res in old["tasks"].values():
        res["mIoU"], res["aAcc"] = res["mIoU"] / 100, res["aAcc"] / 100
        res["IoU"] = {c: None if v is None else v / 100 for c, v in res["IoU"].items()}
    old["average"] = {k: v / 100 for k, v in old["average"].items()}
    path.write_text(json.dumps(old))
    converted = read_results(path)
    assert converted["metric_unit"] == "percent" and converted["average"] == pytest.approx({"mIoU": 40.0, "aAcc": 80.0})
    assert converted["tasks"]["gaussian_noise"]["IoU"] == {"wall": pytest.approx(20.0), "sky": None,
                                                           "tree": pytest.approx(40.0)}
    path.write_text(json.dumps({**old, "metric_unit": "fraction"}))
    with pytest.raises(ValueError, match="metric_unit 'fraction'"):
        read_results(path)


def test_results_files_get_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_results(summarize(TASK_RESULTS, CONFIG, CLASSES), tmp_path)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"results.json": 0o644,
                                                                             "results.csv": 0o644}


def test_a_resumed_sweep_continues_its_wandb_run_and_a_finished_one_opens_none(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _clear_wandb_env(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    config = {**CONFIG, "data": {"corruptions": list(TASK_RESULTS)}}
    first = RunLogger(LoggingConfig(), out, config, CLASSES)
    run_id = first._run.id
    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    for step in range(4):
        first.log_step("gaussian_noise", step, loss=1.0)
    first.log_task("gaussian_noise", TASK_RESULTS["gaussian_noise"])
    write_results(summarize({"gaussian_noise": TASK_RESULTS["gaussian_noise"]}, config, CLASSES), out)
    first._run.finish(exit_code=1)  # the sweep is killed during the second task
    capsys.readouterr()

    again = RunLogger(LoggingConfig(), out, config, CLASSES)
    assert again.enabled and again._run.id == run_id
    assert again._global_step == 4  # the images of the finished task, as in an uninterrupted sweep
    printed = capsys.readouterr().out
    assert f"continuing run {run_id}" in printed and "offline-run-*" in printed
    again.log_step("fog", 0, loss=0.5)
    again.log_task("fog", TASK_RESULTS["fog"])
    results = summarize(TASK_RESULTS, config, CLASSES)
    write_results(results, out)
    again.finish(results)
    assert "WARNING" not in capsys.readouterr().out
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in r.name for r in runs)  # one run, one folder per attempt

    done = RunLogger(LoggingConfig(), out, config, CLASSES)  # nothing left to do: no run at all
    assert not done.enabled and "already done" in capsys.readouterr().out
    done.finish(results)
    assert sorted((out / "wandb").glob("offline-run-*")) == runs


def test_an_unusable_run_id_file_starts_a_new_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _clear_wandb_env(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_ID_FILE).write_text("not an id\n")
    logger = RunLogger(LoggingConfig(), out, CONFIG, CLASSES)
    assert logger.enabled and "does not hold a W&B run id" in capsys.readouterr().out
    assert (out / RUN_ID_FILE).read_text().strip() == logger._run.id != "not an id"
    logger.finish(summarize(TASK_RESULTS, CONFIG, CLASSES))


def test_the_deepspeed_keys_load_ds_config_overrides_are_named(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.dusa.engine import load_ds_config

    user = {"train_batch_size": 32, "gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 1,
            "bf16": {"enabled": True}, "data_types": {"buffer_dtype": "fp32"},
            "optimizer": {"type": "AdamW", "params": {"eps": 1e-8}}}
    # Kept as given: equal values, the user's buffer dtype, the optimizer (lr is added, not overridden).
    assert list(overridden_ds_keys(user, load_ds_config(user, lr=1e-4))) == ["train_batch_size",
                                                                              "gradient_accumulation_steps"]
    assert overridden_ds_keys({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}}) == {"a.c": 2, "d": 3}
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")
    warn_overridden_ds_keys(
        {"train_batch_size": 32, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1}},
        {"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1}})
    warn_overridden_ds_keys({"a": 1}, {"a": 1})  # nothing overridden: nothing printed
    assert capsys.readouterr().err.splitlines() == [
        "warning: DeepSpeed config values ignored, this program sets these keys itself: train_batch_size=32, "
        "gradient_accumulation_steps=4"]
    monkeypatch.setenv("RANK", "1")  # one line per run, not per process
    warn_overridden_ds_keys({"train_batch_size": 32}, {})
    assert capsys.readouterr().err == ""
