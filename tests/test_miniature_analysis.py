"""The miniature's analysis section (bench/miniature_analysis.py through `miniature.py report`) on a synthetic
results folder: every figure against a direct computation from the runs' results.json and images.csv, the
spread over the seeds, the declared verdict, and the section in the JSON, the Markdown and its PNG."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import rankdata

import bench.miniature as mini
from bench.miniature_make import CLASSES
from pipeline.run.image_figures import COLUMNS, IMAGES_FILE

IMAGES = 9  # per corruption: quartiles of 3, 2, 2, 2 images


def spearman(x, y) -> float:
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def make_runs(wd: mini.Workdir, with_images: bool = True, offset: float = 0.0, seed: int = 0) -> dict:
    """The source and the two dusa seeds of the declared pair: snow gains and its loss tracks the error in both
    seeds; fog gains but its loss does not rank the errors; the others gain under a point. Returns what was
    written: per seed, per corruption, (losses, errors, recalls), and the mIoU / IoU of every run. `offset`: added
    to every mIoU (another training's level); `seed`: the figures' random numbers."""
    source_run, dusa_runs = mini.analysis_pair(tiny=False)
    rng = np.random.default_rng(seed)
    gains = {"snow": 20.0, "frost": 0.5, "fog": 6.0, "brightness": -1.0, "contrast": 0.2}

    def write(run: dict, miou: dict, iou: dict) -> None:
        folder = wd.runs / run["name"]
        folder.mkdir(parents=True)
        tasks = {c: {"mIoU": miou[c], "aAcc": 90.0, "IoU": iou[c], "images": IMAGES, "seconds": 1.0}
                 for c in wd.corruptions}
        (folder / "results.json").write_text(json.dumps({"metric_unit": "percent", "tasks": tasks}))

    written: dict = {"source": {}, "dusa": {}}
    source_iou = {c: {k: float(10 + i) for i, k in enumerate(CLASSES)} for c in wd.corruptions}
    source_iou["snow"]["flower"] = None  # a class in neither map: its change is undefined
    source_miou = {c: 30.0 + offset + i for i, c in enumerate(wd.corruptions)}
    write(source_run, source_miou, source_iou)
    written["source"] = (source_miou, source_iou)
    for run in dusa_runs:
        seed = run["seed"]
        miou = {c: source_miou[c] + gains[c] + 0.4 * seed for c in wd.corruptions}
        iou = {c: {k: float(10 + i + (i % 3) - 1 + seed) for i, k in enumerate(CLASSES)} for c in wd.corruptions}
        write(run, miou, iou)
        figures = {}
        rows = []
        for c in wd.corruptions:
            losses = rng.uniform(0.1, 1.0, IMAGES)
            noise = rng.normal(0, 1, IMAGES)
            errors = 100 * losses / 2 + noise if c == "snow" else rng.uniform(5, 60, IMAGES)
            if c == "fog":  # the loss ranks the errors backwards
                errors = 60 - 40 * losses
            recalls = rng.choice([0.5, 2 / 3, 1.0], IMAGES)
            figures[c] = (losses, errors, recalls)
            rows += [{"task": c, "step": str(i), "image": f"img{i}", "loss": repr(float(losses[i])),
                      "pixel_error": repr(float(errors[i])), "labelled_pixels": "100", "windows": "2",
                      "candidate_recall": repr(float(recalls[i]))} for i in range(IMAGES)]
        written["dusa"][seed] = (miou, iou, figures)
        if with_images:
            with open(wd.runs / run["name"] / IMAGES_FILE, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
    return written


def test_the_analysis_figures_match_a_direct_computation(tmp_path):
    wd = mini.Workdir(tmp_path / "full", tiny=False)
    written = make_runs(wd)
    document = mini.cmd_report(wd, type("Args", (), {"out": str(tmp_path / "out")}))
    analysis = document["analysis"]
    assert analysis["runs"] == [f"seed {s}" for s in mini.SEEDS] and analysis["source_run"] == "source-autocast-s0"
    assert analysis["dusa_runs"] == [str(wd.runs / f"dusa-autocast-lr1e-05-s{s}") for s in mini.SEEDS]
    source_miou, source_iou = written["source"]
    for task, entry in analysis["tasks"].items():
        gains = [written["dusa"][s][0][task] - source_miou[task] for s in mini.SEEDS]
        assert entry["mIoU_gain"]["values"] == pytest.approx(gains)
        assert entry["mIoU_gain"]["mean"] == pytest.approx(np.mean(gains))
        assert entry["mIoU_gain"]["half_range"] == pytest.approx(np.ptp(gains) / 2)
        for c in CLASSES:
            changes = [None if source_iou[task][c] is None else written["dusa"][s][1][task][c] - source_iou[task][c]
                       for s in mini.SEEDS]
            assert entry["class_IoU_change"][c]["values"] == changes
        spearmans, pearsons, recalls, complete, quartiles = [], [], [], [], []
        for s in mini.SEEDS:
            losses, errors, recall = written["dusa"][s][2][task]
            spearmans.append(spearman(losses, errors))
            pearsons.append(float(np.corrcoef(losses, errors)[0, 1]))
            recalls.append(float(recall.mean()))
            complete.append(float((recall == 1.0).mean()))
            order = np.argsort(losses)  # 9 images in quartiles of 3, 2, 2, 2, lowest loss first
            quartiles.append([float(errors[order[a:b]].mean()) for a, b in ((0, 3), (3, 5), (5, 7), (7, 9))])
        assert entry["spearman"]["values"] == pytest.approx(spearmans)
        assert entry["spearman"]["half_range"] == pytest.approx(np.ptp(spearmans) / 2)
        assert entry["pearson"]["values"] == pytest.approx(pearsons)
        assert entry["candidate_recall"]["values"] == pytest.approx(recalls)
        assert entry["all_true_classes"]["values"] == pytest.approx(complete)
        assert [q["mean"] for q in entry["error_by_loss_quantile"]] == pytest.approx(np.mean(quartiles, 0))
    # Pooled: the correlation over every image of every corruption, and the mean of the within-corruption ones.
    pooled = analysis["pooled"]
    for k, s in enumerate(mini.SEEDS):
        figures = written["dusa"][s][2]
        losses = np.concatenate([figures[c][0] for c in wd.corruptions])
        errors = np.concatenate([figures[c][1] for c in wd.corruptions])
        assert pooled["spearman"]["values"][k] == pytest.approx(spearman(losses, errors))
        recalls = np.concatenate([figures[c][2] for c in wd.corruptions])
        assert pooled["candidate_recall"]["values"][k] == pytest.approx(recalls.mean())
        assert pooled["all_true_classes"]["values"][k] == pytest.approx((recalls == 1.0).mean())
        assert pooled["spearman_mean_within"]["values"][k] == pytest.approx(
            np.mean([spearman(*figures[c][:2]) for c in wd.corruptions]))
    assert analysis["tasks"]["fog"]["spearman"]["mean"] == pytest.approx(-1.0)
    # The declared rule: snow and fog gain (over 1 point); snow's loss ranks its errors in both seeds, fog's not.
    verdict = analysis["verdict"]
    assert verdict["gaining"] == ["snow", "fog"] and verdict["explained"] == ["snow"]
    assert verdict["verdict"] == "partly explained"
    markdown = document["markdown"]
    assert "**Verdict: the gain is PARTLY EXPLAINED**" in markdown and "Spearman >= 0.3" in markdown
    snow = analysis["tasks"]["snow"]
    assert f"| snow | +{snow['mIoU_gain']['mean']:.1f} ± {snow['mIoU_gain']['half_range']:.1f} |" in markdown
    assert "| flower | – |" in markdown  # snow's flower change is undefined
    png = next((tmp_path / "out").glob("*-miniature-analysis.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_images_csv_the_analysis_says_it_is_not_measured(tmp_path):
    wd = mini.Workdir(tmp_path / "full", tiny=False)
    make_runs(wd, with_images=False)  # runs made before the loop kept per-image figures
    document = mini.cmd_report(wd, type("Args", (), {"out": str(tmp_path / "out")}))
    analysis = document["analysis"]
    assert analysis["verdict"]["verdict"] == "not measured" and "spearman" not in analysis["pooled"]
    assert analysis["tasks"]["snow"]["mIoU_gain"]["mean"] == pytest.approx(20.2)  # results.json alone still gives
    assert "**Verdict: NOT MEASURED**" in document["markdown"]


def test_retrained_workdirs_join_the_analysis_each_against_its_own_source(tmp_path, capsys):
    first, second = mini.Workdir(tmp_path / "a", tiny=False), mini.Workdir(tmp_path / "b", tiny=False)
    written = [make_runs(first), make_runs(second, offset=5.0, seed=1)]
    for k, wd in enumerate((first, second)):
        mini.write_json(wd.training, {"segmenter": {"steps": 1, "seconds": 1.0, "stopped_by": "steps",
                                                    "device": "cpu", "seed": k}})
    assert mini.main(["report", "--workdir", str(first.root), "--retrained", str(second.root),
                      "--out", str(tmp_path / "out")]) == 0
    analysis = json.loads(next((tmp_path / "out").glob("*-miniature.json")).read_text())["analysis"]
    assert analysis["runs"] == [f"training seed {k}, seed {s}" for k in (0, 1) for s in mini.SEEDS]
    snow = analysis["tasks"]["snow"]
    # Each run against its own training's source: the other training's higher level does not enter the gains.
    assert snow["mIoU_gain"]["values"] == pytest.approx([20.0, 20.4, 20.0, 20.4])
    expected = [spearman(*w["dusa"][s][2]["snow"][:2]) for w in written for s in mini.SEEDS]
    assert snow["spearman"]["values"] == pytest.approx(expected)
    assert snow["spearman"]["half_range"] == pytest.approx(np.ptp(expected) / 2)
    assert "over the 4 runs (training seed 0, seed 0; " in capsys.readouterr().out
    assert mini.main(["report", "--workdir", str(first.root), "--retrained", str(tmp_path / "none")]) == 2
    assert "--retrained" in capsys.readouterr().err
