"""The adaptation methods behind one interface, and the registry that names them.

A method turns one prepared image into its scored logits, adapting on the way if it adapts; the runner
(pipeline/run/loop.py) does the rest the same way for every method: data, metric, reset between tasks,
continual state, pictures, logging. A new method is one class here and one entry in `METHODS`.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn

from data.ade20k_c import ADE20KC
from pipeline.run import timing
from pipeline.run.config import RunConfig
from pipeline.dusa.engine import TTAEngine, precision_of
from pipeline.run.images import image_seed, num_windows
from pipeline.run.replicas import Replicas
from pipeline.methods.tent import Tent
from pipeline.dusa.windows import draw_windows


class StepResult(NamedTuple):
    """One image through a method."""

    logits: torch.Tensor  # whole-image logits [1, C, h, w] that are scored (the forward before any update)
    loss: torch.Tensor | None  # a device tensor, read back in batches; None: the method does not adapt
    skipped: bool  # the update was skipped for a NaN/inf loss
    notes: list[str]  # lines for the image's picture (e.g. DUSA's windows and their candidates)
    windows: int = 0  # the micro-batches of the image's step (DUSA's windows; 0: the method has none)


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
    """The interface. `scoring`: this process scores the images (with a pipeline, the stage holding the
    segmenter; the others `follow`). `adapts`: there is state to reset, save and load. `pipeline`: every
    process of the run takes part in each step (barriers around saving state); else the method runs on
    the first process alone. `generator`: it reads the generator and the class-embedding cache."""

    name = ""
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
        """The method's models on this process (`report`: start-up lines, printed by the first process;
        `replicas`: where this process sits among the run's independent replicas)."""
        raise NotImplementedError

    def step(self, task: str, item: dict) -> StepResult:
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


class Source(Method):
    """The unadapted segmenter."""

    name, adapts = "source", False

    def __init__(self, segmenter: torch.nn.Module, device: torch.device):
        self.segmenter, self.device = segmenter, device

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        segmenter = load_segmenter(cfg, device).requires_grad_(False)
        if precision_of(ds_config) == "bf16":  # the preset's weights; under autocast, float32
            segmenter = segmenter.to(torch.bfloat16)
        return Built(cls(segmenter, device), segmenter, [parameter_counts(segmenter, "segmenter")],
                     f"{replicas.describe()}: source")

    @torch.no_grad()
    def step(self, task: str, item: dict) -> StepResult:
        return StepResult(self.segmenter(item["image"].to(self.device)), None, False, [])


class TentMethod(Method):
    """Tent (pipeline/methods/tent.py) on one process."""

    name = "tent"

    def __init__(self, tent: Tent, device: torch.device):
        self.tent, self.device = tent, device

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        segmenter = load_segmenter(cfg, device)
        # float32 weights for Adam; bf16 compute by autocast under either bf16 preset
        low = torch.bfloat16 if precision_of(ds_config) in ("bf16", "autocast") else None
        tent = Tent(segmenter, cfg.tta.segmenter_lr, low, cfg.tta.accumulation_steps)
        return Built(cls(tent, device), segmenter, [parameter_counts(segmenter, "segmenter")],
                     f"{replicas.describe()}: tent")

    def step(self, task: str, item: dict) -> StepResult:
        logits, loss = self.tent.step(item["image"].to(self.device))
        return StepResult(logits, loss, self.tent.skipped, [])

    def end_task(self) -> None:
        self.tent.discard_accumulated()

    def reset(self) -> None:
        self.tent.reset()

    def save(self, folder: Path, task: str) -> None:
        torch.save(self.tent.state_dict(), folder / task)

    def load(self, folder: Path, task: str) -> None:
        path = folder / task
        try:
            state = torch.load(path, weights_only=True)  # tensors and plain containers only
        except Exception as exc:  # any failure to read it is a damaged file
            raise ValueError(f"cannot read the saved state {path} ({type(exc).__name__}): "
                             f"delete the output folder to start over") from exc
        self.tent.load_state_dict(state)


