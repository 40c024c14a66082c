"""The DeepSpeed engine around the DUSA pipeline: config, trainable parameters, one step, reset."""
from __future__ import annotations

import copy
import ctypes
import functools
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from pipeline.dusa import deepspeed_seam as seam
from pipeline.run import timing
from pipeline.methods.dusa import DusaOptions
from pipeline.run.config import TTAConfig
from pipeline.dusa.layers import JointBlock, SD3Embed, SD3Head, SegmenterFront
from pipeline.dusa.low_precision import WorkingWeights, cast_frozen_layers
from pipeline.run.reporting import warn_overridden_ds_keys
from pipeline.dusa.windows import WindowDraw, WindowSampler

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}}
# The optimizer types of the DeepSpeed JSON, always torch's own: "Adam" is Adam (weight decay as an L2 term,
# as the reference's torch.optim.Adam), not DeepSpeed's reading of it (AdamW unless adam_w_mode is false).
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SGD_MOMENTUM = 0.9  # the reference's SGD


def optimizer_factory(spec: dict[str, Any]) -> Callable[[Any], torch.optim.Optimizer]:
    """The DeepSpeed JSON's `optimizer` section ({"type": AdamW | Adam | SGD, "params": {...}}, lr
    included) as a function of the parameter groups, for `deepspeed.initialize` (it builds the optimizer
    after placing the model on its device). Unknown types and parameters are refused here."""
    kind = str(spec.get("type", "AdamW"))
    if kind.lower() not in OPTIMIZERS:
        raise ValueError(f"DeepSpeed config optimizer.type {kind!r} is not supported: use AdamW, Adam or SGD")
    cls = OPTIMIZERS[kind.lower()]
    params = dict(spec.get("params", {}))
    params.pop("torch_adam", None)  # DeepSpeed's switch for torch's implementation: always torch's here
    if "adam_w_mode" in params:
        raise ValueError("DeepSpeed config optimizer.params.adam_w_mode: choose optimizer.type AdamW or Adam instead")
    if cls is torch.optim.SGD:
        params.setdefault("momentum", SGD_MOMENTUM)
    try:
        inspect.signature(cls).bind(None, **params)
    except TypeError as exc:
        raise ValueError(f"DeepSpeed config optimizer.params for {kind}: {exc}") from None
    return functools.partial(cls, **params)


def load_ds_config(ds: str | dict[str, Any], lr: float) -> dict[str, Any]:
    """The user's DeepSpeed JSON (a path or a dict) with what this program sets per image.

    The micro-batch is one window and the number of windows changes per image, so the batch sizes
    are set per step; the learning rate is `tta.lr`, one place for it.
    """
    if isinstance(ds, (str, Path)):
        path = Path(ds)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {path} does not exist (see ds_configs/)")
        ds = json.loads(path.read_text())
    config = copy.deepcopy(dict(ds))
    if config.get("fp16", {}).get("enabled", False):
        raise ValueError("fp16 is not supported (SD3 overflows in fp16): use bf16 or float32 in the DeepSpeed config")
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        config.pop(key, None)  # set per image: one micro-batch per window
    if config.get("bf16", {}).get("enabled", False):
        # DeepSpeed casts parameters only; buffers (BatchNorm statistics, the class embeddings)
        # must follow them, or kernels meet bf16 weights with fp32 statistics.
        config.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    optimizer = config.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    params = optimizer.setdefault("params", {})
    if "lr" in params:
        raise ValueError("the DeepSpeed config sets optimizer.params.lr: remove it and set tta.lr instead")
    params["lr"] = lr
    optimizer_factory(optimizer)  # a bad type or parameter fails now, before any model loads
    if str(optimizer.get("type", "")).lower() == "sgd" and config.get("zero_optimization", {}).get("stage", 0):
        # DeepSpeed's ZeRO wrappers list SGD as untested; with one data-parallel rank they only hold its
        # float32 masters, which the tests here check.
        config["zero_allow_untested_optimizer"] = True
    warn_overridden_ds_keys(ds, config)  # the user's values replaced here, named in one line
    return config


