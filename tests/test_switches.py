"""Which parameters adapt: segmenter / generator / norm layers only (pipeline/dusa/engine.py select_trainable)."""
from __future__ import annotations

import pytest
import torch

from models.sd3 import LatentEncoder, TransformerParts
from models.segformer import Segmenter
from models.tiny import make_tiny_sd3, make_tiny_segformer
from data.classes import ADE20K_CLASSES
from pipeline.methods.dusa import DusaOptions
from pipeline.run.config import TTAConfig
from pipeline.dusa.engine import is_norm_module, parameter_groups, select_trainable
from pipeline.dusa.layers import JointBlock, SD3Embed, SD3Head, SegmenterFront


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("switches")
    make_tiny_segformer(root / "seg", ADE20K_CLASSES)
    make_tiny_sd3(root / "sd3", num_layers=2)
    parts = TransformerParts(str(root / "sd3"))
    return torch.nn.Sequential(
        SegmenterFront(Segmenter.from_pretrained(str(root / "seg")), LatentEncoder.from_pretrained(str(root / "sd3")),
                       64, 1, 20, 2),
        SD3Embed(parts.load("pos_embed"), parts.load("time_text_embed"), parts.load("context_embedder"),
                 torch.zeros(150, 4, 32), torch.zeros(150, 32)),
        JointBlock(parts.load("transformer_blocks.0")), JointBlock(parts.load("transformer_blocks.1")),
        SD3Head(parts.load("norm_out"), parts.load("proj_out"), 2, 16))


def names(module, **switches) -> set[str]:
    select_trainable(module, DusaOptions(**switches))
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_switches_select_the_right_parameters(layers):
    everything = {n for n, _ in layers.named_parameters()}
    segmenter = {n for n in everything if n.startswith("0.segmenter.")}
    vae = {n for n in everything if n.startswith("0.encoder.")}
    generator = everything - segmenter - vae
    assert segmenter and vae and generator
    assert names(layers) == segmenter | generator  # the VAE never adapts
    assert names(layers, update_generator=False) == segmenter
    assert names(layers, update_segmenter=False) == generator
    norm = names(layers, norm_only=True)
    assert norm and norm < segmenter | generator
    owners = {n.rsplit(".", 1)[0] for n in norm}
    modules = dict(layers.named_modules())
    # Every selected parameter sits under a normalization module (LayerNorm, BatchNorm, AdaLayerNorm*).
    assert all(any(is_norm_module(modules[o.rsplit(".", k)[0]]) for k in range(o.count(".") + 1)) for o in owners)
    assert any(n.startswith("0.segmenter.") for n in norm) and any(n.startswith("2.") for n in norm)
    assert names(layers, norm_only=True, update_segmenter=False) == {n for n in norm if not n.startswith("0.")}


def test_parameter_groups_carry_each_model_its_learning_rate(layers):
    segmenter = {id(p) for p in layers[0].segmenter.parameters()}
    groups = parameter_groups(layers, TTAConfig(lr=1e-5, lr_segmenter=3e-6), DusaOptions())
    assert groups[0]["lr"] == 3e-6 and "lr" not in groups[1]  # the generator: the optimizer's lr (tta.lr)
    assert all(id(p) in segmenter for p in groups[0]["params"])
    assert not any(id(p) in segmenter for p in groups[1]["params"])
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in layers.parameters() if p.requires_grad}
    only_generator = parameter_groups(layers, TTAConfig(), DusaOptions(lr_generator=2e-5, update_segmenter=False))
    assert [g["lr"] for g in only_generator] == [2e-5]  # a group without parameters is left out
