"""The DUSA model as a flat list of pipeline layers (tuple in, tuple out).

    SegmenterFront  image -> SegFormer logits, VAE latent, noising, candidate classes
    SD3Embed        patch / timestep+pooled-text / caption embedding of the N class samples
    JointBlock x L  SD3's joint transformer blocks, unchanged
    SD3Head         norm_out, proj_out, unpatchify -> velocity per class sample
    DusaLoss        the loss of pipeline/loss.py on the last stage

The activations tuple after SD3Embed is
    (hidden_states, encoder_hidden_states, temb, logits, classes, mask, target)
and the last joint block drops `encoder_hidden_states` (SD3's last block does not return it).

Stage boundaries may fall between any two layers, so every layer returns `pack(...)`: DeepSpeed
sends every floating tensor with the expectation of a gradient for it, so a float that does not
require grad travels as its integer bit-view (float32 <-> int32, bfloat16 <-> int16) and the next
layer restores it with `unpack(...)`. Genuine integers use other dtypes (int64 classes, uint8 mask).
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.loss import dusa_loss, select_candidates

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


class SegmenterFront(nn.Module):
    """Stage-0 front of one window.

    inputs: image [1, 3, H, W] in [0, 1] (whole resized image), corner long [2] (top, left),
            noise [1, ch, h, w], t [1] (flow time in [0, 1]), seed long [1] (candidate sampling)
    outputs: x_t [1, ch, h, w], timestep [1] (= 1000 t), logits [C, h, w], classes long [N],
             mask uint8 [h, w], target [ch, h, w]
    The whole-image logits of the latest forward are kept in `last_logits` (detached): they are the
    scored prediction (weights do not change within a step, so every window sees the same ones);
    each window's candidate classes go to `candidates`.
    """

    def __init__(self, segmenter: nn.Module, encoder: nn.Module, window_size: int, topk: int,
                 max_classes: int, min_classes: int):
        super().__init__()
        self.segmenter = segmenter
        self.encoder = encoder
        self.window_size = window_size
        self.topk, self.max_classes, self.min_classes = topk, max_classes, min_classes
        self.last_logits: torch.Tensor | None = None
        # Candidate classes of the latest windows, in forward order (for pictures); bounded.
        self.candidates: deque[torch.Tensor] = deque(maxlen=256)

    def forward(self, inputs):
        image, corner, noise, t, seed = inputs
        size = self.window_size
        logits = self.segmenter(image)  # [1, C, H/4, W/4], on the whole image
        self.last_logits = logits.detach()
        # Window crop by index tensors: no host sync for the window's position.
        offsets = torch.arange(size, device=image.device)
        rows, cols = corner[0] + offsets, corner[1] + offsets
        full = F.interpolate(logits.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
        window_logits = full.index_select(2, rows).index_select(3, cols)
        latent_size = noise.shape[-2:]
        logits_latent = F.interpolate(window_logits, size=latent_size, mode="bilinear", align_corners=False)[0]

        window = image.index_select(2, rows).index_select(3, cols)
        z0 = self.encoder(window)  # float32, no grad
        noise = noise.float()
        x_t = (1 - t) * z0 + t * noise
        target = (noise - z0)[0]

        generator = torch.Generator().manual_seed(int(seed.item()))
        classes, mask = select_candidates(logits_latent, self.topk, self.max_classes, self.min_classes, generator)
        self.candidates.append(classes)
        return pack(x_t, t * 1000, logits_latent, classes, mask.to(torch.uint8), target)


class SD3Embed(nn.Module):
    """SD3's input embeddings for the N candidate classes; the class-embedding table stays fixed."""

    def __init__(self, pos_embed: nn.Module, time_text_embed: nn.Module, context_embedder: nn.Module,
                 prompt_embeds: torch.Tensor, pooled: torch.Tensor):
        super().__init__()
        self.pos_embed = pos_embed
        self.time_text_embed = time_text_embed
        self.context_embedder = context_embedder
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)

    def forward(self, inputs):
        x_t, timestep, logits, classes, mask, target = unpack(inputs)
        dtype = _param_dtype(self.context_embedder)
        n = classes.shape[0]
        # Every class sample shares x_t: embed it once and broadcast.
        hidden_states = self.pos_embed(x_t.to(dtype)).expand(n, -1, -1)
        # The timestep stays float32: the sinusoidal projection needs its precision (bf16 rounds 1000 t).
        temb = self.time_text_embed(timestep.expand(n), self.pooled[classes].to(dtype))
        encoder_hidden_states = self.context_embedder(self.prompt_embeds[classes].to(dtype))
        return pack(hidden_states, encoder_hidden_states, temb, logits, classes, mask, target)


class JointBlock(nn.Module):
    """One SD3 joint transformer block, adapted to tuples."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, inputs):
        hidden_states, encoder_hidden_states, temb, *rest = unpack(inputs)
        encoder_hidden_states, hidden_states = self.block(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)
        if self.block.context_pre_only:  # the last block returns no text stream
            return pack(hidden_states, temb, *rest)
        return pack(hidden_states, encoder_hidden_states, temb, *rest)


class SD3Head(nn.Module):
    """SD3's output layers: modulated norm, projection and unpatchify to [N, ch, h, w]."""

    def __init__(self, norm_out: nn.Module, proj_out: nn.Module, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_out = norm_out
        self.proj_out = proj_out
        self.patch_size = patch_size
        self.out_channels = out_channels

    def forward(self, inputs):
        hidden_states, temb, logits, classes, mask, target = unpack(inputs)
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        n, p, c = hidden_states.shape[0], self.patch_size, self.out_channels
        h, w = mask.shape[0] // p, mask.shape[1] // p
        velocity = hidden_states.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h * p, w * p)
        return pack(velocity, logits, classes, mask, target)


class DusaLoss:
    """The pipeline's loss_fn: DeepSpeed calls it on the last stage with the head's outputs."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.__name__ = "dusa_loss"  # DeepSpeed prints the loss by this name

    def __call__(self, outputs, labels):
        velocity, logits, classes, mask, target = unpack(outputs)
        return dusa_loss(logits, classes, mask.bool(), velocity, target, self.temperature)
