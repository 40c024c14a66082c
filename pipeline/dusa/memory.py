"""Memory per pipeline stage, estimated before any weight is read, and the images per second of other layouts.

Per stage s of S, with W windows per image and k = min(W, S - s) windows in flight there (DeepSpeed's 1F1B):

    weights    every parameter x its bytes (fp32 4, bf16 2) + buffers (position table, class embeddings)
    grads      trainable parameters x gradient bytes
    optimizer  trainable parameters x (master copy + optimizer states)
    activations k x (what one window's forward keeps for its backward at c classes) + on stage 0
               SegFormer's forward of the image (kept until its backward after the windows) and the
               gradients its CUDA graphs hold per captured shape
    peak       weights + optimizer + activations + grads, except where gradients are freed after every
               step (ZeRO 0, float32 weights) and no forward follows a backward on the stage (W <= k): then
               the activations peak before the first backward and weights + optimizer +
               max(k A, (k - 1) A + grads) is the peak

Parameter counts come from the models' configs, instantiated on the meta device (no memory, no weights),
and the trainable ones from the engine's own rule (`select_trainable`). Bytes per parameter, as DeepSpeed
0.19 allocates them (runtime/bf16_optimizer.py, runtime/zero/stage_1_and_2.py, runtime/engine.py):

    autocast / fp32, ZeRO 0 (torch AdamW): 4 weight + 4 grad (param.grad, freed by zero_grad) + 8 (2 states)
    the same with ZeRO 1: + 4 master copy (the flat fp32 partition is a clone) + 4 flat gradient partition
    bf16, ZeRO 1 with float32 gradient accumulation (BF16_Optimizer): 2 weight + 4 fp32 gradient buffer
        (allocated at start, held between steps) + 4 fp32 master + 8 states; the bf16 gradients are freed as
        they are added with `immediate_grad_update`, else 2 more bytes held
    bf16, ZeRO 1 with bf16 accumulation (ZeRO optimizer): 2 weight + 2 grad + 4 fp32 partition + 4 master + 8

Adam and AdamW keep 2 float32 states, SGD with momentum 1, plain SGD none.

Activations come from a measured cost table where one exists for these models (any card: bytes do not
depend on the card), fitted per layer as fixed + per-class bytes over the class counts measured; else
from the transformer's dims: per class sample and window, a joint block keeps kappa x T x d bytes, T =
(window / VAE downsampling / patch)^2 + text tokens, d = heads x head_dim:

    kappa         bf16 42.1   autocast 56.3   fp32 84.1   (bytes per token and channel)
    + qk rms_norm      16.1            20.1         16.1
    + dual attention   28.2            38.2         40.2   (per image token and channel)

kappa of bf16 and autocast are the H200 tables' SD3-medium blocks; the rest was measured on a CPU with
autograd's saved-tensor hooks on one block (which give SD3-medium's bf16 figure exactly, and 54.1 under
CPU autocast). The last block (no text stream out) keeps 0.83 of that; under autocast each window's forward
also keeps the bf16 copies of the weights it used (2 bytes per parameter of the layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pipeline.dusa.partition import StepCosts, plan_partition, simulate_step

GIB = 2.0**30
BUDGET = 0.85  # of a card's memory, as the planner leaves 15 % for fragmentation, the CUDA context and NCCL
WINDOWS = 2  # a 512 x 683 image (ADE20K's usual 4:3) with stride 256; S - s < 2 windows in flight anyway

# Bytes per token and channel that one joint block keeps per class sample (see the module docstring).
KAPPA = {"bf16": 42.1, "autocast": 56.3, "fp32": 84.1}
KAPPA_QK_RMS = {"bf16": 16.1, "autocast": 20.1, "fp32": 16.1}
KAPPA_DUAL = {"bf16": 28.2, "autocast": 38.2, "fp32": 40.2}
LAST_BLOCK = 0.83
# SD3Head per class sample, bytes per image token and channel (the H200 tables: autocast 10.2, bf16 4.2).
KAPPA_HEAD = {"bf16": 4.2, "autocast": 10.2, "fp32": 8.4}
# SegFormer's forward keeps this many bytes per pixel and unit of `_segformer_volume` in bf16 (SegFormer-B5 at
# 512 x 683: 1.14 GiB, saved-tensor hooks); float32 twice that.
SEGFORMER_BYTES_PER_UNIT = 5.65


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter under a DeepSpeed JSON."""

    name: str  # bf16 | autocast | fp32 (pipeline.dusa.engine.precision_of)
    weight: int  # every parameter
    grad: int  # every trainable parameter
    optimizer: int  # every trainable parameter: float32 master copy (if any) + optimizer states
    persistent_grads: bool  # DeepSpeed's flat gradient buffers, held between steps (else freed at each step)
    buffer: int | None  # bytes per floating buffer element (None: the buffer's own dtype)
    residual: int  # bytes per element of the activations passed between blocks (autocast: float32 residual)


