"""Every use of DeepSpeed's private API, in one module (read from deepspeed 0.19.8).

DeepSpeed's pipeline engine has no public hooks for what this project changes in its step: the engine
(pipeline/dusa/engine.py), the module (pipeline/dusa/module.py), the launcher, the timing recorder, the
benchmarks and the tests all go through the named hooks below, and no other file touches a private name.
`PRIVATE_API` lists each private name with the form it had in the version read; tests/test_deepspeed_seam.py
checks them in seconds, without starting a process, so a DeepSpeed upgrade that moves one fails there with
one message naming what moved, instead of deep inside a pipeline run.
"""
from __future__ import annotations

import collections
import importlib
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import (BACKWARD_GLOBAL_TIMER, BACKWARD_INNER_GLOBAL_TIMER,
                                           BACKWARD_INNER_MICRO_TIMER, BACKWARD_MICRO_TIMER)

READ_FROM = "0.19.8"  # the DeepSpeed version whose source these hooks were written against


class PrivateName(NamedTuple):
    """One private name the seam relies on: `owner` (module:qualname), `name`, and what it must be:
    a signature such as "(self, start=None, stop=None)", "attribute" (assigned as `self.<name>` in the
    owner's source), "function print" (the module calls the built-in `print`), or "instructions" (the
    engine's table of schedule instructions)."""

    owner: str
    name: str
    form: str
    used_by: str


PRIVATE_API: tuple[PrivateName, ...] = (
    PrivateName("deepspeed.runtime.pipe.engine:PipelineEngine", "_INSTRUCTION_MAP", "instructions",
                "wrap_instructions"),
    PrivateName("deepspeed.runtime.engine:DeepSpeedEngine", "_check_for_duplicates", "(self, optimizer)",
                "linear_duplicate_check"),
    PrivateName("deepspeed.runtime.pipe.engine:PipelineEngine", "_exec_backward_pass", "(self, buffer_id)",
                "one_backward_per_stage (the instruction it replaces)"),
    PrivateName("deepspeed.runtime.pipe.engine:PipelineEngine", "pipe_buffers", "attribute", "one_backward_per_stage"),
    PrivateName("deepspeed.runtime.pipe.engine:PipelineEngine", "grad_layer", "attribute", "one_backward_per_stage"),
    PrivateName("deepspeed.runtime.pipe.engine:PipelineEngine", "total_loss", "attribute",
                "nonfinite_loss_on_any_stage"),
    PrivateName("deepspeed.runtime.engine:DeepSpeedEngine", "_running_engine_backward", "attribute",
                "one_backward_per_stage"),
    PrivateName("deepspeed.runtime.engine:DeepSpeedEngine", "_config", "attribute", "backward_with_bf16_bookkeeping"),
    PrivateName("deepspeed.runtime.pipe.module:PipelineModule", "_partition_layers", "(self, method='uniform')",
                "StagePipelineModule"),
    PrivateName("deepspeed.runtime.pipe.module:PipelineModule", "_set_bounds", "(self, start=None, stop=None)",
                "StagePipelineModule"),
    PrivateName("deepspeed.runtime.pipe.module:PipelineModule", "_topo", "attribute", "StagePipelineModule"),
    PrivateName("deepspeed.runtime.pipe.module:PipelineModule", "_grid", "attribute", "StagePipelineModule"),
    PrivateName("deepspeed.runtime.pipe.topology:PipelineParallelGrid", "data_parallel_size", "attribute",
                "isolate_data_parallel"),
    PrivateName("deepspeed.runtime.pipe.topology:PipelineParallelGrid", "data_parallel_id", "attribute",
                "isolate_data_parallel"),
    PrivateName("deepspeed.runtime.pipe.topology:PipelineParallelGrid", "dp_group", "attribute",
                "isolate_data_parallel"),
    PrivateName("deepspeed.runtime.pipe.topology:PipelineParallelGrid", "dp_proc_group", "attribute",
                "isolate_data_parallel"),
    PrivateName("deepspeed.runtime.pipe.topology:PipelineParallelGrid", "dp_groups", "attribute",
                "isolate_data_parallel"),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "clear_lp_grads", "(self, set_to_none=False)",
                "backward_with_bf16_bookkeeping, drop_gradients"),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "update_hp_grads", "(self, clear_lp_grads=False)",
                "backward_with_bf16_bookkeeping"),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "clear_hp_grads", "(self)", "drop_gradients"),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "refresh_fp32_params", "(self)",
                "reset_optimizer_state"),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "_hp_optimizer_states_linked", "attribute",
                "reset_optimizer_state"),
    PrivateName("deepspeed.runtime.bf16_optimizer:BF16_Optimizer", "immediate_grad_update", "attribute",
                "backward_with_bf16_bookkeeping (the engine config's bfloat16_config has it too)"),
    PrivateName("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer", "reduce_gradients",
                "(self, pipeline_parallel=False)", "reduction_needed (its class name is matched)"),
    *(PrivateName(f"deepspeed.{module}", "print", "function print", "quiet_deepspeed")
      for module in ("comm.torch", "runtime.pipe.engine", "runtime.pipe.module", "runtime.pipe.topology")),
)

