"""Random checkpoints of the published architectures (models/architectures.py), written one piece at a time:
a tiny config of the same kind loads like a real checkpoint and passes the pre-load checks."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from data.classes import ADE20K_CLASSES
from models.architectures import (GENERATORS, SD3_5_LARGE_TRANSFORMER, make_random_checkpoints,
                                  save_random_transformer)
from models.class_embeddings import load_class_embeddings
from models.sd3 import TransformerParts
from pipeline.run.checks import check_class_embedding_file, check_generator_files

TINY_LARGE = dict(SD3_5_LARGE_TRANSFORMER, num_layers=3, num_attention_heads=2, attention_head_dim=8,
                  caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=32,
                  sample_size=16)


def test_streamed_transformer_loads_like_a_saved_one(tmp_path):
    folder = tmp_path / "sd3.5" / "transformer"
    save_random_transformer(folder, TINY_LARGE, shard_bytes=40_000)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    assert not list(folder.glob("*.tmp"))
    reference = SD3Transformer2DModel(**TINY_LARGE)
    loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path / "sd3.5"), subfolder="transformer")
    assert sorted(index["weight_map"]) == sorted(reference.state_dict())  # every tensor, none more
    state = loaded.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    # The position table is the model's own sine-cosine table; RMS q/k gains are 1; weights are not constant.
    torch.testing.assert_close(state["pos_embed.pos_embed"].float(),
                               reference.pos_embed.pos_embed.to(torch.bfloat16).float())
    assert all(v.float().eq(1).all() for k, v in state.items() if ".norm_q." in k or ".norm_added_k." in k)
    assert state["transformer_blocks.1.ff.net.2.weight"].float().std() > 0
    # The pipeline's per-stage loader reads it, and the pre-load checks find every shape its config makes.
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  latent_channels=16, norm_num_groups=8).save_pretrained(tmp_path / "sd3.5" / "vae")
    assert check_generator_files(str(tmp_path / "sd3.5"))["num_layers"] == 3
    block = TransformerParts(str(tmp_path / "sd3.5")).load("transformer_blocks.2")
    assert block.attn.norm_q is not None and block.context_pre_only


def test_an_unfinished_folder_is_written_again(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "diffusion_pytorch_model-00001-of-00009.safetensors").write_bytes(b"cut short")
    save_random_transformer(folder, TINY_LARGE)
    assert not (folder / "diffusion_pytorch_model-00001-of-00009.safetensors").exists()
    assert (folder / "config.json").is_file()


def test_random_checkpoints_per_generator(tmp_path, monkeypatch):
    """The layout and cache of each generator (its configs swapped for tiny ones of the same kind)."""
    import models.architectures as architectures
    monkeypatch.setitem(GENERATORS, "sd3.5-large", TINY_LARGE)
    monkeypatch.setattr(architectures, "SD3_VAE", dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8))
    monkeypatch.setattr(architectures, "SEGFORMER_B5", dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                                             num_attention_heads=[1, 1, 2, 2],
                                                             decoder_hidden_size=32))
    paths = make_random_checkpoints(tmp_path, ADE20K_CLASSES, generator="sd3.5-large")
    assert paths["generator"].endswith("sd3.5-large")
    transformer = check_generator_files(paths["generator"])
    check_class_embedding_file(paths["class_embeddings"], ADE20K_CLASSES, paths["generator"], transformer)
    prompt, pooled = load_class_embeddings(paths["class_embeddings"], ADE20K_CLASSES, paths["generator"])
    assert prompt.shape == (150, 333, 32) and pooled.shape == (150, 32) and prompt.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown generator"):
        make_random_checkpoints(tmp_path, ADE20K_CLASSES, generator="sd4")
