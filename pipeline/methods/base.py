"""The interface every adaptation method implements (the registry in pipeline/methods/__init__.py names them).

A method turns one prepared image into its scored logits, adapting on the way if it adapts; the runner
(pipeline/run/loop.py) does the rest the same way for every method: data, metric, reset between tasks,
continual state, pictures, logging.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from data.ade20k_c import ADE20KC
    from pipeline.run.config import RunConfig
    from pipeline.run.replicas import Replicas


class StepResult(NamedTuple):
    """One image through a method."""

    logits: torch.Tensor  # whole-image logits [1, C, h, w] that are scored (the forward before any update)
    loss: torch.Tensor | None  # a device tensor, read back in batches; None: the method does not adapt
    skipped: bool  # the update was skipped for a NaN/inf loss
    notes: list[str]  # lines for the image's picture (e.g. DUSA's windows and their candidates)
    windows: int = 0  # the micro-batches of the image's step (DUSA's windows; 0: the method has none)
    candidates: list[torch.Tensor] | None = None  # each window's candidate class ids (host; DUSA), for images.csv


class Built(NamedTuple):
    """What `Method.build` hands the launcher."""

    method: "Method"
    segmenter: nn.Module | None  # the segmenter on this process (its classes are checked), if it holds one
    parameters: list[tuple[str, int, int]]  # (part, trainable, total) for the start-up summary
    processes: str  # how the run uses its processes, for the start-up summary


def parameter_counts(module: nn.Module, part: str) -> tuple[str, int, int]:
    """(part, trainable, total) parameters of a module on this process."""
    params = list(module.parameters())
    return part, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class Method:
    """The interface. Class attributes say what the launcher and the runner must do around the method:

    `name`: its `--tta.method` value (the registry's key). `options`: the dataclass of its own settings, or
    None; the CLI gets a section `--<name>.<field>` of its fields (their docstrings are the help), the run's
    config.json a `<name>` key, and the run reads it as `cfg.<name>`; a rerun resumes only with the same
    values. `adapts`: there is state to reset, save and load. `pipeline`: every process of the run takes part
    in each step (barriers around saving state); else the method runs on one process per replica.
    `generator`: it reads the generator and the class-embedding cache. `scoring`: this process scores the
    images (with a pipeline, the stage holding the segmenter; the others `follow`).
    """

    name = ""
    prediction: dict | None = None  # start-up images/s of one replica (pipeline/dusa/memory.py: this_layout_prediction)
    options: type | None = None
    adapts = True
    pipeline = False
    generator = False
    scoring = True

    @classmethod
    def check(cls, cfg: RunConfig, processes: int) -> None:
        """Settings that this method cannot run with (ValueError, one line), before anything loads."""

    @classmethod
    def build(cls, cfg: RunConfig, class_names: Sequence[str], device: torch.device, ds_config: dict[str, Any],
              report: Callable[[str], None], replicas: Replicas) -> Built:
        """The method's models on this process (`report`: start-up lines, for the console's rank-0 logger;
        `replicas`: where this process sits among the run's independent replicas)."""
        raise NotImplementedError

    def step(self, task: str, item: dict) -> StepResult:
        """One prepared image (pipeline/run/images.py: `image`, `corners`, `name`, ...) -> its StepResult."""
        raise NotImplementedError

    def follow(self, task: str, dataset: ADE20KC, index: int) -> bool:
        """A process that does not score takes its part in image `index`'s step; returns `skipped`."""
        raise NotImplementedError(f"{self.name} runs on the scoring process alone")

    def end_task(self) -> None:
        """After a task's last image (gradients waiting for an update are dropped)."""

    def reset(self) -> None:
        """Initial weights and fresh optimizer state."""

    def save(self, folder: Path, task: str) -> None:
        """This process's adapted state after `task`, as `folder/task` (a file or a folder)."""

    def load(self, folder: Path, task: str) -> None:
        """The state that `save` wrote (checked by the runner before it calls this)."""


def load_segmenter(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The segmenter in eval behaviour on `device` (dropout and drop-path off, as every method runs it)."""
    from models.segformer import Segmenter
    return Segmenter.from_pretrained(cfg.model.segmenter).eval().to(device)


def working_dtype(ds_config: dict[str, Any]) -> torch.dtype | None:
    """bf16 under either bf16 preset of the DeepSpeed JSON (bf16 weights, or float32 weights under autocast)."""
    from pipeline.dusa.engine import precision_of
    return torch.bfloat16 if precision_of(ds_config) in ("bf16", "autocast") else None
