"""Where the pipeline's stage boundaries go: measured per-layer costs and a model of DeepSpeed's schedule.

A step is one image: SegFormer's forward on stage 0, one micro-batch per window through DeepSpeed's
1F1B schedule, SegFormer's backward on stage 0, then the optimizer step on every stage, which starts
together on all stages (its gradient-norm all-reduce spans the pipeline). `simulate_step` replays
that schedule with per-layer costs; `plan_partition` picks the boundaries with the shortest
simulated step. Costs come from a table measured on the card (`pipeline/dusa/costs/*.json`, written by
`launch/calibrate.py`); without one, from relative default costs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from deepspeed.runtime.pipe import schedule

COST_TABLES = Path(__file__).resolve().parent / "costs"


@dataclass
class StepCosts:
    """Seconds of work per pipeline layer for one window micro-batch (forward, backward), SegFormer's
    forward and backward per image (stage 0), and each layer's share of the optimizer step; optionally
    bytes per layer: activations kept for the backward of one window, and weights + optimizer state
    (SegFormer's share, its graphs and activations included, sits on the front)."""

    forward: list[float]
    backward: list[float]
    segmenter: tuple[float, float]
    optimizer: list[float]
    activation_bytes: list[float] | None = None
    state_bytes: list[float] | None = None

    def __post_init__(self):
        if not len(self.forward) == len(self.backward) == len(self.optimizer):
            raise ValueError("forward, backward and optimizer costs need one entry per layer")


def stage_memory(costs: StepCosts, bounds: Sequence[int], num_windows: int = 2) -> list[float] | None:
    """Predicted peak bytes per stage: its weights and optimizer state, plus the activations of the
    windows in flight there (DeepSpeed's 1F1B keeps up to stages - s of them on stage s)."""
    if costs.activation_bytes is None or costs.state_bytes is None:
        return None
    stages = len(bounds) - 1
    return [sum(costs.state_bytes[a:b]) + min(num_windows, stages - s) * sum(costs.activation_bytes[a:b])
            for s, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def default_costs(num_blocks: int) -> StepCosts:
    """Relative costs (one joint block's forward = 1) for a card without a measured table, from the
    shape of the SD3-medium / SegFormer-B5 figures at 10 classes per window."""
    forward = [1.6, 0.1] + [1.0] * num_blocks + [0.1]  # front (VAE, crop), embed, blocks, head + loss
    backward = [0.05, 0.2] + [2.0] * num_blocks + [0.2]
    optimizer = [0.0, 0.02] + [0.08] * num_blocks + [0.01]
    return StepCosts(forward, backward, (1.5, 4.0), optimizer)


def _stage_programs(num_windows: int, num_stages: int) -> list[list[str]]:
    """Each stage's order of forward ('F') and backward ('B') passes in DeepSpeed's training schedule."""
    kinds = {schedule.ForwardPass: "F", schedule.BackwardPass: "B"}
    return [[kinds[type(cmd)] for step in schedule.TrainSchedule(num_windows, num_stages, s) for cmd in step
             if type(cmd) in kinds] for s in range(num_stages)]


def simulate_step(costs: StepCosts, bounds: Sequence[int], num_windows: int) -> dict:
    """Predicted seconds of one step and of each stage's work, for stage boundaries `bounds`.

    Each stage runs its passes in the schedule's order; a forward waits for the previous stage's
    forward of the same window, a backward for the next stage's backward; sends cost nothing."""
    stages = len(bounds) - 1
    fwd = [sum(costs.forward[a:b]) for a, b in zip(bounds, bounds[1:])]
    bwd = [sum(costs.backward[a:b]) for a, b in zip(bounds, bounds[1:])]
    opt = [sum(costs.optimizer[a:b]) for a, b in zip(bounds, bounds[1:])]
    programs = _stage_programs(num_windows, stages)
    done = {"F": [[None] * num_windows for _ in range(stages)], "B": [[None] * num_windows for _ in range(stages)]}
    clock = [costs.segmenter[0]] + [0.0] * (stages - 1)  # SegFormer's forward comes first on stage 0
    position = [0] * stages
    counters = [{"F": 0, "B": 0} for _ in range(stages)]
    while any(position[s] < len(programs[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if position[s] == len(programs[s]):
                continue
            kind = programs[s][position[s]]
            k = counters[s][kind]
            if kind == "F":
                ready = 0.0 if s == 0 else done["F"][s - 1][k]
            else:
                ready = done["F"][s][k] if s == stages - 1 else done["B"][s + 1][k]
            if ready is None:
                continue
            clock[s] = max(clock[s], ready) + (fwd[s] if kind == "F" else bwd[s])
            done[kind][s][k] = clock[s]
            counters[s][kind] += 1
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlock in the step model")
    clock[0] += costs.segmenter[1]  # SegFormer's backward, after every window's
    barrier = max(clock)
    busy = [num_windows * (f + b) + o for f, b, o in zip(fwd, bwd, opt)]
    busy[0] += sum(costs.segmenter)
    return {"step": barrier + max(opt), "stage_busy": busy}


def plan_partition(costs: Sequence[StepCosts], num_stages: int, num_windows: int = 2,
                   memory_budget: float | None = None,
                   memory: Callable[[list[int]], list[float]] | None = None) -> tuple[list[int], dict]:
    """Boundaries with the shortest simulated step, averaged over the cost sets given (e.g. several
    class counts per window), among those whose predicted memory (at the cost set with the most
    activation bytes, or `memory(bounds)`: bytes per stage, e.g. pipeline/dusa/memory.py's estimate) fits
    `memory_budget` bytes per GPU when both are known; when none fits, the split with the smallest largest
    stage memory. Returns (bounds, the simulation of the first cost set, with the predicted memory per stage)."""
    layers = len(costs[0].forward)
    if not 1 <= num_stages <= layers:
        raise ValueError(f"cannot split {layers} layers into {num_stages} stages")
    options = itertools.combinations(range(1, layers), num_stages - 1)
    if math.comb(layers - 1, num_stages - 1) > 50_000:  # too many to try: balance the summed work instead
        total = [sum(c.forward[i] + c.backward[i] for c in costs) for i in range(layers)]
        options = [balanced_partition(total, num_stages)[1:-1]]
    largest = max(costs, key=lambda c: sum(c.activation_bytes or [0]))
    if memory is None:
        def memory(bounds):
            return stage_memory(largest, bounds, num_windows)
    ranked = []
    for cuts in options:
        bounds = [0, *cuts, layers]
        time = sum(simulate_step(c, bounds, num_windows)["step"] for c in costs) / len(costs)
        peaks = memory(bounds)
        ranked.append((time, max(peaks) if peaks else 0.0, bounds))
    fits = [r for r in ranked if memory_budget is None or r[1] <= memory_budget]
    best = min(fits, key=lambda r: r[0]) if fits else min(ranked, key=lambda r: r[1])
    result = simulate_step(costs[0], best[2], num_windows)
    result["memory"] = memory(best[2])
    result["fits"] = bool(fits)
    return best[2], result


def balanced_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split of `costs` into `num_stages` non-empty parts minimising the largest part.

    Returns boundaries [0, b1, ..., len(costs)]; exact dynamic programme (a few dozen layers).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} layers into {num_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible largest stage cost when the first i layers form s stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds = [n]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def check_partition(bounds: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    bounds = list(bounds)
    if (len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != num_layers
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        raise ValueError(f"pipeline.partition {bounds} must be {num_stages + 1} increasing layer indices "
                         f"from 0 to {num_layers} (one non-empty range per stage)")
    return bounds


# ----------------------------------------------------------------------------- measured cost tables
def model_signature(generator_config: dict, segmenter_config: dict, window_size: int, precision: str = "bf16") -> dict:
    """What decides the per-layer costs besides the card: the architectures, the window size and the
    precision preset (`precision_of` the DeepSpeed JSON: float32 weights under autocast keep more memory)."""
    gen_keys = ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "caption_projection_dim", "patch_size", "in_channels", "dual_attention_layers", "qk_norm")
    seg_keys = ("depths", "hidden_sizes", "decoder_hidden_size")

    def pick(config, keys):
        return {k: (list(config[k]) if isinstance(config.get(k), (list, tuple)) else config.get(k)) for k in keys}
    segmenter = pick(segmenter_config, seg_keys) | {"num_labels": len(segmenter_config.get("id2label") or {})}
    return {"generator": pick(generator_config, gen_keys), "segmenter": segmenter, "window_size": window_size,
            "precision": precision}


def table_costs(table: dict) -> list[StepCosts]:
    """The StepCosts of a table, one per class count it was measured at."""
    mib = 2.0**20

    def scaled(values, factor):
        return None if values is None else [v * factor for v in values]
    return [StepCosts(scaled(entry["forward_ms"], 1e-3), scaled(entry["backward_ms"], 1e-3),
                      tuple(ms / 1e3 for ms in table["segmenter_ms"]), scaled(table["optimizer_ms"], 1e-3),
                      scaled(entry.get("activation_mib"), mib), scaled(table.get("state_mib"), mib))
            for _, entry in sorted(table["classes"].items(), key=lambda kv: int(kv[0]))]


def find_cost_table(card: str, signature: dict, folder: Path = COST_TABLES) -> tuple[Path, dict] | None:
    """The measured table for these models on this card; else one measured on another card (its
    memory figures hold anywhere, its times roughly, on GPUs of one generation); else None."""
    from pipeline.run.checks import read_cost_table
    tables = [(path, read_cost_table(path, "cost table")) for path in sorted(folder.glob("*.json"))] \
        if folder.is_dir() else []
    same = [(path, table) for path, table in tables if table.get("signature") == signature]
    return next(((path, table) for path, table in same if table.get("card") == card), same[0] if same else None)
