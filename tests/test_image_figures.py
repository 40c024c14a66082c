"""Per-image figures (pipeline/run/image_figures.py, images.csv): every column against a direct computation from
the images, the labels and what a stand-in method returned; a resumed sweep keeps one row per image; a damaged
file is one clear line. In-process, on the synthetic ACDC layout (the launcher's DUSA demo, replicas and a killed
replica are checked in test_demo.py and test_replicas.py through `check_image_figures`)."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from data.cityscapes import CITYSCAPES_CLASSES
from data.demo import make_demo_street
from pipeline.methods import Method, StepResult
from pipeline.run.config import RunConfig
from pipeline.run.image_figures import COLUMNS, IMAGES_FILE, candidate_recall, image_counts
from pipeline.run.images import PreparedImages, predict, task_order
from pipeline.run.loop import TTARunner, open_tasks

C = len(CITYSCAPES_CLASSES)
CONDITIONS = ["fog", "night", "rain"]


@pytest.fixture(scope="module")
def acdc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("acdc")
    make_demo_street(root, "acdc", CONDITIONS, num_images=3, size=(48, 96), create=True)
    return root


def config(root: Path, out: Path) -> RunConfig:
    cfg = RunConfig(output_dir=str(out))
    cfg.data.dataset, cfg.data.root, cfg.data.classes = "acdc", str(root), "cityscapes"
    cfg.data.corruptions = CONDITIONS
    cfg.data.window_size = cfg.data.short_edge = 48
    cfg.data.window_stride, cfg.data.num_workers = 48, 0
    cfg.tta.method = "tent"
    cfg.logging.progress, cfg.logging.image_every, cfg.logging.log_every = False, 0, 2
    return cfg


def stand_in_logits(image: torch.Tensor) -> torch.Tensor:
    """Logits that depend on the image's pixels (so some pixels are right and some wrong)."""
    gray = image.float().mean(1, keepdim=True)  # [1, 1, h, w]
    return torch.cat([torch.sin(gray * (c + 1) * 7.0) for c in range(C)], 1)


def stand_in_candidates(name: str) -> list[torch.Tensor]:
    """Two windows' candidate classes, fixed by the image's name."""
    k = sum(map(ord, name))
    return [torch.tensor([k % C, (k + 3) % C]), torch.tensor([(k + 5) % C])]


class StandIn(Method):
    """Adapts nothing; returns image-dependent logits, a loss counting its steps, two windows and candidates."""

    name = "tent"

    def __init__(self, fail_at: str | None = None):
        self.seen, self.fail_at = 0, fail_at

    def step(self, task: str, item: dict) -> StepResult:
        if task == self.fail_at:
            raise RuntimeError(f"stopped in {task}")
        self.seen += 1
        return StepResult(stand_in_logits(item["image"]), torch.tensor(0.5 * self.seen), False, [], 2,
                          stand_in_candidates(item["name"]))


def run(cfg: RunConfig, method: Method) -> dict:
    record = {**asdict(cfg), "deepspeed": {}}
    return TTARunner(cfg, CITYSCAPES_CLASSES, torch.device("cpu"), method, config_record=record).run()


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / IMAGES_FILE, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_every_column_matches_a_direct_computation(acdc, tmp_path):
    cfg = config(acdc, tmp_path / "run")
    results = run(cfg, StandIn())
    rows = read_rows(tmp_path / "run")
    datasets = open_tasks(cfg.data, C)
    assert [r["task"] for r in rows] == [t for t in CONDITIONS for _ in range(3)]  # one row per image, run order
    seen = 0
    for task in CONDITIONS:
        prepared = PreparedImages(datasets[task], 48, 48, 48)
        order = task_order(cfg.data, cfg.seed, task, len(prepared))
        task_rows = [r for r in rows if r["task"] == task]
        correct_sum = labelled_sum = 0
        for step, (row, index) in enumerate(zip(task_rows, order, strict=True)):
            item = prepared[index]
            seen += 1
            label = item["label"].numpy()
            prediction = predict(stand_in_logits(item["image"]), label.shape).numpy()
            labelled = label != 255
            correct = int((prediction[labelled] == label[labelled]).sum())
            assert 0 < correct < labelled.sum(), "the stand-in should be partly right"
            assert row["step"] == str(step) and row["image"] == item["name"]
            assert float(row["loss"]) == 0.5 * seen and row["windows"] == "2"
            assert int(row["labelled_pixels"]) == labelled.sum()
            assert float(row["pixel_error"]) == 100 * (1 - correct / labelled.sum())
            present = set(np.unique(label[labelled]).tolist())
            chosen = set(torch.cat(stand_in_candidates(item["name"])).tolist())
            assert float(row["candidate_recall"]) == len(present & chosen) / len(present)
            correct_sum, labelled_sum = correct_sum + correct, labelled_sum + int(labelled.sum())
        # The metric's aAcc is the labelled-pixel-weighted mean accuracy of the rows.
        assert math.isclose(results["tasks"][task]["aAcc"], 100 * correct_sum / labelled_sum, rel_tol=1e-9)
        assert math.isclose(results["tasks"][task]["loss"], np.mean([float(r["loss"]) for r in task_rows]))


