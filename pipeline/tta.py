"""The TTA loop: tasks (corruptions), one step per image of the chosen method, scoring and results.

Every method (`source`, `tent`, `dusa`) goes through the same data, metric, reset, pictures and logging code;
only the step that turns an image into scored logits differs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data.ade20k_c import ADE20KC
from data.metrics import SegmentationMetric
from pipeline.config import DataConfig, RunConfig
from pipeline.engine import TTAEngine
from pipeline.pictures import make_picture, save_picture
from pipeline.reporting import RunLogger, format_results_table, summarize, write_results
from pipeline.tent import Tent
from pipeline.windows import draw_windows, resize_short_edge, resized_size, window_boxes


def resume_signature(record: dict[str, Any]) -> dict[str, Any]:
    """What makes results comparable: a rerun resumes only when this is unchanged (logging, workers,
    the task list's tail and the stage split may change; the stage split does not change the math)."""
    record = json.loads(json.dumps(record))  # tuples and lists compare alike, as saved
    return {"model": {k: v for k, v in record["model"].items() if k != "build_demo_models"},
            "data": {k: v for k, v in record["data"].items() if k not in ("corruptions", "num_workers", "build_demo_data")},
            "tta": record["tta"], "seed": record["seed"],
            "deepspeed": {k: v for k, v in (record.get("deepspeed") or {}).items()
                          if k not in ("steps_per_print", "wall_clock_breakdown")}}


def open_tasks(data: DataConfig) -> dict[str, ADE20KC]:
    """Every task's dataset, in run order (listing checks folders and annotations)."""
    return {task: ADE20KC(data.root, task, data.severity, data.limit) for task in data.corruptions}


def state_path(output_dir: str, task: str) -> Path:
    """Where a continual run keeps the adapted state after `task` (the latest only)."""
    return Path(output_dir) / "state" / task


def finished_tasks(cfg: RunConfig, record: dict[str, Any], class_names: Sequence[str]) -> dict[str, dict]:
    """Tasks that results.json in the output folder already holds for this very configuration.

    Raises for an output folder that holds another configuration's results, or tasks in another
    order, or (continual) no saved state to go on from: mixing them would give wrong numbers.
    """
    path = Path(cfg.output_dir) / "results.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    before, now = resume_signature(saved["config"]), resume_signature(record)
    differing = [k for k in now if before[k] != now[k]]
    if differing:
        raise ValueError(f"{path} holds results of another configuration (differs in: {', '.join(differing)}): "
                         f"use another --output_dir, or delete that folder to start over")
    tasks, order = list(saved.get("tasks", {})), list(cfg.data.corruptions)
    if tasks != order[:len(tasks)]:
        raise ValueError(f"{path} holds tasks {tasks}, not a beginning of this run's {order}: use another --output_dir")
    if tasks and cfg.tta.continual and len(tasks) < len(order) and not state_path(cfg.output_dir, tasks[-1]).exists():
        raise ValueError(f"continual run: no saved state after task {tasks[-1]} in "
                         f"{state_path(cfg.output_dir, tasks[-1])}; delete {cfg.output_dir} to start over")
    def restore(value):
        return math.nan if value is None else value
    return {t: {**r, "IoU": [restore(r["IoU"].get(n)) for n in class_names], "mIoU": restore(r["mIoU"]),
                "aAcc": restore(r["aAcc"])} for t, r in saved["tasks"].items()}


def image_seed(seed: int, task: str, name: str) -> int:
    """A per-image seed that depends on the image, not on its position in the run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}/{name}".encode()).digest()[:7], "little")


def task_order(data: DataConfig, seed: int, task: str, size: int) -> list[int]:
    """The order in which a task's images are adapted: shuffled (`data.shuffle`, as the reference does),
    seeded from the run's seed and the task so that every stage and every rerun sees the same order;
    else file order."""
    if not data.shuffle:
        return list(range(size))
    generator = torch.Generator().manual_seed(image_seed(seed, task, "image order"))
    return torch.randperm(size, generator=generator).tolist()


class PreparedImages(Dataset):
    """ADE20K-C items resized for the segmenter, with their windows (runs in loader workers)."""

    def __init__(self, dataset: ADE20KC, window_size: int, window_stride: int):
        self.dataset, self.size, self.stride = dataset, window_size, window_stride

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        image = resize_short_edge(item["image"], self.size).unsqueeze(0)
        item["image"] = image
        item["corners"] = window_boxes(image.shape[-2], image.shape[-1], self.size, self.stride)
        return item


def num_windows(dataset: ADE20KC, i: int, window_size: int, window_stride: int) -> int:
    """Window count of image i from its header alone (ranks that do not need the pixels)."""
    return len(window_boxes(*resized_size(*dataset.image_size(i), window_size), window_size, window_stride))


def predict(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Whole-image logits [1, C, h, w] -> label map [H, W] at the annotation's size."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False).argmax(1)[0]


# Images/s (never inverted to s/image), then the postfix: running mIoU, loss, ETA of the whole sweep.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class TTARunner:
    """Runs every task on this rank: stage 0 reads data and scores; other DUSA stages follow the steps.

    The method's model comes as one argument: `segmenter` (source), `tent` or `engine` (dusa).
    """

    def __init__(self, cfg: RunConfig, class_names: Sequence[str], device: torch.device,
                 engine: TTAEngine | None = None, tent: Tent | None = None, segmenter: torch.nn.Module | None = None,
                 stage: int = 0, num_stages: int = 1, logger: RunLogger | None = None,
                 config_record: dict[str, Any] | None = None, datasets: dict[str, ADE20KC] | None = None):
        self.method = cfg.tta.method
        given = {"dusa": engine, "tent": tent, "source": segmenter}
        if given[self.method] is None or any(v is not None for m, v in given.items() if m != self.method):
            raise ValueError(f"tta.method={self.method} needs exactly its own model "
                             f"(engine for dusa, tent for tent, segmenter for source)")
        self.cfg, self.class_names, self.device = cfg, list(class_names), device
        self.engine, self.tent, self.segmenter = engine, tent, segmenter
        self.stage, self.num_stages = stage, num_stages
        self.logger = logger
        self.config_record = config_record if config_record is not None else asdict(cfg)
        self.results: dict[str, dict] = {}
        data = cfg.data
        # Every task is listed up front: a missing folder fails now, not hours in, and the sweep's size is known.
        self.datasets = datasets if datasets is not None else open_tasks(data)
        self.total_images = sum(len(d) for d in self.datasets.values())
        self._done = 0  # images scored so far in the sweep (for its ETA)
        self._nonfinite_run = self._nonfinite_task = 0  # steps with a NaN/inf loss: in a row, in this task
        self._postfix: dict[str, str] = {}  # what the progress bar shows after its rate

    @property
    def scoring(self) -> bool:
        return self.stage == 0

    def reset(self) -> None:
        """Initial weights and fresh optimizer state of the adapted model (source has none)."""
        if self.engine is not None:
            self.engine.reset()
        elif self.tent is not None:
            self.tent.reset()

    def run(self) -> dict | None:
        finished = finished_tasks(self.cfg, self.config_record, self.class_names)
        for index, (task, dataset) in enumerate(self.datasets.items()):
            if task in finished:
                self.results[task] = finished[task]
                self._done += len(dataset)
                if self.scoring:
                    print(f"{task}: already done in {self.cfg.output_dir} (mIoU {100 * finished[task]['mIoU']:.2f}), "
                          f"skipped", flush=True)
                if self.cfg.tta.continual and index + 1 == len(finished) < len(self.datasets):
                    self._load_state(task)  # the models and optimizer as they were after that task
                continue
            if index > 0 and not self.cfg.tta.continual:
                self.reset()
            result = self.run_task(task, dataset, f"[{index + 1}/{len(self.datasets)}] {task}")
            if self.cfg.tta.continual and index + 1 < len(self.datasets):
                self._save_state(task)  # before results.json names the task finished
            if self.scoring:
                self.results[task] = result
                # Saved after every task, so a crash keeps what finished and claims nothing else.
                write_results(summarize(self.results, self.config_record, self.class_names), self.cfg.output_dir)
                if self.logger:
                    self.logger.log_task(task, result)
        if not self.scoring:
            return None
        results = summarize(self.results, self.config_record, self.class_names)
        write_results(results, self.cfg.output_dir)
        print(format_results_table(results), flush=True)
        if self.logger:
            self.logger.finish(results)
        return results

    # ------------------------------------------------------------------ resuming an interrupted sweep
    def _state_path(self, task: str) -> Path:
        return state_path(self.cfg.output_dir, task)

    def _save_state(self, task: str) -> None:
        """Continual runs keep the adapted state after each task (only the latest), to resume from."""
        path = self._state_path(task)
        if self.engine is not None:  # every rank writes its stage (DeepSpeed checkpoint: weights + optimizer)
            self.engine.engine.save_checkpoint(str(path.parent), tag=task)
        elif self.tent is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.tent.state_dict(), path)
        else:
            return
        if dist.is_initialized():
            dist.barrier()
        if self.scoring:
            for old in path.parent.iterdir():
                if old.name != task and old.name != "latest":
                    shutil.rmtree(old) if old.is_dir() else old.unlink()

    def _load_state(self, task: str) -> None:
        path = self._state_path(task)
        if self.engine is not None:
            self.engine.engine.load_checkpoint(str(path.parent), tag=task, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        elif self.tent is not None:
            self.tent.load_state_dict(torch.load(path))

    # ------------------------------------------------------------------ one image
    def step(self, task: str, item: dict) -> tuple[torch.Tensor, torch.Tensor | None, list | None]:
        """One image through the method: (whole-image logits scored, loss or None, DUSA's windows as
        ((top, left, side), candidate classes) or None)."""
        if self.method == "source":
            with torch.no_grad():
                return self.segmenter(item["image"].to(self.device)), None, None
        if self.method == "tent":
            logits, loss = self.tent.step(item["image"].to(self.device))
            return logits, loss, None
        front, data = self.engine.module.front, self.cfg.data
        generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, task, item["name"]))
        latent = (front.encoder.vae.config.latent_channels,) + (data.window_size // front.encoder.downsample,) * 2
        draw = functools.partial(draw_windows, latent_shape=latent, timestep_range=self.cfg.tta.timestep_range,
                                 generator=generator)
        # Adaptive windows are placed by the step's own forward: the front draws for them.
        out = self.engine.step(item["image"], draw if data.windows == "adaptive" else draw(item["corners"]))
        return out.logits, out.loss.detach(), list(zip(out.windows, out.candidates))

    def _discard_leftovers(self) -> None:
        """With gradient accumulation, the gradients of a task's last images that did not make a whole
        group never reach the weights (as the reference's loop)."""
        if self.engine is not None:
            self.engine.discard_accumulated()
        elif self.tent is not None:
            self.tent.discard_accumulated()

    def _count_nonfinite(self, skipped: bool) -> None:
        """Counts steps whose update was skipped for a NaN/inf loss; too many in a row stop the run."""
        self._nonfinite_run = self._nonfinite_run + 1 if skipped else 0
        self._nonfinite_task += int(skipped)
        if self._nonfinite_run >= self.cfg.tta.max_nonfinite:
            raise FloatingPointError(
                f"{self._nonfinite_run} steps in a row had a NaN/inf loss (their updates were skipped): "
                f"the adapted weights or the inputs are broken; lower --tta.lr or check the images "
                f"(limit: --tta.max_nonfinite)")

    def run_task(self, task: str, dataset: ADE20KC, description: str) -> dict | None:
        data = self.cfg.data
        self._nonfinite_task = 0
        order = task_order(data, self.cfg.seed, task, len(dataset))
        if not self.scoring:  # later stages: the same steps, window counts from the headers (or stage 0)
            for i in order:
                n = None if data.windows == "adaptive" else num_windows(dataset, i, data.window_size,
                                                                        data.window_stride)
                self.engine.step(None, None if n is None else [None] * n)
                self._count_nonfinite(self.engine.skipped)
            self._discard_leftovers()
            return None

        metric = SegmentationMetric(len(self.class_names))
        loader = DataLoader(Subset(PreparedImages(dataset, data.window_size, data.window_stride), order),
                            batch_size=None, num_workers=data.num_workers, pin_memory=self.device.type == "cuda")
        # (step, loss, picture) per image; losses are read back in batches: no host sync per step.
        pending: list[tuple[int, torch.Tensor | None, tuple[Image.Image, str] | None]] = []
        every = self.cfg.logging.image_every
        start = time.perf_counter()
        bar = tqdm(total=len(dataset), desc=description, disable=not self.cfg.logging.progress, dynamic_ncols=True,
                   unit=" img", bar_format=BAR_FORMAT)
        # Fixed order on the bar: running mIoU, last loss, ETA of the whole sweep.
        self._postfix = {"mIoU": "?", **({} if self.method == "source" else {"loss": "?"}), "sweep ETA": "?"}
        for step, item in enumerate(loader):
            label = item["label"].to(self.device, non_blocking=True)
            logits, loss, candidates = self.step(task, item)
            if self.method != "source":
                self._count_nonfinite((self.engine or self.tent).skipped)
            prediction = predict(logits, label.shape)
            metric.update(prediction, label)
            picture = self._picture(task, item, prediction, label, candidates) if every and step % every == 0 else None
            pending.append((step, loss, picture))
            self._done += 1
            self._update_bar(bar)
            if len(pending) >= self.cfg.logging.log_every or step + 1 == len(dataset):
                self._flush(task, pending, metric, bar)
        bar.close()
        self._discard_leftovers()
        result = metric.compute()
        result.update(images=len(dataset), seconds=time.perf_counter() - start, nonfinite_steps=self._nonfinite_task)
        if self._nonfinite_task:
            print(f"{task}: {self._nonfinite_task} steps had a NaN/inf loss; their updates were skipped", flush=True)
        print(f"{task}: mIoU {100 * result['mIoU']:.2f}  aAcc {100 * result['aAcc']:.2f}  "
              f"({result['images']} images, {result['seconds']:.1f} s)", flush=True)
        return result

    def _picture(self, task: str, item: dict, prediction: torch.Tensor, label: torch.Tensor,
                 candidates: list | None) -> tuple[Image.Image, str]:
        """Input | prediction | ground truth, saved as PNG now and logged to W&B with the step."""
        notes = [f"{self.method}, {task}, {item['name']}"]
        if candidates is not None:
            for w, ((top, left, side), classes) in enumerate(candidates):
                notes.append(f"window {w + 1} ({side} px at {top}, {left}) candidates: "
                             + ", ".join(self.class_names[c] for c in classes.tolist()))
        picture = make_picture(item["image"], prediction, label, self.class_names, notes)
        save_picture(picture, self.cfg.output_dir, task, item["name"])
        return picture, "\n".join(notes)

    def _update_bar(self, bar: tqdm) -> None:
        """Advances the bar; the sweep's ETA is its remaining images over the current (smoothed) rate."""
        rate = bar.format_dict.get("rate")  # None until tqdm has measured one (and when the bar is off)
        if rate:
            self._postfix["sweep ETA"] = tqdm.format_interval((self.total_images - self._done) / rate)
        bar.set_postfix(self._postfix, refresh=False)
        bar.update(1)

    def _flush(self, task: str, pending: list, metric: SegmentationMetric, bar: tqdm) -> None:
        running = metric.compute()["mIoU"]
        losses = [loss for _, loss, _ in pending if loss is not None]
        values = iter(torch.stack(losses).float().tolist() if losses else [])
        for k, (step, loss, picture) in enumerate(pending):
            value = next(values) if loss is not None else None
            if self.logger:
                self.logger.log_step(task, step, value, running_miou=running if k == len(pending) - 1 else None)
                if picture is not None:
                    self.logger.log_picture(task, *picture)
            if value is not None:
                self._postfix["loss"] = f"{value:.4f}"
        self._postfix["mIoU"] = f"{100 * running:.1f}"
        bar.set_postfix(self._postfix)
        pending.clear()
