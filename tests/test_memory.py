"""The per-stage memory estimate (pipeline/dusa/memory.py): parameter counts against the real layers, bytes per
preset, activation scaling, windows in flight, and the layout predictions on hand-made costs."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from data.classes import ADE20K_CLASSES
from models.architectures import SD3_5_LARGE_TRANSFORMER, SD3_MEDIUM_TRANSFORMER
from models.class_embeddings import load_class_embeddings
from models.sd3 import LatentEncoder, TransformerParts
from models.segformer import Segmenter
from models.tiny import make_tiny_class_embeddings, make_tiny_sd3, make_tiny_segformer
from pipeline.run.config import ModelConfig
from pipeline.methods.dusa import DusaOptions
from pipeline.dusa.engine import select_trainable
from pipeline.dusa.layers import JointBlock, SD3Embed, SD3Head, SegmenterFront
from pipeline.dusa.memory import (GIB, KAPPA, KAPPA_QK_RMS, Geometry, LayerCount, MemoryModel, Precision,
                             analytic_activations, build_memory_model, format_layouts, format_stages, layer_counts,
                             memory_split, precision_bytes, predict_layouts, read_configs, smallest_layout,
                             table_activations)
from pipeline.dusa.partition import StepCosts, plan_partition, simulate_step

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = [dict(), dict(norm_only=True), dict(update_segmenter=False), dict(update_generator=False),
            dict(learnable_embedding=True), dict(norm_only=True, update_generator=False)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints saved and read back like the real ones: SD3 (plain) and SD3.5-like (RMS q/k norm, dual
    attention in the first block)."""
    root = tmp_path_factory.mktemp("memory")
    make_tiny_segformer(root / "segformer", ADE20K_CLASSES)
    make_tiny_sd3(root / "sd3", num_layers=3)
    make_tiny_class_embeddings(root / "classes.safetensors", ADE20K_CLASSES, root / "sd3")
    make_tiny_sd3(root / "sd35", num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,))
    make_tiny_class_embeddings(root / "classes35.safetensors", ADE20K_CLASSES, root / "sd35")
    return root


def real_layers(root: Path, generator: str, cache: str, dusa: DusaOptions) -> list[torch.nn.Module]:
    """The pipeline's layers as the stages build them (real loaders, real weights), trainable per `dusa`."""
    parts = TransformerParts(str(root / generator))
    prompt, pooled = load_class_embeddings(root / cache, ADE20K_CLASSES, str(root / generator))
    layers = [SegmenterFront(Segmenter.from_pretrained(str(root / "segformer")),
                             LatentEncoder.from_pretrained(str(root / generator)), 64, 1, 20, 0),
              SD3Embed(parts.load("pos_embed"), parts.load("time_text_embed"), parts.load("context_embedder"),
                       prompt, pooled, learnable_pooled=dusa.learnable_embedding)]
    layers += [JointBlock(parts.load(f"transformer_blocks.{i}")) for i in range(parts.num_blocks)]
    layers.append(SD3Head(parts.load("norm_out"), parts.load("proj_out"), parts.config["patch_size"],
                          parts.out_channels))
    select_trainable(torch.nn.ModuleList(layers), dusa)
    return layers


@pytest.mark.parametrize("generator,cache", [("sd3", "classes.safetensors"), ("sd35", "classes35.safetensors")])
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(s) or "default")
def test_parameter_counts_equal_the_real_layers(tiny, generator, cache, switches):
    dusa = DusaOptions(**switches)
    gen, vae, seg, shape, dtype = read_configs(ModelConfig(segmenter=str(tiny / "segformer"),
                                                           generator=str(tiny / generator),
                                                           class_embeddings=str(tiny / cache)))
    assert shape is not None and shape[0] == 150  # from the cache's header, no tensor read
    counts = layer_counts(gen, vae, seg, dusa, shape, gen["pooled_projection_dim"], dtype)
    layers = real_layers(tiny, generator, cache, dusa)
    assert len(counts) == len(layers) == gen["num_layers"] + 3
    for count, layer in zip(counts, layers):
        params = list(layer.parameters())
        assert count.params == sum(p.numel() for p in params), count.name
        assert count.trainable == sum(p.numel() for p in params if p.requires_grad), count.name
        assert count.buffer_bytes == sum(b.numel() * b.element_size() for b in layer.buffers()
                                         if b.is_floating_point()), count.name
    assert counts[0].segmenter == sum(p.numel() for p in layers[0].segmenter.parameters())
    # Independently of the layer split: the whole transformer's parameters, once each.
    whole = SD3Transformer2DModel.from_pretrained(str(tiny / generator), subfolder="transformer")
    offset = counts[1].params - sum(p.numel() for m in (whole.pos_embed, whole.time_text_embed,
                                                         whole.context_embedder) for p in m.parameters())
    assert sum(c.params for c in counts[1:]) == whole.num_parameters() + offset
    assert offset == (gen["pooled_projection_dim"] if dusa.learnable_embedding else 0)


