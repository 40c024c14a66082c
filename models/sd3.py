"""Stable Diffusion 3 pieces from a diffusers folder or hub id: the frozen VAE encoder and the transformer."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from safetensors import safe_open
from torch import nn

from models.checkpoints import load_checkpoint

WEIGHTS = "diffusion_pytorch_model.safetensors"


def resolve_subfolder(name_or_path: str, subfolder: str) -> Path:
    """A local diffusers folder's subfolder, or the hub snapshot of just that subfolder."""
    def find(name: str) -> Path:
        if Path(name).exists():
            if not (Path(name) / subfolder).is_dir():
                raise FileNotFoundError(f"no {subfolder}/ folder in it (expected the diffusers SD3 layout)")
            return Path(name) / subfolder
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=[f"{subfolder}/*"])) / subfolder
    return load_checkpoint(name_or_path, "generator", find)


class TransformerParts:
    """Loads pieces of an SD3 transformer checkpoint, reading only the tensors of each piece.

    A pipeline rank builds only its stage's blocks: the others are never read from the
    safetensors shards, so host memory holds one stage's weights, not the model's.
    """

    def __init__(self, name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """`device`: where the pieces are made and their tensors read to (a GPU: the checkpoint's 16-bit tensors
        travel, and are widened there, instead of float32 copies made on the host)."""
        self.folder = resolve_subfolder(name_or_path, "transformer")
        self.config = SD3Transformer2DModel.load_config(self.folder)
        self.dtype = dtype
        self.device = torch.device(device)
        index = self.folder / f"{WEIGHTS.removesuffix('.safetensors')}.safetensors.index.json"
        if index.is_file():
            self.weight_map = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / WEIGHTS).is_file():
            with safe_open(str(self.folder / WEIGHTS), framework="pt") as f:
                self.weight_map = {k: self.folder / WEIGHTS for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {WEIGHTS} (or its .index.json) in {self.folder}")
        self.loaded_keys: list[str] = []  # what was read, for tests and reports

    @functools.cached_property
    def _skeleton(self) -> SD3Transformer2DModel:
        with torch.device("meta"):  # shapes only, no memory
            return SD3Transformer2DModel.from_config(self.config)

    @property
    def num_blocks(self) -> int:
        return self.config["num_layers"]

    @property
    def out_channels(self) -> int:
        return self._skeleton.out_channels

    def _read(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        keys = [k for k in self.weight_map if k.startswith(prefixes)]
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted({self.weight_map[k] for k in keys}):
            with safe_open(str(file), framework="pt", device=str(self.device)) as f:
                for k in keys:
                    if self.weight_map[k] == file:
                        tensors[k] = f.get_tensor(k)
        self.loaded_keys += keys
        return tensors

    def load(self, name: str) -> nn.Module:
        """Submodule `name` (e.g. "pos_embed", "transformer_blocks.7"), built on the meta device and
        materialised with its own weights only."""
        # Cast on the meta device first: memory is allocated once, directly in the target dtype.
        module = self._skeleton.get_submodule(name).to(self.dtype).to_empty(device=self.device)
        if any(m._non_persistent_buffers_set for m in module.modules()):
            raise NotImplementedError(f"{name} has buffers that are not in the checkpoint")
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in self._read((prefix,)).items()}, strict=True)
        return module


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
        return cls(load_checkpoint(name_or_path, "generator (VAE)",
                                   lambda name: AutoencoderKL.from_pretrained(name, subfolder="vae")))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> latents [B, C, H/8, W/8] in float32."""
        dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode((2 * images - 1).to(dtype)).latent_dist.mean
        return (mean.float() - self.shift) * self.scale
