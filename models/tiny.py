"""Tiny checkpoints of the real architectures, for the demo and the tests.

They are built from real configs with random weights and saved in the same layouts as the
published checkpoints, so every run loads them through the real `from_pretrained` paths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from models.class_embeddings import save_class_embeddings

# Text-embedding widths of the tiny SD3 (the real ones are 4096 and 2048, with 333 tokens).
TINY_JOINT_DIM = 32
TINY_POOLED_DIM = 32
TINY_TEXT_TOKENS = 12


def make_tiny_segformer(path: str | Path, class_names: Sequence[str], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 2, 2], mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=32,
        # Live dropout/drop-path in train mode, so tests can tell that TTA runs in eval behaviour.
        drop_path_rate=0.1, classifier_dropout_prob=0.1,
        num_labels=len(class_names), id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)})
    SegformerForSemanticSegmentation(config).save_pretrained(path)
    return Path(path)


def make_tiny_sd3(path: str | Path, num_layers: int = 4, seed: int = 0, **transformer_kwargs) -> Path:
    """A diffusers-layout SD3 folder (`transformer/`, `vae/`) with tiny widths."""
    torch.manual_seed(seed)
    heads, head_dim = 2, 8
    config = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
                  attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TINY_JOINT_DIM,
                  caption_projection_dim=heads * head_dim, pooled_projection_dim=TINY_POOLED_DIM,
                  pos_embed_max_size=32)
    config.update(transformer_kwargs)
    SD3Transformer2DModel(**config).save_pretrained(Path(path) / "transformer")
    # 4 levels: the VAE downsamples by 8 like SD3's, with 16 latent channels and SD3's shift/scale.
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                  layers_per_block=1, latent_channels=16, norm_num_groups=8, shift_factor=0.0609,
                  scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
                  ).save_pretrained(Path(path) / "vae")
    return Path(path)


def make_random_class_embeddings(path: str | Path, class_names: Sequence[str], model: str, seed: int = 0) -> Path:
    """A cache in the real format holding random embeddings (stands in for tiny text encoders)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(len(class_names), TINY_TEXT_TOKENS, TINY_JOINT_DIM, generator=g)
    pooled = torch.randn(len(class_names), TINY_POOLED_DIM, generator=g)
    return save_class_embeddings(path, prompt, pooled, class_names, model, template="random (tiny demo)")


def ensure_demo_models(segmenter: str, generator: str, class_embeddings: str, class_names: Sequence[str]) -> None:
    """Builds the tiny checkpoints at the configured paths unless they are already there."""
    if not (Path(segmenter) / "config.json").is_file():
        make_tiny_segformer(segmenter, class_names)
    if not (Path(generator) / "transformer" / "config.json").is_file():
        make_tiny_sd3(generator)
    if not Path(class_embeddings).is_file():
        make_random_class_embeddings(class_embeddings, class_names, generator)