class Dusa(Method):
    """DUSA through the DeepSpeed pipeline (pipeline/dusa/engine.py): stage 0 scores, the others follow."""

    name, pipeline, generator = "dusa", True, True

    def __init__(self, engine: TTAEngine, cfg: RunConfig, class_names: Sequence[str]):
        self.engine, self.cfg, self.class_names = engine, cfg, list(class_names)
        self.scoring = engine.module.front is not None

    @classmethod
    def check(cls, cfg: RunConfig, processes: int) -> None:
        if not (cfg.tta.update_segmenter or cfg.tta.update_generator):
            raise ValueError("tta.update_segmenter and tta.update_generator are both false: nothing adapts "
                             "(use --tta.method source for the unadapted model)")
        if cfg.tta.learnable_embedding and not cfg.tta.update_generator:
            raise ValueError("tta.learnable_embedding adapts with the generator: it needs tta.update_generator true")

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        from pipeline.dusa.module import build_pipeline  # DeepSpeed's pipeline modules: only for this method
        precision = precision_of(ds_config)
        module = build_pipeline(cfg.model, cfg.data, cfg.tta, cfg.pipeline, class_names, stage_report=report,
                                dtype=torch.bfloat16 if precision == "bf16" else torch.float32, precision=precision,
                                replicas=replicas.count, ds_config=ds_config)
        timing.mark("weights loaded")
        engine = TTAEngine(module, ds_config, cfg.tta, adaptive_windows=cfg.data.windows == "adaptive")
        timing.mark("engine ready")
        timing.instrument(engine)
        stage = engine.engine.stage_id
        counts: list = [(stage, parameter_counts(module, f"stage {stage}"))] * replicas.stages
        if replicas.stages > 1:  # this replica's stages (the other replicas hold the same)
            dist.all_gather_object(counts, counts[0], group=replicas.group)
        return Built(cls(engine, cfg, class_names), module.front.segmenter if stage == 0 else None,
                     [c for _, c in sorted(counts)], f"{replicas.describe()}: dusa")

    def step(self, task: str, item: dict) -> StepResult:
        front, data = self.engine.module.front, self.cfg.data
        generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, task, item["name"]))
        latent = (front.encoder.vae.config.latent_channels,) + (data.window_size // front.encoder.downsample,) * 2
        draw = functools.partial(draw_windows, latent_shape=latent, timestep_range=self.cfg.tta.timestep_range,
                                 generator=generator)
        # Adaptive windows are placed by the step's own forward: the front draws for them.
        out = self.engine.step(item["image"], draw if data.windows == "adaptive" else draw(item["corners"]))
        notes = [f"window {w + 1} ({side} px at {top}, {left}) candidates: "
                 + ", ".join(self.class_names[c] for c in classes.tolist())
                 for w, ((top, left, side), classes) in enumerate(zip(out.windows, out.candidates))]
        return StepResult(out.logits, out.loss.detach(), self.engine.skipped, notes, len(out.windows))

    def follow(self, task: str, dataset: ADE20KC, index: int) -> bool:
        data = self.cfg.data  # the window count from the image's header (adaptive: stage 0 sends it)
        n = None if data.windows == "adaptive" else num_windows(dataset, index, data.window_size, data.window_stride)
        self.engine.step(None, None if n is None else [None] * n)
        return self.engine.skipped

    def end_task(self) -> None:
        self.engine.discard_accumulated()

    def reset(self) -> None:
        self.engine.reset()

    def save(self, folder: Path, task: str) -> None:  # every stage writes its part (weights + optimizer)
        self.engine.engine.save_checkpoint(str(folder), tag=task, save_latest=False)

    def load(self, folder: Path, task: str) -> None:
        self.engine.engine.load_checkpoint(str(folder), tag=task, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)


def load_segmenter(cfg: RunConfig, device: torch.device) -> nn.Module:
    from models.segformer import Segmenter
    return Segmenter.from_pretrained(cfg.model.segmenter).eval().to(device)


# tta.method -> the class that checks its settings, builds its models and runs its steps.
METHODS: dict[str, type[Method]] = {"source": Source, "tent": TentMethod, "dusa": Dusa}
