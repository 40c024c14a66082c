"""`dusa`: DUSA (Li et al., NeurIPS 2024) for segmentation: the segmenter and the SD3 transformer adapt
together from the diffusion loss, one DeepSpeed pipeline step per image (pipeline/dusa/)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
import torch.distributed as dist

from pipeline.dusa.windows import draw_windows, window_count
from pipeline.methods.base import Built, Method, StepResult, parameter_counts
from pipeline.run import timing

# jsonargparse runs this block to read DusaOptions' annotations (the CLI's `--dusa.*`): nothing here may import
# DeepSpeed, which the CLI must not load (it prints at import); hence the engine's annotation is Any below.
if TYPE_CHECKING:
    from data.ade20k_c import ADE20KC
    from pipeline.run.config import RunConfig


@dataclass
class DusaOptions:
    """dusa: the candidates, the loss and what adapts (the segmenter's learning rate is `--tta.lr_segmenter`,
    shared with tent)."""

    lr_generator: float | None = None
    """Learning rate of the SD3 transformer's parameters (None: `--tta.lr`)."""
    lr_embeddings: float | None = None
    """Learning rate of the learnable pooled embedding (`learnable_embedding`; None: `--tta.lr`)."""
    window_weighting: Literal["uniform", "entropy"] = "uniform"
    """How the windows' losses make the image's loss: `uniform` (their mean; the reference's ADE20K-C setting)
    or `entropy` (weights softmax over windows of H / window_tau, H the window's mean pixel entropy of the
    raw logits' softmax divided by ln C, computed without gradient)."""
    window_tau: float = 1.0
    """Temperature of the entropy window weights."""
    learnable_embedding: bool = False
    """Add one learnable vector (zeros at the start of every task) to every candidate's pooled text embedding,
    adapted with the generator at `lr_embeddings` (the reference's option; it does not reset it between tasks)."""
    update_segmenter: bool = True
    """Adapt the segmenter."""
    update_generator: bool = True
    """Adapt the SD3 transformer."""
    norm_only: bool = False
    """Adapt only normalization layers (LayerNorm/BatchNorm/GroupNorm affine parameters; tent always does)."""
    candidates: Literal["topk", "area_k"] = "topk"
    """Candidate rule: `topk` (the union of every latent pixel's top-k classes, within the class budget; the
    reference's ADE20K-C setting) or `area_k` (classes whose summed top-`area_k` probabilities exceed
    `area_threshold`; no budget, no pixel mask)."""
    topk: int = 1
    """Candidate classes: the union of every latent pixel's top-k classes."""
    area_k: int = 5
    """area_k rule: per latent pixel, the probabilities (softmax of the raw logits over all classes) kept."""
    area_threshold: float = 15.0
    """area_k rule: a class is a candidate when its kept probabilities summed over the window exceed this."""
    max_classes: int = 20
    """At most this many candidate classes per window (transformer batch size): every top-1 class is kept
    and the rest of the budget is drawn uniformly from the other candidates."""
    min_classes: int = 0
    """At least this many candidate classes per window, the others sampled with probability softmax of
    the LogitNormed logits summed over the window (0, the reference's setting: no fill; a window whose
    pixels all vote one class then has one candidate, p = 1, and gives the segmenter no gradient)."""
    ignore_classes: list[int] = field(default_factory=list)
    """Class ids (0-based) that are never candidates: their logits are set to -inf at latent resolution
    before candidate selection (a pixel's top-1 falls to its next class); the scored prediction keeps them."""
    temperature: float = 1.0
    """LogitNorm temperature: p = softmax((l / ||l||) / temperature) over the candidates."""
    candidate_weights: Literal["softmax", "uniform"] = "softmax"
    """How the candidates' velocities are weighted: `softmax` (p above: DUSA) or `uniform` (p = 1 / N, an
    ablation: the segmenter only picks the candidates and gets no gradient, so only the generator adapts)."""
    timestep_range: tuple[float, float] = (0.25, 0.25)
    """Flow-matching time t is drawn uniformly from this range (equal bounds: fixed t)."""


