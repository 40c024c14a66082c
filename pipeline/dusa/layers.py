"""The DUSA model as a flat list of pipeline layers (tuple in, tuple out).

    SegmenterFront  window -> its logits (from SegFormer's one whole-image forward per step), VAE latent,
                    noising, candidate classes
    SD3Embed        patch / timestep+pooled-text / caption embedding of the N class samples
    JointBlock x L  SD3's joint transformer blocks, unchanged
    SD3Head         norm_out, proj_out, unpatchify -> velocity per class sample
    DusaLoss        the loss of pipeline/dusa/loss.py on the last stage

The activations tuple after SD3Embed is
    (hidden_states, encoder_hidden_states, temb, logits, classes, mask, target, weight)
and the last joint block drops `encoder_hidden_states` (SD3's last block does not return it).

Stage boundaries may fall between any two layers, so every layer returns `pack(...)`: DeepSpeed
sends every floating tensor with the expectation of a gradient for it, so a float that does not
require grad travels as its integer bit-view (float32 <-> int32, bfloat16 <-> int16) and the next
layer restores it with `unpack(...)`. Genuine integers use other dtypes (int64 classes, uint8 mask).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch
from einops import rearrange
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.stateless import _reparametrize_module

from pipeline.run import timing
from pipeline.run.log import LOG
from pipeline.dusa.graphs import GraphedModule
from pipeline.dusa.loss import (area_k_candidates, area_scores, candidate_statistics, choose_candidates, dusa_loss,
                           logit_norm)
from pipeline.dusa.windows import (AdaptiveWindows, WindowDraw, WindowSampler, adaptive_boxes, entropy_map, resample_window,
                              float32_math, window_boxes, window_resampler)

_AS_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
_AS_FLOAT = {v: k for k, v in _AS_INT.items()}


def pack(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = []
    for t in tensors:
        t = t.contiguous()  # p2p sends refuse views
        if t.is_floating_point() and not t.requires_grad:
            if t.dtype not in _AS_INT:
                raise TypeError(f"pipeline tensors must be float32 or bfloat16, got {t.dtype}")
            t = t.view(_AS_INT[t.dtype])
        out.append(t)
    return tuple(out)


def unpack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.view(_AS_FLOAT[t.dtype]) if t.dtype in _AS_FLOAT else t for t in tensors)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class PreparedImage(NamedTuple):
    """What `SegmenterFront.begin_image` hands back for one step."""

    inputs: list[tuple[torch.Tensor, ...]]  # the front's inputs of each window micro-batch, on the device
    logits: torch.Tensor  # whole-image logits [1, C, h, w], detached: the scored prediction
    candidates: list[torch.Tensor]  # each window's candidate classes (host), for pictures
    windows: list[tuple[int, int, int]]  # each window's (top, left, side) in the image


class SegmenterFront(nn.Module):
    """Stage-0 front: SegFormer once per image, then per window the VAE latent, noising and candidates.

    Per step, in three parts:
    - `begin_image(image, windows)`, before the pipeline step: SegFormer's forward on the whole image
      (through CUDA graphs when `max_graphs` > 0 and on a GPU) and LogitNorm at its resolution; with
      adaptive windows, their placement from that forward's entropy; each window's normalised logits at
      latent resolution, its candidate classes (one host transfer for every window) and loss weight;
      and the micro-batches;
    - `forward(inputs)`, one per window micro-batch: the window's logits, a crop of one detached leaf
      of the whole-image normalised logits, and x_t / target from the frozen VAE;
    - `backward_segmenter()`, after the pipeline's backward of every window: the gradient that the
      windows left on the leaf goes through SegFormer in one backward.
    inputs: rows [s, h], cols [s, w] (window resamplers), pixel_rows long [side], pixel_cols long [side],
            noise [1, ch, s, s], t [1], classes long [N], mask uint8 [s, s], weight [1]
    outputs: x_t [1, ch, s, s], timestep [1] (= 1000 t), logits [C, s, s], classes, mask, target [ch, s, s],
             weight [1] (the window loss's factor: windows x its share of the image's loss / accumulation steps)
    """

    def __init__(self, segmenter: nn.Module, encoder: nn.Module, window_size: int, topk: int,
                 max_classes: int, min_classes: int, max_graphs: int = 0, ignore_classes: Sequence[int] = (),
                 area_k: int | None = None, area_threshold: float = 15.0, window_stride: int | None = None,
                 adaptive: AdaptiveWindows | None = None, compile_encoder: str | None = None):
        super().__init__()
        self.segmenter = segmenter
        self.encoder = encoder
        # torch.compile's backend for the VAE encoder (None: eager); the compiled function is made at first use
        # and kept beside the module, not in it (the state dict's names stay).
        self.compile_encoder = compile_encoder
        self._compiled_encoder = None
        self.window_size = window_size
        self.window_stride = window_size if window_stride is None else window_stride  # the adaptive fallback
        self.adaptive = adaptive  # None: the windows come from the runner (grid)
        self.topk, self.max_classes, self.min_classes = topk, max_classes, min_classes
        self.ignore_classes = torch.tensor(sorted(set(ignore_classes)), dtype=torch.long)
        self.area_k, self.area_threshold = area_k, area_threshold  # area_k None: the top-k rule
        self.max_graphs = max_graphs
        self.graphed: GraphedModule | None = None  # made on the first GPU step (after DeepSpeed placed the weights)
        self._image: torch.Tensor | None = None
        self._normed: torch.Tensor | None = None  # LogitNorm of the segmenter's output, holding its graph
        self._leaf: torch.Tensor | None = None  # float32 detached copy of it that the windows crop
        self._ignored = self.ignore_classes  # on the step's device

    def _run_segmenter(self, image: torch.Tensor) -> torch.Tensor:
        if self.max_graphs and image.is_cuda:
            if self.graphed is None:
                self.graphed = GraphedModule(self.segmenter, self.max_graphs)
            return self.graphed(image)
        return self.segmenter(image)

    def place_windows(self, image: torch.Tensor, logits: torch.Tensor) -> list[tuple[int, ...]]:
        """Adaptive windows (top, left, side) from the raw logits' entropy at the image's resolution, or the
        grid's corners when too few are found."""
        height, width = image.shape[-2:]
        raw = F.interpolate(logits.detach().float(), size=(height, width), mode="bilinear", align_corners=False)
        boxes = adaptive_boxes(entropy_map(raw[0]), self.adaptive)
        return boxes or window_boxes(height, width, self.window_size, self.window_stride)

    def begin_image(self, image: torch.Tensor, windows: Sequence[WindowDraw] | WindowSampler,
                    loss_scale: float = 1.0, window_tau: float | None = None) -> PreparedImage:
        """SegFormer's forward for the step; image [1, 3, H, W] in [0, 1] on the front's device.

        `windows`: each window's draw, or (adaptive windows) a function from the windows placed here to
        their draws. `loss_scale` multiplies every window's loss (1 / accumulation steps); `window_tau`
        None: the image's loss is the windows' mean, else their entropy-weighted sum.
        """
        adapt = any(p.requires_grad for p in self.segmenter.parameters())
        with torch.set_grad_enabled(adapt):
            logits = self._run_segmenter(image)  # [1, C, h, w] on the whole image (under the step's precision)
            with float32_math(image.device):
                normed = logit_norm(logits.float(), dim=1)  # at the segmenter's resolution, as the reference
        with float32_math(image.device):
            return self._prepare(image, logits, normed, windows, loss_scale, window_tau, adapt)

    def _prepare(self, image: torch.Tensor, logits: torch.Tensor, normed: torch.Tensor,
                 windows: Sequence[WindowDraw] | WindowSampler, loss_scale: float, window_tau: float | None,
                 adapt: bool) -> PreparedImage:
        self._image, self._normed = image, normed if adapt else None
        self._leaf = normed.detach().requires_grad_(adapt)
        draws = windows(self.place_windows(image, logits)) if callable(windows) else windows

        device, size = image.device, self.window_size
        latent = draws[0].noise.shape[-1] if draws else size // 8
        (height, width), (h, w) = image.shape[-2:], logits.shape[-2:]
        boxes = [(*d.corner, d.side or size) for d in draws]
        rows = [window_resampler(h, height, top, side, latent, device, scaled=size) for top, _, side in boxes]
        cols = [window_resampler(w, width, left, side, latent, device, scaled=size) for _, left, side in boxes]
        if len(self.ignore_classes):
            self._ignored = _to_device(self.ignore_classes, device)
        with torch.no_grad():
            rows_all, cols_all = torch.stack(rows), torch.stack(cols)
            if self.area_k is None:
                windows_latent = self._without_ignored(resample_window(self._leaf[0], rows_all, cols_all))
                top1, stats = candidate_statistics(windows_latent, self.topk)
            else:  # from the raw logits' probabilities
                raw = self._without_ignored(resample_window(logits[0].detach().float(), rows_all, cols_all))
                stats = area_scores(raw, self.area_k)
            weights = self._window_weights(logits, boxes, window_tau, loss_scale)
        with timing.phase("wait: candidate classes"):
            stats = stats.cpu()  # the step's one wait for the device: the class sets decide the batch shapes
        offsets = torch.arange(max(side for *_, side in boxes), device=device) if boxes else None
        batches, candidates = [], []
        for k, draw in enumerate(draws):
            if self.area_k is None:
                classes, kept = choose_candidates(stats[k], self.topk, self.max_classes, self.min_classes,
                                                  torch.Generator().manual_seed(draw.seed))
            else:
                classes, kept = area_k_candidates(stats[k], self.area_threshold), None
            mask = torch.ones(latent, latent, dtype=torch.uint8, device=device) if kept is None else \
                _to_device(kept, device)[top1[k]].to(torch.uint8)
            top, left, side = boxes[k]
            inputs = (rows[k], cols[k], offsets[:side] + top, offsets[:side] + left, _to_device(draw.noise, device),
                      _to_device(draw.t, device), _to_device(classes, device), mask, weights[k:k + 1])
            batches.append(inputs)
            candidates.append(classes)
        return PreparedImage(batches, logits.detach(), candidates, boxes)

    def _window_weights(self, logits: torch.Tensor, boxes: Sequence[tuple[int, int, int]],
                        tau: float | None, scale: float) -> torch.Tensor:
        """Each window's factor on its loss, [windows], times `scale`: 1 (the mean over windows), or windows
        x softmax over windows of H / tau, H the window's mean pixel entropy (softmax of the raw logits over
        all classes, at the generator's resolution) divided by ln C."""
        n = len(boxes)
        if tau is None:
            return torch.full((n,), scale, device=logits.device)
        raw = logits[0].detach().float()
        (height, width), (h, w), size = self._image.shape[-2:], raw.shape[-2:], self.window_size
        entropies = torch.stack([
            entropy_map(resample_window(raw, window_resampler(h, height, top, side, size, raw.device, scaled=size),
                                        window_resampler(w, width, left, side, size, raw.device, scaled=size))).mean()
            for top, left, side in boxes]) / math.log(raw.shape[0])
        return n * scale * torch.softmax(entropies / tau, dim=0)

    def forward(self, inputs):
        if self._leaf is None:
            raise RuntimeError("SegmenterFront.begin_image must run before the window micro-batches")
        rows, cols, pixel_rows, pixel_cols, noise, t, classes, mask, weight = inputs
        with float32_math(rows.device):
            logits_latent = self._without_ignored(resample_window(self._leaf[0], rows, cols))  # [C, s, s]
        window = self._image.index_select(2, pixel_rows).index_select(3, pixel_cols)
        if window.shape[-1] != self.window_size:  # an adaptive window, resized to the generator's size
            window = F.interpolate(window, size=(self.window_size,) * 2, mode="bilinear", align_corners=False)
        z0 = self._encode(window)  # float32, no grad
        noise = noise.float()
        x_t = (1 - t) * z0 + t * noise
        target = (noise - z0)[0]
        return pack(x_t, t * 1000, logits_latent, classes, mask, target, weight)

    def _encode(self, window: torch.Tensor) -> torch.Tensor:
        """The window's latent from the frozen VAE encoder: compiled (`compile_encoder`: one window shape, its
        group norms' statistics in fused reductions instead of eager's 32 rows on as many SMs: 4.5 against
        13.5 ms per 512 x 512 window on an H200, bench/vae_encoder.py), or eager."""
        if self.compile_encoder is None:
            return self.encoder(window)
        if self._compiled_encoder is None:
            LOG.info("compiling the VAE encoder (torch.compile: about 25 s on a first run, seconds from torch's cache "
                     "under /tmp later; --pipeline.compile_vae false: eager)")
            self._compiled_encoder = torch.compile(self.encoder.forward, backend=self.compile_encoder, dynamic=False,
                                                   **inductor_options(self.compile_encoder))
        try:
            return self._compiled_encoder(window)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no Triton or C compiler on this node
            LOG.warning(f"warning: the VAE encoder could not be compiled ({compile_failure(exc)}); it runs eagerly "
                        "(--pipeline.compile_vae false skips the attempt)")
            self.compile_encoder = self._compiled_encoder = None
            return self.encoder(window)

    def _without_ignored(self, logits: torch.Tensor) -> torch.Tensor:
        """Ignored classes' logits set to -inf along the class dimension (-3): never candidates."""
        if not len(self.ignore_classes):
            return logits
        return logits.index_fill(-3, self._ignored, float("-inf"))

    def backward_segmenter(self) -> bool:
        """One backward through LogitNorm and SegFormer with the gradient the windows accumulated on the
        leaf; False when there was nothing to do (a frozen segmenter, or no window reached the leaf)."""
        normed, leaf = self._normed, self._leaf
        self._normed = self._image = None  # the graph is used once
        if normed is None or leaf is None or leaf.grad is None:
            return False
        normed.backward(leaf.grad)
        return True


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the device (pinned memory, asynchronous copy)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class SD3Embed(nn.Module):
    """SD3's input embeddings for the N candidate classes; the class-embedding table stays fixed, and
    with `learnable_pooled` one learnable vector (zeros at first) is added to every pooled embedding."""

    def __init__(self, pos_embed: nn.Module, time_text_embed: nn.Module, context_embedder: nn.Module,
                 prompt_embeds: torch.Tensor, pooled: torch.Tensor, learnable_pooled: bool = False):
        super().__init__()
        self.pos_embed = pos_embed
        self.time_text_embed = time_text_embed
        self.context_embedder = context_embedder
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)
        self.pooled_offset = nn.Parameter(torch.zeros(pooled.shape[-1], dtype=pooled.dtype)) \
            if learnable_pooled else None

    def forward(self, inputs):
        x_t, timestep, logits, classes, mask, target, weight = unpack(inputs)
        dtype = _param_dtype(self.context_embedder)
        n = classes.shape[0]
        # Every class sample shares x_t: embed it once and broadcast.
        hidden_states = self.pos_embed(x_t.to(dtype)).expand(n, -1, -1)
        pooled = self.pooled[classes]
        if self.pooled_offset is not None:
            pooled = pooled + self.pooled_offset
        # The timestep stays float32: the sinusoidal projection needs its precision (bf16 rounds 1000 t).
        temb = self.time_text_embed(timestep.expand(n), pooled.to(dtype))
        encoder_hidden_states = self.context_embedder(self.prompt_embeds[classes].to(dtype))
        return pack(hidden_states, encoder_hidden_states, temb, logits, classes, mask, target, weight)