def precision_of(ds_config: dict[str, Any]) -> str:
    """The precision preset of a DeepSpeed JSON: bf16 (bf16 weights, float32 masters), autocast (float32
    weights, bf16 autocast) or fp32."""
    if ds_config.get("bf16", {}).get("enabled", False):
        return "bf16"
    return "autocast" if ds_config.get("torch_autocast", {}).get("enabled", False) else "fp32"


def is_norm_module(module: nn.Module) -> bool:
    # LayerNorm, BatchNorm, GroupNorm, RMSNorm and SD3's adaptive AdaLayerNorm* (with their modulation).
    return "Norm" in type(module).__name__


def select_trainable(module: nn.Module, dusa: DusaOptions) -> list[nn.Parameter]:
    """Freezes everything, then unfreezes the adapted parameters of the layers on this rank."""
    module.requires_grad_(False)
    parts: list[nn.Module] = []
    for layer in module.modules():
        if isinstance(layer, SegmenterFront) and dusa.update_segmenter:
            parts.append(layer.segmenter)  # never the VAE
        elif isinstance(layer, (SD3Embed, JointBlock, SD3Head)) and dusa.update_generator:
            parts.append(layer)  # SD3Embed's class-embedding table is a buffer: fixed
    for part in parts:
        targets = [m for m in part.modules() if is_norm_module(m)] if dusa.norm_only else [part]
        for m in targets:
            m.requires_grad_(True)
    for layer in module.modules():  # adapted with the generator, norm_only or not
        if isinstance(layer, SD3Embed) and layer.pooled_offset is not None:
            layer.pooled_offset.requires_grad_(dusa.update_generator)
    return [p for p in module.parameters() if p.requires_grad]


def parameter_groups(module: nn.Module, tta: TTAConfig, dusa: DusaOptions) -> list[dict[str, Any]]:
    """The adapted parameters on this rank (`select_trainable`) as optimizer groups: the segmenter's
    with `tta.lr_segmenter`, the generator's with `dusa.lr_generator`, the learnable pooled embedding with
    `dusa.lr_embeddings`, where set (else the optimizer's learning rate, `tta.lr` through
    `load_ds_config`); groups without parameters here are left out."""
    select_trainable(module, dusa)
    segmenter = {id(p) for layer in module.modules() if isinstance(layer, SegmenterFront)
                 for p in layer.segmenter.parameters()}
    embedding = {id(layer.pooled_offset) for layer in module.modules()
                 if isinstance(layer, SD3Embed) and layer.pooled_offset is not None}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = []
    for params, lr in (([p for p in trainable if id(p) in segmenter], tta.lr_segmenter),
                       ([p for p in trainable if id(p) not in segmenter | embedding], dusa.lr_generator),
                       ([p for p in trainable if id(p) in embedding], dusa.lr_embeddings)):
        if params:
            groups.append({"params": params} if lr is None else {"params": params, "lr": lr})
    return groups


# Page-locked memory as torch's caching host allocator makes it with these settings: the pages mapped by 8
# threads, then registered with the driver (cudaHostRegister), not one cudaHostAlloc. SD3-medium's 8 GB
# snapshot: 3.5 s through cudaHostAlloc, 0.9-1.1 s this way on an H200.
PINNED_SETTINGS = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def fast_pinned_allocation() -> bool:
    """Adds PINNED_SETTINGS to the allocator's settings, unless the user's PYTORCH_ALLOC_CONF (or
    PYTORCH_CUDA_ALLOC_CONF) already chooses how pinned memory is made. The user's other settings are kept
    (setting the string again resets the keys it leaves out). Whether it changed them."""
    user = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # (torch builds without it: unchanged)
    if setter is None or "pinned_" in user:
        return False
    try:
        setter(",".join(filter(None, (user, PINNED_SETTINGS))))
    except RuntimeError:  # a torch that does not know these keys: its default allocation, only slower
        return False
    return True


MADV_DONTFORK = 10  # <sys/mman.h> on Linux