def precision_bytes(ds_config: Mapping[str, Any]) -> Precision:
    """Bytes per parameter of the DeepSpeed JSON's precision preset, ZeRO stage and optimizer."""
    from pipeline.dusa.engine import DEFAULT_OPTIMIZER, SGD_MOMENTUM, precision_of
    name = precision_of(ds_config)
    optimizer = ds_config.get("optimizer") or DEFAULT_OPTIMIZER
    kind = str(optimizer.get("type", "AdamW")).lower()
    momentum = (optimizer.get("params") or {}).get("momentum", SGD_MOMENTUM)
    states = 4 * (2 if kind in ("adam", "adamw") else 1 if momentum else 0)
    zero = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if name != "bf16":
        if zero:  # DeepSpeedZeroOptimizer on float32 weights: its own master copy and flat gradient partition
            return Precision(name, 4, 8, 4 + states, True, None, 4)
        return Precision(name, 4, 4, states, False, None, 4)
    bf16 = ds_config.get("bf16") or {}
    accumulate = str((ds_config.get("data_types") or {}).get("grad_accum_dtype", "bf16")).lower()
    if zero and accumulate not in ("fp32", "float32"):  # ZeRO optimizer on bf16 weights
        return Precision(name, 2, 6, 4 + states, True, 2, 2)
    grad = (4 if accumulate in ("fp32", "float32") else 2) + (0 if bf16.get("immediate_grad_update") else 2)
    return Precision(name, 2, grad, 4 + states, True, 2, 2)


# ----------------------------------------------------------------------------- parameters per layer
@dataclass
class LayerCount:
    """One pipeline layer: its parameters, the trainable ones, and its buffers."""

    name: str
    params: int
    trainable: int
    buffer_numel: int = 0  # floating buffers (their dtype follows the weights under bf16)
    buffer_bytes: int = 0  # the same in their own dtype
    other_buffer_bytes: int = 0  # integer buffers
    segmenter: int = 0  # the front: SegFormer's parameters (the rest is the frozen VAE encoder)