class Dusa(Method):
    """DUSA through the DeepSpeed pipeline (pipeline/dusa/engine.py): stage 0 scores, the others follow."""

    name, pipeline, generator = "dusa", True, True
    options = DusaOptions

    def __init__(self, engine: Any, cfg: RunConfig, class_names: Sequence[str]):  # engine: pipeline/dusa/engine.py TTAEngine
        self.engine, self.cfg, self.class_names = engine, cfg, list(class_names)
        self.scoring = engine.module.front is not None

    @classmethod
    def check(cls, cfg: RunConfig, processes: int) -> None:
        if not (cfg.dusa.update_segmenter or cfg.dusa.update_generator):
            raise ValueError("dusa.update_segmenter and dusa.update_generator are both false: nothing adapts "
                             "(use --tta.method source for the unadapted model)")
        if cfg.dusa.candidate_weights == "uniform" and not cfg.dusa.update_generator:
            raise ValueError("dusa.candidate_weights uniform gives the segmenter no gradient: it needs "
                             "dusa.update_generator true (else nothing adapts)")
        if cfg.dusa.learnable_embedding and not cfg.dusa.update_generator:
            raise ValueError("dusa.learnable_embedding adapts with the generator: it needs dusa.update_generator true")

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        from pipeline.dusa.engine import TTAEngine, precision_of  # DeepSpeed: imported when this method runs
        from pipeline.dusa.module import build_pipeline
        precision = precision_of(ds_config)
        module = build_pipeline(cfg.model, cfg.data, cfg.dusa, cfg.pipeline, class_names, stage_report=report,
                                dtype=torch.bfloat16 if precision == "bf16" else torch.float32, precision=precision,
                                replicas=replicas.count, ds_config=ds_config,
                                # the planner's predictions and memory estimate are about GPUs
                                details=torch.cuda.is_available() or cfg.logging.verbose)
        timing.mark("weights loaded")
        engine = TTAEngine(module, ds_config, cfg.tta, cfg.dusa, adaptive_windows=cfg.data.windows == "adaptive")
        timing.mark("engine ready")
        timing.instrument(engine)
        stage = engine.engine.stage_id
        counts: list = [(stage, parameter_counts(module, f"stage {stage}"))] * replicas.stages
        if replicas.stages > 1:  # this replica's stages (the other replicas hold the same)
            dist.all_gather_object(counts, counts[0], group=replicas.group)
        method = cls(engine, cfg, class_names)
        method.prediction = getattr(module, "prediction", None)
        return Built(method, module.front.segmenter if stage == 0 else None,
                     [c for _, c in sorted(counts)], f"{replicas.describe()}: dusa")

    def step(self, task: str, item: dict) -> StepResult:
        from pipeline.run.images import image_seed
        front, data = self.engine.module.front, self.cfg.data
        generator = torch.Generator().manual_seed(image_seed(self.cfg.seed, task, item["name"]))
        latent = (front.encoder.vae.config.latent_channels,) + (data.window_size // front.encoder.downsample,) * 2
        draw = functools.partial(draw_windows, latent_shape=latent, timestep_range=self.cfg.dusa.timestep_range,
                                 generator=generator)
        # Adaptive windows are placed by the step's own forward: the front draws for them.
        out = self.engine.step(item["image"], draw if data.windows == "adaptive" else draw(item["corners"]))
        notes = [f"window {w + 1} ({side} px at {top}, {left}) candidates: "
                 + ", ".join(self.class_names[c] for c in classes.tolist())
                 for w, ((top, left, side), classes) in enumerate(zip(out.windows, out.candidates))]
        return StepResult(out.logits, out.loss.detach(), self.engine.skipped, notes, len(out.windows),
                          list(out.candidates))

    def follow(self, task: str, dataset: ADE20KC, index: int) -> bool:
        data = self.cfg.data  # the window count from the image's header (adaptive: stage 0 sends it)
        n = None if data.windows == "adaptive" else window_count(*dataset.image_size(index), data.window_size,
                                                                 data.window_stride, data.short_edge)
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
