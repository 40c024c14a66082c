"""The DeepSpeed engine around the DUSA pipeline: config, trainable parameters, one step, reset."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import (BACKWARD_GLOBAL_TIMER, BACKWARD_INNER_GLOBAL_TIMER,
                                           BACKWARD_INNER_MICRO_TIMER, BACKWARD_MICRO_TIMER)
from torch import nn

from pipeline.config import TTAConfig
from pipeline.layers import JointBlock, SD3Embed, SD3Head, SegmenterFront
from pipeline.windows import WindowDraw

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                                 "torch_adam": True}}


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
    return config


def is_norm_module(module: nn.Module) -> bool:
    # LayerNorm, BatchNorm, GroupNorm, RMSNorm and SD3's adaptive AdaLayerNorm* (with their modulation).
    return "Norm" in type(module).__name__


def select_trainable(module: nn.Module, tta: TTAConfig) -> list[nn.Parameter]:
    """Freezes everything, then unfreezes the adapted parameters of the layers on this rank."""
    module.requires_grad_(False)
    parts: list[nn.Module] = []
    for layer in module.modules():
        if isinstance(layer, SegmenterFront) and tta.update_segmenter:
            parts.append(layer.segmenter)  # never the VAE
        elif isinstance(layer, (SD3Embed, JointBlock, SD3Head)) and tta.update_generator:
            parts.append(layer)  # SD3Embed's class-embedding table is a buffer: fixed
    for part in parts:
        targets = [m for m in part.modules() if is_norm_module(m)] if tta.norm_only else [part]
        for m in targets:
            m.requires_grad_(True)
    return [p for p in module.parameters() if p.requires_grad]


def parameter_groups(module: nn.Module, tta: TTAConfig) -> list[dict[str, Any]]:
    """The adapted parameters on this rank (`select_trainable`) as optimizer groups: the segmenter's
    with `tta.lr_segmenter`, the generator's with `tta.lr_generator` where set (else the optimizer's
    learning rate, `tta.lr` through `load_ds_config`); groups without parameters here are left out."""
    select_trainable(module, tta)
    segmenter = {id(p) for layer in module.modules() if isinstance(layer, SegmenterFront)
                 for p in layer.segmenter.parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = []
    for params, lr in (([p for p in trainable if id(p) in segmenter], tta.lr_segmenter),
                       ([p for p in trainable if id(p) not in segmenter], tta.lr_generator)):
        if params:
            groups.append({"params": params} if lr is None else {"params": params, "lr": lr})
    return groups


class StepOutput(NamedTuple):
    """One TTA step: the loss (a device tensor, not read back) and, on the stage with the segmenter,
    the scored whole-image logits and each window's candidate classes."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    candidates: list[torch.Tensor] | None


