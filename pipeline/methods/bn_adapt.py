"""`bn_adapt`: test-time normalisation statistics (Schneider et al., NeurIPS 2020, "Improving robustness
against common corruptions by covariate shift adaptation"; Nado et al. 2020, "prediction-time batch
normalization"; the `norm` baseline of Tent and CoTTA).

Every BatchNorm layer of the segmenter normalises with the statistics of the test image's own feature
map (its mean and biased variance over the pixels), optionally mixed with the source statistics as
Schneider et al. do: mean = (N mu_source + mu_image) / (N + 1), likewise the variance, N = `prior`.
Nothing is learned and nothing carries over from one image to the next.

SegFormer has one BatchNorm, in the decode head (after the fusion of the four scales); the encoder's
LayerNorms normalise every token by its own statistics already and keep no source statistics, so there is
nothing of theirs to replace: on SegFormer this method changes the decode head's normalisation only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import Built, Method, StepResult, load_segmenter, parameter_counts


@dataclass
class BnAdaptOptions:
    """bn_adapt: the BatchNorm statistics of the test image."""

    prior: float = 0.0
    """N, the weight of the source statistics against the image's: (N source + image) / (N + 1) for the mean
    and the variance (0: the image's statistics alone, the usual test-time BN; Schneider et al. pick N by
    validation, e.g. 16 for a batch of 1 on ImageNet-C)."""


class ImageStatisticsNorm(nn.Module):
    """A BatchNorm layer that normalises with its input's own statistics, mixed with its source running
    statistics by `prior` (its weights and running statistics stay as loaded and are never updated)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, prior: float):
        super().__init__()
        if norm.running_mean is None:
            raise ValueError(f"{type(norm).__name__} keeps no running statistics: nothing to mix with (bn_adapt)")
        self.norm, self.prior = norm, float(prior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))  # every axis but the channels
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        n = self.prior
        mean = (n * self.norm.running_mean.float() + mean) / (n + 1)
        var = (n * self.norm.running_var.float() + var) / (n + 1)
        weight = None if self.norm.weight is None else self.norm.weight.float()
        bias = None if self.norm.bias is None else self.norm.bias.float()
        return F.batch_norm(x.float(), mean, var, weight, bias, False, 0.0, self.norm.eps).to(x.dtype)


def use_image_statistics(model: nn.Module, prior: float) -> int:
    """Replaces every BatchNorm layer of `model` by an `ImageStatisticsNorm` around it; returns how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, ImageStatisticsNorm(module, prior))
    return len(targets)


class BnAdapt(Method):
    """The segmenter with test-image BatchNorm statistics, on one process per replica."""

    name, adapts, options = "bn_adapt", False, BnAdaptOptions

    def __init__(self, segmenter: nn.Module, device: torch.device):
        self.segmenter, self.device = segmenter, device

    @classmethod
    def check(cls, cfg, processes: int) -> None:
        prior = cfg.bn_adapt.prior
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not prior >= 0 or prior == float("inf"):
            raise ValueError(f"--bn_adapt.prior {prior!r} is outside its domain: a finite number >= 0")

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        from pipeline.dusa.engine import precision_of
        segmenter = load_segmenter(cfg, device).requires_grad_(False)
        if precision_of(ds_config) == "bf16":  # the preset's weights, as `source` runs them; under autocast, float32
            segmenter = segmenter.to(torch.bfloat16)
        count = use_image_statistics(segmenter, cfg.bn_adapt.prior)
        if count == 0:
            raise ValueError(f"segmenter {cfg.model.segmenter} has no BatchNorm layer: bn_adapt would be the source "
                             f"model (use --tta.method source)")
        report(f"bn_adapt: {count} BatchNorm layer(s) normalise with the image's statistics "
               f"(prior N = {cfg.bn_adapt.prior:g})")
        return Built(cls(segmenter, device), segmenter,
                     [parameter_counts(segmenter, "segmenter")], f"{replicas.describe()}: bn_adapt")

    @torch.no_grad()
    def step(self, task: str, item: dict) -> StepResult:
        return StepResult(self.segmenter(item["image"].to(self.device)), None, False, [])
