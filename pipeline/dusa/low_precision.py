"""Autocast's arithmetic without its per-tensor, per-window casts.

Under bf16 autocast (the reference's precision: float32 weights), every Linear and Conv weight is cast to
bf16 by every window's forward, and its bf16 gradient is cast back to float32 and added to the weight's
gradient by every window's backward: three kernels and two autograd nodes per tensor and window, some
two thousand per window for SD3-medium's blocks, which is most of what keeps the GPU waiting on the host.

`WorkingWeights` does the same arithmetic in bulk. The stage's adapted Linear/Conv weights live in one
flat float32 buffer; once per step one copy makes their bf16 working copies (one flat buffer: the same
rounding as autocast's cast), and the layers compute with those during each window's forward; after each
window's backward, the window's bf16 gradients are gathered by one multi-tensor copy and added to the
float32 gradients by one add (the same float32 sum of the same bf16 gradients as autocast's). The
optimizer sees the float32 parameters and gradients as before.

`cast_frozen_layers` handles frozen weights (the VAE): autocast casts them on every use, and nothing
changes them, so their Linear/Conv weights are stored in bf16 once.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

# The layers whose weights autocast computes with in bf16 (torch's lower-precision ops; DeepSpeed's list too).
LOW_PRECISION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def low_precision_slots(modules: Iterable[nn.Module], trainable: bool) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(layer, name, parameter) of every Linear/Conv parameter under `modules` that requires grad (or not)."""
    slots, seen = [], set()
    for root in modules:
        for layer in root.modules():
            if not isinstance(layer, LOW_PRECISION_LAYERS):
                continue
            for name, p in layer.named_parameters(recurse=False):
                if p.requires_grad == trainable and id(p) not in seen:
                    seen.add(id(p))
                    slots.append((layer, name, p))
    return slots


@torch.no_grad()
def cast_frozen_layers(modules: Iterable[nn.Module], dtype: torch.dtype = torch.bfloat16) -> int:
    """Stores the frozen Linear/Conv weights under `modules` in `dtype` (autocast would cast them to it on
    every use); norm layers keep theirs (autocast computes them in float32). Returns the tensors cast."""
    slots = low_precision_slots(modules, trainable=False)
    for _, _, p in slots:
        p.data = p.data.to(dtype)
    return len(slots)


class WorkingWeights:
    """bf16 working copies of a stage's adapted Linear/Conv weights, made once per step.

    Per step: `refresh()` before the first window; each window's forward inside `active()`; `fold()` after
    each window's backward; at an update, `release_unused()` before the optimizer step and `updated()` after
    it (the optimizer consumed the gradients); `drop()` forgets gradients that wait for an update.
    """

    def __init__(self, modules: Iterable[nn.Module], dtype: torch.dtype = torch.bfloat16):
        self.slots = low_precision_slots(modules, trainable=True)
        self.params = [p for _, _, p in self.slots]
        if not self.params:
            raise ValueError("no adapted Linear/Conv weights to keep working copies of")
        device = self.params[0].device
        if any(p.dtype != torch.float32 or p.device != device for p in self.params):
            raise ValueError("working copies need float32 weights on one device (the autocast preset)")
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        with torch.no_grad():
            # The float32 weights become views of one buffer (same values, same Parameter objects: the
            # optimizer, resets and checkpoints see no difference).
            self.master = torch.empty(total, dtype=torch.float32, device=device)
            self.master_views = list(self.master.split(sizes))
            for p, view in zip(self.params, self.master_views):
                view.copy_(p.data.reshape(-1))
                p.data = view.view_as(p)
        self.grad = torch.zeros(total, dtype=torch.float32, device=device)
        self.grad_views = [g.view_as(p) for g, p in zip(self.grad.split(sizes), self.params)]
        self.low = torch.empty(total, dtype=dtype, device=device)
        self.low_grad = torch.empty(total, dtype=dtype, device=device)
        self.low_grad_views = [g.view_as(p) for g, p in zip(self.low_grad.split(sizes), self.params)]
        # One leaf per weight, a view of the flat bf16 buffer: the window graphs' gradients land on these.
        self.leaves = [v.view_as(p).requires_grad_(True) for v, p in zip(self.low.split(sizes), self.params)]
        self.received = [False] * len(self.params)  # which weights got a gradient since the last update
        self._attached = False  # whether the parameters' gradients are the buffer's views, holding a sum
        self._empty = True  # no window folded into the float32 gradients since they were attached

    @property
    def numel(self) -> int:
        return self.master.numel()

    @torch.no_grad()
    def refresh(self) -> None:
        """The bf16 copies of the current float32 weights (one kernel), and the float32 gradients as views
        of one buffer: started anew after an update or a drop (the first fold writes it); kept while gradients
        of earlier images wait for an update (accumulation)."""
        self.low.copy_(self.master)
        if not self._attached:
            self._attached, self._empty = True, True
            for p, g in zip(self.params, self.grad_views):
                p.grad = g
            self.received = [False] * len(self.params)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The layers compute with the bf16 leaves (a forward's graph keeps them; leaving restores the
        float32 parameters for everything else: optimizer, checkpoints, the next refresh)."""
        for (layer, name, _), leaf in zip(self.slots, self.leaves):
            layer._parameters[name] = leaf
        try:
            yield
        finally:
            for layer, name, p in self.slots:
                layer._parameters[name] = p

    @torch.no_grad()
    def fold(self) -> None:
        """Adds the bf16 gradients of the window just back-propagated to the float32 gradients: one
        multi-tensor copy into one buffer and one add (exact: every bf16 value is a float32 value)."""
        got = [i for i, leaf in enumerate(self.leaves) if leaf.grad is not None]
        if not got:
            return
        if len(got) < len(self.leaves):
            self.low_grad.zero_()
        torch._foreach_copy_([self.low_grad_views[i] for i in got], [self.leaves[i].grad for i in got])
        if self._empty:  # the first window's: a copy (0 + g is g), no zeroing and reading of the buffer
            self.grad.copy_(self.low_grad)
            self._empty = False
        else:
            self.grad.add_(self.low_grad)
        for i in got:
            self.leaves[i].grad = None
            self.received[i] = True

    def release_unused(self) -> None:
        """Weights that got no gradient since the last update keep none (as under autocast, where the
        optimizer then leaves them and their state alone)."""
        for p, got in zip(self.params, self.received):
            if not got:
                p.grad = None

    def updated(self) -> None:
        """The optimizer consumed the gradients: the next refresh starts a new sum."""
        self._attached = False

    def drop(self) -> None:
        """Forgets gradients waiting for an update (a skipped NaN step, a task's leftovers)."""
        for leaf in self.leaves:
            leaf.grad = None
        for p in self.params:
            p.grad = None
        self._attached = False
