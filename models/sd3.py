"""Stable Diffusion 3 pieces from a diffusers folder or hub id: the frozen VAE encoder and the transformer."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import nn


def load_transformer(name_or_path: str) -> SD3Transformer2DModel:
    return SD3Transformer2DModel.from_pretrained(name_or_path, subfolder="transformer")


class LatentEncoder(nn.Module):
    """z0 = (E(2x - 1).mean - shift) * scale with the VAE's own shift and scale; frozen, no grad."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        vae.decoder = None  # never used here: do not keep its weights on the GPU
        self.vae = vae.eval().requires_grad_(False)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.scale = float(vae.config.scaling_factor)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "LatentEncoder":
        return cls(AutoencoderKL.from_pretrained(name_or_path, subfolder="vae"))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> latents [B, C, H/8, W/8] in float32."""
        dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode((2 * images - 1).to(dtype)).latent_dist.mean
        return (mean.float() - self.shift) * self.scale
