"""The joint blocks of a stage replayed as CUDA graphs, one set of graphs per class count.

Eager, each joint block's forward and backward launch a few hundred small kernels per window, and at a
few candidate classes the GPU waits on the host (a block's forward + backward: 4.8 ms at 2 classes, 8.4 at
10, on an H200, of which the kernels are a fraction at 2). Replayed, a block costs two graph launches.

The window's class count is the only shape that varies (the window size is fixed), so a *form* is one class
count: its graphs are captured, for every block of the chain at once, on the form's `capture_after`-th
window, and kept while at most `max_forms` forms are held (the most frequent; pipeline/dusa/graphs.py's
`FrequentShapes`). Capture order is the replay order: the forwards of blocks 0..k, then the backwards of
k..0, so every form's graphs share one memory pool, as one eager window would use it.

Memory that outlives a replay is shared by all forms: the blocks' outputs (one buffer per block boundary,
sized for `max_classes`: each form uses its first N rows), the gradients flowing between blocks (two
buffers, used in turn), and the parameters' gradients (one buffer per dtype). The graphs copy into them
(a few copy kernels), so a form costs only its pool's share, not a copy of every activation.

Contract, which the pipeline's last stage keeps (one window in flight: forward, then backward): a form's
block is replayed forward at most once before its backward, and the blocks run in chain order in each
window. A forward out of order raises. The arithmetic is the block's own as it runs outside the graphs (the
same kernels: eager, or compiled with pipeline.compile_blocks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from pipeline.dusa.graphs import FrequentShapes, GraphStats, cached_capture, copies, flat_views

BlockFn = Callable[[nn.Module, dict, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


class CudaRecorder:
    """Records a function as a CUDA graph (run once under capture) and replays it."""

    def __init__(self):
        self.pool = None
        self.side = None  # one side stream for every warm-up (cuBLAS keeps a workspace per stream)

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (NCCL's watchdog) may use CUDA while this thread captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph.replay

    def warm_up(self, fn: Callable[[], None]) -> None:
        # On a side stream: lazy initialisation and autotuning stay out of the capture.
        if self.side is None:
            self.side = torch.cuda.Stream()
        side = self.side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def done(self) -> None:
        torch.cuda.synchronize()


class EagerRecorder:
    """The same protocol without a GPU: a "replay" runs the function again. It keeps the chain's plumbing
    (static buffers, their sharing between forms, the autograd wiring) testable on a CPU."""

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        fn()

        def replay():  # (a replay is called inside autograd's forward, where gradients are off)
            with torch.enable_grad():
                fn()
        return replay

    def warm_up(self, fn: Callable[[], None]) -> None:
        fn()

    def done(self) -> None:
        pass


@dataclass
class _Form:
    """One class count's graphs, a forward and a backward per block."""

    forwards: list[Callable[[], None]]
    backwards: list[Callable[[], None]]
    outputs: list[tuple[torch.Tensor, ...]]  # each block's outputs (views of the shared boundary buffers)
    grad_outputs: list[tuple[torch.Tensor, ...]]  # each block's incoming gradients (shared, used in turn)
    grad_inputs: list[tuple[torch.Tensor, ...]]  # each block's gradients of (hidden, context, temb) (shared)
    grad_params: list[tuple[list[torch.Tensor], list[bool]]]  # each block's parameters' gradients (shared
    # buffer views) and which parameters get one (the others get None, as eager)
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # block 0's inputs
    generation: list[int] = field(default_factory=list)  # forwards replayed per block, for the contract