# SDPA's backends by their names in `pipeline.attention_backend`.
ATTENTION_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_order(first: str) -> list[SDPBackend] | None:
    """SDPA's backends in the order torch tries them: `first` ahead of the others, which stay as fallbacks
    for shapes or cards it does not take ("default": None, torch's own order)."""
    if first == "default":
        return None
    if first not in ATTENTION_BACKENDS:
        raise ValueError(f"pipeline.attention_backend {first!r}: one of {', '.join(ATTENTION_BACKENDS)}, default")
    return [ATTENTION_BACKENDS[first]] + [b for name, b in ATTENTION_BACKENDS.items() if name != first]


# torch.compile's inductor options for pipeline.compile_blocks and compile_vae: eager's bf16 roundings kept.
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def inductor_options(backend) -> dict:
    """torch.compile's keyword arguments for `backend`: INDUCTOR_OPTIONS for inductor, none for another."""
    return {"options": INDUCTOR_OPTIONS} if backend == "inductor" else {}


def compile_failure(exc: Exception) -> str:
    """One line for a failed compile: the compiler's own exception and the first line of its message."""
    cause = getattr(exc, "inner_exception", None) or exc
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"


def block_forward_in_order(order: tuple[SDPBackend, ...], block: nn.Module, **kwargs):
    """`block`'s forward with SDPA's backends tried in `order`, eager or compiled: compiled, the order is inside
    what torch.compile traces (dynamo's guards and torch's compile caches do not see SDPA's settings around a
    compiled call, so code compiled under one setting would run under another; seen on an H200: cuDNN's code
    kept under `flash`)."""
    with sdpa_kernel(list(order), set_priority=True):
        return block(**kwargs)


