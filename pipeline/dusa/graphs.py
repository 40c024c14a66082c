"""A module's forward and backward replayed as CUDA graphs, one pair per input shape.

SegFormer's forward and backward launch thousands of small kernels: eager, the GPU waits on the
host (0.14-0.19 s per image at 512 x 683 on an H200, against 0.04-0.06 s replayed as graphs). Image
widths vary, so graphs are kept per input shape in a bounded cache that keeps the most frequent shapes.
A shape is captured when it is seen the second time (`capture_after`): a capture costs about four
eager passes (0.7-0.9 s on an H200), and most shapes of ADE20K's long tail of aspect ratios occur once
per task. When the cache is full, a shape is captured only if it has been seen clearly more often than
the least frequent cached one, which it replaces: the tasks of a sweep are the same images under other
corruptions, so every shape comes back once per task, and a least-recently-used cache of 16 then
recaptured the tail's shapes in every task, evicting the common ones (47 captures in 300 images of the
benchmark of record's mix, 0.13 s per image; H200). A shape whose capture runs out of memory runs eagerly.

Contract, which the pipeline's step keeps: at most one forward of a graph is waiting for its
backward (a second forward before that backward raises). A capture that runs out of memory leaves
that shape eager; any other capture failure stops with a message (eager: segmenter_graphs 0). Every capture shares one memory pool,
which is safe because a replay's inputs are copied in just before it and its outputs (logits,
gradients) are copied out just after it.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.run.log import LOG


@dataclass
class _Graphs:
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph | None
    static_input: torch.Tensor
    static_output: torch.Tensor
    static_grad_output: torch.Tensor | None
    static_grads: tuple[torch.Tensor | None, ...]
    aliases: dict[str, torch.Tensor]  # the parameters' storage as fresh leaves (see `_capture`)
    generation: int = 0  # forwards replayed so far; a backward must follow the latest


@dataclass
class GraphStats:
    """What the cache did: for the run's report and the benchmark."""

    calls: int = 0
    hits: int = 0
    captures: int = 0
    evictions: int = 0
    eager: int = 0  # calls run eagerly (shape not seen often enough yet, or too large to capture)
    capture_seconds: list[float] = field(default_factory=list)
    capture_bytes: list[int] = field(default_factory=list)  # pool memory reserved by each capture

    @property
    def hit_rate(self) -> float:
        return self.hits / self.calls if self.calls else 0.0


class FrequentShapes:
    """Which shapes hold a graph (bookkeeping only): a shape is captured on its `capture_after`-th sighting while
    there is room; when the cache is full, only if it has been seen at least twice more than the least frequent
    held shape (of equal counts, the least recently used), which then gives up its place. (Twice: in a sweep,
    shapes of equal frequency are one sighting apart while a task is under way; a margin of one would have
    them take each other's places in every task.)"""

    def __init__(self, capacity: int, capture_after: int = 2, memory: int = 4096):
        self.capacity, self.capture_after, self.memory = capacity, capture_after, memory
        self.counts: OrderedDict[tuple, int] = OrderedDict()  # sightings per shape, least recently seen first
        self.held: OrderedDict[tuple, None] = OrderedDict()  # shapes with a graph, least recently used first

    def visit(self, key: tuple, capturable: bool = True) -> tuple[str, tuple | None]:
        """One call with `key`: ("hit" | "capture" | "eager", the shape evicted to make room or None)."""
        count = self.counts.pop(key, 0) + 1
        self.counts[key] = count
        if len(self.counts) > self.memory:  # forget the longest unseen shapes that hold no graph
            for old in [k for k in self.counts if k not in self.held][:len(self.counts) - self.memory]:
                del self.counts[old]
        if key in self.held:
            self.held.move_to_end(key)
            return "hit", None
        if not capturable or count < self.capture_after:
            return "eager", None
        evicted = None
        if len(self.held) >= self.capacity:
            victim = min(self.held, key=lambda k: self.counts.get(k, 0))  # first of equals: least recently used
            if self.counts.get(victim, 0) + 1 >= count:
                return "eager", None
            del self.held[victim]
            evicted = victim
        self.held[key] = None
        return "capture", evicted

    def drop(self, key: tuple) -> None:
        """`key` holds no graph after all (its capture failed)."""
        self.held.pop(key, None)


def cached_capture(key: tuple, cache: dict, shapes: FrequentShapes, stats: GraphStats, too_large: set,
                   capture: Callable[[], object], no_memory: Callable[[], str]):
    """The graphs of `key` from `cache`, captured now when `shapes` says so, or None (run eagerly): the
    bookkeeping of every graph cache here. A capture that runs out of memory marks `key` too large and logs
    `no_memory()` (eager needs less memory than a captured pool)."""
    stats.calls += 1
    action, evicted = shapes.visit(key, capturable=key not in too_large)
    if evicted is not None:
        del cache[evicted]
        stats.evictions += 1
    entry = cache.get(key)
    if entry is not None:
        stats.hits += 1
    elif action == "capture":
        try:
            entry = capture()
        except torch.OutOfMemoryError:
            too_large.add(key)
            shapes.drop(key)
            LOG.info(no_memory())
        else:
            cache[key] = entry
    if entry is None:
        stats.eager += 1
    return entry


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphs: _Graphs, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        graphs.static_input.copy_(x)
        graphs.forward.replay()
        graphs.generation += 1
        ctx.graphs, ctx.generation = graphs, graphs.generation
        return graphs.static_output.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        graphs = ctx.graphs
        if graphs.generation != ctx.generation:
            raise RuntimeError("a graphed forward was replayed again before the backward of the previous one")
        graphs.static_grad_output.copy_(grad)
        graphs.backward.replay()
        # Copies, not the static buffers: autograd may keep an incoming gradient as `param.grad`, and
        # the next replay would then overwrite (and double) it.
        return (None, None, *copies(graphs.static_grads))