def keep_out_of_forks(tensor: torch.Tensor) -> bool:
    """Marks the whole pages of a host tensor's memory as not inherited by forked processes (Linux
    `madvise(MADV_DONTFORK)`); whether it did. Pages registered with the driver (cudaHostRegister) are pinned
    for DMA, and Linux copies pinned pages into every child at fork instead of sharing them: the DataLoader's
    workers, forked anew for every task, each copied SD3-medium's 8 GiB snapshot (3.2-3.7 s per fork, 13-17 s
    per task with 4 workers on an H200 node; bench/fork_cost.py). The children never read it."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.numel():
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTFORK) == 0


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor that the host does not wait for: page-locked memory filled by an
    asynchronous copy on the current stream (SD3-medium's 8 GB of float32 weights: 6.4 s through pageable
    memory on an H200), kept out of forked processes (`keep_out_of_forks`). Whatever reads it back is ordered
    after the copy on the same stream."""
    if tensor.device.type != "cuda":
        return tensor.to("cpu", copy=True)
    fast_pinned_allocation()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    keep_out_of_forks(host)
    host.copy_(tensor, non_blocking=True)
    return host


class HostSnapshot:
    """The values of many tensors kept on the host in one page-locked buffer per dtype (one allocation and
    one copy each way: SegFormer-B5's and the generator's norm parameters are about 1,200 tensors, 3.4 s
    one by one on an H200)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.groups = []
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # first-seen order
            group = [t for t in tensors if t.dtype == dtype]
            self.groups.append((group, host_copy(torch.cat([t.detach().reshape(-1) for t in group]))))

    @torch.no_grad()
    def restore(self) -> None:
        for group, host in self.groups:
            flat = host.to(group[0].device, non_blocking=True)
            torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)])


class StepOutput(NamedTuple):
    """One TTA step: the image's loss (a device tensor, not read back) and, on the stage with the
    segmenter, the scored whole-image logits, each window's candidate classes and its box
    (top, left, side) in the resized image."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    candidates: list[torch.Tensor] | None
    windows: list[tuple[int, int, int]] | None = None


