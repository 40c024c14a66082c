"""Tiny checkpoints of the real architectures, for the demo and the tests.

They are built from real configs with random weights and saved in the same layouts as the
published checkpoints, so every run loads them through the real `from_pretrained` paths.
"""
from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, SegformerConfig,
                          SegformerForSemanticSegmentation, T5Config, T5EncoderModel, T5Tokenizer)

from models.checkpoints import readable_weights
from models.class_embeddings import DEFAULT_TEMPLATE, write_class_embeddings

# Text-embedding widths of the tiny SD3 (the real ones are 4096 and 2048, with 77 + 256 = 333 tokens).
TINY_JOINT_DIM = 32
TINY_POOLED_DIM = 32
# CLIP-L / CLIP-G projection widths: their pooled outputs are concatenated into SD3's pooled vector.
TINY_CLIP_PROJECTION_DIMS = (12, 20)
# CLIP-L / CLIP-G hidden widths: concatenated (24) and zero-padded to the T5 width, as in SD3 (2048 -> 4096).
TINY_CLIP_HIDDEN_DIMS = (8, 16)
CLIP_TOKENS = 77
TINY_T5_TOKENS = 8  # the demo cache's T5 length (SD3 uses 256); keeps the demo fast
TINY_TEXT_TOKENS = CLIP_TOKENS + TINY_T5_TOKENS
assert sum(TINY_CLIP_PROJECTION_DIMS) == TINY_POOLED_DIM and sum(TINY_CLIP_HIDDEN_DIMS) <= TINY_JOINT_DIM


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
    return readable_weights(path)


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
    return readable_weights(path)


def _tiny_clip(path: Path, hidden: int, projection: int, act: str, pad_token: str) -> None:
    """A character-level CLIP tokenizer (BPE without merges) and a 2-layer CLIP text model."""
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]  # CLIP lowercases
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1  # special tokens last, as in the real CLIP vocabulary
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_TOKENS, pad_token=pad_token)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, projection_dim=projection,
                            intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=CLIP_TOKENS, hidden_act=act, bos_token_id=bos,
                            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(path.parent / path.name.replace("text_encoder", "tokenizer"))
    CLIPTextModelWithProjection(config).save_pretrained(path)


def make_tiny_text_encoders(path: str | Path, seed: int = 0) -> Path:
    """Adds SD3's three text stacks, tiny, to a diffusers-layout SD3 folder: `text_encoder{,_2,_3}` and
    `tokenizer{,_2,_3}`, with widths that fit the tiny transformer of `make_tiny_sd3`."""
    path = Path(path)
    torch.manual_seed(seed)
    # CLIP-L pads with its end token, CLIP-G (tokenizer_2) with "!", as the SD3 checkpoints do.
    _tiny_clip(path / "text_encoder", TINY_CLIP_HIDDEN_DIMS[0], TINY_CLIP_PROJECTION_DIMS[0], "quick_gelu",
               "<|endoftext|>")
    _tiny_clip(path / "text_encoder_2", TINY_CLIP_HIDDEN_DIMS[1], TINY_CLIP_PROJECTION_DIMS[1], "gelu", "!")
    # T5: a character-level Unigram vocabulary behind the real layout <pad>=0, </s>=1, <unk>=2.
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(path / "tokenizer_3")
    config = T5Config(vocab_size=len(pieces), d_model=TINY_JOINT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path / "text_encoder_3")
    return readable_weights(path)