def test_a_method_without_loss_or_windows_leaves_their_cells_empty(acdc, tmp_path):
    class Source(Method):
        name, adapts = "source", False

        def step(self, task: str, item: dict) -> StepResult:
            return StepResult(stand_in_logits(item["image"]), None, False, [])

    cfg = config(acdc, tmp_path / "source")
    cfg.tta.method = "source"
    results = run(cfg, Source())
    rows = check_image_figures(tmp_path / "source", results, C)
    assert len(rows) == 9
    assert all(r["loss"] == "" and r["candidate_recall"] == "" and r["windows"] == "0" and r["pixel_error"]
               for r in rows)


def test_a_resumed_sweep_rewrites_the_interrupted_task_and_keeps_one_row_per_image(acdc, tmp_path):
    whole = tmp_path / "whole"
    run(config(acdc, whole), StandIn())
    cut = config(acdc, tmp_path / "cut")
    with pytest.raises(RuntimeError, match="stopped in rain"):
        run(cut, StandIn(fail_at="rain"))
    assert [r["task"] for r in read_rows(tmp_path / "cut")] == ["fog"] * 3 + ["night"] * 3
    # Rows of a task that results.json does not hold (left by a crash between the two writes) go.
    with open(tmp_path / "cut" / IMAGES_FILE, "a", newline="") as f:
        f.write("rain,0,stray,1.0,50.0,10,2,1.0\n")
    resumed = StandIn()
    resumed.seen = 6  # the stand-in's loss counts every step of the run: as the uninterrupted run counted
    run(cut, resumed)
    assert (tmp_path / "cut" / IMAGES_FILE).read_text() == (whole / IMAGES_FILE).read_text()


def test_a_damaged_images_file_is_one_clear_line(acdc, tmp_path):
    out = tmp_path / "damaged"
    cfg = config(acdc, out)
    with pytest.raises(RuntimeError):
        run(cfg, StandIn(fail_at="night"))
    (out / IMAGES_FILE).write_text("task,image\nfog,a\n")
    with pytest.raises(ValueError) as err:
        run(cfg, StandIn())
    assert "images.csv is damaged" in str(err.value) and "\n" not in str(err.value)


def test_the_figures_helpers_on_hand_made_tensors():
    label = torch.tensor([[0, 1, 255], [2, 2, 1]])
    prediction = torch.tensor([[0, 2, 1], [2, 0, 1]])
    assert image_counts(prediction, label, 3).tolist() == [3, 5]  # 255 is not counted
    assert candidate_recall(label, [torch.tensor([0]), torch.tensor([2, 5])], 6) == 2 / 3
    assert candidate_recall(torch.full((2, 2), 255), [torch.tensor([0])], 6) is None


def check_image_figures(out: Path, results: dict, num_classes: int) -> list[dict[str, str]]:
    """A launcher run's images.csv against its results.json (for the slow launcher tests): one row per image of
    every task in the run's order, each task's rows in its image order; the labelled-pixel-weighted accuracy of
    the rows is the task's aAcc, the mean of their losses its loss; the windows are the count of each image's
    grid; DUSA's candidate recall is a share. Returns the rows."""
    from pipeline.dusa.windows import window_count
    from pipeline.run.config import DataConfig
    rows = read_rows(out)
    config = results["config"]
    data = DataConfig(**config["data"])
    datasets = open_tasks(data, num_classes)
    assert [r["task"] for r in rows] == [t for t, entry in results["tasks"].items() for _ in range(entry["images"])]
    dusa = config["tta"]["method"] == "dusa"
    for task, entry in results["tasks"].items():
        dataset = datasets[task]
        order = task_order(data, config["seed"], task, len(dataset))
        task_rows = [r for r in rows if r["task"] == task]
        names = [dataset.names[i] for i in order]
        assert [r["image"] for r in task_rows] == names and [r["step"] for r in task_rows] == list(
            map(str, range(len(order))))
        labelled = np.array([int(r["labelled_pixels"]) for r in task_rows])
        errors = np.array([float(r["pixel_error"]) for r in task_rows])
        assert math.isclose(float((100 - errors) @ labelled / labelled.sum()), entry["aAcc"], rel_tol=1e-9)
        losses = [float(r["loss"]) for r in task_rows if r["loss"]]
        if entry["loss"] is None:
            assert not losses
        else:
            assert len(losses) == len(task_rows) and math.isclose(float(np.mean(losses)), entry["loss"], rel_tol=1e-9)
        for r, i in zip(task_rows, order):
            windows = window_count(*dataset.image_size(i), data.window_size, data.window_stride, data.short_edge)
            assert int(r["windows"]) == (windows if dusa else 0)
            assert (0 <= float(r["candidate_recall"]) <= 1) if dusa else r["candidate_recall"] == ""
    return rows


def test_a_link_in_place_of_images_csv_is_refused_at_the_start(tmp_path):
    from pipeline.run.folder import RunFolder
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere.csv").write_text("task\n")
    (tmp_path / "out" / IMAGES_FILE).symlink_to(tmp_path / "elsewhere.csv")  # a resume would read it back
    with pytest.raises(ValueError, match="images.csv is a link"):
        RunFolder.claim(str(tmp_path / "out"))