class TTAEngine:
    """One DeepSpeed PipelineEngine step per image, and the reset of models and optimizer."""

    def __init__(self, module: nn.Module, ds_config: dict[str, Any], tta: TTAConfig,
                 optimizer: torch.optim.Optimizer | None = None):
        params = parameter_groups(module, tta)
        if optimizer is not None:  # a caller-made optimizer (tests) replaces the config's
            ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
        # Some stage may hold nothing to adapt (e.g. only the segmenter adapts): keep DeepSpeed's
        # optimizer code paths uniform with one frozen dummy; it never receives a gradient.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=params or [nn.Parameter(torch.zeros(1))], config=ds_config,
            optimizer=optimizer)
        self.module = module
        self.skipped = False  # whether the last step's update was skipped (non-finite loss)
        self._label = torch.zeros(1, device=self.engine.device)  # the last stage reads one per micro-batch
        self._extend_schedule()
        # Initial state of everything that adapts, after DeepSpeed's dtype cast, kept on the host.
        self._initial = {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}

    def _extend_schedule(self) -> None:
        """Three changes to DeepSpeed's pipeline schedule, for this engine only (the engine runs each
        instruction through its instance's table, so the table is extended, not the class):

        - the backward pass of a stage that is not the last runs one autograd pass for all its outputs;
        - before the tied-gradient reduction, which follows the backward of the last window: the
          segmenter's one backward of the step (`SegmenterFront.backward_segmenter`);
        - at the optimizer step: every stage skips the update of a step whose loss is NaN or infinite.
          The last stage knows the loss; one all-reduce over the pipeline tells every stage, which then
          drops its gradients instead of stepping.
        """
        engine = self.engine
        table = dict(engine._INSTRUCTION_MAP)
        backward_pass = table[schedule.BackwardPass]
        reduce_tied_grads = table[schedule.ReduceTiedGrads]
        optimizer_step = table[schedule.OptimizerStep]

        def one_backward_pass(eng, buffer_id):
            # DeepSpeed runs one backward per float output of a stage: every joint block before a stage
            # boundary would run its backward twice (image and text streams both depend on it). One
            # autograd pass over all outputs computes the same gradients once.
            if eng.is_last_stage() or eng.is_pipe_partitioned or eng.is_grad_partitioned:
                return backward_pass(eng, buffer_id)
            outputs = eng.pipe_buffers["outputs"][buffer_id]
            tensors = [t for t in outputs if t.is_floating_point()] if isinstance(outputs, tuple) else [outputs]
            grads = list(eng.grad_layer) if isinstance(eng.grad_layer, (list, tuple)) else [eng.grad_layer]
            if len(tensors) != len(grads):
                raise RuntimeError(f"{len(tensors)} stage outputs but {len(grads)} gradients received")
            timers = [BACKWARD_MICRO_TIMER, BACKWARD_GLOBAL_TIMER, BACKWARD_INNER_MICRO_TIMER,
                      BACKWARD_INNER_GLOBAL_TIMER] if eng.wall_clock_breakdown() else []
            for name in timers:
                eng.timers(name).start()
            eng._running_engine_backward = True
            try:
                self._backward_with_bf16_bookkeeping(lambda: torch.autograd.backward(tensors, grads) or True)
            finally:
                eng._running_engine_backward = False
            eng.pipe_buffers["output_tensors"][buffer_id] = None
            eng.pipe_buffers["outputs"][buffer_id] = None
            for name in timers:
                eng.timers(name).stop()

        def segmenter_backward_then_reduce(eng, *args, **kwargs):
            front = self.module.front
            if front is not None:
                self._backward_with_bf16_bookkeeping(front.backward_segmenter)
            return reduce_tied_grads(eng, *args, **kwargs)

        def guarded_step(eng, *args, **kwargs):
            bad = torch.zeros(1, device=eng.device)
            if eng.is_last_stage() and eng.total_loss is not None:
                bad = (~torch.isfinite(eng.total_loss.detach().float())).float().reshape(1)
            if eng.is_pipe_parallel:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=eng.grid.get_pipe_parallel_group())
            self.skipped = bool(bad.item())
            if self.skipped:
                self._drop_gradients()
                return None
            return optimizer_step(eng, *args, **kwargs)

        table[schedule.BackwardPass] = one_backward_pass
        table[schedule.ReduceTiedGrads] = segmenter_backward_then_reduce
        table[schedule.OptimizerStep] = guarded_step
        engine._INSTRUCTION_MAP = table

    def _backward_with_bf16_bookkeeping(self, backward: Callable[[], bool]) -> None:
        """A backward outside DeepSpeed's own, with its bookkeeping: the bf16 optimizer adds each backward's
        low-precision gradients into its float32 ones, so these are cleared first (they hold the previous
        backward's, already added) and added after (unless DeepSpeed's hooks add them as they come,
        `immediate_grad_update`). `backward` returns whether it ran."""
        bf16 = getattr(self.engine, "using_bf16_optimizer", False)
        if bf16:
            self.engine.optimizer.clear_lp_grads()
        if backward() and bf16 and not self.engine._config.bfloat16_config.immediate_grad_update:
            self.engine.optimizer.update_hp_grads(clear_lp_grads=False)

    def _drop_gradients(self) -> None:
        optimizer = self.engine.optimizer
        if getattr(self.engine, "using_bf16_optimizer", False):  # its zero_grad() leaves the float32 gradients
            optimizer.clear_hp_grads()
            optimizer.clear_lp_grads()
        else:
            optimizer.zero_grad()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, image: torch.Tensor | None, windows: Sequence[WindowDraw | None]) -> StepOutput:
        """One TTA step: one micro-batch per window, gradients averaged over windows, one update
        (skipped, with `self.skipped` set, when the loss is not finite).

        The stage with the segmenter needs the image [1, 3, H, W] and each window's `WindowDraw`;
        the other stages only the number of windows (`image` None, `windows` of any items).
        """
        front = self.module.front
        prepared = None
        if front is not None:
            autocast = self.engine.torch_autocast_enabled()
            with torch.autocast(self.device.type, self.engine.torch_autocast_dtype() if autocast else torch.bfloat16,
                                enabled=autocast, cache_enabled=False):  # the engine's precision (no cache: graphs)
                prepared = front.begin_image(image.to(self.device, non_blocking=True), windows)
            microbatches = [(inputs, self._label) for inputs in prepared.inputs]
        else:
            microbatches = [(None, self._label)] * len(windows)
        self.engine.set_train_batch_size(len(microbatches))
        loss = self.engine.train_batch(iter(microbatches))
        if prepared is None:
            return StepOutput(loss, None, None)
        return StepOutput(loss, prepared.logits, prepared.candidates)

    @torch.no_grad()
    def reset(self) -> None:
        """Bit-exact initial parameters and fresh optimizer state (fp32 master copies included)."""
        for name, p in self.module.named_parameters():
            if name in self._initial:
                p.copy_(self._initial[name])
        wrapper = self.engine.optimizer
        base = getattr(wrapper, "optimizer", wrapper)  # DeepSpeed's bf16/ZeRO wrappers hold the torch one
        base.state.clear()
        if hasattr(wrapper, "refresh_fp32_params"):  # master weights <- the restored bf16 weights
            wrapper.refresh_fp32_params()
        if hasattr(wrapper, "_hp_optimizer_states_linked"):
            wrapper._hp_optimizer_states_linked = False  # relink to the new state on the next step
