"""The DUSA PipelineModule: the layer list, its partition into stages, and eval behaviour."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from models.class_embeddings import load_class_embeddings
from models.sd3 import LatentEncoder, TransformerParts
from models.segformer import Segmenter
from pipeline.config import DataConfig, ModelConfig, PipelineConfig, TTAConfig
from pipeline.layers import DusaLoss, JointBlock, SD3Embed, SD3Head, SegmenterFront

# Relative costs of the non-block layers, in units of one joint block (the front's is configurable).
EMBED_COST = 0.2
HEAD_COST = 0.2


class _BuiltBy(LayerSpec):
    """A LayerSpec whose module comes from a function, called only on the stage that owns it."""

    def __init__(self, typename: type, build_fn: Callable[[], nn.Module]):
        super().__init__(typename)
        self.build_fn = build_fn

    def build(self, log=False):
        return self.build_fn()


def balanced_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split of `costs` into `num_stages` non-empty parts minimising the largest part.

    Returns boundaries [0, b1, ..., len(costs)]; exact dynamic programme (a few dozen layers).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} layers into {num_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible largest stage cost when the first i layers form s stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds = [n]
    for s in range(num_stages, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    return bounds[::-1]


def check_partition(bounds: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    bounds = list(bounds)
    if (len(bounds) != num_stages + 1 or bounds[0] != 0 or bounds[-1] != num_layers
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        raise ValueError(f"pipeline.partition {bounds} must be {num_stages + 1} increasing layer indices "
                         f"from 0 to {num_layers} (one non-empty range per stage)")
    return bounds


class DusaPipeline(PipelineModule):
    """PipelineModule with explicit stage boundaries and eval behaviour in every step."""

    def __init__(self, layers: list[LayerSpec], boundaries: list[int], loss_fn, num_stages: int,
                 activation_checkpoint_interval: int = 0):
        self._boundaries = boundaries  # read by _partition_layers inside PipelineModule.__init__
        super().__init__(layers=layers, loss_fn=loss_fn, num_stages=num_stages,
                         topology=None, activation_checkpoint_interval=activation_checkpoint_interval,
                         dynamic_shape=True)

    def _partition_layers(self, method="uniform"):
        # DeepSpeed's hook for the stage split; ours comes precomputed (explicit or by cost).
        self.parts = list(self._boundaries)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def train(self, mode: bool = True):
        # DeepSpeed calls train() at every train_batch(); TTA adapts and predicts in eval behaviour
        # (no dropout, no drop-path, frozen norm statistics), as Tent/CoTTA/DUSA do.
        return super().train(False)

    @property
    def front(self) -> SegmenterFront | None:
        """The stage-0 front on the rank that holds it (for the scored prediction)."""
        return next((m for m in self.forward_funcs if isinstance(m, SegmenterFront)), None)


def build_pipeline(model: ModelConfig, data: DataConfig, tta: TTAConfig, pipe: PipelineConfig,
                   class_names: Sequence[str], stage_report: Callable[[str], None] = print,
                   dtype: torch.dtype = torch.float32) -> DusaPipeline:
    """Layer list -> partition -> module; each rank reads only the weights of its stage's layers."""
    parts = TransformerParts(model.generator, dtype)
    num_blocks = parts.num_blocks

    def front():
        return SegmenterFront(Segmenter.from_pretrained(model.segmenter), LatentEncoder.from_pretrained(model.generator),
                              data.window_size, tta.topk, tta.max_classes, tta.min_classes, pipe.segmenter_graphs)

    def embed():
        prompt, pooled = load_class_embeddings(model.class_embeddings, class_names, model.generator)
        return SD3Embed(parts.load("pos_embed"), parts.load("time_text_embed"), parts.load("context_embedder"),
                        prompt, pooled)

    layers = [_BuiltBy(SegmenterFront, front), _BuiltBy(SD3Embed, embed)]
    layers += [_BuiltBy(JointBlock, functools.partial(lambda i: JointBlock(parts.load(f"transformer_blocks.{i}")), i))
               for i in range(num_blocks)]
    layers.append(_BuiltBy(SD3Head, lambda: SD3Head(parts.load("norm_out"), parts.load("proj_out"),
                                                    parts.config["patch_size"], parts.out_channels)))

    costs = [pipe.segmenter_cost, EMBED_COST] + [1.0] * num_blocks + [HEAD_COST]
    if pipe.partition is not None:
        bounds = check_partition(pipe.partition, len(layers), pipe.num_stages)
    else:
        bounds = balanced_partition(costs, pipe.num_stages)
    names = ["SegmenterFront", "SD3Embed"] + [f"JointBlock{i}" for i in range(num_blocks)] + ["SD3Head"]
    for s in range(pipe.num_stages):
        a, b = bounds[s], bounds[s + 1]
        stage_report(f"stage {s}: layers {a}-{b - 1} ({names[a]} .. {names[b - 1]}), cost {sum(costs[a:b]):.1f}")
    module = DusaPipeline(layers, bounds, DusaLoss(tta.temperature), pipe.num_stages,
                          pipe.activation_checkpoint_interval)
    module.loaded_keys = parts.loaded_keys
    return module