# The instructions this project wraps or times, by their schedule class names.
INSTRUCTION_NAMES = ("OptimizerStep", "ReduceGrads", "ReduceTiedGrads", "LoadMicroBatch", "ForwardPass",
                     "BackwardPass", "SendActivation", "RecvActivation", "SendGrad", "RecvGrad")


def api_problems() -> list[str]:
    """Each private name of `PRIVATE_API` that the installed DeepSpeed lacks or has in another form (empty:
    the seam holds). Read from the source and signatures only: nothing is started."""
    problems = []
    for entry in PRIVATE_API:
        module_name, _, qualname = entry.owner.partition(":")
        try:
            owner = importlib.import_module(module_name)
            for part in filter(None, qualname.split(".")):
                owner = getattr(owner, part)
        except (ImportError, AttributeError):
            problems.append(f"{entry.owner} is gone (used by {entry.used_by})")
            continue
        where = f"{entry.owner}.{entry.name}"
        if entry.form == "instructions":
            table = getattr(owner, entry.name, None)
            names = {kind.__name__ for kind in table} if isinstance(table, dict) else set()
            missing = [n for n in INSTRUCTION_NAMES if n not in names or not hasattr(schedule, n)]
            if missing:
                problems.append(f"{where} has no instruction {', '.join(missing)} (used by {entry.used_by})")
        elif entry.form == "attribute":
            source = inspect.getsource(owner)
            if f"self.{entry.name} =" not in source and f"self.{entry.name}=" not in source \
                    and not hasattr(owner, entry.name):
                problems.append(f"{where} is no longer set (used by {entry.used_by})")
        elif entry.form == "function print":
            if "print(" not in inspect.getsource(owner):
                problems.append(f"{module_name} no longer prints with print() (used by {entry.used_by})")
        else:
            member = getattr(owner, entry.name, None)
            found = str(inspect.signature(member)) if callable(member) else None
            if found != entry.form:
                problems.append(f"{where} is {found or 'gone'}, read as {entry.form} (used by {entry.used_by})")
    return problems


# Instructions -------------------------------------------------------------------------------------------------

def wrap_instructions(engine: Any, wrappers: Mapping[str, Callable[[Callable], Callable]]) -> None:
    """Runs each named instruction of `engine`'s schedule (a schedule class name of `INSTRUCTION_NAMES`)
    through `wrappers[name](current)`, which returns the new instruction (called as `(engine, *args)`).

    For this engine only: the engine looks each instruction up in its instance's `_INSTRUCTION_MAP`, so a
    copy of the table is extended there and the class stays untouched. Wrappers installed later see the
    earlier ones as `current` (the timing recorder times the TTA engine's own instructions)."""
    table = dict(engine._INSTRUCTION_MAP)
    by_name = {kind.__name__: kind for kind in table}
    for name, wrap in wrappers.items():
        if name not in by_name:
            raise KeyError(f"DeepSpeed's pipeline schedule has no instruction {name!r} (deepspeed_seam.py)")
        table[by_name[name]] = wrap(table[by_name[name]])
    engine._INSTRUCTION_MAP = table