@dataclass
class Geometry:
    """What one window's activations depend on."""

    window: int  # pixels
    latent: int  # window / VAE downsampling
    patch: int
    hidden: int  # heads x head_dim
    joint_dim: int  # text embedding width (T5)
    text_tokens: int
    num_labels: int
    qk_norm: str | None
    dual_layers: tuple[int, ...]
    num_blocks: int

    @property
    def image_tokens(self) -> int:
        return (self.latent // self.patch) ** 2

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


def layer_counts(generator_config: Mapping, vae_config: Mapping, segmenter_config: Mapping, dusa: Any,
                 prompt_shape: Sequence[int], pooled_dim: int, cache_dtype: torch.dtype = torch.bfloat16
                 ) -> list[LayerCount]:
    """[SegmenterFront, SD3Embed, JointBlock x L, SD3Head] as the pipeline builds them, on the meta device;
    trainable as `pipeline.dusa.engine.select_trainable` decides under `dusa` (update_segmenter, update_generator,
    norm_only, learnable_embedding). `prompt_shape`: the class-embedding cache's [classes, tokens, width]."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from models.sd3 import LatentEncoder
    from models.segformer import Segmenter
    from pipeline.dusa.engine import select_trainable
    from pipeline.dusa.layers import JointBlock, SD3Embed, SD3Head, SegmenterFront
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(dict(generator_config))
        vae = AutoencoderKL.from_config(dict(vae_config))
        segformer = SegformerForSemanticSegmentation(SegformerConfig.from_dict(dict(segmenter_config)))
        prompt = torch.empty(*prompt_shape, dtype=cache_dtype)
        pooled = torch.empty(prompt_shape[0], pooled_dim, dtype=cache_dtype)
    front = SegmenterFront(Segmenter(segformer), LatentEncoder(vae), 8, 1, 1, 0)
    embed = SD3Embed(transformer.pos_embed, transformer.time_text_embed, transformer.context_embedder, prompt, pooled,
                     learnable_pooled=getattr(dusa, "learnable_embedding", False))
    blocks = [JointBlock(block) for block in transformer.transformer_blocks]
    head = SD3Head(transformer.norm_out, transformer.proj_out, transformer.config.patch_size, transformer.out_channels)
    layers = [front, embed, *blocks, head]
    select_trainable(nn.ModuleList(layers), dusa)
    names = ["SegmenterFront", "SD3Embed"] + [f"JointBlock{i}" for i in range(len(blocks))] + ["SD3Head"]
    out = []
    for name, layer in zip(names, layers):
        params = list(layer.parameters())
        floating = [b for b in layer.buffers() if b.is_floating_point()]
        out.append(LayerCount(name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                              sum(b.numel() for b in floating), sum(b.numel() * b.element_size() for b in floating),
                              sum(b.numel() * b.element_size() for b in layer.buffers() if not b.is_floating_point())))
    out[0].segmenter = sum(p.numel() for p in front.segmenter.parameters())
    return out


# ----------------------------------------------------------------------------- activations per layer
def analytic_activations(geometry: Geometry, counts: Sequence[LayerCount], precision: str
                         ) -> list[tuple[float, float]]:
    """Per layer (fixed, per class sample) bytes that one window's forward keeps for its backward."""
    g, p = geometry, (4 if precision == "fp32" else 2)
    copies = 2.0 if precision == "autocast" else 0.0  # bf16 casts of the weights, saved for the backward
    kappa = KAPPA[precision] + (KAPPA_QK_RMS[precision] if g.qk_norm == "rms_norm" else 0.0)
    out = [(3.0 * g.window**2 * 4 + g.num_labels * g.latent**2 * 4, 0.0),  # the window's crop and its logits
           (copies * counts[1].params, (g.text_tokens * (g.joint_dim + g.hidden) + g.image_tokens * g.hidden) * p)]
    for i in range(g.num_blocks):
        per_class = kappa * g.tokens * g.hidden
        if i in g.dual_layers:
            per_class += KAPPA_DUAL[precision] * g.image_tokens * g.hidden
        out.append((copies * counts[2 + i].params, per_class * (LAST_BLOCK if i == g.num_blocks - 1 else 1.0)))
    out.append((copies * counts[-1].params, KAPPA_HEAD[precision] * g.image_tokens * g.hidden))
    return out


def table_activations(costs: Sequence[StepCosts], classes: Sequence[int]) -> list[tuple[float, float]]:
    """Per layer (fixed, per class sample) bytes from a measured table's activation bytes at `classes`
    (a least-squares line over the class counts; one count: proportional)."""
    if any(c.activation_bytes is None for c in costs):
        raise ValueError("the cost table has no activation bytes")
    out = []
    for layer in range(len(costs[0].activation_bytes)):
        ys = [c.activation_bytes[layer] for c in costs]
        if len(classes) == 1:
            out.append((0.0, ys[0] / classes[0]))
            continue
        mx, my = sum(classes) / len(classes), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(classes, ys)) / sum((x - mx) ** 2 for x in classes)
        out.append((my - slope * mx, slope))
    return out