def has_text_encoders(path: str | Path) -> bool:
    return all((Path(path) / f"{kind}{suffix}").is_dir()
               for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3"))


def ensure_demo_models(segmenter: str, generator: str | None, class_embeddings: str | None,
                       class_names: Sequence[str]) -> None:
    """Builds the tiny checkpoints at the given paths unless they are already there (generator None: the
    segmenter only). For paths a program chose; the launcher goes through `build_demo_models`."""
    if not (Path(segmenter) / "config.json").is_file():
        make_tiny_segformer(segmenter, class_names)
    if generator is None:
        return
    if not (Path(generator) / "transformer" / "config.json").is_file():
        make_tiny_sd3(generator)
    if class_embeddings is not None and not Path(class_embeddings).is_file():
        make_tiny_class_embeddings(class_embeddings, class_names, generator)


# The demo's own asset folder (ds_configs/demo.json's model paths), relative to where the run starts, as
# data.demo.DEMO_ROOT; and the marker the builder leaves in any other folder it builds in.
DEMO_ASSETS = Path("demo_assets")
ASSETS_MARKER = ".demo_assets"
# owner/name, the shape of a hub id: a folder of that name would shadow the real model for every run started here.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_id_shaped(name: str) -> bool:
    """Whether `name` reads as owner/name, also once normalised (`./org/model`) or taken relative to the working
    folder (an absolute path into it): the forms in which a folder there would be loaded for a hub id."""
    forms = {str(name), os.path.normpath(str(name))}
    try:
        forms.add(os.path.relpath(Path(name).resolve(), Path.cwd().resolve()))
    except ValueError:  # another drive
        pass
    return any(_HUB_ID.fullmatch(form) for form in forms)


def _under_demo_assets(path: Path) -> bool:
    return path.resolve().is_relative_to(DEMO_ASSETS.resolve())


def check_demo_model_path(path: str, option: str, folder: bool = True) -> None:
    """Raises unless `model.build_demo_models` may build a random tiny model at `path`: under the demo's own
    asset folder (`demo_assets/`); else, never at a path shaped like a hub id, and only in an existing empty
    folder or beside models the demo built before (its marker in the parent folder). A typo or a real
    model's name never gets a random model that later runs would load under that name."""
    target = Path(path)
    if _under_demo_assets(target):
        return
    if folder and hub_id_shaped(path):
        raise ValueError(f"{option} {path} holds no model and looks like a hub id: the demo never builds its random "
                         f"models there (the folder would stand in for the real model); use a path under "
                         f"{DEMO_ASSETS}/, or --model.build_demo_models false to load the real one")
    parent = target.parent
    empty = folder and target.is_dir() and not any(target.iterdir())
    if target.exists() and not empty:
        raise ValueError(f"{option} {path} exists but holds no model the program can read: the demo does not build "
                         f"into it; fix the path, or set --model.build_demo_models false")
    if empty or parent.is_dir() and ((parent / ASSETS_MARKER).is_file() or not any(parent.iterdir())):
        return
    raise ValueError(f"{option} {path} does not exist, and the demo builds its random models only under "
                     f"{DEMO_ASSETS}/, in an empty folder or beside models it built before: fix the path, or set "
                     f"--model.build_demo_models false")


def build_demo_models(segmenter: str, generator: str | None, class_embeddings: str | None,
                      class_names: Sequence[str]) -> None:
    """The launcher's `model.build_demo_models`: every missing path is checked (`check_demo_model_path`) before
    anything is built, then built, and the folders built in are marked as the demo's."""
    wanted = [(segmenter, "--model.segmenter", True, not (Path(segmenter) / "config.json").is_file())]
    if generator is not None:
        wanted += [(generator, "--model.generator", True, not (Path(generator) / "transformer" / "config.json").is_file()),
                   (class_embeddings, "--model.class_embeddings", False, not Path(class_embeddings).is_file())]
    missing = [(path, option, folder) for path, option, folder, absent in wanted if absent]
    for path, option, folder in missing:
        check_demo_model_path(path, option, folder)
    ensure_demo_models(segmenter, generator, class_embeddings, class_names)
    for path, _, _ in missing:
        parent = Path(path).parent
        if not _under_demo_assets(Path(path)) and not (parent / ASSETS_MARKER).is_file():
            (parent / ASSETS_MARKER).write_text("random tiny models of the demo (models/tiny.py), not real ones\n")


def make_tiny_class_embeddings(path: str | Path, class_names: Sequence[str], generator: str | Path) -> Path:
    """The class-embedding cache of a tiny SD3 folder, made by the real builder (adds the tiny text
    encoders to the folder first if it has none)."""
    if not has_text_encoders(generator):
        make_tiny_text_encoders(generator)
    return write_class_embeddings(path, str(generator), class_names, DEFAULT_TEMPLATE, TINY_T5_TOKENS, "cpu",
                                  torch.float32, batch_size=len(class_names), progress=False)
