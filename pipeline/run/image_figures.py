"""Per-image figures after adaptation (`images.csv` in the run folder), to set a method's loss against the
error of the prediction it scored, image by image.

One row per scored image, in the run's task order and within a task in its adaptation order:

- `task`, `step` (the image's place in the task's order, from 0), `image` (its name);
- `loss`: the loss the method's step returned (DUSA's loss; tent's, cotta's, sar's own); empty for a method
  that does not adapt;
- `pixel_error`: 100 - pixel accuracy, in percent, over the image's labelled pixels (those the metric counts),
  of the scored prediction; empty for an image without labelled pixels; `labelled_pixels`: their count (a
  task's aAcc is 100 - the mean of `pixel_error` weighted by it);
- `windows`: the micro-batches of the image's step (DUSA's windows; 0: the method has none);
- `candidate_recall`: DUSA only, the share of the classes present in the label that are among the candidate
  classes of the image's windows (their union); empty for other methods and for an image without labels.

The counts are accumulated on the device and read back once per task, with the task's metric; the losses are
the values the progress reads back in batches: no host wait per image. Rank 0 writes the file after every
task, before results.json names the task finished; other replicas send their rows with their task's result.
A resumed sweep keeps the rows of the tasks results.json holds and rewrites the rest: no duplicates.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.run.folder import write_text_atomic

IMAGES_FILE = "images.csv"
COLUMNS = ("task", "step", "image", "loss", "pixel_error", "labelled_pixels", "windows", "candidate_recall")


def image_counts(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(correct, labelled) pixels of one image as a device tensor [2] (no host wait); labelled as the metric
    counts them: a class id in [0, num_classes)."""
    labelled = (label >= 0) & (label < num_classes)
    return torch.stack([((prediction == label) & labelled).sum(), labelled.sum()])


def candidate_recall(label: torch.Tensor, candidates: Sequence[torch.Tensor], num_classes: int) -> float | None:
    """The share of the classes present in `label` (a host tensor) that are among the union of `candidates`
    (each window's class ids, host); None without labelled pixels."""
    # numpy's bincount: a fraction of a millisecond for a 512 x 683 label, where torch's takes tens on a CPU.
    # Values outside the classes (255: ignored) fall into the two end bins, which are dropped.
    values = np.clip(label.numpy().ravel(), -1, num_classes) + 1
    present = np.bincount(values, minlength=num_classes + 2)[1:num_classes + 1] > 0
    total = int(present.sum())
    if not total:
        return None
    chosen = np.zeros(num_classes, dtype=bool)
    for classes in candidates:
        chosen[classes.numpy()] = True
    return int((present & chosen).sum()) / total


def _cell(value) -> str:
    """A number as Python writes it back exactly (repr), an empty cell for None."""
    return "" if value is None else repr(value)


def image_rows(task: str, names: Sequence[str], losses: Sequence[float | None], counts: list[list[int]],
               windows: Sequence[int], recalls: Sequence[float | None]) -> list[dict[str, str]]:
    """A task's rows, in step order, as the file holds them (text cells)."""
    rows = []
    for step, (name, loss, (correct, labelled), n, recall) in enumerate(zip(names, losses, counts, windows, recalls,
                                                                              strict=True)):
        error = 100 * (1 - correct / labelled) if labelled else None
        rows.append({"task": task, "step": str(step), "image": name, "loss": _cell(loss), "pixel_error": _cell(error),
                     "labelled_pixels": str(labelled), "windows": str(n), "candidate_recall": _cell(recall)})
    return rows


def images_csv(rows_by_task: dict[str, list[dict[str, str]]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rows in rows_by_task.values():
        writer.writerows(rows)
    return buffer.getvalue()


def write_images(output_dir: str | Path, rows_by_task: dict[str, list[dict[str, str]]]) -> Path:
    """`<output_dir>/images.csv`, atomically (tasks in the order of `rows_by_task`)."""
    root = Path(output_dir)
    return write_text_atomic(root / IMAGES_FILE, images_csv(rows_by_task), root)


def read_images(output_dir: str | Path, tasks: Sequence[str]) -> dict[str, list[dict[str, str]]]:
    """The rows of `tasks` (the finished ones) that images.csv holds, by task; the other tasks' rows (an
    interrupted one's) are dropped, to be written again. No file: none."""
    path = Path(output_dir) / IMAGES_FILE
    if not path.is_file():
        return {}
    fix = f"delete {path} (the finished tasks' rows are lost) or {output_dir} to start over"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(f"its columns are {reader.fieldnames}, not {list(COLUMNS)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise ValueError(f"{path} is damaged ({' '.join(str(exc).split())}): {fix}") from None
    kept: dict[str, list[dict[str, str]]] = {}
    wanted = set(tasks)
    for row in rows:
        if None in row or None in row.values():
            raise ValueError(f"{path} is damaged (a row has {'more' if None in row else 'fewer'} cells than "
                             f"columns): {fix}")
        if row["task"] in wanted:
            kept.setdefault(row["task"], []).append(row)
    return kept
