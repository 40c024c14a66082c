"""The TTA loop: tasks (corruptions), one step per image of the chosen method, scoring and results.

Every method (`source`, `tent`, `dusa`) goes through the same data, metric, reset, pictures and logging code;
only the step that turns an image into scored logits differs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.ade20k_c import ADE20KC
from data.metrics import SegmentationMetric
from pipeline.config import RunConfig
from pipeline.engine import TTAEngine
from pipeline.layers import SegmenterFront
from pipeline.loss import select_candidates
from pipeline.pictures import make_picture, save_picture
from pipeline.reporting import RunLogger, format_results_table, summarize, write_results
from pipeline.tent import Tent
from pipeline.windows import resize_short_edge, resized_size, window_boxes


def image_seed(seed: int, task: str, name: str) -> int:
    """A per-image seed that depends on the image, not on its position in the run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{task}/{name}".encode()).digest()[:7], "little")


def microbatches(image: torch.Tensor, corners: Sequence[tuple[int, int]], latent_shape: Sequence[int],
                 timestep_range: Sequence[float], generator: torch.Generator) -> list[tuple[tuple, torch.Tensor]]:
    """One micro-batch per window: (image, corner, noise, t, sampling seed), label placeholder.

    The randomness of a step (noise, flow time, candidate sampling) is drawn here from one seeded
    generator, so the pipeline and a single-process reference see the same values.
    """
    low, high = timestep_range
    batches = []
    for top, left in corners:
        noise = torch.randn(1, *latent_shape, generator=generator)
        t = low + (high - low) * torch.rand(1, generator=generator)
        seed = torch.randint(0, 2**62, (1,), generator=generator)
        # The last stage reads a label per micro-batch; the loss takes its inputs from the pipeline.
        batches.append(((image, torch.tensor([top, left]), noise, t, seed), torch.zeros(1)))
    return batches


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


def window_candidates(front: SegmenterFront, batches: list) -> list[torch.Tensor]:
    """The candidate classes of every window of the last DUSA step, as `SegmenterFront` chose them.

    The front keeps no record of them, so they are recomputed from what it used: the same whole-image
    logits, window crop, latent size, settings and sampling seed. No model runs: an interpolation and
    a top-k per window, done only for the images that get a picture.
    """
    image = batches[0][0][0]
    full = F.interpolate(front.last_logits.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
    size, chosen = front.window_size, []
    for (_, corner, noise, _, seed), _ in batches:
        top, left = (int(v) for v in corner)
        window = full[..., top:top + size, left:left + size]
        latent = F.interpolate(window, size=noise.shape[-2:], mode="bilinear", align_corners=False)[0]
        classes, _ = select_candidates(latent, front.topk, front.max_classes, front.min_classes,
                                       torch.Generator().manual_seed(int(seed.item())))
        chosen.append(classes.cpu())
    return chosen


# Images/s (never inverted to s/image), then the postfix: running mIoU, loss, ETA of the whole sweep.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


class TTARunner:
    """Runs every task on this rank: stage 0 reads data and scores; other DUSA stages follow the steps.

    The method's model comes as one argument: `segmenter` (source), `tent` or `engine` (dusa).
    """

    def __init__(self, cfg: RunConfig, class_names: Sequence[str], device: torch.device,
                 engine: TTAEngine | None = None, tent: Tent | None = None, segmenter: torch.nn.Module | None = None,
                 stage: int = 0, num_stages: int = 1, logger: RunLogger | None = None,
                 config_record: dict[str, Any] | None = None):
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
        self.datasets = {task: ADE20KC(data.root, task, data.severity, data.limit) for task in data.corruptions}
        self.total_images = sum(len(d) for d in self.datasets.values())
        self._done = 0  # images scored so far in the sweep (for its ETA)
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
        for index, (task, dataset) in enumerate(self.datasets.items()):
            if index > 0 and not self.cfg.tta.continual:
                self.reset()
            result = self.run_task(task, dataset, f"[{index + 1}/{len(self.datasets)}] {task}")
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

    def step(self, task: str, item: dict) -> tuple[torch.Tensor, torch.Tensor | None, list | None]:
        """One image through the method: (whole-image logits scored, loss or None, DUSA micro-batches or None)."""
        if self.method == "source":
            with torch.no_grad():
                return self.segmenter(item["image"].to(self.device)), None, None
        if self.method == "tent":
            logits, loss = self.tent.step(item["image"].to(self.device))
            return logits, loss, None
        front, data = self.engine.module.front, self.cfg.data
        generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, task, item["name"]))
        latent = (front.encoder.vae.config.latent_channels,) + (data.window_size // front.encoder.downsample,) * 2
        batches = microbatches(item["image"], item["corners"], latent, self.cfg.tta.timestep_range, generator)
        loss = self.engine.step(batches)
        return front.last_logits, loss.detach(), batches

    def run_task(self, task: str, dataset: ADE20KC, description: str) -> dict | None:
        data = self.cfg.data
        if not self.scoring:  # later stages: the same steps, window counts from the headers
            for i in range(len(dataset)):
                n = num_windows(dataset, i, data.window_size, data.window_stride)
                self.engine.step([(None, torch.zeros(1))] * n)
            return None

        metric = SegmentationMetric(len(self.class_names))
        loader = DataLoader(PreparedImages(dataset, data.window_size, data.window_stride), batch_size=None,
                            num_workers=data.num_workers, pin_memory=self.device.type == "cuda")
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
            logits, loss, batches = self.step(task, item)
            prediction = predict(logits, label.shape)
            metric.update(prediction, label)
            picture = self._picture(task, item, prediction, label, batches) if every and step % every == 0 else None
            pending.append((step, loss, picture))
            self._done += 1
            self._update_bar(bar)
            if len(pending) >= self.cfg.logging.log_every or step + 1 == len(dataset):
                self._flush(task, pending, metric, bar)
        bar.close()
        result = metric.compute()
        result.update(images=len(dataset), seconds=time.perf_counter() - start)
        print(f"{task}: mIoU {100 * result['mIoU']:.2f}  aAcc {100 * result['aAcc']:.2f}  "
              f"({result['images']} images, {result['seconds']:.1f} s)", flush=True)
        return result

    def _picture(self, task: str, item: dict, prediction: torch.Tensor, label: torch.Tensor,
                 batches: list | None) -> tuple[Image.Image, str]:
        """Input | prediction | ground truth, saved as PNG now and logged to W&B with the step."""
        notes = [f"{self.method}, {task}, {item['name']}"]
        if batches is not None:
            for w, classes in enumerate(window_candidates(self.engine.module.front, batches)):
                notes.append(f"window {w + 1} candidates: " + ", ".join(self.class_names[c] for c in classes.tolist()))
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
