"""The TTA loop: tasks (corruptions), one adaptation step per image, scoring and results."""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.ade20k_c import ADE20KC
from data.metrics import SegmentationMetric
from pipeline.config import RunConfig
from pipeline.engine import TTAEngine
from pipeline.reporting import RunLogger, format_results_table, summarize, write_results
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


class TTARunner:
    """Runs every task on this rank: stage 0 reads data and scores; other stages follow the steps."""

    def __init__(self, cfg: RunConfig, class_names: Sequence[str], device: torch.device,
                 engine: TTAEngine | None = None, segmenter: torch.nn.Module | None = None,
                 stage: int = 0, num_stages: int = 1, logger: RunLogger | None = None,
                 config_record: dict[str, Any] | None = None):
        self.cfg, self.class_names, self.device = cfg, list(class_names), device
        self.engine, self.segmenter = engine, segmenter
        self.stage, self.num_stages = stage, num_stages
        self.logger = logger
        self.config_record = config_record if config_record is not None else asdict(cfg)
        self.results: dict[str, dict] = {}

    @property
    def scoring(self) -> bool:
        return self.stage == 0

    def run(self) -> dict | None:
        data = self.cfg.data
        for index, task in enumerate(data.corruptions):
            if index > 0 and self.engine is not None and not self.cfg.tta.continual:
                self.engine.reset()
            dataset = ADE20KC(data.root, task, data.severity, data.limit)
            result = self.run_task(task, dataset, f"[{index + 1}/{len(data.corruptions)}] {task}")
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

    def run_task(self, task: str, dataset: ADE20KC, description: str) -> dict | None:
        data, tta = self.cfg.data, self.cfg.tta
        if not self.scoring:  # later stages: the same steps, window counts from the headers
            for i in range(len(dataset)):
                n = num_windows(dataset, i, data.window_size, data.window_stride)
                self.engine.step([(None, torch.zeros(1))] * n)
            return None

        metric = SegmentationMetric(len(self.class_names))
        loader = DataLoader(PreparedImages(dataset, data.window_size, data.window_stride), batch_size=None,
                            num_workers=data.num_workers, pin_memory=self.device.type == "cuda")
        pending: list[tuple[int, torch.Tensor]] = []  # losses read back in batches: no sync per step
        start = time.perf_counter()
        bar = tqdm(total=len(dataset), desc=description, disable=not self.cfg.logging.progress, dynamic_ncols=True)
        for step, item in enumerate(loader):
            label = item["label"].to(self.device, non_blocking=True)
            if self.engine is None:
                with torch.no_grad():
                    logits = self.segmenter(item["image"].to(self.device))
            else:
                front = self.engine.module.front
                generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, task, item["name"]))
                latent = (front.encoder.vae.config.latent_channels,) + (data.window_size // front.encoder.downsample,) * 2
                loss = self.engine.step(microbatches(item["image"], item["corners"], latent, tta.timestep_range,
                                                     generator))
                pending.append((step, loss.detach()))
                logits = front.last_logits
            metric.update(predict(logits, label.shape), label)
            bar.update(1)
            if len(pending) >= self.cfg.logging.log_every or step + 1 == len(dataset):
                self._flush(task, pending, metric, bar)
        bar.close()
        result = metric.compute()
        result.update(images=len(dataset), seconds=time.perf_counter() - start)
        print(f"{task}: mIoU {100 * result['mIoU']:.2f}  aAcc {100 * result['aAcc']:.2f}  "
              f"({result['images']} images, {result['seconds']:.1f} s)", flush=True)
        return result

    def _flush(self, task: str, pending: list, metric: SegmentationMetric, bar: tqdm) -> None:
        running = metric.compute()["mIoU"]
        losses = torch.stack([loss for _, loss in pending]).float().tolist() if pending else []
        if self.logger:
            for k, ((step, _), loss) in enumerate(zip(pending, losses)):
                self.logger.log_step(task, step, loss, running_miou=running if k == len(losses) - 1 else None)
            if not losses:  # no adaptation: only the running mIoU
                self.logger.log_step(task, bar.n - 1, None, running_miou=running)
        bar.set_postfix({"mIoU": f"{100 * running:.1f}", **({"loss": f"{losses[-1]:.4f}"} if losses else {})})
        pending.clear()