def _segformer_volume(config: Mapping) -> float:
    """Activation units per pixel of a SegFormer: each encoder block's width x (1 + MLP ratio) over its
    stage's downsampling squared, and the decoder's maps at 1/4 resolution."""
    depths, widths = config["depths"], config["hidden_sizes"]
    ratios = config.get("mlp_ratios") or [4] * len(depths)
    strides = [4 * 2**i for i in range(len(depths))]
    encoder = sum(d * w * (1 + r) / s**2 for d, w, r, s in zip(depths, widths, ratios, strides))
    return encoder + 5 * config.get("decoder_hidden_size", 256) / 16


def segformer_activation_bytes(config: Mapping, image: tuple[int, int], precision: str) -> float:
    """SegFormer's forward on an image of `image` (H, W) pixels: bytes kept for its backward (an estimate
    scaled from SegFormer-B5; under autocast + the bf16 copies of its weights, counted by the caller)."""
    return SEGFORMER_BYTES_PER_UNIT * (2 if precision == "fp32" else 1) * image[0] * image[1] * _segformer_volume(config)


# ----------------------------------------------------------------------------- the model of a run
@dataclass
class MemoryModel:
    """Everything the per-stage estimate needs, per pipeline layer."""

    layers: list[LayerCount]
    precision: Precision
    activations: list[tuple[float, float]]  # per layer (fixed, per class sample) bytes per window
    segmenter_bytes: float  # stage 0: SegFormer's activations for one image + its graphs' gradients
    source: str  # where the activations came from
    geometry: Geometry | None = None
    checkpoint_interval: int = 0  # pipeline.activation_checkpoint_interval

    def _layer(self, i: int) -> tuple[float, float, float]:
        layer, p = self.layers[i], self.precision
        buffers = layer.buffer_numel * p.buffer if p.buffer else layer.buffer_bytes
        return (layer.params * p.weight + buffers + layer.other_buffer_bytes, layer.trainable * p.grad,
                layer.trainable * p.optimizer)

    def window_bytes(self, i: int, classes: int) -> float:
        fixed, per_class = self.activations[i]
        return max(fixed + per_class * classes, 0.0)

    def _input_bytes(self, i: int, classes: int) -> float:
        """What a checkpointed chunk starting at layer i keeps: its input tuple (the two token streams)."""
        g = self.geometry
        if g is None or not 2 <= i < len(self.layers):
            return 0.0
        return classes * g.tokens * g.hidden * self.precision.residual

    def stage_activations(self, a: int, b: int, classes: int, windows_in_flight: int) -> float:
        per_window = [self.window_bytes(i, classes) for i in range(a, b)]
        if self.checkpoint_interval <= 0:
            return windows_in_flight * sum(per_window)
        # Each chunk of `interval` layers keeps only its input; its backward recomputes it, one chunk at a time.
        chunks = range(a, b, self.checkpoint_interval)
        kept = sum(self._input_bytes(i, classes) for i in chunks)
        largest = max(sum(per_window[i - a:i - a + self.checkpoint_interval]) for i in chunks)
        return windows_in_flight * kept + largest

    def stage(self, a: int, b: int, s: int, stages: int, classes: int, num_windows: int = WINDOWS) -> dict:
        """Stage s of `stages`, layers a..b-1: bytes of weights, grads, optimizer, activations and the peak
        (`total`), with the windows in flight there."""
        weights, grads, optimizer = (sum(self._layer(i)[j] for i in range(a, b)) for j in range(3))
        k = min(num_windows, stages - s)
        windows = self.stage_activations(a, b, classes, k)
        segmenter = self.segmenter_bytes if a == 0 else 0.0
        if self.precision.persistent_grads or num_windows > k:  # the gradients meet k windows' activations
            peak = weights + optimizer + grads + windows
        else:  # the gradients come after the last forward, as the first window's activations go
            one = self.stage_activations(a, b, classes, k - 1) if k > 1 else 0.0
            peak = weights + optimizer + max(windows, one + grads)
        return {"params": weights, "grads": grads, "optimizer": optimizer, "activations": windows + segmenter,
                "total": peak + segmenter, "windows": k, "classes": classes,
                "per_class": sum(self.activations[i][1] for i in range(a, b))}  # per class sample and window

    def stages(self, bounds: Sequence[int], classes: int, num_windows: int = WINDOWS) -> list[dict]:
        """`stage` of every stage of the split `bounds`."""
        return [self.stage(a, b, s, len(bounds) - 1, classes, num_windows)
                for s, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def totals(self, classes: int, num_windows: int = WINDOWS) -> Callable[[Sequence[int]], list[float]]:
        """bounds -> predicted peak bytes per stage (for `plan_partition(memory=...)`)."""
        return lambda bounds: [s["total"] for s in self.stages(bounds, classes, num_windows)]


def build_memory_model(generator_config: Mapping, vae_config: Mapping, segmenter_config: Mapping, dusa: Any,
                       ds_config: Mapping, window_size: int, prompt_shape: Sequence[int] | None = None,
                       pooled_dim: int | None = None, cache_dtype: torch.dtype = torch.bfloat16,
                       table: Mapping | None = None, graph_shapes: int = 0,
                       image: tuple[int, int] | None = None, checkpoint_interval: int = 0) -> MemoryModel:
    """The memory model of a run from its configs (no weights read). `table`: a measured cost table of these
    models (activations from it), else the analytic estimate; `graph_shapes`: image shapes whose SegFormer
    CUDA graphs hold gradients on stage 0 (at most pipeline.segmenter_graphs, on a GPU; 0 on a CPU);
    `image`: the resized image (H, W) (default: the window's height, 4:3)."""
    from pipeline.dusa.partition import table_costs
    precision = precision_bytes(ds_config)
    text_tokens = 333 if prompt_shape is None else int(prompt_shape[1])
    joint = int(generator_config.get("joint_attention_dim", 4096))
    pooled_dim = int(pooled_dim or generator_config.get("pooled_projection_dim", 2048))
    labels = len(segmenter_config.get("id2label") or {}) or int(segmenter_config.get("num_labels", 150))
    prompt_shape = tuple(prompt_shape or (labels, text_tokens, joint))
    counts = layer_counts(generator_config, vae_config, segmenter_config, dusa, prompt_shape, pooled_dim, cache_dtype)
    down = 2 ** (len(vae_config.get("block_out_channels", (1, 1, 1, 1))) - 1)
    geometry = Geometry(window_size, window_size // down, int(generator_config.get("patch_size", 2)),
                        int(generator_config["num_attention_heads"]) * int(generator_config["attention_head_dim"]),
                        joint, text_tokens, labels, generator_config.get("qk_norm"),
                        tuple(generator_config.get("dual_attention_layers") or ()), int(generator_config["num_layers"]))
    if table is not None and table.get("classes") and all("activation_mib" in e for e in table["classes"].values()):
        classes = sorted(int(c) for c in table["classes"])
        activations = table_activations(table_costs(dict(table)), classes)
        source = f"activations measured on {table.get('card', 'a GPU')} at {'/'.join(map(str, classes))} classes"
    else:
        activations = analytic_activations(geometry, counts, precision.name)
        source = "activations from the transformer's dims (no measured table for these models)"
    image = image or (window_size, round(window_size * 4 / 3))
    front, segmenter = counts[0], 0.0
    if front.trainable:  # a frozen segmenter runs without autograd: nothing kept
        segmenter = segformer_activation_bytes(segmenter_config, image, precision.name)
        if precision.name == "autocast":  # the bf16 copies of its weights, kept with the activations
            segmenter += 2 * front.segmenter
        segmenter += graph_shapes * front.trainable * precision.weight  # each graph's static parameter gradients
    return MemoryModel(counts, precision, activations, segmenter, source, geometry, checkpoint_interval)


# ----------------------------------------------------------------------------- printing
def format_stages(stages: Sequence[Mapping], card_bytes: float | None = None) -> list[str]:
    """One start-up line per stage: "stage 0: 9.8 GiB weights, 9.8 grads, 19.6 optimizer, 12.3 activations
    (10 classes x 2 windows) = 51.5 GiB of 80.0 GiB" (MiB for models under a GiB, as the demo's)."""
    lines = []
    for s, st in enumerate(stages):
        unit, size = ("GiB", GIB) if st["total"] >= GIB or card_bytes else ("MiB", 2.0**20)
        line = (f"stage {s}: {st['params'] / size:.1f} {unit} weights, {st['grads'] / size:.1f} grads, "
                f"{st['optimizer'] / size:.1f} optimizer, {st['activations'] / size:.1f} activations "
                f"({st['classes']} classes x {st['windows']} window{'s' if st['windows'] > 1 else ''}"
                + (f", {st['per_class'] / size:.2f} per class sample" if st.get("per_class") else "")
                + f") = {st['total'] / size:.1f} {unit}")
        if card_bytes:
            line += f" of {card_bytes / GIB:.1f} GiB"
            if st["total"] > BUDGET * card_bytes:
                line += f" (over the {BUDGET:.0%} this program plans with)"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- layouts
def predict_layouts(costs: Mapping[int, StepCosts], gpus: int, card_bytes: float | None = None,
                    memory: MemoryModel | None = None, num_windows: int = WINDOWS) -> list[dict]:
    """Images per second of every layout R replicas x S stages on `gpus` GPUs (S dividing it): each S's split
    is planned as the launcher plans it (`plan_partition` over the class counts of `costs`, within 85 % of
    the card), its step simulated per class count; throughput R / step. Memory per stage from `memory` when
    given, else from the costs' own bytes (None without them); `fits` False where a layout's memory exceeds
    85 % of the card at that class count (`format_layouts` then gives its memory, not its images/s)."""
    classes = sorted(costs)
    budget = BUDGET * card_bytes if card_bytes else None
    out = []
    for stages in (s for s in range(1, gpus + 1) if gpus % s == 0):
        if stages > len(costs[classes[0]].forward):
            continue
        replicas = gpus // stages
        fit = memory.totals(max(classes), num_windows) if memory else None
        bounds, _ = plan_partition([costs[c] for c in classes], stages, num_windows, budget, memory=fit)
        per_class = {}
        for c in classes:
            step = simulate_step(costs[c], bounds, num_windows)["step"]
            if memory is not None:
                peak = [s["total"] for s in memory.stages(bounds, c, num_windows)]
            else:
                from pipeline.dusa.partition import stage_memory
                peak = stage_memory(costs[c], bounds, num_windows)
            fits = None if peak is None or budget is None else max(peak) <= budget
            per_class[c] = {"step_s": step, "images_per_s": replicas / step, "fits": fits,
                            "peak_gib": None if peak is None else [round(m / GIB, 1) for m in peak]}
        out.append({"replicas": replicas, "stages": stages, "partition": bounds, "classes": per_class})
    return out


def this_layout_prediction(predictions: Sequence[Mapping], stages: int, max_classes: int, source: str) -> dict:
    """One replica's predicted images/s for the layout with `stages` stages, at the measured class count
    nearest `max_classes`, for `WINDOWS` windows per image; {} when that layout was not predicted."""
    for p in predictions:
        if p["stages"] == stages:
            classes = min(p["classes"], key=lambda c: (abs(c - max_classes), -c))
            return {"images_per_s": p["classes"][classes]["images_per_s"] / p["replicas"], "classes": classes,
                    "windows": WINDOWS, "source": source}
    return {}


def prediction_line(prediction: Mapping, images: int, seconds: float, windows: int) -> str:
    """After the first task: its measured images/s beside the start-up prediction (one replica), the latter
    also scaled to the task's mean windows per image (a step's time grows about in proportion to them)."""
    measured = images / seconds
    per_image = windows / images if images else 0.0
    line = (f"speed: {measured:.2f} images/s measured over the first task ({images} images, "
            f"{per_image:.2f} windows per image); predicted at start-up {prediction['images_per_s']:.2f} at "
            f"{prediction['classes']} classes and {prediction['windows']} windows per image")
    if per_image:
        line += f", {prediction['images_per_s'] * prediction['windows'] / per_image:.2f} at {per_image:.2f}"
    return line + f" ({prediction['source']})"


def format_layouts(predictions: Sequence[Mapping], current: tuple[int, int], source: str) -> str:
    """One line: this run's layout and the predicted images/s of each alternative, per class count."""
    parts = []
    for p in predictions:
        rates = []
        for c, v in p["classes"].items():
            if v["fits"] is False:
                rates.append(f"does not fit at {c} ({max(v['peak_gib']):.0f} GiB per GPU)")
            else:
                rates.append(f"{v['images_per_s']:.2f} at {c}")
        this = " (this run)" if (p["replicas"], p["stages"]) == tuple(current) else ""
        parts.append(f"{p['replicas']} x {p['stages']}{this}: {', '.join(rates)}")
    replicas, stages = current
    return (f"layout {replicas} replica{'s' if replicas > 1 else ''} x {stages} stage{'s' if stages > 1 else ''}; "
            f"predicted images/s ({source}): " + "; ".join(parts))


def memory_split(memory: MemoryModel, stages: int, classes: int, num_windows: int = WINDOWS) -> list[int]:
    """The split with the smallest largest stage peak: the least cap under which filling each stage from the
    front with as many layers as fit leaves a last stage that fits (a stage's peak grows with its layers)."""
    n = len(memory.layers)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages")

    def fill(cap: float) -> list[int]:
        bounds = [0]
        for s in range(stages - 1):
            end = bounds[-1] + 1
            while end < n - (stages - 1 - s) and \
                    memory.stage(bounds[-1], end + 1, s, stages, classes, num_windows)["total"] <= cap:
                end += 1
            bounds.append(end)
        return bounds + [n]

    def peak(bounds: list[int]) -> float:
        return max(st["total"] for st in memory.stages(bounds, classes, num_windows))
    low, high = 0.0, memory.stage(0, n, 0, 1, classes, num_windows)["total"] * num_windows
    best = fill(high)
    for _ in range(50):
        cap = (low + high) / 2
        bounds = fill(cap)
        if peak(bounds) <= cap:
            high, best = cap, bounds
        else:
            low = cap
    return best


def smallest_layout(memory: MemoryModel, classes: int, card_bytes: float, max_stages: int = 8,
                    num_windows: int = WINDOWS) -> dict | None:
    """The fewest stages whose memory-balanced split fits `BUDGET` of the card, with its per-stage peaks."""
    for stages in range(1, min(max_stages, len(memory.layers)) + 1):
        bounds = memory_split(memory, stages, classes, num_windows)
        peaks = [st["total"] for st in memory.stages(bounds, classes, num_windows)]
        if max(peaks) <= BUDGET * card_bytes:
            return {"stages": stages, "partition": bounds, "peak_gib": [round(p / GIB, 1) for p in peaks],
                    "card_gib": round(card_bytes / GIB, 1)}
    return None


# ----------------------------------------------------------------------------- a run's configs
def read_configs(model: Any) -> tuple[dict, dict, dict, tuple | None, torch.dtype]:
    """(transformer, VAE, segmenter configs, the cache's prompt_embeds shape or None, its dtype) of a run's
    ModelConfig: config files only (hub ids: their config files are downloaded)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import SegformerConfig

    from models.checkpoints import load_checkpoint
    from models.sd3 import resolve_subfolder
    generator = dict(SD3Transformer2DModel.load_config(resolve_subfolder(model.generator, "transformer")))
    vae = dict(AutoencoderKL.load_config(resolve_subfolder(model.generator, "vae")))
    segmenter = load_checkpoint(model.segmenter, "segmenter", SegformerConfig.from_pretrained).to_dict()
    shape, dtype = None, torch.bfloat16
    cache = Path(model.class_embeddings)
    if cache.is_file():
        from pipeline.run.checks import safetensors_header
        header = safetensors_header(cache, "class-embedding cache", "rebuild it")
        if "prompt_embeds" in header:
            kind, shape = header["prompt_embeds"]
            dtype = {"F32": torch.float32, "F16": torch.float16}.get(kind, torch.bfloat16)
    return generator, vae, segmenter, shape, dtype


def card_memory() -> tuple[str, float | None]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(), float(torch.cuda.get_device_properties(0).total_memory)
    return "cpu", None


def run_memory_model(model: Any, data: Any, dusa: Any, pipe: Any, ds_config: Mapping, card: str | None = None
                     ) -> tuple[MemoryModel, tuple[Path, dict] | None]:
    """The memory model of a DUSA run from its config groups (configs and the cache's header only), with the
    measured cost table of these models (path, table) if there is one (its activations are then used)."""
    from pipeline.dusa.engine import precision_of
    from pipeline.dusa.partition import find_cost_table, model_signature
    card = card or card_memory()[0]
    generator, vae, segmenter, shape, dtype = read_configs(model)
    found = find_cost_table(card, model_signature(generator, segmenter, data.window_size, precision_of(ds_config)))
    graphs = pipe.segmenter_graphs if card != "cpu" else 0  # CUDA graphs only on a GPU
    image = None  # the segmenter sees the resized image: a typical one of the dataset (ADE20K-C: the default)
    if getattr(data, "short_edge", None) is not None:
        from data.datasets import DATASETS
        aspect = DATASETS[data.dataset].aspect if data.dataset in DATASETS else 4 / 3
        image = (data.short_edge, round(data.short_edge * aspect))
    memory = build_memory_model(generator, vae, segmenter, dusa, ds_config, data.window_size, shape, None, dtype,
                                found[1] if found else None, graphs, image=image,
                                checkpoint_interval=pipe.activation_checkpoint_interval)
    return memory, found


def startup_lines(model: Any, data: Any, dusa: Any, pipe: Any, ds_config: Mapping, bounds: Sequence[int],
                  gpus: int, card: str | None = None, card_bytes: float | None = None,
                  estimate: tuple[MemoryModel, tuple[Path, dict] | None] | None = None,
                  prediction: dict | None = None) -> list[str]:
    """The start-up estimate of a DUSA run (rank 0, before weights load): one line per stage at
    dusa.max_classes, and the layout line with the other layouts' predicted images/s where a measured cost
    table for these models exists. `estimate`: `run_memory_model`'s result when the caller has it already;
    `prediction`: filled with this layout's predicted images/s per replica at the cost table's class count
    nearest dusa.max_classes (`this_layout_prediction`), for the line printed after the first task."""
    from pipeline.dusa.partition import table_costs
    if card is None:
        card, card_bytes = card_memory()
    try:
        memory, found = estimate or run_memory_model(model, data, dusa, pipe, ds_config, card)
    except Exception as exc:  # noqa: BLE001 - a start-up print never stops a run
        return [f"memory estimate unavailable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"]
    graphs = pipe.segmenter_graphs if card != "cpu" else 0
    lines = [f"memory per GPU, estimated ({memory.source}"
             + (f"; SegFormer's CUDA graphs of up to {graphs} image shapes" if graphs else "") + "):"]
    lines += ["  " + line for line in format_stages(memory.stages(list(bounds), dusa.max_classes), card_bytes)]
    stages = len(bounds) - 1
    if found is not None:
        path, table = found
        costs = dict(zip(sorted(int(c) for c in table["classes"]), table_costs(table)))
        predictions = predict_layouts(costs, gpus, card_bytes, memory)
        lines.append(format_layouts(predictions, (gpus // stages, stages), f"{path.name}, measured on {table['card']}"))
        if prediction is not None:
            prediction.update(this_layout_prediction(predictions, stages, dusa.max_classes, path.name))
    else:
        lines.append(f"layout {gpus // stages} x {stages} (no measured cost table for these models: "
                     f"`launch/calibrate.py` measures one on this card, then the other layouts are predicted)")
    return lines
