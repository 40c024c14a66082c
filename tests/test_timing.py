"""`--logging.timing` (pipeline/run/timing.py): phases per image, nested phases, notes, start-up marks, the file."""
from __future__ import annotations

import json
import time

import torch

from pipeline.run.timing import Timing


def test_nested_phases_count_once_and_the_rest_of_the_image_is_other(tmp_path):
    timer = Timing(enabled=True, device=torch.device("cpu"))
    timer.mark("imports")
    for task in ("a", "a", "b"):
        timer.begin_image(task)
        with timer.phase("step"):
            time.sleep(0.02)
            with timer.phase("window forwards"):
                time.sleep(0.03)
        timer.note("windows", 2)
        time.sleep(0.01)
        timer.end_image()
    timer.end_task("b", images=1, seconds=0.1, reset_s=0.5)
    image = timer.images[0]
    assert image["windows"] == 2 and image["task"] == "a"
    assert 0.03 <= image["host"]["window forwards"] < 0.06 and 0.02 <= image["host"]["step"] < 0.045
    assert abs(sum(image["host"].values()) - image["wall_s"]) < 1e-6  # every second counted once
    assert image["host"]["other"] >= 0.01
    timer.write(tmp_path, rank=3)
    saved = json.loads((tmp_path / "timing-rank3.json").read_text())
    assert saved["marks"]["imports"] >= 0 and "first image done" in saved["marks"]
    assert saved["steady_images"] == 1  # each task's first image is not steady
    assert saved["tasks"] == [{"task": "b", "images": 1, "seconds": 0.1, "reset_s": 0.5}]
    assert saved["images"][2]["device"] == {}  # no GPU: host seconds only


def test_off_it_records_only_start_up_marks_and_writes_nothing(tmp_path):
    timer = Timing()
    timer.mark("imports")
    timer.begin_image("a")
    with timer.phase("step"):
        pass
    timer.note("windows", 2)
    timer.end_image()
    timer.end_task("a", 1, 0.0, 0.0)
    timer.write(tmp_path, rank=0)
    assert timer.images == [] and timer.tasks == [] and "imports" in timer.marks
    assert not list(tmp_path.iterdir())