def one_backward_per_stage(backward_pass: Callable, run_backward: Callable[[Callable[[], bool]], None]) -> Callable:
    """The BackwardPass instruction with one autograd pass over all of a stage's float outputs.

    DeepSpeed runs one backward per float output of a stage that is not the last: every joint block before
    a stage boundary would run its backward twice (image and text streams both depend on it). One pass over
    all outputs computes the same gradients once. `run_backward(fn)` runs `fn` (the pass; it returns
    whether it ran) with the optimizer's bookkeeping (`backward_with_bf16_bookkeeping`). The last stage, and
    partitioned activations or gradients, keep DeepSpeed's own `backward_pass`."""
    def stage_backward(eng, buffer_id):
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
            run_backward(lambda: torch.autograd.backward(tensors, grads) or True)
        finally:
            eng._running_engine_backward = False
        eng.pipe_buffers["output_tensors"][buffer_id] = None
        eng.pipe_buffers["outputs"][buffer_id] = None
        for name in timers:
            eng.timers(name).stop()
    return stage_backward


def reduction_needed(engine: Any) -> bool:
    """Whether the gradient reduction does anything: not when this process is its data-parallel group alone
    (DeepSpeed still flattens, all-reduces and copies back every gradient, 0.08 s per step for SD3-medium on
    an H200), except with DeepSpeed's float32 ZeRO optimizer, whose reduction also fills its own buffers."""
    return engine.dp_world_size != 1 or type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"


def uses_zero_reduction(engine: Any) -> bool:
    """Whether the engine's optimizer is DeepSpeed's float32 ZeRO one (it reduces gradients away at every step)."""
    return type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"


def nonfinite_loss_on_any_stage(engine: Any) -> torch.Tensor:
    """A device flag (1.0: the step's loss is NaN or infinite), the same on every stage: the last stage
    knows the loss (`total_loss`), one all-reduce over the pipeline tells the others. Not read back here."""
    bad = torch.zeros(1, device=engine.device)
    if engine.is_last_stage() and engine.total_loss is not None:
        bad = (~torch.isfinite(engine.total_loss.detach().float())).float().reshape(1)
    if engine.is_pipe_parallel:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=engine.grid.get_pipe_parallel_group())
    return bad


# The bf16 optimizer's bookkeeping ------------------------------------------------------------------------------

def uses_bf16_optimizer(engine: Any) -> bool:
    return bool(getattr(engine, "using_bf16_optimizer", False))


def backward_with_bf16_bookkeeping(engine: Any, backward: Callable[[], bool]) -> None:
    """A backward outside DeepSpeed's own, with its bookkeeping: the bf16 optimizer adds each backward's
    low-precision gradients into its float32 ones, so these are cleared first (they hold the previous
    backward's, already added) and added after (unless DeepSpeed's hooks add them as they come,
    `immediate_grad_update`). `backward` returns whether it ran."""
    bf16 = uses_bf16_optimizer(engine)
    if bf16:
        engine.optimizer.clear_lp_grads()
    if backward() and bf16 and not engine._config.bfloat16_config.immediate_grad_update:
        engine.optimizer.update_hp_grads(clear_lp_grads=False)


def drop_gradients(engine: Any) -> None:
    """Every gradient waiting for an update, the bf16 optimizer's float32 ones included (its zero_grad()
    leaves those)."""
    optimizer = engine.optimizer
    if uses_bf16_optimizer(engine):
        optimizer.clear_hp_grads()
        optimizer.clear_lp_grads()
    else:
        optimizer.zero_grad()