class BlockChain:
    """Consecutive joint blocks (a stage's) through CUDA graphs per class count.

    `run_block(block, params, hidden, context, temb)` is the block as it runs unreplayed: `params` maps
    parameter names to the tensors to compute with (torch.func.functional_call's), and it returns (hidden,
    context), or (hidden,) for a block without a text stream (SD3's last). `max_classes`: the largest class
    count to graph (larger ones run unreplayed). Call `begin_window(hidden, context, temb)` at the chain's
    first block, then `block(i, ...)` for each block i in order; it returns the block's outputs, or None when
    this window runs unreplayed.
    """

    def __init__(self, blocks: Sequence[nn.Module], run_block: BlockFn, max_forms: int, max_classes: int,
                 capture_after: int = 2, warmup: int = 2, recorder=None):
        if max_forms < 1 or max_classes < 1:
            raise ValueError(f"max_forms={max_forms} and max_classes={max_classes} must be >= 1")
        self.blocks, self.run_block = list(blocks), run_block
        self.max_classes, self.warmup = max_classes, warmup
        self.recorder = recorder if recorder is not None else CudaRecorder()
        self.shapes = FrequentShapes(max_forms, capture_after)
        self.forms: dict[tuple, _Form] = {}
        self.stats = GraphStats()
        self._too_large: set[tuple] = set()
        self._buffers: dict[str, list[torch.Tensor]] | None = None
        self._current: _Form | None = None  # this window's form (None: eager)
        self._params_now: list[tuple[torch.Tensor, ...]] = []  # each block's tensors with gradients, this window
        self._next = 0  # the block expected next in this window
        self._temb_seen = 0  # block 0's temb (its data pointer) in this window

    # ------------------------------------------------------------------------------------------- per window
    def begin_window(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> None:
        """Picks this window's form (a replay, a capture, or eager) from block 0's inputs."""
        self._current, self._next, self._temb_seen = None, 0, 0
        params = [self._params(b) for b in self.blocks]
        self._params_now = [tuple(ps.values()) for ps in params]
        needs_grad = hidden.requires_grad or context.requires_grad or temb.requires_grad or any(params)
        if not torch.is_grad_enabled() or not needs_grad or hidden.shape[0] > self.max_classes:
            return  # no backward to graph (a frozen generator), or more classes than the buffers hold: eager
        key = (tuple(hidden.shape), tuple(context.shape), tuple(temb.shape), hidden.dtype, context.dtype, temb.dtype,
               hidden.requires_grad, context.requires_grad, temb.requires_grad,
               torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type),
               tuple(tuple(id(p) for p in ps.values()) for ps in params))
        form = cached_capture(key, self.forms, self.shapes, self.stats, self._too_large,
                              lambda: self._capture(hidden, context, temb, params),
                              lambda: f"no memory for CUDA graphs of the joint blocks at {hidden.shape[0]} classes: "
                                      "eager")
        self._current = form  # (None: this window runs eagerly)

    def block(self, index: int, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor
              ) -> tuple[torch.Tensor, ...] | None:
        """Block `index`'s outputs by replay, or None: run it eagerly."""
        if self._current is None:
            return None
        if index != self._next:
            raise RuntimeError(f"joint block {index} ran out of order (expected {self._next}): the graphs need the "
                               "chain's blocks in order, one window at a time")
        self._next += 1
        return _Replay.apply(self, self._current, index, hidden, context, temb, *self._params_now[index])

    # ------------------------------------------------------------------------------------------- capture
    @staticmethod
    def _params(block: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors the block computes with that get gradients (under working weights: their bf16 leaves)."""
        return {n: p for n, p in block.named_parameters() if p.requires_grad}

    def _shared(self, hidden, context, temb, params) -> dict[str, list[torch.Tensor]]:
        """The buffers every form shares, sized for `max_classes` (made on the first capture)."""
        if self._buffers is None:
            m = self.max_classes

            def rows(t):
                return torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
            k = len(self.blocks)
            last_has_context = not getattr(self.blocks[-1], "context_pre_only", False)  # SD3's last has none
            self._buffers = {
                "input": [rows(hidden), rows(context), rows(temb)],
                "hidden": [rows(hidden) for _ in range(k)],
                "context": [rows(context) for _ in range(k - 1)] + ([rows(context)] if last_has_context else []),
                "grad_hidden": [rows(hidden) for _ in range(2)],
                "grad_context": [rows(context) for _ in range(2)],
                "grad_temb": [rows(temb) for _ in range(k)],
            }
            self._buffers["params"] = flat_views([p for ps in params for p in ps.values()])
        return self._buffers

    def _capture(self, hidden, context, temb, params) -> _Form:
        start = time.perf_counter()
        reserved = torch.cuda.memory_reserved() if hidden.is_cuda else 0
        shared = self._shared(hidden, context, temb, params)
        n, k = hidden.shape[0], len(self.blocks)
        grads_in = (hidden.requires_grad, context.requires_grad, temb.requires_grad)
        static_in = [b[:n] for b in shared["input"]]
        for s, t in zip(static_in, (hidden, context, temb)):
            s.copy_(t.detach())
        device = hidden.device.type
        autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device),
                        enabled=torch.is_autocast_enabled(device), cache_enabled=False)

        def leaves(ts, flags):
            return [t.detach().requires_grad_(f) for t, f in zip(ts, flags)]

        def aliases(i):
            # Fresh leaves on the parameters' storage: the capture must not wait on the nodes that autograd
            # made for the parameters themselves on another stream; same storage, so updates reach the graphs.
            return {name: p.detach().requires_grad_(True) for name, p in params[i].items()}

        def warm_up():
            x = leaves(static_in, grads_in)
            h, c, t = x
            held = []
            for i, block in enumerate(self.blocks):
                a = aliases(i)
                with torch.autocast(**autocast):
                    out = self.run_block(block, a, h, c, t)
                held += [*a.values()]
                h, c = out[0], out[1] if len(out) > 1 else None
            wanted = [v for v in [*x, *held] if v.requires_grad]
            outs = [o for o in (h, c) if o is not None]
            torch.autograd.grad(outs, wanted, [torch.ones_like(o) for o in outs], allow_unused=True)

        for _ in range(self.warmup):
            self.recorder.warm_up(warm_up)

        live: list[dict] = [{} for _ in range(k)]  # what a block's forward hands its backward (tensors in the pool)
        forwards, backwards = [], []
        outputs, grad_outputs, grad_inputs, grad_params = [], [None] * k, [None] * k, [None] * k
        h_in, c_in = static_in[0], static_in[1]
        flags = grads_in
        for i, block in enumerate(self.blocks):
            out_h = shared["hidden"][i][:n]
            out_c = shared["context"][i][:n] if i < len(shared["context"]) else None
            inputs_i = (h_in, c_in, static_in[2])

            def forward(i=i, block=block, inputs_i=inputs_i, flags=flags, out_h=out_h, out_c=out_c):
                x = leaves(inputs_i, flags)
                a = aliases(i)
                with torch.autocast(**autocast):
                    out = self.run_block(block, a, *x)
                out_h.copy_(out[0])
                if out_c is not None:
                    out_c.copy_(out[1])
                live[i].update(x=x, a=a, out=out)
            forwards.append(self.recorder.record(forward))
            outputs.append((out_h,) if out_c is None else (out_h, out_c))
            h_in, c_in = out_h, out_c
            follows = any(flags) or bool(params[i])  # whether this block's outputs carry a gradient
            flags = (follows, follows, grads_in[2])
        for i in reversed(range(k)):
            slot = (k - 1 - i) % 2  # the gradients flowing in; this block's go to the other buffer
            g_out = [shared["grad_hidden"][slot][:n]] + ([shared["grad_context"][slot][:n]]
                                                         if len(outputs[i]) > 1 else [])
            g_in = (shared["grad_hidden"][1 - slot][:n], shared["grad_context"][1 - slot][:n])
            p_views = shared["params"][sum(len(ps) for ps in params[:i]):][:len(params[i])]
            t_grad = shared["grad_temb"][i][:n]
            got: list[bool] = []  # which parameters get a gradient (decided by the first run: the capture)

            def backward(i=i, g_out=g_out, g_in=g_in, p_views=p_views, t_grad=t_grad, got=got):
                x, a, out = live[i]["x"], live[i]["a"], live[i]["out"]
                wanted = [v for v in [*x, *a.values()] if v.requires_grad]
                grads = torch.autograd.grad(list(out), wanted, g_out, allow_unused=True)
                by_input = dict(zip(map(id, wanted), grads))
                for dst, src in zip(g_in, x[:2]):
                    g = by_input.get(id(src))
                    if g is not None:
                        dst.copy_(g)
                t = by_input.get(id(x[2]))
                if t is not None:
                    t_grad.copy_(t)
                sources = [by_input.get(id(v)) for v in a.values()]
                if not got:
                    got.extend(src is not None for src in sources)
                for dst, src in zip(p_views, sources):
                    if src is not None:
                        dst.copy_(src)
                live[i].clear()
            backwards.append(self.recorder.record(backward))
            grad_outputs[i] = tuple(g_out)
            grad_inputs[i] = (g_in[0], g_in[1], t_grad)
            grad_params[i] = (p_views, got)
        backwards.reverse()
        self.recorder.done()
        self.stats.captures += 1
        self.stats.capture_seconds.append(time.perf_counter() - start)
        if hidden.is_cuda:
            self.stats.capture_bytes.append(torch.cuda.memory_reserved() - reserved)
        return _Form(forwards, backwards, outputs, grad_outputs, grad_inputs, grad_params, tuple(static_in),
                     [0] * k)


class _Replay(torch.autograd.Function):
    """One block by replay: its outputs are views of the shared buffers (new tensor objects each time), its
    gradients of hidden and context are views of the shared buffers too (the previous block's backward reads
    them at once), its parameters' gradients copies (autograd may keep them as `.grad`)."""

    @staticmethod
    def forward(ctx, chain: BlockChain, form: _Form, index: int, hidden, context, temb, *params):
        if index == 0:
            for static, t in zip(form.inputs, (hidden, context, temb)):
                static.copy_(t.detach())
            chain._temb_seen = temb.data_ptr()
        else:
            if temb.data_ptr() != chain._temb_seen:  # every block of SD3 reads the same temb: copied at block 0
                raise RuntimeError("the joint blocks' graphs need the same temb tensor through the chain")
            for static, t in zip(form.outputs[index - 1], (hidden, context)):
                if t.data_ptr() != static.data_ptr():  # (normally the previous block's output buffer itself)
                    static.copy_(t.detach())
        form.forwards[index]()
        form.generation[index] += 1
        ctx.chain, ctx.form, ctx.index, ctx.generation = chain, form, index, form.generation[index]
        ctx.inputs_need = (hidden.requires_grad, context.requires_grad, temb.requires_grad)
        return tuple(o.detach() for o in form.outputs[index])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        form, index = ctx.form, ctx.index
        if form.generation[index] != ctx.generation:
            raise RuntimeError("a joint block's graphed forward was replayed again before the backward of the "
                               "previous one")
        for static, g in zip(form.grad_outputs[index], grads):
            if g is None:
                static.zero_()
            elif g.data_ptr() != static.data_ptr():  # the next block's backward wrote it in place already
                static.copy_(g)
        form.backwards[index]()
        out = [g.detach() if need else None for g, need in zip(form.grad_inputs[index], ctx.inputs_need)]
        views, got = form.grad_params[index]
        return (None, None, None, *out, *copies(tuple(v if g else None for v, g in zip(views, got))))
