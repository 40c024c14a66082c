"""The published architectures with random weights, for benchmarks and full-size checks.

Configs are those of SD3-medium (diffusers layout) and SegFormer-B5 fine-tuned on ADE20K; the
checkpoints are saved like the real ones, so everything downstream loads them the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from models.class_embeddings import save_class_embeddings

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False)
SEGFORMER_B5 = dict(
    depths=[3, 6, 40, 3], sr_ratios=[8, 4, 2, 1], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
    mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=768, drop_path_rate=0.1, classifier_dropout_prob=0.1)
SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens


def make_random_checkpoints(root: str | Path, class_names: Sequence[str], device: str = "cpu",
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, str]:
    """SegFormer-B5, SD3-medium (transformer + VAE) and a class-embedding cache, random, under root."""
    root = Path(root)
    paths = {"segmenter": str(root / "segformer-b5"), "generator": str(root / "sd3-medium"),
             "class_embeddings": str(root / "sd3-medium-classes.safetensors")}
    torch.manual_seed(seed)
    if not (root / "segformer-b5" / "config.json").is_file():
        config = SegformerConfig(**SEGFORMER_B5, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                                 label2id={n: i for i, n in enumerate(class_names)})
        SegformerForSemanticSegmentation(config).save_pretrained(paths["segmenter"])
    if not (root / "sd3-medium" / "transformer" / "config.json").is_file():
        with torch.device(device):  # random init of 2 B parameters is minutes on a CPU, seconds on a GPU
            transformer = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER).to(dtype)
        transformer.save_pretrained(root / "sd3-medium" / "transformer")
        del transformer
        AutoencoderKL(**SD3_VAE).save_pretrained(root / "sd3-medium" / "vae")
    if not Path(paths["class_embeddings"]).is_file():
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randn(len(class_names), SD3_TEXT_TOKENS, SD3_MEDIUM_TRANSFORMER["joint_attention_dim"],
                             generator=g).to(dtype)
        pooled = torch.randn(len(class_names), SD3_MEDIUM_TRANSFORMER["pooled_projection_dim"], generator=g).to(dtype)
        save_class_embeddings(paths["class_embeddings"], prompt, pooled, class_names, paths["generator"],
                              template="random (benchmark)")
    return paths
