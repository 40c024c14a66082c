"""Typed run configuration. `launch/tta.py` turns these dataclasses into a jsonargparse CLI:
every field is a `--group.field` option and the field docstrings are its help text. The method names and
each method's own option section come from the registry (pipeline/methods/)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Literal

from data.classes import CORRUPTIONS, safe_name  # noqa: F401 (safe_name: the check's home for pipeline/)
from pipeline.methods import METHODS

MethodName = Literal[tuple(METHODS)]  # the registry's names: the CLI's choices


@dataclass
class ModelConfig:
    """Checkpoints: hub ids or local folders."""

    segmenter: str | None = None
    """SegFormer checkpoint: a hub id or a local folder (transformers layout); None: the dataset's
    (`nvidia/segformer-b5-finetuned-ade-640-640`, `nvidia/segformer-b5-finetuned-cityscapes-1024-1024`)."""
    generator: str = "stabilityai/stable-diffusion-3-medium-diffusers"
    """SD3 checkpoint: a hub id or a local folder in the diffusers layout (`vae/`, `transformer/`)."""
    class_embeddings: str | None = None
    """Class-embedding cache (safetensors) made from the generator's text encoders; None: the dataset's
    (`class_embeddings/sd3-medium-ade20k.safetensors`, `class_embeddings/sd3-medium-cityscapes.safetensors`)."""
    build_demo_models: bool = False
    """Build the tiny demo checkpoints at these paths first when they are missing (demo only)."""


@dataclass
class DataConfig:
    """The dataset, its task sequence, and how images are cut into windows. Options left None take the
    dataset's default (data/datasets.py; docs/datasets.md names where each comes from)."""

    dataset: Literal["ade20k", "cityscapes", "acdc"] = "ade20k"
    """`ade20k` (ADE20K-C), `cityscapes` (Cityscapes-C, or its clean val set as the task `clean`) or `acdc`
    (ACDC val, its conditions as tasks): the reader of `root`, and the defaults of the options left None."""
    root: str | None = None
    """Dataset root in its official layout (docs/datasets.md); None: `data/ade20k_c`, `data/cityscapes` or
    `data/acdc`."""
    classes: str | None = None
    """The class list: `ade20k` (its 150 classes), `cityscapes` (its 19 train ids; also ACDC's) or a text file
    with one class name per line, annotation value i + 1 being line i (0 ignored); the segmenter, the
    class-embedding cache and the metric use it. None: the dataset's."""
    corruptions: list[str] | None = None
    """The tasks, in this order: corruptions (ADE20K-C, Cityscapes-C) or conditions (ACDC). None: the
    dataset's (the 15 corruptions; ACDC: fog, night, rain, snow)."""
    severity: int = 5
    """Corruption severity (1-5; ACDC has none)."""
    gradual: bool = False
    """The gradual protocol: each corruption at severities 1, 2, 3, 4, 5, 4, 3, 2, 1 (tasks `<corruption>_<s>`,
    the way down `<corruption>_<s>_down`) instead of `severity`; needs --tta.continual true (no resets)."""
    rounds: int = 1
    """Run the task sequence this many times (tasks `r<round>.<task>` when more than one): with
    --tta.continual true, CoTTA's protocol (ACDC's four conditions x 10, no reset)."""
    limit: int | None = None
    """Use only the first N images of each task (None: all)."""
    shuffle: bool = True
    """Adapt each task's images in a shuffled order, as the reference does (it shuffles unseeded; here the
    order is seeded by `--seed` and the task, so a rerun repeats it); false: file order."""
    window_size: int = 512
    """Square windows of this size cover the resized image (see `short_edge`); each is a generator input."""
    short_edge: int | None = None
    """Images are resized so the short edge is this, and windows of `window_size` cover them in rows and
    columns (None: the dataset's: ADE20K-C `window_size`, one row of windows; Cityscapes-C 1024; ACDC 1080)."""
    window_stride: int | None = None
    """Stride between windows; the last window is aligned to the border (None: the dataset's: 256 the
    reference's ADE20K-C setting, 171 its Cityscapes-C and ACDC one)."""
    windows: Literal["grid", "adaptive"] = "grid"
    """Window placement: `grid` (the regular cover above; the reference's ADE20K-C setting) or `adaptive`
    (the reference's entropy-guided placement around the segmenter's most uncertain regions: see the
    `adaptive_*` options; fewer than `adaptive_min_windows` found falls back to the grid)."""
    adaptive_std: float = 0.5
    """adaptive: pixels whose entropy exceeds mean + this many standard deviations of the image's map are hot."""
    adaptive_dilation: int = 5
    """adaptive: rounds of 3 x 3 max-pool dilation of the hot map before its 4-connected components are taken."""
    adaptive_min_size: int = 128
    """adaptive: the smallest window side (a component's box side max(h, w) is clamped to [min, max])."""
    adaptive_max_size: int = 512
    """adaptive: the largest window side (at most the image's short edge)."""
    adaptive_min_distance: float = 64.0
    """adaptive: a window whose centre is closer than this (pixels) to an accepted window's is dropped."""
    adaptive_max_windows: int = 8
    """adaptive: at most this many windows per image, the most uncertain first."""
    adaptive_min_windows: int = 2
    """adaptive: with fewer windows than this, the image is covered by the grid instead."""
    num_workers: int = 2
    """Background workers that decode and resize the next images (0: in the main process)."""
    build_demo_data: bool = False
    """Write the synthetic demo dataset at `root` first when it is missing (demo only)."""
    max_windows: int | None = None
    """Refuse, before any model loads, an image that gets more windows than this (an extreme aspect ratio:
    every window is a micro-batch of the image's step, so time and memory grow with their number; None: the
    dataset's, 32 for ADE20K-C, 64 for Cityscapes-C and ACDC, whose images get 40 and 50)."""

    def __post_init__(self) -> None:
        from data.datasets import DATASETS
        info = DATASETS.get(self.dataset)
        if info is None:  # validate() says it, naming the choices
            return
        for name, default in (("root", info.root), ("classes", info.class_list), ("corruptions", list(info.tasks)),
                              ("window_stride", info.window_stride), ("max_windows", info.max_windows)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.short_edge is None and info.short_edge is not None:
            self.short_edge = info.short_edge

    @property
    def image_short_edge(self) -> int:
        """The short edge images are resized to."""
        return self.window_size if self.short_edge is None else self.short_edge


@dataclass
class TTAConfig:
    """The adaptation method and what every method reads; a method's own options are its section (`--dusa.*`,
    `--cotta.*`, ...: pipeline/methods/)."""

    method: MethodName = "dusa"
    """The adaptation method, one file each in pipeline/methods/ (the README's methods: `source`, the unadapted
    segmenter; `tent`, entropy minimisation of its norm layers; `dusa`, the diffusion loss through the pipeline;
    `bn_adapt`, `cotta`, `sar`: the baselines of docs/baselines.md)."""
    continual: bool = False
    """Keep adapting across tasks (no reset of models and optimizer between corruptions)."""
    lr: float = 1e-5
    """Learning rate of every adapted parameter (dusa: the DeepSpeed JSON's optimizer, AdamW by default, whose
    file must not set one; tent: Adam; cotta and sar have their own, `--cotta.lr` and `--sar.lr`)."""
    lr_segmenter: float | None = None
    """Learning rate of the segmenter's parameters (None: `lr`); dusa and tent."""
    accumulation_steps: int = 1
    """Update every this many images, from the sum of their losses divided by it (each image is still scored
    from its own forward, before the update it contributes to); a task's leftover images are discarded."""
    max_nonfinite: int = 5
    """Stop when this many steps in a row have a NaN/inf loss (each such step skips its update)."""

    @property
    def segmenter_lr(self) -> float:
        return self.lr if self.lr_segmenter is None else self.lr_segmenter


@dataclass
class PipelineConfig:
    """How the DUSA model is split into DeepSpeed pipeline stages."""

    num_stages: int = 2
    """Pipeline stages (S): the launcher starts a multiple of S processes, G / S independent replicas that each
    take whole tasks (1: every process holds the whole model)."""
    partition: list[int] | None = None
    """Explicit stage boundaries as layer indices over [front, embed, blocks..., head], e.g. [0, 14, 27]
    (None: the boundaries with the shortest predicted step, from measured per-layer costs)."""
    cost_table: str | None = None
    """Per-layer cost table (JSON, from `launch/calibrate.py`) for the partition (None: the table in
    pipeline/dusa/costs/ measured on this GPU model for these models, else relative default costs)."""
    activation_checkpoint_interval: int = 0
    """Recompute activations every N layers in backward (0: off; trades time for memory)."""
    compile_blocks: bool = True
    """On a GPU, the SD3 joint blocks run through torch.compile (inductor; the class count a dynamic dimension;
    eager's bf16 roundings kept), and the CUDA graphs of up to transformer_graphs classes record the compiled
    blocks: on an H200 the step is 10 % faster at 2 classes, 16 % at 5, 21-22 % at 10-20 (13-18 % less
    memory there). Not bit for bit the eager blocks (the reference's): at 10 classes the loss within 3e-6,
    gradients a median 0.6 % apart; at 2 classes, where any kernel change moves the first step more, within
    about 2.5 times the spread of eager attention kernels (docs/benchmarks.md). The first window of a new
    form compiles it (about 35 s, then 13 s; torch's compile cache, under /tmp, keeps them for later runs);
    where compiling fails (no Triton or C compiler), one warning and eager blocks. Not with activation
    checkpointing. false: eager blocks."""
    compile_vae: bool = True
    """On a GPU, the frozen VAE encoder runs through torch.compile (inductor, one window shape, eager's bf16
    roundings kept): 4.5 against 13.5 ms per window on an H200 (the step at 2 classes 0.201 against 0.222 s; at
    10 the same, its windows' forwards waiting on the host), its latent as far from float32 math as eager's
    (2.0 % relative; 1.6 % from eager's, bf16's rounding: bench/vae_encoder.py). The first window compiles it
    (about 25 s, then seconds from torch's cache under /tmp); where compiling fails, one warning and eager.
    false: eager, as the reference."""
    attention_backend: Literal["default", "cudnn", "flash", "efficient", "math"] = "default"
    """SDPA backend tried first by the joint blocks' attention, the others kept as fallbacks ("default": torch's
    own order, as the reference runs; with torch 2.11 and cuDNN 9.19 on an H200 that is cuDNN's attention,
    eager and compiled, whose gradients match float32 as closely as flash's, bench/attention_backends.py).
    `flash`: 1.5x slower than cuDNN in isolation on an H200, 8 % slower in the step at 10 classes with eager
    blocks, within the step's spread with compiled ones. With compile_blocks a chosen order is traced into the
    compiled blocks (torch's compile caches do not see SDPA's settings around a call; docs/benchmarks.md)."""
    segmenter_graphs: int = 16
    """On a GPU, SegFormer's forward and backward are replayed as CUDA graphs, one per image shape, keeping
    at most this many (the most frequently seen shapes; 0: eager). Images of equal size share one."""
    transformer_graphs: int = 8
    """On a GPU, windows of up to this many candidate classes run the last stage's SD3 joint blocks as CUDA
    graphs, one set per class count (0: none). The same kernels as unreplayed (compiled with compile_blocks),
    two launches per block instead of hundreds: at few classes the step is bound by kernel launches (an H200,
    eager blocks: 0.238 against 0.368 s per image at 2 classes); at many, by the kernels, where the graphs'
    extra copies and memory cost a little (0.524 against 0.508 s at 10). Not with activation checkpointing;
    earlier stages of a pipeline run without (they hold two windows at once)."""


@dataclass
class WandbConfig:
    """Weights & Biases."""

    enabled: bool = True
    """Log to Weights & Biases (offline automatically when no credentials are configured)."""
    project: str | None = None
    """W&B project (default: $WANDB_PROJECT, else `dusa-seg-tta`)."""
    entity: str | None = None
    """W&B entity (default: $WANDB_ENTITY)."""
    name: str | None = None
    """Run name (default: $WANDB_NAME, else W&B's own)."""
    tags: list[str] = field(default_factory=list)
    """Run tags (added to $WANDB_TAGS)."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """Force a W&B mode (default: $WANDB_MODE, else online with credentials and offline without)."""


@dataclass
class LoggingConfig:
    """Logging, pictures and progress."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: int = 10
    """Log the running mIoU every N images (the loss is logged every image)."""
    image_every: int = 100
    """Every N images of a task (its 1st, N+1th, ...), save a picture (input | prediction | ground truth)
    under `<output_dir>/pictures/<task>/` and log it to W&B (0: never)."""
    progress: bool = True
    """Show a progress bar per task."""
    timing: bool = False
    """Write where the time goes to `<output_dir>/timing-rank<r>.json` (per process): start-up milestones and, per
    image, the host and device seconds of each phase (data wait, segmenter, window forwards and backwards,
    optimizer, scoring, logging, the host's waits for the device); `bench/record.py` reports them."""
    verbose: bool = False
    """Also show what DeepSpeed, transformers, diffusers, W&B and torch print on their own (banners, topology,
    per-step lines, weight-loading bars, W&B's summary); off, a run prints one line per event, on rank 0."""


@dataclass
class RunConfig:
    """One run: every group, the DeepSpeed JSON, the output folder and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: str | dict = "ds_configs/ds_tta.json"
    """DeepSpeed engine JSON: a path (relative to the working directory) or an inline dict (default: float32
    weights under bf16 autocast, the reference's precision; `ds_configs/ds_tta_bf16.json`: bf16 weights)."""
    output_dir: str = "runs/tta"
    """Where results.json, the effective config and W&B's offline files go."""
    seed: int = 0
    """Seeds the noise, timesteps and candidate sampling of every image (per image, order-free)."""

    def __post_init__(self) -> None:
        from data.datasets import DATASETS
        info = DATASETS.get(self.data.dataset)
        if info is not None:  # the model options left None: the dataset's checkpoint and cache
            if self.model.segmenter is None:
                self.model.segmenter = info.segmenter
            if self.model.class_embeddings is None:
                self.model.class_embeddings = info.class_embeddings


def method_sections() -> dict[str, type]:
    """The methods' own option sections (`--<method>.<field>`), from the registry: name -> dataclass."""
    return {name: cls.options for name, cls in METHODS.items() if cls.options is not None}


if method_sections():  # RunConfig gains one field per section, named after its method
    RunConfig = make_dataclass(  # noqa: F811
        "RunConfig", [(name, options, field(default_factory=options)) for name, options in method_sections().items()],
        bases=(RunConfig,), namespace={"__doc__": RunConfig.__doc__, "__module__": __name__})


# DUSA's own options lived in `tta` until they got their section `dusa` (issue #22): an old command line or config
# file is told the new name (launch/tta.py), and resume reads run folders written before as what they ran
# (pipeline/run/resume.py). Old dotted name -> new.
MOVED_OPTIONS = {f"tta.{name}": f"dusa.{name}" for name in (
    "lr_generator", "lr_embeddings", "window_weighting", "window_tau", "learnable_embedding", "update_segmenter",
    "update_generator", "norm_only", "candidates", "topk", "area_k", "area_threshold", "max_classes", "min_classes",
    "ignore_classes", "temperature", "candidate_weights", "timestep_range")}


# W&B project and entity names become parts of URLs and of W&B's own paths; W&B refuses these characters.
WANDB_RESERVED = set('/\\#?%:')


def _printable(text, longest: int, reserved: set[str] = frozenset()) -> bool:
    return isinstance(text, str) and 0 < len(text) <= longest and text.isprintable() and not reserved & set(text)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(cfg: RunConfig, num_classes: int) -> None:
    """Every numeric option inside its domain: ValueError, one line naming the option and its domain.

    What depends on files (the window size against the models' latent patch, window counts against
    image sizes, the DeepSpeed JSON) is checked by pipeline/run/checks.py.
    """
    problems: list[str] = []

    def need(ok: bool, name: str, value, domain: str) -> None:
        if not ok:
            problems.append(f"--{name} {value!r} is outside its domain: {domain}")

    def count(name: str, value, low: int, high: int | None = None) -> None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        need(ok, name, value, f"an integer {'>= ' + str(low) if high is None else f'in {low}..{high}'}")

    def positive(name: str, value, zero: bool = False) -> None:
        need(_finite(value) and (value >= 0 if zero else value > 0), name, value,
             f"a finite number {'>= 0' if zero else '> 0'}")

    data, tta, dusa, pipe, log = cfg.data, cfg.tta, cfg.dusa, cfg.pipeline, cfg.logging
    count("data.severity", data.severity, 1, 5)
    if data.limit is not None:
        count("data.limit", data.limit, 1)
    need(bool(data.corruptions), "data.corruptions", data.corruptions, "at least one corruption")
    need(len(set(data.corruptions)) == len(data.corruptions), "data.corruptions", data.corruptions,
         "each corruption once")
    unsafe = [c for c in data.corruptions if not safe_name(c)]
    need(not unsafe, "data.corruptions", unsafe[:1], "task names of letters, digits and _ - . + (they name folders: "
         "no separator, no `..`, not starting with a dot)")
    count("data.window_size", data.window_size, 1)
    if data.short_edge is not None:  # windows must fit inside the resized image
        count("data.short_edge", data.short_edge, data.window_size if _finite(data.window_size) else 1)
    count("data.rounds", data.rounds, 1)
    from data.datasets import DATASETS
    info = DATASETS.get(data.dataset)
    need(info is not None, "data.dataset", data.dataset, ", ".join(DATASETS))
    if data.gradual:
        if not tta.continual:
            problems.append("--data.gradual true needs --tta.continual true: the gradual protocol adapts through "
                            "the severities without resets")
        if info is not None and not info.severities:
            problems.append(f"--data.gradual true needs corruption severities; {info.title} has none "
                            f"(--data.dataset ade20k or cityscapes)")
    count("data.window_stride", data.window_stride, 1, data.window_size if _finite(data.window_size) else None)
    count("data.num_workers", data.num_workers, 0)
    count("data.max_windows", data.max_windows, 1)
    if getattr(data, "windows", "grid") == "adaptive":
        positive("data.adaptive_std", data.adaptive_std, zero=True)
        count("data.adaptive_dilation", data.adaptive_dilation, 0)
        count("data.adaptive_min_size", data.adaptive_min_size, 1)
        count("data.adaptive_max_size", data.adaptive_max_size, max(data.adaptive_min_size, 1)
              if isinstance(data.adaptive_min_size, int) else 1)
        positive("data.adaptive_min_distance", data.adaptive_min_distance, zero=True)
        count("data.adaptive_max_windows", data.adaptive_max_windows, 1, data.max_windows)
        count("data.adaptive_min_windows", data.adaptive_min_windows, 1, data.adaptive_max_windows)

    for section, name in (("tta", "lr"), ("tta", "lr_segmenter"), ("dusa", "lr_generator"), ("dusa", "lr_embeddings")):
        value = getattr(getattr(cfg, section), name, None)
        if value is not None:
            positive(f"{section}.{name}", value, zero=True)  # 0: nothing moves, a valid check against source
    count("tta.accumulation_steps", getattr(tta, "accumulation_steps", 1), 1)
    positive("dusa.window_tau", getattr(dusa, "window_tau", 1.0))
    count("dusa.topk", dusa.topk, 1, num_classes)
    count("dusa.area_k", dusa.area_k, 1, num_classes)
    positive("dusa.area_threshold", dusa.area_threshold, zero=True)
    count("dusa.max_classes", dusa.max_classes, 1)  # more than the classes: all of them
    count("dusa.min_classes", dusa.min_classes, 0, dusa.max_classes if isinstance(dusa.max_classes, int) else None)
    positive("dusa.temperature", dusa.temperature)
    t = tuple(dusa.timestep_range)
    need(len(t) == 2 and all(_finite(v) for v in t) and 0 <= t[0] <= t[1] <= 1, "dusa.timestep_range", list(t),
         "two flow times 0 <= low <= high <= 1")
    count("tta.max_nonfinite", tta.max_nonfinite, 1)
    bad = [c for c in dusa.ignore_classes if not (isinstance(c, int) and 0 <= c < num_classes)]
    need(not bad, "dusa.ignore_classes", dusa.ignore_classes, f"class ids in 0..{num_classes - 1}")
    need(len(set(dusa.ignore_classes)) < num_classes, "dusa.ignore_classes", dusa.ignore_classes,
         "at least one class left to choose from")

    count("pipeline.num_stages", pipe.num_stages, 1)
    count("pipeline.activation_checkpoint_interval", pipe.activation_checkpoint_interval, 0)
    count("pipeline.segmenter_graphs", pipe.segmenter_graphs, 0)
    count("pipeline.transformer_graphs", pipe.transformer_graphs, 0)
    count("logging.log_every", log.log_every, 1)
    count("logging.image_every", log.image_every, 0)
    count("seed", cfg.seed, 0, 2**63 - 1)
    wandb = log.wandb
    for name in ("project", "entity"):
        value = getattr(wandb, name)
        if value is not None:
            need(_printable(value, 128, WANDB_RESERVED), f"logging.wandb.{name}", value,
                 f"printable text of at most 128 characters, none of {''.join(sorted(WANDB_RESERVED))}")
    if wandb.name is not None:
        need(_printable(wandb.name, 128), "logging.wandb.name", wandb.name, "printable text (at most 128 characters)")
    bad_tags = [t for t in wandb.tags if not _printable(t, 64)]
    need(not bad_tags, "logging.wandb.tags", bad_tags[:1], "printable texts (at most 64 characters each)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def cap_class_budget(cfg: RunConfig, num_classes: int) -> list[str]:
    """A class budget above the class count means every class: `dusa.max_classes` (and `min_classes`) are capped
    at it, so that memory estimates and plans count the transformer batch that can really occur. Returns one
    warning line per capped option."""
    notes = []
    for name in ("max_classes", "min_classes"):
        value = getattr(cfg.dusa, name)
        if value > num_classes:
            notes.append(f"warning: --dusa.{name} {value} is more than the {num_classes} classes of data.classes: "
                         f"capped at {num_classes}")
            setattr(cfg.dusa, name, num_classes)
    return notes
