"""The DUSA PipelineModule: the layer list, its partition into stages, and eval behaviour."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from deepspeed.pipe import LayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import nn
from transformers import SegformerConfig

from models.checkpoints import load_checkpoint
from models.class_embeddings import load_class_embeddings
from models.sd3 import LatentEncoder, TransformerParts
from models.segformer import Segmenter
from pipeline.run import timing
from pipeline.run.config import DataConfig, ModelConfig, PipelineConfig
from pipeline.methods.dusa import DusaOptions
from pipeline.dusa.deepspeed_seam import StagePipelineModule
from pipeline.dusa.layers import (DusaLoss, JointBlock, SD3Embed, SD3Head, SegmenterFront, attention_order,
                                  chain_joint_blocks)
from pipeline.dusa.memory import BUDGET
from pipeline.dusa.partition import (StepCosts, check_partition, default_costs, find_cost_table, model_signature,
                                plan_partition, table_costs)
from pipeline.dusa.windows import AdaptiveWindows
from pipeline.run.log import LOG


class _BuiltBy(LayerSpec):
    """A LayerSpec whose module comes from a function, called only on the stage that owns it."""

    def __init__(self, typename: type, build_fn: Callable[[], nn.Module]):
        super().__init__(typename)
        self.build_fn = build_fn

    def build(self, log=False):
        return self.build_fn()


class DusaPipeline(StagePipelineModule):
    """PipelineModule with explicit stage boundaries (explicit or planned by cost) and eval behaviour in
    every step."""

    def __init__(self, layers: list[LayerSpec], boundaries: list[int], loss_fn, num_stages: int,
                 activation_checkpoint_interval: int = 0, replicas: int = 1):
        # Replica r is ranks r*S .. r*S+S-1 (pipeline/run/replicas.py): the data axis first, unlike DeepSpeed's
        # default, so that a replica's stages are neighbours (one node) and match the runner's replicas.
        topology = ProcessTopology(axes=["data", "pipe"], dims=[replicas, num_stages])
        super().__init__(layers=layers, loss_fn=loss_fn, topology=topology, boundaries=boundaries,
                         activation_checkpoint_interval=activation_checkpoint_interval, dynamic_shape=True)
        self.isolate_data_parallel(replicas * num_stages)  # replicas never share gradients

    def train(self, mode: bool = True):
        # DeepSpeed calls train() at every train_batch(); TTA adapts and predicts in eval behaviour
        # (no dropout, no drop-path, frozen norm statistics), as Tent/CoTTA/DUSA do. Nothing else switches
        # the layers' mode, so after the first call there is nothing to do (the walk over every submodule
        # took 15 ms of host time per step).
        if not self._eval_set:
            super().train(False)
            self._eval_set = True
        return self

    _eval_set = False

    @property
    def front(self) -> SegmenterFront | None:
        """The stage-0 front on the rank that holds it (for the scored prediction)."""
        return next((m for m in self.forward_funcs if isinstance(m, SegmenterFront)), None)


def build_pipeline(model: ModelConfig, data: DataConfig, dusa: DusaOptions, pipe: PipelineConfig,
                   class_names: Sequence[str], stage_report: Callable[[str], None] = LOG.info,
                   dtype: torch.dtype = torch.float32, precision: str | None = None,
                   replicas: int = 1, ds_config: dict | None = None, details: bool = True) -> DusaPipeline:
    """Layer list -> partition -> module; each rank reads only the weights of its stage's layers.
    `precision` (bf16, autocast, fp32; default from `dtype`) picks the measured cost table; with the
    DeepSpeed config, the split is planned and reported with the memory estimate of pipeline/dusa/memory.py.
    `details`: the planner's predictions and the memory estimate in the report (else the split only)."""
    precision = precision or ("bf16" if dtype == torch.bfloat16 else "fp32")
    # Each stage reads its blocks straight to its GPU (DeepSpeed would move them there anyway).
    parts = TransformerParts(model.generator, dtype,
                             f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    num_blocks = parts.num_blocks

    def front():
        return SegmenterFront(Segmenter.from_pretrained(model.segmenter), LatentEncoder.from_pretrained(model.generator),
                              data.window_size, dusa.topk, dusa.max_classes, dusa.min_classes, pipe.segmenter_graphs,
                              dusa.ignore_classes, dusa.area_k if dusa.candidates == "area_k" else None,
                              dusa.area_threshold, data.window_stride, adaptive_rule(data),
                              compile_encoder="inductor" if pipe.compile_vae and torch.cuda.is_available() else None)

    def embed():
        prompt, pooled = load_class_embeddings(model.class_embeddings, class_names, model.generator)
        return SD3Embed(parts.load("pos_embed"), parts.load("time_text_embed"), parts.load("context_embedder"),
                        prompt, pooled, learnable_pooled=dusa.learnable_embedding)

    layers = [_BuiltBy(SegmenterFront, front), _BuiltBy(SD3Embed, embed)]
    # (not with activation checkpointing: DeepSpeed's recompute through compiled code is untested)
    backend = "inductor" if pipe.compile_blocks and torch.cuda.is_available() \
        and not pipe.activation_checkpoint_interval else None
    attention = attention_order(pipe.attention_backend)
    layers += [_BuiltBy(JointBlock, functools.partial(
        lambda i: JointBlock(parts.load(f"transformer_blocks.{i}"), compile_backend=backend, attention=attention), i))
        for i in range(num_blocks)]
    layers.append(_BuiltBy(SD3Head, lambda: SD3Head(parts.load("norm_out"), parts.load("proj_out"),
                                                    parts.config["patch_size"], parts.out_channels)))

    estimate = None  # the memory model, made once for the planner and the start-up lines
    names = ["SegmenterFront", "SD3Embed"] + [f"JointBlock{i}" for i in range(num_blocks)] + ["SD3Head"]
    if pipe.partition is not None:
        bounds = check_partition(pipe.partition, len(layers), pipe.num_stages)
        stage_report(f"partition {bounds} (pipeline.partition)")
    else:
        costs, source = step_costs(model, data, pipe, parts, precision)
        # 15 % left for the allocator's fragmentation, the CUDA context and NCCL buffers (memory.BUDGET).
        budget = BUDGET * torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        memory = None
        if ds_config is not None:  # the estimate at dusa.max_classes (parameters, optimizer, activations)
            from pipeline.dusa.memory import run_memory_model
            estimate = run_memory_model(model, data, dusa, pipe, ds_config)
            memory = estimate[0].totals(dusa.max_classes)
        bounds, predicted = plan_partition(costs, pipe.num_stages, memory_budget=budget, memory=memory)
        stage_report(f"partition {bounds} from {source}; predicted step {predicted['step']:.3f} "
                     f"(2 windows, {'relative units' if source.startswith('default') else 's'})" if details
                     else f"partition {bounds} (planned)")
        if not predicted["fits"]:
            stage_report("warning: no split is predicted to fit this GPU's memory at the measured class counts: "
                         "the one with the least memory is used")
    for s in range(pipe.num_stages):
        a, b = bounds[s], bounds[s + 1]
        busy = ""
        if pipe.partition is None and details:
            busy = f", predicted busy {predicted['stage_busy'][s]:.3f}"
            if predicted["memory"]:
                busy += f", memory {predicted['memory'][s] / 2**30:.1f} GiB at " + (
                    f"{dusa.max_classes} classes" if memory else "the most classes measured")
        stage_report(f"stage {s}: layers {a}-{b - 1} ({names[a]} .. {names[b - 1]}){busy}")
    prediction = {}  # this layout's images/s from the card's cost table, printed again after the first task
    if details and ds_config is not None and int(os.environ.get("RANK", "0")) == 0:  # before any weight loads
        from pipeline.dusa.memory import startup_lines
        for line in startup_lines(model, data, dusa, pipe, ds_config, bounds, gpus=replicas * pipe.num_stages,
                                  estimate=estimate, prediction=prediction):
            stage_report(line)
    timing.mark("partition planned")
    loss = DusaLoss(dusa.temperature, dusa.candidate_weights == "uniform")
    module = DusaPipeline(layers, bounds, loss, pipe.num_stages, pipe.activation_checkpoint_interval, replicas)
    module.loaded_keys = parts.loaded_keys
    module.prediction = prediction or None
    # The last stage runs one window at a time (forward, then backward): its joint blocks can replay graphs.
    module.block_chain = None
    if pipe.transformer_graphs and torch.cuda.is_available() \
            and not pipe.activation_checkpoint_interval and any(isinstance(f, SD3Head) for f in module.forward_funcs):
        graphed = min(pipe.transformer_graphs, dusa.max_classes, len(class_names))  # class counts 1..graphed
        module.block_chain = chain_joint_blocks(module.forward_funcs, graphed, graphed)
    return module


def adaptive_rule(data: DataConfig) -> AdaptiveWindows | None:
    """The adaptive window placement of `data.windows adaptive` (None: the grid)."""
    if data.windows != "adaptive":
        return None
    return AdaptiveWindows(data.adaptive_std, data.adaptive_dilation, data.adaptive_min_size, data.adaptive_max_size,
                           data.adaptive_min_distance, data.adaptive_max_windows, data.adaptive_min_windows)


def step_costs(model: ModelConfig, data: DataConfig, pipe: PipelineConfig, parts: TransformerParts,
               precision: str = "bf16") -> tuple[list[StepCosts], str]:
    """Per-layer costs for the partition: the measured table for this card and these models (or the
    one named by pipeline.cost_table), else relative defaults; and where they came from."""
    segmenter_config = load_checkpoint(model.segmenter, "segmenter", SegformerConfig.from_pretrained).to_dict()
    signature = model_signature(dict(parts.config), segmenter_config, data.window_size, precision)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if pipe.cost_table is not None:
        path = Path(pipe.cost_table)
        if not path.is_file():
            raise FileNotFoundError(f"pipeline.cost_table {path} does not exist")
        table = json.loads(path.read_text())
        if table.get("signature") != signature:
            raise ValueError(f"pipeline.cost_table {path} was measured for other models or window size "
                             f"({table.get('signature')}), not {signature}")
        found = path, table
    else:
        found = find_cost_table(card, signature)
    if found is None:
        return [default_costs(parts.num_blocks)], "default relative costs (no measured table for this card and models)"
    path, table = found
    other = "" if table["card"] == card else f", used for {card}: `launch/calibrate.py` measures this card"
    return table_costs(table), f"costs measured on {table['card']} ({path.name}{other})"
