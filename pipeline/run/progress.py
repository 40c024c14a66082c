"""One task's progress on the console and in W&B: a bar with images/s, the running mIoU, the last loss and
the whole sweep's ETA on a terminal (one line of the same every `log_every` images into a file or pipe);
losses are read back from the device in batches (no host sync per step) and logged with the pictures."""
from __future__ import annotations

import math
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

from data.metrics import SegmentationMetric
from pipeline.run.log import LOG
from pipeline.run.reporting import RunLogger

# Images/s (never inverted to s/image), then the postfix: running mIoU, loss, ETA of the whole sweep.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class TaskProgress:
    """`add` once per scored image; every `log_every` images (and at the task's last) the pending losses are
    read back at once, logged, and shown."""

    def __init__(self, task: str, description: str, images: int, sweep_images: int, sweep_done: int,
                 log_every: int, show: bool, logger: RunLogger | None, with_loss: bool, replicas: int = 1):
        self.task, self.images, self.log_every, self.logger = task, images, log_every, logger
        # For the sweep's ETA: images done by every replica (the others' as rank 0 hears of them), at this
        # replica's rate times the number of replicas.
        self.sweep_images, self.sweep_done, self.replicas = sweep_images, sweep_done, replicas
        # A bar only on a terminal: in a log file its carriage-return updates pile up on one line.
        self.lines = show and not sys.stderr.isatty()
        self.bar = tqdm(total=images, desc=description, disable=not show or self.lines, dynamic_ncols=True,
                        unit=" img", bar_format=BAR_FORMAT, leave=False)  # the task's line replaces it
        self.description, self.start, self.done = description, time.perf_counter(), 0
        # Fixed order on the bar: running mIoU, last loss, ETA of the whole sweep.
        self.postfix = {"mIoU": "?", **({"loss": "?"} if with_loss else {}), "sweep ETA": "?"}
        self.pending: list[tuple[int, torch.Tensor | None, tuple[Image.Image, str] | None]] = []
        self.loss_sum, self.loss_count = 0.0, 0  # the task's finite losses, for its mean in the results
        self.losses: list[float | None] = []  # every step's loss as read back, in step order (images.csv)

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.loss_count if self.loss_count else None

    def add(self, step: int, loss: torch.Tensor | None, picture: tuple[Image.Image, str] | None,
            metric: SegmentationMetric) -> None:
        self.pending.append((step, loss, picture))
        self.sweep_done += 1
        self.done += 1
        rate = self.bar.format_dict.get("rate")  # None until tqdm has measured one (and when the bar is off)
        if self.lines:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        if rate:
            left = max(self.sweep_images - self.sweep_done, 0)
            self.postfix["sweep ETA"] = tqdm.format_interval(left / (rate * self.replicas))
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)
        if len(self.pending) >= self.log_every or step + 1 == self.images:
            self._flush(metric)

    def _flush(self, metric: SegmentationMetric) -> None:
        running = metric.compute()["mIoU"]
        losses = [loss for _, loss, _ in self.pending if loss is not None]
        values = iter(torch.stack(losses).float().tolist() if losses else [])
        for k, (step, loss, picture) in enumerate(self.pending):
            value = next(values) if loss is not None else None
            self.losses.append(value)
            if self.logger:
                self.logger.log_step(self.task, step, value,
                                     running_miou=running if k == len(self.pending) - 1 else None)
                if picture is not None:
                    self.logger.log_picture(self.task, *picture)
            if value is not None:
                self.postfix["loss"] = f"{value:.4f}"
                if math.isfinite(value):
                    self.loss_sum, self.loss_count = self.loss_sum + value, self.loss_count + 1
        self.postfix["mIoU"] = f"{running:.1f}"
        self.bar.set_postfix(self.postfix)
        self.pending.clear()
        if self.lines:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            LOG.info(f"{self.description}: {self.done}/{self.images} images, {rate:.2f} img/s, "
                     + ", ".join(f"{k} {v}" for k, v in self.postfix.items()))

    def close(self) -> None:
        self.bar.close()


def end_bars() -> None:
    """Clears the progress bars still open (a run stopping mid-task), so that the next line starts a line
    of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()