def test_published_configs_have_their_published_sizes():
    with torch.device("meta"):
        medium = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
        large = SD3Transformer2DModel(**SD3_5_LARGE_TRANSFORMER)
    assert 2.0e9 < medium.num_parameters() < 2.1e9  # SD3-medium: 2 B
    assert 8.0e9 < large.num_parameters() < 8.2e9  # SD3.5-large: 8.1 B
    assert large.inner_dim == 2432 and len(large.transformer_blocks) == 38


def ds(**kwargs) -> dict:
    config = {"zero_optimization": {"stage": 0},
              "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "lr": 1e-5}}}
    config.update(kwargs)
    return config


def test_bytes_per_parameter_of_each_preset():
    from pipeline.dusa.engine import load_ds_config
    autocast = precision_bytes(load_ds_config(str(ROOT / "ds_configs" / "ds_tta.json"), lr=1e-5))
    assert (autocast.name, autocast.weight, autocast.grad, autocast.optimizer) == ("autocast", 4, 4, 8)
    assert not autocast.persistent_grads and autocast.buffer is None  # torch's zero_grad frees them
    bf16 = precision_bytes(load_ds_config(str(ROOT / "ds_configs" / "ds_tta_bf16.json"), lr=1e-5))
    # BF16_Optimizer: bf16 weights, a float32 gradient buffer held between steps, float32 masters + 2 states.
    assert (bf16.name, bf16.weight, bf16.grad, bf16.optimizer, bf16.buffer) == ("bf16", 2, 4, 12, 2)
    assert bf16.persistent_grads
    delayed = precision_bytes(ds(bf16={"enabled": True}, zero_optimization={"stage": 1},
                                 data_types={"grad_accum_dtype": "fp32"}))
    assert delayed.grad == 6  # without immediate_grad_update the bf16 gradients stay too
    assert precision_bytes(ds(zero_optimization={"stage": 1})).optimizer == 12  # ZeRO-1's float32 copy
    assert precision_bytes(ds(optimizer={"type": "SGD", "params": {}})).optimizer == 4  # momentum 0.9
    assert precision_bytes(ds(optimizer={"type": "SGD", "params": {"momentum": 0.0}})).optimizer == 0
    assert precision_bytes(ds(optimizer={"type": "Adam", "params": {}})).optimizer == 8


def hand_model(precision: Precision, layers: int = 4, fixed: float = 10.0, per_class: float = 5.0,
               segmenter: float = 7.0) -> MemoryModel:
    counts = [LayerCount(f"L{i}", 100 + i, 50 + i, buffer_numel=3, buffer_bytes=12) for i in range(layers)]
    return MemoryModel(counts, precision, [(fixed, per_class)] * layers, segmenter, "hand-made")


def test_stage_bytes_by_hand():
    freed = Precision("autocast", 4, 4, 8, False, None, 4)
    model = hand_model(freed)
    s0, s1 = model.stages([0, 2, 4], classes=3)
    weights0 = (100 + 101) * 4 + 2 * 12  # every parameter + the buffers in their own dtype
    grads0, optimizer0 = (50 + 51) * 4, (50 + 51) * 8
    window = 2 * (10 + 5 * 3)  # two layers' activations of one window at 3 classes
    assert (s0["params"], s0["grads"], s0["optimizer"]) == (weights0, grads0, optimizer0)
    assert s0["windows"] == 2 and s1["windows"] == 1  # 1F1B: S - s windows in flight
    assert s0["activations"] == 2 * window + 7  # + SegFormer's, on the first stage only
    # Stage 0 (no forward after a backward with 2 windows): gradients come as the first window's activations go.
    assert s0["total"] == weights0 + optimizer0 + max(2 * window, window + grads0) + 7
    # The last stage runs its second forward with the first window's gradients held.
    weights1, grads1, optimizer1 = (102 + 103) * 4 + 24, (52 + 53) * 4, (52 + 53) * 8
    assert s1["total"] == weights1 + grads1 + optimizer1 + window
    # bf16: buffers follow the weights to 2 bytes, gradients are held between steps: everything adds up.
    held = hand_model(Precision("bf16", 2, 4, 12, True, 2, 2))
    b0 = held.stages([0, 2, 4], classes=3)[0]
    assert b0["params"] == (100 + 101) * 2 + 2 * 3 * 2
    assert b0["total"] == b0["params"] + b0["grads"] + b0["optimizer"] + b0["activations"]
    # More windows than in flight: a forward follows a backward, so the gradients meet k windows.
    s0_many = model.stages([0, 2, 4], classes=3, num_windows=3)[0]
    assert s0_many["total"] == weights0 + optimizer0 + grads0 + 2 * window + 7


def test_activation_scaling_from_a_table_and_from_the_dims():
    # A measured table at 10 and 20 classes: per layer fixed + per-class bytes, recovered exactly.
    true = [(100.0, 7.0), (0.0, 3.0), (50.0, 0.0)]
    tables = [StepCosts([1.0] * 3, [1.0] * 3, (0.0, 0.0), [0.0] * 3,
                        activation_bytes=[a + b * c for a, b in true]) for c in (10, 20)]
    flat = [x for pair in table_activations(tables, [10, 20]) for x in pair]
    assert flat == pytest.approx([x for pair in true for x in pair])
    flat = [x for pair in table_activations(tables[:1], [10]) for x in pair]
    assert flat == pytest.approx([x for a, b in true for x in (0.0, (a + 10 * b) / 10)])
    # From the dims: kappa x tokens x width per class sample; RMS q/k norm keeps more; autocast adds the bf16
    # copies of the block's weights once per window.
    g = Geometry(window=512, latent=64, patch=2, hidden=1536, joint_dim=4096, text_tokens=333, num_labels=150,
                 qk_norm=None, dual_layers=(), num_blocks=2)
    counts = [LayerCount("front", 10, 10), LayerCount("embed", 20, 20), LayerCount("b0", 1000, 1000),
              LayerCount("b1", 600, 600), LayerCount("head", 30, 30)]
    tokens = 1024 + 333
    bf16 = analytic_activations(g, counts, "bf16")
    assert bf16[2] == (0.0, pytest.approx(KAPPA["bf16"] * tokens * 1536))
    autocast = analytic_activations(g, counts, "autocast")
    assert autocast[2] == (2.0 * 1000, pytest.approx(KAPPA["autocast"] * tokens * 1536))
    rms = analytic_activations(Geometry(**{**g.__dict__, "qk_norm": "rms_norm"}), counts, "bf16")
    assert rms[2][1] - bf16[2][1] == pytest.approx(KAPPA_QK_RMS["bf16"] * tokens * 1536)
    # The stage's activations: per window, fixed + per class x classes, times the windows in flight.
    model = MemoryModel(counts, Precision("bf16", 2, 4, 12, True, 2, 2), bf16, 0.0, "dims")
    assert model.stage_activations(2, 4, 10, 2) == pytest.approx(2 * 10 * (bf16[2][1] + bf16[3][1]))
    assert model.stage_activations(2, 4, 20, 1) == pytest.approx(2 * model.stage_activations(2, 4, 10, 1))


def test_activation_checkpointing_keeps_less():
    g = Geometry(512, 64, 2, 64, 32, 20, 150, None, (), 6)
    counts = [LayerCount(f"L{i}", 10, 10) for i in range(9)]
    plain = MemoryModel(counts, Precision("bf16", 2, 4, 12, True, 2, 2), analytic_activations(g, counts, "bf16"),
                        0.0, "dims", g)
    checkpointed = MemoryModel(**{**plain.__dict__, "checkpoint_interval": 1})
    for k in (1, 2):
        assert checkpointed.stage_activations(2, 8, 10, k) < plain.stage_activations(2, 8, 10, k)
    # What a window keeps is the inputs of its chunks; one chunk is recomputed at a time on top.
    kept = 6 * 10 * g.tokens * 64 * 2
    assert checkpointed.stage_activations(2, 8, 10, 2) == pytest.approx(2 * kept + max(
        plain.window_bytes(i, 10) for i in range(2, 8)))


def uniform_costs(layers: int = 4) -> StepCosts:
    return StepCosts([1.0] * layers, [2.0] * layers, (0.5, 1.0), [0.1] * layers)


def test_layout_prediction_on_hand_made_costs():
    costs = {10: uniform_costs(), 20: StepCosts([2.0] * 4, [4.0] * 4, (0.5, 1.0), [0.1] * 4)}
    small = hand_model(Precision("autocast", 4, 4, 8, False, None, 4))
    out = predict_layouts(costs, gpus=2, card_bytes=1e6, memory=small)
    layouts = {(p["replicas"], p["stages"]): p for p in out}
    assert set(layouts) == {(2, 1), (1, 2)}
    for (replicas, stages), p in layouts.items():
        bounds, _ = plan_partition([costs[10], costs[20]], stages, memory_budget=0.85e6,
                                   memory=small.totals(20))
        assert p["partition"] == bounds
        for c, cost in costs.items():
            step = simulate_step(cost, bounds, 2)["step"]
            assert p["classes"][c]["step_s"] == step and p["classes"][c]["images_per_s"] == replicas / step
            assert p["classes"][c]["fits"]
    # One image through 2 stages has a bubble: 2 replicas of 1 stage finish more images per second.
    assert layouts[(2, 1)]["classes"][10]["images_per_s"] > layouts[(1, 2)]["classes"][10]["images_per_s"]
    # A card too small for the whole model on one GPU: the 1-stage layout gets no images/s, 2 stages do.
    single = small.stages([0, 4], 20)[0]["total"]
    tight = {(p["replicas"], p["stages"]): p for p in predict_layouts(costs, 2, 0.7 * single / 0.85, small)}
    assert all(not v["fits"] for v in tight[(2, 1)]["classes"].values())
    assert all(v["fits"] and v["images_per_s"] > 0 for v in tight[(1, 2)]["classes"].values())
    line = format_layouts(list(tight.values()), (1, 2), "hand-made")
    assert line.startswith("layout 1 replica x 2 stages") and "1 x 2 (this run): " in line
    assert "2 x 1: does not fit at 10 (" in line
    # 4 GPUs: 4 x 1, 2 x 2 and 1 x 4.
    assert [(p["replicas"], p["stages"]) for p in predict_layouts(costs, 4, 1e6, small)] == [(4, 1), (2, 2), (1, 4)]


def test_this_layouts_prediction_and_the_line_after_the_first_task():
    from pipeline.dusa.memory import prediction_line, this_layout_prediction
    costs = {10: uniform_costs(), 20: StepCosts([2.0] * 4, [4.0] * 4, (0.5, 1.0), [0.1] * 4)}
    out = predict_layouts(costs, gpus=2, card_bytes=1e6, memory=hand_model(Precision("autocast", 4, 4, 8, False,
                                                                                      None, 4)))
    two = next(p for p in out if p["replicas"] == 2)
    # One replica's images/s at the measured class count nearest max_classes (ties: the larger count).
    for max_classes, classes in ((8, 10), (15, 20), (30, 20)):
        got = this_layout_prediction(out, 1, max_classes, "table.json")
        assert got == {"images_per_s": two["classes"][classes]["images_per_s"] / 2, "classes": classes,
                       "windows": 2, "source": "table.json"}
    assert this_layout_prediction(out, 3, 10, "table.json") == {}
    line = prediction_line({"images_per_s": 0.8, "classes": 10, "windows": 2, "source": "t.json"}, 100, 125.0, 250)
    assert line == ("speed: 0.80 images/s measured over the first task (100 images, 2.50 windows per image); "
                    "predicted at start-up 0.80 at 10 classes and 2 windows per image, 0.64 at 2.50 (t.json)")


def test_plan_partition_takes_a_memory_estimate():
    costs = [uniform_costs(6)]
    fastest, _ = plan_partition(costs, 2)

    def front_heavy(bounds):  # the first stage costs 10 per layer, the second 1
        return [10.0 * (bounds[1] - bounds[0]), 1.0 * (bounds[2] - bounds[1])]
    bounds, result = plan_partition(costs, 2, memory_budget=25.0, memory=front_heavy)
    assert bounds[1] <= 2 and result["memory"] == front_heavy(bounds) and result["fits"]
    assert bounds != fastest


def test_memory_split_and_smallest_layout_against_brute_force():
    model = hand_model(Precision("autocast", 4, 4, 8, False, None, 4), layers=7, fixed=200.0, per_class=40.0)
    for stages in (1, 2, 3, 4):
        best = min(max(s["total"] for s in model.stages([0, *cuts, 7], 10))
                   for cuts in itertools.combinations(range(1, 7), stages - 1))
        got = memory_split(model, stages, 10)
        assert max(s["total"] for s in model.stages(got, 10)) == pytest.approx(best)
    peaks = {s: max(x["total"] for x in model.stages(memory_split(model, s, 10), 10)) for s in range(1, 8)}
    card = peaks[3] / 0.85 * 1.001  # 3 stages fit, 2 do not
    assert peaks[2] > 0.85 * card
    found = smallest_layout(model, 10, card)
    assert found["stages"] == 3 and max(found["peak_gib"]) == pytest.approx(round(peaks[3] / GIB, 1))
    assert smallest_layout(model, 10, 1.0) is None


def test_start_up_lines_read_like_the_brief():
    stages = [{"params": 9.8 * GIB, "grads": 9.8 * GIB, "optimizer": 19.6 * GIB, "activations": 12.3 * GIB,
               "total": 51.5 * GIB, "windows": 2, "classes": 10},
              {"params": 1.0 * GIB, "grads": 1.0 * GIB, "optimizer": 2.0 * GIB, "activations": 70.0 * GIB,
               "total": 74.0 * GIB, "windows": 1, "classes": 10}]
    lines = format_stages(stages, 80 * GIB)
    assert lines[0] == ("stage 0: 9.8 GiB weights, 9.8 grads, 19.6 optimizer, 12.3 activations "
                        "(10 classes x 2 windows) = 51.5 GiB of 80.0 GiB")
    assert lines[1].endswith("(over the 85% this program plans with)") and "x 1 window)" in lines[1]


def test_the_measured_h200_peaks_within_five_percent():
    """The estimate (activations from the H200 tables) against the peaks measured on 2 x H200
    (bench/results/2026-11-27-h200-precision-*.json): stage peaks of the split [0, 17, 27] and of one GPU."""
    from models.architectures import SD3_VAE, SEGFORMER_B5
    from diffusers import AutoencoderKL
    from transformers import SegformerConfig
    from pipeline.dusa.engine import load_ds_config
    with torch.device("meta"):
        gen = dict(SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER).config)
        vae = dict(AutoencoderKL(**SD3_VAE).config)
    seg = SegformerConfig(**SEGFORMER_B5, num_labels=150, id2label=dict(enumerate(ADE20K_CLASSES))).to_dict()
    measured = {"autocast": {(0, 17, 27): {10: [53.9, 22.4], 20: [85.8, 32.2]}, (0, 27): {10: [62.0], 20: [87.3]}},
                "bf16": {(0, 17, 27): {10: [49.3, 20.2], 20: [73.9, 27.7]}}}
    for precision, runs in measured.items():
        config = load_ds_config(str(ROOT / "ds_configs" / ("ds_tta.json" if precision == "autocast"
                                                           else "ds_tta_bf16.json")), lr=1e-5)
        table = json.loads((ROOT / "pipeline" / "dusa" / "costs" / f"h200-sd3-medium-segformer-b5-{precision}.json").read_text())
        for source in (table, None):  # the table's activations, and the transformer's dims
            model = build_memory_model(gen, vae, seg, DusaOptions(), config, 512, (150, 333, 4096), 2048,
                                       table=source, graph_shapes=1, image=(512, 683))
            for bounds, by_classes in runs.items():
                for classes, peaks in by_classes.items():
                    estimate = [s["total"] / GIB for s in model.stages(list(bounds), classes)]
                    assert all(math.isclose(e, m, rel_tol=0.05) for e, m in zip(estimate, peaks)), \
                        (precision, bounds, classes, estimate, peaks)