class TTAEngine:
    """One DeepSpeed PipelineEngine step per image, and the reset of models and optimizer."""

    def __init__(self, module: nn.Module, ds_config: dict[str, Any], tta: TTAConfig, dusa: DusaOptions,
                 optimizer: Callable[[Any], torch.optim.Optimizer] | None = None, adaptive_windows: bool = False,
                 working_weights: bool = True):
        """`optimizer`: a function of the parameter groups (tests), else the DeepSpeed JSON's optimizer;
        `adaptive_windows`: stage 0 decides each image's window count and tells the other stages;
        `working_weights`: under autocast, the generator's Linear/Conv weights are cast once per step, not
        per window (pipeline/dusa/low_precision.py; False: autocast's own casts, for comparisons)."""
        params = parameter_groups(module, tta, dusa)
        if optimizer is None:
            optimizer = optimizer_factory(ds_config.get("optimizer", DEFAULT_OPTIMIZER))
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
        seam.linear_duplicate_check()  # DeepSpeed's own is quadratic in the parameters (2.7 s for SD3-medium)
        # Some stage may hold nothing to adapt (e.g. only the segmenter adapts): keep DeepSpeed's
        # optimizer code paths uniform with one frozen dummy; it never receives a gradient.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=params or [nn.Parameter(torch.zeros(1))], config=ds_config,
            optimizer=optimizer)
        timing.mark("deepspeed initialized")
        if tta.accumulation_steps > 1 and seam.uses_zero_reduction(self.engine):
            raise ValueError("tta.accumulation_steps > 1 needs ZeRO stage 0 or bf16 with ZeRO stage 1 (DeepSpeed's "
                             "float32 ZeRO optimizer reduces its gradients away at every image)")
        self.module = module
        self.accumulation_steps = tta.accumulation_steps
        self.entropy_weights, self.window_tau = dusa.window_weighting == "entropy", dusa.window_tau
        self.adaptive_windows = adaptive_windows
        self._accumulated = 0  # images whose gradients wait for the next update
        self.skipped = False  # whether the last step's update was skipped (non-finite loss)
        self._label = torch.zeros(1, device=self.engine.device)  # the last stage reads one per micro-batch
        self.working = self._working_weights(module, tta) if working_weights else None
        self._extend_schedule()
        seam.zero_grad_by_list(self.engine, module.parameters())
        # Initial state of everything that adapts, after DeepSpeed's dtype cast, kept on the host.
        # The working weights' float32 buffer in one host copy; the other adapted parameters one by one.
        held = {id(p) for p in self.working.params} if self.working is not None else set()
        self._initial_flat = host_copy(self.working.master) if self.working is not None else None
        self._initial = HostSnapshot([p for p in module.parameters() if p.requires_grad and id(p) not in held])
        timing.mark("initial weights kept")

    def _working_weights(self, module: nn.Module, tta: TTAConfig) -> WorkingWeights | None:
        """Under autocast with float32 weights: frozen Linear/Conv weights (the VAE; a frozen generator)
        stored in bf16, and bf16 working copies of the adapted generator's, made once per step. Not with
        activation checkpointing (its recomputed forwards run outside the step's windows)."""
        eng = self.engine
        if not eng.torch_autocast_enabled() or seam.uses_bf16_optimizer(eng) \
                or eng.torch_autocast_dtype() != torch.bfloat16 or module.activation_checkpoint_interval:
            return None
        layers = [layer for layer in module.forward_funcs if isinstance(layer, nn.Module)]
        front = module.front
        cast_frozen_layers([front.encoder] if front is not None else [])
        generator = [layer for layer in layers if not isinstance(layer, SegmenterFront)]
        cast_frozen_layers(generator)
        if not any(p.requires_grad for layer in generator for p in layer.parameters()):
            return None
        try:
            return WorkingWeights(generator)
        except ValueError:  # nothing of this stage's generator computes in bf16 (e.g. norm layers only)
            return None

    def _extend_schedule(self) -> None:
        """Five changes to DeepSpeed's pipeline schedule, for this engine only (the engine runs each
        instruction through its instance's table, so the table is extended, not the class):

        - the backward pass of a stage that is not the last runs one autograd pass for all its outputs;
        - with working weights (`_working_weights`), each forward computes with the bf16 copies and each
          backward's gradients are folded into the float32 ones;
        - the gradient reduction is skipped when this process is its data-parallel group alone (always:
          replicas never share gradients, pipeline/run/replicas.py), except for DeepSpeed's float32 ZeRO
          optimizer, whose reduction also fills its own gradient buffers;
        - before the tied-gradient reduction, which follows the backward of the last window: the
          segmenter's one backward of the step (`SegmenterFront.backward_segmenter`);
        - at the optimizer step: every stage skips the update of a step whose loss is NaN or infinite.
          The last stage knows the loss; one all-reduce over the pipeline tells every stage, which then
          drops its gradients instead of stepping. With `tta.accumulation_steps` k, the update happens at
          every k-th image and the others keep their gradients.
        """
        engine = self.engine
        working = self.working
        run_backward = functools.partial(seam.backward_with_bf16_bookkeeping, engine)

        def forward_with_working_weights(forward_pass):
            def forward(eng, buffer_id):
                with working.active():
                    return forward_pass(eng, buffer_id)
            return forward

        def backward_then_fold(backward_pass):
            stage_backward = seam.one_backward_per_stage(backward_pass, run_backward)

            def backward(eng, buffer_id):
                stage_backward(eng, buffer_id)
                working.fold()
            return backward

        needed = seam.reduction_needed(engine)

        def reduce_if_shared(reduce_grads):
            def reduce(eng, *args, **kwargs):
                return reduce_grads(eng, *args, **kwargs) if needed else None
            return reduce

        def segmenter_backward_then_reduce(reduce_tied_grads):
            def reduce(eng, *args, **kwargs):
                front = self.module.front
                if front is not None:
                    run_backward(front.backward_segmenter)
                return reduce_tied_grads(eng, *args, **kwargs)
            return reduce

        def guarded_step(optimizer_step):
            def step(eng, *args, **kwargs):
                bad = seam.nonfinite_loss_on_any_stage(eng)
                with timing.phase("wait: NaN guard"):
                    self.skipped = bool(bad.item())
                if self.skipped:  # with accumulation, the images waiting for this update go with it
                    self.discard_accumulated()
                    return None
                self._accumulated += 1
                if self._accumulated < self.accumulation_steps:
                    return None  # the gradients stay for the next images
                self._accumulated = 0
                if working is None:
                    return optimizer_step(eng, *args, **kwargs)
                working.release_unused()
                try:
                    return optimizer_step(eng, *args, **kwargs)
                finally:
                    working.updated()
            return step

        hooks = {"BackwardPass": (lambda original: seam.one_backward_per_stage(original, run_backward))
                 if working is None else backward_then_fold,
                 "ReduceGrads": reduce_if_shared, "ReduceTiedGrads": segmenter_backward_then_reduce,
                 "OptimizerStep": guarded_step}
        if working is not None:
            hooks["ForwardPass"] = forward_with_working_weights
        seam.wrap_instructions(engine, hooks)

    def discard_accumulated(self) -> None:
        """Drops the gradients of images that wait for an update (a task's leftovers, a NaN image's group)."""
        self._accumulated = 0
        self._drop_gradients()

    def _drop_gradients(self) -> None:
        if self.working is not None:
            self.working.drop()
        seam.drop_gradients(self.engine)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, image: torch.Tensor | None, windows: Sequence[WindowDraw | None] | WindowSampler | None
             ) -> StepOutput:
        """One TTA step: one micro-batch per window, the windows' losses averaged (or entropy-weighted),
        and one update (every `accumulation_steps` images; skipped, with `self.skipped` set, when the
        loss is not finite).

        The stage with the segmenter needs the image [1, 3, H, W] and each window's `WindowDraw`, or with
        adaptive windows a function from the chosen windows to their draws; the other stages only the
        number of windows (`image` None, `windows` of any items), or None with adaptive windows (stage 0
        tells them).
        """
        front = self.module.front
        prepared = None
        if front is not None:
            autocast = self.engine.torch_autocast_enabled()
            with torch.autocast(self.device.type, self.engine.torch_autocast_dtype() if autocast else torch.bfloat16,
                                enabled=autocast, cache_enabled=False):  # the engine's precision (no cache: graphs)
                prepared = front.begin_image(image.to(self.device, non_blocking=True), windows,
                                             loss_scale=1 / self.accumulation_steps,
                                             window_tau=self.window_tau if self.entropy_weights else None)
            microbatches = [(inputs, self._label) for inputs in prepared.inputs]
        count = len(microbatches) if front is not None else None if windows is None else len(windows)
        if self.adaptive_windows and self.engine.is_pipe_parallel:
            count = self._window_count_from_stage0(count)
        if front is None:
            microbatches = [(None, self._label)] * count
        self.engine.set_train_batch_size(len(microbatches))
        if self.working is not None:
            self.working.refresh()
        loss = self.engine.train_batch(iter(microbatches))
        if self.accumulation_steps > 1:
            loss = loss * self.accumulation_steps  # the image's own loss (its gradients were divided)
        if prepared is None:
            return StepOutput(loss, None, None)
        return StepOutput(loss, prepared.logits, prepared.candidates, prepared.windows)

    def _window_count_from_stage0(self, count: int | None) -> int:
        grid = self.engine.grid
        value = torch.tensor([count if count is not None else -1], dtype=torch.long, device=self.device)
        dist.broadcast(value, src=grid.stage_to_global(0), group=grid.get_pipe_parallel_group())
        return int(value.item())

    @torch.no_grad()
    def reset(self) -> None:
        """Bit-exact initial parameters and fresh optimizer state (fp32 master copies included); gradients
        of images still waiting for an update are dropped."""
        self.discard_accumulated()
        self._initial.restore()
        if self._initial_flat is not None:
            self.working.master.copy_(self._initial_flat, non_blocking=True)
        seam.reset_optimizer_state(self.engine)
