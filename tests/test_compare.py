"""launch/compare.py: several runs' results.json side by side."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from launch.compare import class_changes, compare_table, load_class_iou, load_run, main
from pipeline.run.reporting import summarize, write_results

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["wall", "sky"]


def make_run(folder: Path, method: str, miou: dict[str, float]) -> Path:
    tasks = {t: {"mIoU": v, "aAcc": 50.0, "IoU": [v, math.nan], "images": 2, "seconds": 1.0} for t, v in miou.items()}
    write_results(summarize(tasks, {"tta": {"method": method}}, CLASSES), folder)
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [make_run(tmp_path / "src", "source", {"fog": 20.0, "snow": 30.0}),
            make_run(tmp_path / "tent-a", "tent", {"fog": 25.0, "snow": 28.0}),
            make_run(tmp_path / "dusa-a", "dusa", {"fog": 24.999, "frost": 40.001})]


def test_load_run_labels_with_method_and_folder(runs):
    label, scores = load_run(runs[1])
    assert label == "tent (tent-a)"
    assert list(scores) == ["fog", "snow", "average"]
    assert scores["average"] == pytest.approx(26.5)


def test_a_results_file_of_fractions_from_before_metric_unit_reads_in_percent(runs, tmp_path: Path):
    old = json.loads((runs[1] / "results.json").read_text())
    del old["metric_unit"]
    for res in [*old["tasks"].values(), old["average"]]:
        res["mIoU"] /= 100
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    assert load_run(tmp_path / "old")[1] == pytest.approx(load_run(runs[1])[1])


def test_markdown_table_bolds_the_best_per_column(runs):
    lines = compare_table([load_run(r) for r in runs], markdown=True).splitlines()
    assert lines[0] == "| run | fog | snow | frost | average |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: |"
    assert lines[2] == "| source (src) | 20.00 | **30.00** | - | 25.00 |"
    # 24.999 rounds to 25.00: equal as shown, so both are bold.
    assert lines[3] == "| tent (tent-a) | **25.00** | 28.00 | - | 26.50 |"
    assert lines[4] == "| dusa (dusa-a) | **25.00** | - | **40.00** | **32.50** |"


def test_text_table_is_plain_and_aligned(runs):
    lines = compare_table([load_run(r) for r in runs]).splitlines()
    assert "**" not in "\n".join(lines)
    assert lines[0].split() == ["run", "fog", "snow", "frost", "average"]
    assert set(lines[1]) == {"-"} and len({len(line) for line in lines}) == 1
    assert lines[3].split() == ["tent", "(tent-a)", "25.00", "28.00", "-", "26.50"]


def test_cli_prints_the_table_and_refuses_a_folder_without_results(runs, tmp_path: Path, capsys):
    assert main([str(r) for r in runs] + ["--format", "markdown"]) == 0
    assert "| dusa (dusa-a) |" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(runs[0]), str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {empty} has no results.json (not a run's output_dir, or no task finished yet)"
    (empty / "results.json").write_text("{not json")
    assert main([str(empty)]) == 2
    assert "is not a results.json of launch/tta.py" in capsys.readouterr().err


def test_runs_as_a_script(runs):
    proc = subprocess.run([sys.executable, "launch/compare.py", *map(str, runs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "source (src)" in proc.stdout


def test_a_folder_of_runs_expands_to_its_runs_and_markdown_is_a_paragraph_then_a_table(runs, tmp_path, capsys):
    make_run(tmp_path / "a|b", "tent", {"fog": 1.0})  # a | in a folder name is escaped in its cell
    assert main([str(tmp_path), "--format", "markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # columns in order of first appearance over the runs, taken in folder-name order: a|b, dusa-a, src, tent-a
    assert lines[:3] == ["mIoU % per corruption (4 runs)", "", "| run | fog | frost | snow | average |"]
    assert lines[3] == "| --- | ---: | ---: | ---: | ---: |"
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| tent (a\\|b)", "| dusa (dusa-a)", "| source (src)",
                                                            "| tent (tent-a)"]
    assert all(line.count("|") - line.count("\\|") == 6 for line in lines[2:])  # 5 cells in every row
    assert main([str(runs[0]), str(tmp_path)]) == 0  # a run and a folder of runs together
    assert "(5 runs)" in capsys.readouterr().out


def make_class_run(folder: Path, method: str, iou: dict[str, list[float]]) -> Path:
    tasks = {t: {"mIoU": math.fsum(v) / 2, "aAcc": 50.0, "IoU": v, "images": 2, "seconds": 1.0} for t, v in iou.items()}
    write_results(summarize(tasks, {"tta": {"method": method}}, CLASSES), folder)
    return folder


def test_per_class_changes_between_two_runs(tmp_path: Path, capsys):
    before = make_class_run(tmp_path / "src", "source", {"fog": [20.0, 50.0], "snow": [30.0, math.nan]})
    after = make_class_run(tmp_path / "dusa", "dusa", {"fog": [26.0, 48.0], "snow": [29.0, 10.0], "frost": [1.0, 2.0]})
    changes = class_changes(load_class_iou(before), load_class_iou(after), top=1)
    # fog: wall moved most (+6); snow: wall (-1), then sky, scored by the second run only.
    assert changes == [("fog", [("wall", 20.0, 26.0)]), ("snow", [("wall", 30.0, 29.0), ("sky", None, 10.0)])]
    assert main([str(before), str(after), "--classes", "2", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| fog | wall | 20.00 | 26.00 | +6.00 |" in out and "| fog | sky | 50.00 | 48.00 | -2.00 |" in out
    assert "| snow | sky | - | 10.00 | - |" in out and "frost" not in out.split("IoU % per class")[1]
    assert main([str(before), str(after), str(after), "--classes", "2"]) == 2
    assert "compares exactly two runs" in capsys.readouterr().err
