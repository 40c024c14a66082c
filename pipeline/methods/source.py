"""`source`: the unadapted segmenter, scored as it is (the baseline every adaptation is measured against)."""
from __future__ import annotations

import torch

from pipeline.methods.base import Built, Method, StepResult, load_segmenter, parameter_counts


class Source(Method):
    """The unadapted segmenter."""

    name, adapts = "source", False

    def __init__(self, segmenter: torch.nn.Module, device: torch.device):
        self.segmenter, self.device = segmenter, device

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        from pipeline.dusa.engine import precision_of
        segmenter = load_segmenter(cfg, device).requires_grad_(False)
        if precision_of(ds_config) == "bf16":  # the preset's weights; under autocast, float32
            segmenter = segmenter.to(torch.bfloat16)
        return Built(cls(segmenter, device), segmenter, [parameter_counts(segmenter, "segmenter")],
                     f"{replicas.describe()}: source")

    @torch.no_grad()
    def step(self, task: str, item: dict) -> StepResult:
        return StepResult(self.segmenter(item["image"].to(self.device)), None, False, [])
