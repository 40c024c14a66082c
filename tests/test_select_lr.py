"""bench/select_lr.py: learning rates chosen on the held-out corruptions only, recorded, then used by the grid."""
from __future__ import annotations

import json

import pytest

from bench import miniature as mini
from bench import select_lr


def test_selection_runs_only_the_validation_corruptions():
    runs = select_lr.selection_runs(["cotta", "sar"], mini.CANDIDATE_RATES)
    assert len(runs) == len(mini.CANDIDATE_RATES["cotta"]) + len(mini.CANDIDATE_RATES["sar"])
    assert all(r["corruptions"] == list(mini.VALIDATION_CORRUPTIONS) and r["seed"] == 0 for r in runs)
    assert not set(mini.VALIDATION_CORRUPTIONS) & (set(mini.CORRUPTIONS) | set(mini.TINY_CORRUPTIONS))
    assert runs[0]["name"] == "select-cotta-autocast-lr7.5e-07-s0"
    assert len({r["name"] for r in runs}) == len(runs)


def test_choose_takes_the_best_mean_and_the_smaller_rate_on_a_tie():
    assert select_lr.choose({1e-5: 30.0, 1e-4: 32.0, 1e-3: 31.0}) == 1e-4
    assert select_lr.choose({1e-5: 32.0, 1e-4: 32.0}) == 1e-5
    assert select_lr.choose({1e-5: 32.0, 1e-4: None}) is None  # not every candidate ran


def test_the_selection_is_recorded_and_resolves_the_grid(tmp_path):
    wd = mini.Workdir(tmp_path / "w", tiny=False)
    rates = {"sar": (3.125e-6, 3.125e-5)}
    for run, miou in zip(select_lr.selection_runs(["sar"], rates), (20.0, 25.0)):
        tasks = {c: {"mIoU": miou + i, "aAcc": 90.0, "IoU": {}, "images": 4, "seconds": 1.0}
                 for i, c in enumerate(mini.VALIDATION_CORRUPTIONS)}
        (wd.runs / run["name"]).mkdir(parents=True)
        (wd.runs / run["name"] / "results.json").write_text(json.dumps({"metric_unit": "percent", "tasks": tasks}))
    record = select_lr.write_selection(wd, ["sar"], rates, limit=None)
    assert record["methods"]["sar"]["selected"] == 3.125e-5
    assert record["methods"]["sar"]["candidates"] == {"3.125e-06": pytest.approx(21.5), "3.125e-05": 26.5}
    assert record["corruptions"] == list(mini.VALIDATION_CORRUPTIONS)
    assert mini.selected_rates(wd) == {"sar": 3.125e-5}
    sar = next(r for r in mini.grid(tiny=False) if r["method"] == "sar")
    assert mini.resolve(sar, mini.selected_rates(wd))["name"] == "sar-autocast-lr3.125e-05-s0"
