"""`cotta`: continual test-time adaptation (Wang et al., CVPR 2022, "Continual Test-Time Domain Adaptation"),
in its segmentation setting (SegFormer, Cityscapes to ACDC; the authors' public segmentation code).

Three copies of the segmenter on the scoring process: the student (adapted), the teacher (its EMA) and the
anchor (the source weights, frozen). Per image:

1. the teacher predicts the image at every scale of `scales` (and flipped, with `flip`); the softmax
   probabilities, resized to the logits' size at scale 1, are averaged;
2. where the anchor is confident (its top probability at scale 1 above `confidence_threshold`), the teacher's
   plain scale-1 prediction is kept, elsewhere the augmented average: these scores are the image's prediction
   (scored) and their argmax its pseudo-label;
3. the student's cross-entropy against the pseudo-label (at the logits' resolution: upsampling both first would
   only interpolate the same values) takes one Adam step over every parameter of the student;
4. teacher <- `ema` teacher + (1 - `ema`) student, for every parameter;
5. stochastic restore: each weight and bias element of the student goes back to the source value with
   probability `restore_probability` (drawn from a generator seeded by the run's seed, the task and the image,
   so a rerun or a resume repeats it).

Every model runs in eval behaviour (dropout and drop-path off, BatchNorm's running statistics), as the
authors' code does. Their defaults, kept here: Adam (0.9, 0.999) at lr 6e-5 / 8 (their Cityscapes training
rate over its batch of 8, for a batch of one image), EMA 0.999, restore probability 0.01, confidence 0.69
(their comment: 0.74 was Cityscapes' 5 % quantile), scales 0.5 to 1.75 with flips.

Memory: the teacher and the anchor sit beside the student on the same device, about 6 x the segmenter's float32
weights with Adam's states; `build` estimates it and refuses at start-up a GPU that cannot hold it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import Built, StepResult, load_segmenter, parameter_counts, working_dtype
from pipeline.methods.segmenter_state import AdapterMethod, autocast, check_domains, refuse_accumulation


@dataclass
class CottaOptions:
    """cotta: the authors' segmentation setting."""

    lr: float = 6e-5 / 8
    """Adam's learning rate over every parameter of the student (the authors': 6e-5 / 8 = 7.5e-6, their
    Cityscapes rate for a batch of 8 over 8; `--tta.lr` is for dusa and tent)."""
    ema: float = 0.999
    """The teacher's EMA factor: teacher <- ema teacher + (1 - ema) student after every update."""
    restore_probability: float = 0.01
    """Each weight and bias element of the student returns to its source value with this probability per image."""
    confidence_threshold: float = 0.69
    """Where the anchor's top-class probability exceeds this, the teacher's plain prediction is the pseudo-label;
    elsewhere its average over the augmentations."""
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    """The teacher's augmentation scales (image sides times each)."""
    flip: bool = True
    """Also predict each scale's horizontally flipped image."""