class JointBlock(nn.Module):
    """One SD3 joint transformer block, adapted to tuples; `compile_backend` (e.g. "inductor"): the block runs
    through torch.compile, the class samples' count marked dynamic (every block of the same form shares the
    compiled code; a BlockChain records the compiled block at the counts it replays); `attention`: SDPA's
    backends in the order to try them (`attention_order`; None: torch's own). The backward runs in the
    backend its forward chose."""

    def __init__(self, block: nn.Module, compile_backend: str | None = None,
                 attention: list[SDPBackend] | None = None):
        super().__init__()
        self.block = block
        self.attention = attention
        self.compile_backend = compile_backend
        self._compiled_forward = None

    compile_failure: str | None = None  # once torch.compile failed for one block, every block runs eagerly
    compile_announced = False  # the first compile is said in one line (the first window waits for it)

    @property
    def compiled(self) -> bool:
        return self.compile_backend is not None and JointBlock.compile_failure is None

    def compiled_forward(self, **kwargs):
        # Kept beside the module (not a submodule: the state dict's names stay); made at first use (start-up
        # imports no compiler). Inductor rounds to bf16 wherever eager would (emulate_precision_casts): without
        # it fused intermediates stay float32, and the gradients drift from the reference's far beyond the
        # kernels' own spread. The class count is marked dynamic before the first call (no code specialised
        # to one count; 1 is specialised by torch).
        for name in ("hidden_states", "encoder_hidden_states", "temb"):
            torch._dynamo.maybe_mark_dynamic(kwargs[name], 0)
        if self._compiled_forward is None:
            if not JointBlock.compile_announced:
                JointBlock.compile_announced = True
                LOG.info("compiling the joint blocks (torch.compile: about 35 s on a first run, seconds from torch's "
                         "cache under /tmp later; --pipeline.compile_blocks false: eager)")
            compiled = torch.compile(
                self.block.forward if self.attention is None else block_forward_in_order,
                backend=self.compile_backend, dynamic=None, **inductor_options(self.compile_backend))
            self._compiled_forward = compiled if self.attention is None else \
                functools.partial(compiled, tuple(self.attention), self.block)
        try:
            return self._compiled_forward(**kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no Triton or C compiler on this node
            JointBlock.compile_failure = compile_failure(exc)
            LOG.warning(f"warning: the joint blocks could not be compiled ({JointBlock.compile_failure}); they run "
                        "eagerly (--pipeline.compile_blocks false skips the attempt)")
            return self.eager_forward(**kwargs)

    def eager_forward(self, **kwargs):
        return self.block(**kwargs) if self.attention is None else \
            block_forward_in_order(tuple(self.attention), self.block, **kwargs)

    @property
    def run(self):
        """The block's forward as it runs unreplayed (and as a BlockChain records it): compiled, or eager; in
        the chosen attention order either way."""
        return self.compiled_forward if self.compiled else self.eager_forward

    chain = None  # a BlockChain (pipeline/dusa/block_graphs.py) that replays this block, and its place in it
    chain_index = 0

    def forward(self, inputs):
        hidden_states, encoder_hidden_states, temb, *rest = unpack(inputs)
        if self.chain is not None:
            if self.chain_index == 0:
                self.chain.begin_window(hidden_states, encoder_hidden_states, temb)
            out = self.chain.block(self.chain_index, hidden_states, encoder_hidden_states, temb)
            if out is not None:
                return pack(*out, temb, *rest)
        encoder_hidden_states, hidden_states = self.run(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)
        if self.block.context_pre_only:  # the last block returns no text stream
            return pack(hidden_states, temb, *rest)
        return pack(hidden_states, encoder_hidden_states, temb, *rest)


def run_joint_block(layer: JointBlock, block, params: dict, hidden_states, encoder_hidden_states, temb):
    """`layer`'s diffusers block on `params` (name -> tensor), compiled when the layer is: (hidden,), or
    (hidden, context) when the block keeps a text stream; what pipeline/dusa/block_graphs.py records."""
    # The parameters swapped in as torch.func.functional_call does (compiled code takes them as inputs).
    with _reparametrize_module(block, params):
        encoder_hidden_states, hidden_states = layer.run(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)
    return (hidden_states,) if block.context_pre_only else (hidden_states, encoder_hidden_states)


def chain_joint_blocks(layers, max_forms: int, max_classes: int, recorder=None, capture_after: int = 2):
    """Replays `layers`' joint blocks (consecutive, in order) through one BlockChain; returns it (None: none)."""
    from pipeline.dusa.block_graphs import BlockChain
    blocks = [layer for layer in layers if isinstance(layer, JointBlock)]
    if not blocks or max_forms < 1:
        return None
    by_block = {id(b.block): b for b in blocks}
    chain = BlockChain([b.block for b in blocks],
                       lambda block, params, h, c, t: run_joint_block(by_block[id(block)], block, params, h, c, t),
                       max_forms, max_classes, capture_after=capture_after, recorder=recorder)
    for i, b in enumerate(blocks):
        b.chain, b.chain_index = chain, i
    return chain


class SD3Head(nn.Module):
    """SD3's output layers: modulated norm, projection and unpatchify to [N, ch, h, w]."""

    def __init__(self, norm_out: nn.Module, proj_out: nn.Module, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_out = norm_out
        self.proj_out = proj_out
        self.patch_size = patch_size
        self.out_channels = out_channels

    def forward(self, inputs):
        hidden_states, temb, logits, classes, mask, target, weight = unpack(inputs)
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        p = self.patch_size  # unpatchify: tokens in rows of patches, each patch p x p x channels
        velocity = rearrange(hidden_states, "n (h w) (p q c) -> n c (h p) (w q)", h=mask.shape[0] // p, p=p, q=p,
                             c=self.out_channels)
        return pack(velocity, logits, classes, mask, target, weight)


class DusaLoss:
    """The pipeline's loss_fn: DeepSpeed calls it on the last stage with the head's outputs."""

    def __init__(self, temperature: float = 1.0, uniform: bool = False):
        self.temperature, self.uniform = temperature, uniform
        self.__name__ = "dusa_loss"  # DeepSpeed prints the loss by this name

    def __call__(self, outputs, labels):
        velocity, logits, classes, mask, target, weight = unpack(outputs)
        # DeepSpeed averages the windows' losses: the weight makes that average the image's loss.
        return weight[0] * dusa_loss(logits, classes, mask.bool(), velocity, target, self.temperature,
                                     self.uniform)