def flat_views(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Empty tensors shaped like `tensors`, as views of one new buffer per dtype (None stays None)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, index in by_dtype.items():
        sizes = [tensors[i].numel() for i in index]
        flat = torch.empty(sum(sizes), dtype=dtype, device=tensors[index[0]].device)
        for i, v in zip(index, flat.split(sizes)):
            out[i] = v.view(tensors[i].shape)
    return out


def copies(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Copies of the tensors as views of one new buffer per dtype, made by one multi-tensor copy per dtype
    (hundreds of separate clones would each be a kernel launch)."""
    out = flat_views(tensors)
    pairs = [(o, t) for o, t in zip(out, tensors) if t is not None]
    for dtype in {t.dtype for _, t in pairs}:
        torch._foreach_copy_([o for o, t in pairs if t.dtype == dtype], [t for _, t in pairs if t.dtype == dtype])
    return out


class GraphedModule:
    """Calls `module(x)` through CUDA graphs captured per (shape, dtype, autocast, grad) of `x`."""

    def __init__(self, module: nn.Module, max_graphs: int, warmup: int = 2, capture_after: int = 2):
        if max_graphs < 1 or capture_after < 1:
            raise ValueError(f"max_graphs={max_graphs} and capture_after={capture_after} must be >= 1")
        self.module, self.warmup = module, warmup
        self.cache: dict[tuple, _Graphs] = {}
        self.shapes = FrequentShapes(max_graphs, capture_after)
        self.stats = GraphStats()
        self._pool = None
        self._too_large: set[tuple] = set()  # shapes whose capture ran out of memory: eager
        self._params: tuple[torch.Tensor, ...] | None = None  # the adapted parameters (a fixed set): once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._params is None:
            self._params = tuple(p for p in self.module.parameters() if p.requires_grad)
        params = self._params if torch.is_grad_enabled() else ()
        key = (tuple(x.shape), x.dtype, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
               bool(params))

        def capture():
            try:
                return self._capture(x, params)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                raise RuntimeError(f"CUDA graph capture of {type(self.module).__name__} failed: {exc}; run with "
                                   f"--pipeline.segmenter_graphs 0 (eager)") from exc
        graphs = cached_capture(key, self.cache, self.shapes, self.stats, self._too_large, capture,
                                lambda: f"no memory for a CUDA graph of {type(self.module).__name__} at input "
                                        f"{tuple(x.shape)}: this shape runs eagerly")
        if graphs is None:
            return self.module(x)
        if graphs.backward is None:
            graphs.static_input.copy_(x)
            graphs.forward.replay()
            return graphs.static_output.clone()
        return _Replay.apply(graphs, x, *params)

    def _run(self, x: torch.Tensor, aliases: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.module, aliases, (x,)) if aliases else self.module(x)

    def _capture(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> _Graphs:
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved()
        names = [n for n, p in self.module.named_parameters() if p.requires_grad] if params else []
        by_name = dict(self.module.named_parameters())

        def fresh_aliases() -> dict[str, torch.Tensor]:
            # The parameters' storage as new leaf tensors: their gradient nodes are created where they are
            # first used. A parameter's own node was created earlier on the default stream, and autograd
            # would make the capture wait on that stream, which breaks the capture. Same storage: the
            # optimizer's in-place updates reach the graphs.
            return {n: by_name[n].detach().requires_grad_(True) for n in names}

        static_input = x.detach().clone()
        # Warm-up on a side stream (lazy initialisation and autotuning stay out of the capture).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                aliases = fresh_aliases()
                out = self._run(static_input, aliases)
                if aliases:
                    torch.autograd.grad(out, list(aliases.values()), torch.ones_like(out), allow_unused=True)
                del out
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        aliases = fresh_aliases()
        forward = torch.cuda.CUDAGraph()
        # thread_local: other threads (NCCL's watchdog) may use CUDA while this thread captures.
        with torch.cuda.graph(forward, pool=self._pool, capture_error_mode="thread_local"):
            static_output = self._run(static_input, aliases)
        backward = static_grad_output = None
        static_grads: tuple = ()
        if aliases:
            static_grad_output = torch.empty_like(static_output)
            backward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(backward, pool=self._pool, capture_error_mode="thread_local"):
                static_grads = torch.autograd.grad(static_output, list(aliases.values()), static_grad_output,
                                                   allow_unused=True)
            static_output = static_output.detach()
        torch.cuda.synchronize()
        self.stats.captures += 1
        self.stats.capture_seconds.append(time.perf_counter() - start)
        self.stats.capture_bytes.append(torch.cuda.memory_reserved() - reserved)
        return _Graphs(forward, backward, static_input, static_output, static_grad_output, tuple(static_grads),
                       aliases)
