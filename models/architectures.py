"""The published architectures with random weights, for benchmarks and full-size checks.

Configs are those of SD3-medium and SD3.5-large (diffusers layout; same VAE and text encoders) and
SegFormer-B5 fine-tuned on ADE20K; the checkpoints are saved like the real ones (sharded safetensors with
an index), so everything downstream loads them the same way. The transformer is written one piece at a
time (a joint block, an embedding), so an 8 B-parameter model never has two copies in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from safetensors.torch import save_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from models.checkpoints import readable_weights
from models.class_embeddings import save_class_embeddings

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192)
# stabilityai/stable-diffusion-3.5-large: 38 joint blocks of 38 heads x 64, RMS q/k norm, no dual attention.
SD3_5_LARGE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=())
GENERATORS = {"sd3-medium": SD3_MEDIUM_TRANSFORMER, "sd3.5-large": SD3_5_LARGE_TRANSFORMER}
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
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            generator: str = "sd3-medium") -> dict[str, str]:
    """SegFormer-B5, an SD3 (`generator`: a key of GENERATORS; transformer + VAE) and its class-embedding
    cache, random, under root; what is there already is kept."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}: one of {', '.join(GENERATORS)}")
    root = Path(root)
    paths = {"segmenter": str(root / "segformer-b5"), "generator": str(root / generator),
             "class_embeddings": str(root / f"{generator}-classes.safetensors")}
    config = GENERATORS[generator]
    torch.manual_seed(seed)
    if not (root / "segformer-b5" / "config.json").is_file():
        segformer = SegformerConfig(**SEGFORMER_B5, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                                    label2id={n: i for i, n in enumerate(class_names)})
        SegformerForSemanticSegmentation(segformer).save_pretrained(paths["segmenter"])
    if not (root / generator / "transformer" / "config.json").is_file():
        # random init of billions of parameters is minutes on a CPU, seconds on a GPU
        save_random_transformer(root / generator / "transformer", config, device, dtype, seed)
    if not (root / generator / "vae" / "config.json").is_file():
        AutoencoderKL(**SD3_VAE).save_pretrained(root / generator / "vae")
    if not Path(paths["class_embeddings"]).is_file():
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randn(len(class_names), SD3_TEXT_TOKENS, config["joint_attention_dim"], generator=g).to(dtype)
        pooled = torch.randn(len(class_names), config["pooled_projection_dim"], generator=g).to(dtype)
        save_class_embeddings(paths["class_embeddings"], prompt, pooled, class_names, paths["generator"],
                              template="random (benchmark)")
    readable_weights(root)
    return paths


WEIGHTS = "diffusion_pytorch_model"


def save_random_transformer(folder: str | Path, config: dict, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0, shard_bytes: int = 5 * 2**30) -> Path:
    """An SD3Transformer2DModel of `config` with random weights (torch's default initialisation, as the model's
    own constructor gives), saved in diffusers' sharded layout: `diffusion_pytorch_model-0000i-of-0000n.safetensors`,
    their index and config.json (written last: a folder without it is unfinished). Each top-level piece (an
    embedding, a joint block, the head) is made on `device`, cast to `dtype` and moved to the current shard, then
    freed: memory holds one piece and one shard (at most `shard_bytes`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{WEIGHTS}*"):  # an unfinished earlier attempt
        old.unlink()
    with torch.device("meta"):
        skeleton = SD3Transformer2DModel(**config)
    pieces = ["pos_embed", "time_text_embed", "context_embedder"]
    pieces += [f"transformer_blocks.{i}" for i in range(config["num_layers"])] + ["norm_out", "proj_out"]
    torch.manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    shards: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(folder / f"{WEIGHTS}-part{len(shards)}.tmp"), metadata={"format": "pt"})
            shards.append(list(shard))
            shard, size = {}, 0

    for name in pieces:
        module = skeleton.get_submodule(name).to_empty(device=device)
        _initialise(module)
        tensors = {f"{name}.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in module.state_dict().items()}
        module.to("meta")
        for key, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
            shard[key] = tensor
            size, total = size + nbytes, total + nbytes
        del tensors
    flush()
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"{WEIGHTS}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"{WEIGHTS}-part{i}.tmp", folder / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    skeleton.save_config(folder)
    return folder


@torch.no_grad()
def _initialise(module: torch.nn.Module) -> None:
    """Fresh values for a module materialised with `to_empty`: torch's default initialisation where a layer
    has one (Linear, Conv2d, LayerNorm), ones for the other norms' gains (RMSNorm), the sine-cosine table of
    a patch embedding."""
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m._parameters:
            m.reset_parameters()
        elif m._parameters:
            for name, p in m._parameters.items():
                if p is not None:
                    p.fill_(1.0) if name == "weight" and "Norm" in type(m).__name__ else p.normal_(0.0, 0.02)
        if isinstance(m, PatchEmbed) and m.pos_embed is not None:
            table = get_2d_sincos_pos_embed(m.proj.out_channels, m.pos_embed_max_size or m.height,
                                            base_size=m.base_size, interpolation_scale=m.interpolation_scale,
                                            output_type="pt")
            m.pos_embed.copy_(table.float().unsqueeze(0))