def reset_optimizer_state(engine: Any) -> None:
    """Fresh optimizer state (moments, step counts) after the parameters were restored: DeepSpeed's
    bf16/ZeRO wrappers hold the torch optimizer; their float32 masters are refreshed from the restored
    weights, and the bf16 optimizer relinks its state views at its next step."""
    wrapper = engine.optimizer
    base = getattr(wrapper, "optimizer", wrapper)
    base.state.clear()
    if hasattr(wrapper, "refresh_fp32_params"):  # master weights <- the restored bf16 weights
        wrapper.refresh_fp32_params()
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False


def zero_grad_by_list(engine: Any, params: Sequence[torch.nn.Parameter]) -> None:
    """The engine's zero_grad over a list made once: DeepSpeed's walks named_parameters() after every update
    (14 ms of host time per step for the whole model)."""
    params = list(params)

    def zero_grad():
        for p in params:
            p.grad = None
    engine.zero_grad = zero_grad


# The module: stage bounds and data-parallel isolation ---------------------------------------------------------

class StagePipelineModule(PipelineModule):
    """A PipelineModule whose stage boundaries are given (`boundaries`: layer indices, one more than the
    stages) instead of computed by DeepSpeed: its `_partition_layers` hook, which `PipelineModule.__init__`
    calls, sets this rank's bounds from them."""

    def __init__(self, *args, boundaries: Sequence[int], **kwargs):
        self._boundaries = list(boundaries)  # read by _partition_layers inside PipelineModule.__init__
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._boundaries)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def isolate_data_parallel(self, world: int) -> None:
        """Every process its own data-parallel group (see `isolate_data_parallel`), on this module's grid."""
        isolate_data_parallel(self._grid, world)


def isolate_data_parallel(grid: Any, world: int) -> None:
    """Make every process its own data-parallel group in DeepSpeed's pipeline grid (before the engine reads
    it): gradient all-reduce, loss averaging and ZeRO's partitioning then stay within the process, and the
    replicas (the grid's data axis) stay independent. Called by every process at once: each makes every
    one-process group, in the same order."""
    singletons = [dist.new_group(ranks=[r]) for r in range(world)]
    rank = grid.get_global_rank()
    grid.data_parallel_size, grid.data_parallel_id = 1, 0
    grid.dp_group, grid.dp_proc_group = [rank], singletons[rank]
    grid.dp_groups = [[r] for r in range(world)]


# Quieting ---------------------------------------------------------------------------------------------------

def check_for_duplicates_in_linear_time(engine: Any, optimizer: Any) -> None:
    """DeepSpeed's `_check_for_duplicates` with its outcome and message, without rebuilding every group's id
    list for every parameter (quadratic: 2.7 s of SD3-medium's start-up on an H200)."""
    counts = collections.Counter(id(p) for group in optimizer.param_groups for p in group["params"])
    for name, param in engine.module.named_parameters():
        assert counts[id(param)] <= 1, (f"Parameter with name: {name} occurs multiple times in optimizer.param_groups. "
                                        "Make sure it only appears once to prevent undefined behavior.")


def linear_duplicate_check() -> None:
    """DeepSpeed engines built from now on check their optimizer's groups with
    `check_for_duplicates_in_linear_time` (the same check; called inside `deepspeed.initialize`)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    DeepSpeedEngine._check_for_duplicates = check_for_duplicates_in_linear_time


def quiet_deepspeed() -> None:
    """The DeepSpeed modules that print with print() (seed and topology banners, "steps: N loss", the
    shared-memory op build), with no switch, get a no-op `print` of their own. (Its logger is quieted apart,
    before DeepSpeed is imported: this module imports it.)"""
    # By module name: the attribute `deepspeed.comm.torch` is the torch library, not that module.
    for entry in PRIVATE_API:
        if entry.name == "print":
            importlib.import_module(entry.owner).print = lambda *args, **kwargs: None