def augmented_probabilities(model: nn.Module, image: torch.Tensor, size: tuple[int, int], scales: list[float],
                            flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the mean over `scales` (x flips) of `model`'s softmax probabilities, each resized to `size`: [1, C, *size];
    the plain image's probabilities, scale 1 unflipped, when that view is among them, else None)."""
    total, count, plain = None, 0, None
    height, width = image.shape[-2:]
    for scale in scales:
        scaled = image if scale == 1 else F.interpolate(
            image, size=(max(1, round(height * scale)), max(1, round(width * scale))), mode="bilinear",
            align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = model(scaled.flip(-1) if flipped else scaled)
            if flipped:
                logits = logits.flip(-1)
            probs = torch.softmax(logits.float(), dim=1)
            if scale == 1 and not flipped:
                plain = probs
            if probs.shape[-2:] != tuple(size):
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            count += 1
    return total / count, plain


class CoTTA:
    """Adapts `segmenter` (the student) in place; `step` returns the teacher's scores (the scored prediction)."""

    def __init__(self, segmenter: nn.Module, options: CottaOptions, autocast_dtype: torch.dtype | None = None):
        self.student = segmenter.eval().requires_grad_(True)
        self.teacher = copy.deepcopy(segmenter).requires_grad_(False)
        self.anchor = copy.deepcopy(segmenter).requires_grad_(False)  # the source weights: restore and reset
        self.params = list(self.student.parameters())
        self.options, self.autocast_dtype = options, autocast_dtype
        self.optimizer = torch.optim.Adam(self.params, lr=options.lr, betas=(0.9, 0.999))
        self.skipped = False

    def pseudo_scores(self, image: torch.Tensor) -> torch.Tensor:
        """The teacher's scores of `image` [1, C, h, w] (steps 1-2 of the module docstring), without gradient."""
        o = self.options
        with torch.no_grad(), autocast(image.device, self.autocast_dtype):
            anchor = torch.softmax(self.anchor(image).float(), dim=1)  # the logits' size at scale 1
            confident = anchor.amax(dim=1, keepdim=True) > o.confidence_threshold
            averaged, plain = augmented_probabilities(self.teacher, image, tuple(anchor.shape[-2:]), o.scales, o.flip)
            if plain is None:  # scale 1 is not among the augmentations
                plain = torch.softmax(self.teacher(image).float(), dim=1)
        return torch.where(confident, plain, averaged)

    def step(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """image [1, 3, H, W] in [0, 1] -> (the teacher's scores before the update; the student's loss), detached.
        `generator` (on the image's device) draws the stochastic restore."""
        scores = self.pseudo_scores(image)
        with autocast(image.device, self.autocast_dtype):
            logits = self.student(image)
        loss = F.cross_entropy(logits.float(), scores.argmax(dim=1))
        loss.backward()
        self.skipped = not bool(torch.isfinite(loss))  # a NaN/inf loss must not reach the weights
        if not self.skipped:
            self.optimizer.step()
            self._update_teacher()
            self._restore(generator)
        self.optimizer.zero_grad(set_to_none=True)
        return scores, loss.detach()

    @torch.no_grad()
    def _update_teacher(self) -> None:
        ema = self.options.ema
        for t, s in zip(self.teacher.parameters(), self.params):
            t.mul_(ema).add_(s, alpha=1 - ema)

    @torch.no_grad()
    def _restore(self, generator: torch.Generator) -> None:
        probability = self.options.restore_probability
        for p, source in zip(self.params, self.anchor.parameters()):
            mask = torch.rand(p.shape, generator=generator, device=p.device) < probability
            p.copy_(torch.where(mask, source, p))

    def state_dict(self) -> dict:
        return {"student": [p.detach().cpu() for p in self.params],
                "teacher": [p.detach().cpu() for p in self.teacher.parameters()],
                "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, saved in zip(self.params, state["student"]):
            p.copy_(saved)
        for p, saved in zip(self.teacher.parameters(), state["teacher"]):
            p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def reset(self) -> None:
        """Student and teacher back to the source weights (bit-exact), fresh Adam state."""
        for p, t, source in zip(self.params, self.teacher.parameters(), self.anchor.parameters()):
            p.copy_(source)
            t.copy_(source)
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)


def memory_estimate(segmenter: str, image: tuple[int, int], scales: list[float], precision: str) -> float:
    """Bytes that cotta holds on its device at the peak of a step, from the segmenter's config alone: float32
    student, gradient, Adam's 2 states, teacher and anchor (6 x 4 bytes per parameter), the student's forward kept
    for its backward, and the teacher's forward at the largest scale."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from models.checkpoints import load_checkpoint
    from pipeline.dusa.memory import segformer_activation_bytes
    config = load_checkpoint(segmenter, "segmenter", SegformerConfig.from_pretrained)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in SegformerForSemanticSegmentation(config).parameters())
    largest = max(scales)
    teacher = segformer_activation_bytes(config.to_dict(), (round(image[0] * largest), round(image[1] * largest)),
                                         precision)
    return 24.0 * parameters + segformer_activation_bytes(config.to_dict(), image, precision) + teacher


def memory_refusal(estimate: float, card: str, card_bytes: float | None) -> str | None:
    """Why a device of `card_bytes` cannot hold `estimate` bytes (the planner's 85 % of it), or None."""
    from pipeline.dusa.memory import BUDGET
    if card_bytes is None or estimate <= BUDGET * card_bytes:
        return None
    return (f"cotta needs about {estimate / 2**30:.1f} GiB on one GPU (student, teacher, anchor, Adam and activations) "
            f"but {card} has {card_bytes / 2**30:.1f} GiB ({BUDGET:.0%} usable): lower the largest --cotta.scales or "
            f"--data.window_size, or use a larger GPU")


class Cotta(AdapterMethod):
    """`cotta`: `CoTTA` on one process per replica (student, teacher and anchor on its device)."""

    name, options = "cotta", CottaOptions

    def __init__(self, cotta: CoTTA, device: torch.device, seed: int):
        self.cotta, self.device, self.seed = cotta, device, seed
        self.adapter = cotta

    @classmethod
    def check(cls, cfg, processes: int) -> None:
        o = cfg.cotta
        check_domains("cotta", [
            ("lr", o.lr, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
            ("ema", o.ema, "a number in [0, 1]", lambda v: 0 <= v <= 1),
            ("restore_probability", o.restore_probability, "a number in [0, 1]", lambda v: 0 <= v <= 1),
            ("confidence_threshold", o.confidence_threshold, "a number in [0, 1]", lambda v: 0 <= v <= 1)])
        if not o.scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                                   and 0 < s <= 4 for s in o.scales):
            raise ValueError(f"--cotta.scales {o.scales!r} is outside its domain: at least one scale, each in (0, 4]")
        refuse_accumulation(cfg, "cotta")

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        from pipeline.dusa.memory import card_memory
        dtype = working_dtype(ds_config)
        side = cfg.data.window_size  # a 4:3 image (ADE20K's usual shape) at the run's short edge
        estimate = memory_estimate(cfg.model.segmenter, (side, round(side * 4 / 3)), cfg.cotta.scales,
                                   "autocast" if dtype is not None else "fp32")
        card, card_bytes = card_memory() if device.type == "cuda" else (device.type, None)
        report(f"cotta: student, teacher and anchor on one device: about {estimate / 2**30:.2f} GiB at the peak "
               f"(a {side} x {round(side * 4 / 3)} image, scales up to {max(cfg.cotta.scales):g})")
        refusal = memory_refusal(estimate, card, card_bytes)
        if refusal:
            raise ValueError(refusal)
        segmenter = load_segmenter(cfg, device)
        cotta = CoTTA(segmenter, cfg.cotta, dtype)  # float32 weights for Adam; bf16 compute by autocast
        return Built(cls(cotta, device, cfg.seed), segmenter, [parameter_counts(segmenter, "segmenter (student)")],
                     f"{replicas.describe()}: cotta")

    def step(self, task: str, item: dict) -> StepResult:
        from pipeline.run.images import image_seed
        generator = torch.Generator(device=self.device).manual_seed(image_seed(self.seed, task, item["name"]))
        scores, loss = self.cotta.step(item["image"].to(self.device), generator)
        return StepResult(scores, loss, self.cotta.skipped, [])


