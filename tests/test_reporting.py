"""Tests of pipeline/reporting.py: results document, JSON file, table, and W&B logging (disabled and offline)."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import LoggingConfig, RunConfig, WandbConfig
from pipeline.reporting import (RunLogger, format_results_table, resolve_wandb_mode, startup_summary, summarize,
                                wandb_credentials_configured, write_results)

CLASSES = ["wall", "sky", "tree"]
TASK_RESULTS = {
    "gaussian_noise": {"mIoU": 0.30, "aAcc": 0.70, "IoU": [0.2, math.nan, 0.4], "images": 4, "seconds": 12.5},
    "fog": {"mIoU": 0.50, "aAcc": 0.90, "IoU": [0.5, 0.6, 0.4], "images": 3, "seconds": 7.25},
}
CONFIG = {"tta": {"lr": 1e-5}, "data": {"severity": 5}}


def test_summarize_averages_and_order() -> None:
    res = summarize(TASK_RESULTS, CONFIG, CLASSES)
    assert list(res["tasks"]) == ["gaussian_noise", "fog"]
    assert res["average"]["mIoU"] == pytest.approx(0.40)
    assert res["average"]["aAcc"] == pytest.approx(0.80)
    g = res["tasks"]["gaussian_noise"]
    assert g["IoU"] == {"wall": 0.2, "sky": None, "tree": 0.4}
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
    assert data["average"]["mIoU"] == pytest.approx(0.40)
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


def test_results_csv_one_row_per_task_then_per_class_iou(tmp_path: Path) -> None:
    write_results(summarize(TASK_RESULTS, CONFIG, CLASSES), tmp_path)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task", "mIoU", "aAcc", "images", "seconds", "IoU/wall", "IoU/sky", "IoU/tree"]
    assert [r["task"] for r in rows] == ["gaussian_noise", "fog"]
    g = rows[0]
    assert float(g["mIoU"]) == 0.30 and float(g["aAcc"]) == 0.70 and int(g["images"]) == 4
    assert float(g["IoU/wall"]) == 0.2 and g["IoU/sky"] == "" and float(g["IoU/tree"]) == 0.4  # NaN: empty


def test_startup_summary_names_what_runs() -> None:
    def fields(text: str) -> dict[str, str]:  # "key   value" lines, keys padded to one width
        return dict(re.match(r"(.+?)\s{2,}(.+)$", line).groups() for line in text.splitlines())

    cfg = RunConfig()
    rows = fields(startup_summary(cfg, ["ds_configs/tta.json"], "2 (2 pipeline stages), 2 x cuda visible",
                                  [("stage 0", 84_700_000, 168_000_000), ("stage 1", 1_200_000_000, 1_200_000_000)],
                                  30000))
    assert rows["method"] == "dusa (lr 1e-05, reset before each task)"
    assert rows["generator"] == cfg.model.generator and rows["segmenter"] == cfg.model.segmenter
    assert rows["parameters, stage 0"] == "84.70M trainable / 168.00M"
    assert rows["parameters, stage 1"] == "1.20B trainable / 1.20B"
    assert rows["processes"] == "2 (2 pipeline stages), 2 x cuda visible"
    assert rows["data"] == "data/ade20k_c: 15 corruptions at severity 5, 30000 images"
    assert rows["config"] == "ds_configs/tta.json" and rows["output"] == cfg.output_dir
    cfg.tta.method = "source"
    rows = fields(startup_summary(cfg, [], "1 (rank 0 runs source, the others exit), 1 x cuda visible",
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
    logger.log_step("fog", 1, 0.5, running_miou=0.3, extra={"lr": 1e-5})
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
            logger.log_step(task, step, loss=1.0 / (step + 1), running_miou=0.1 * step if step else None)
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