def test_start_up_lines_of_a_run(tiny):
    from pipeline.run.config import DataConfig, PipelineConfig
    from pipeline.dusa.engine import load_ds_config
    from pipeline.dusa.memory import startup_lines
    model = ModelConfig(segmenter=str(tiny / "segformer"), generator=str(tiny / "sd3"),
                        class_embeddings=str(tiny / "classes.safetensors"))
    ds_config = load_ds_config(str(ROOT / "ds_configs" / "ds_demo.json"), lr=1e-4)
    lines = startup_lines(model, DataConfig(window_size=64, window_stride=32), DusaOptions(max_classes=6),
                          PipelineConfig(), ds_config, [0, 3, 6], gpus=2, card="cpu")
    assert lines[0].startswith("memory per GPU, estimated (activations from the transformer's dims")
    assert lines[1].startswith("  stage 0: ") and "(6 classes x 2 windows" in lines[1] and lines[1].endswith(" MiB")
    assert lines[2].startswith("  stage 1: ") and "(6 classes x 1 window," in lines[2]
    assert lines[3].startswith("layout 1 x 2 (no measured cost table")
    missing = ModelConfig(segmenter=str(tiny / "nothing"), generator=str(tiny / "sd3"))
    assert startup_lines(missing, DataConfig(), DusaOptions(), PipelineConfig(), ds_config, [0, 6], 1,
                         card="cpu")[0].startswith("memory estimate unavailable (")
