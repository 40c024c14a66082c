"""Tent (Wang et al., ICLR 2021, "Tent: Fully Test-time Adaptation by Entropy Minimization") for the segmenter.

One Adam step per image on the mean pixel entropy of the segmenter's own prediction, adapting only the
affine weight and bias of its normalization layers (SegFormer: the LayerNorms of the encoder and the
BatchNorm2d of the decode head). Plain torch on one device: no generator, no pipeline.

Choice for a batch of one image: the model stays in eval behaviour, so BatchNorm keeps its running
statistics (Tent's batch statistics would come from a single image's pixels) and dropout/drop-path stay
off, the same protocol as the DUSA runs; only the affine parameters adapt.
"""
from __future__ import annotations


import torch
from torch import nn

from pipeline.methods.base import Built, StepResult, load_segmenter, parameter_counts, working_dtype
from pipeline.methods.segmenter_state import AdapterMethod

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Freezes `model`, then unfreezes the affine weight/bias of its normalization layers (returned)."""
    model.requires_grad_(False)
    params = []
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            for p in module.parameters(recurse=False):  # weight and bias; None when affine=False
                p.requires_grad_(True)
                params.append(p)
    if not params:
        raise ValueError(f"{type(model).__name__} has no normalization layer with affine parameters to adapt")
    return params


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the entropy of softmax over classes (dim 1), computed in float32."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


class Tent:
    """Adapts `segmenter` in place; `step` returns the logits of its adaptation forward (the scored ones).

    The loss is taken at the logits' own resolution (1/4 of the whole resized image): upsampling first
    would only interpolate the same values.
    """

    def __init__(self, segmenter: nn.Module, lr: float, autocast_dtype: torch.dtype | None = None,
                 accumulation_steps: int = 1):
        self.segmenter = segmenter.eval()
        self.params = norm_affine_parameters(segmenter)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.autocast_dtype = autocast_dtype
        self.accumulation_steps = accumulation_steps  # update every k images from their summed losses / k
        self._accumulated = 0
        self._initial = [p.detach().clone() for p in self.params]
        self.skipped = False  # whether the last step's update was skipped (non-finite loss)

    def step(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [1, 3, H, W] in [0, 1] -> (logits before the update, detached; entropy loss, detached)."""
        enabled = self.autocast_dtype is not None
        with torch.autocast(image.device.type, dtype=self.autocast_dtype, enabled=enabled):
            logits = self.segmenter(image)
        loss = mean_entropy(logits)
        (loss / self.accumulation_steps).backward()
        self.skipped = not bool(torch.isfinite(loss))  # a NaN/inf loss must not reach the weights
        if self.skipped:  # the images waiting for this update go with it
            self.discard_accumulated()
        else:
            self._accumulated += 1
            if self._accumulated == self.accumulation_steps:
                self.optimizer.step()
                self.discard_accumulated()
        return logits.detach(), loss.detach()

    def discard_accumulated(self) -> None:
        """Drops the gradients waiting for an update (after one, a task's leftovers, a NaN image's group)."""
        self._accumulated = 0
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu() for p in self.params], "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, saved in zip(self.params, state["params"]):
            p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def reset(self) -> None:
        """Bit-exact initial norm parameters and fresh Adam state (moments and step counts)."""
        for p, p0 in zip(self.params, self._initial):
            p.copy_(p0)
        self.optimizer.state.clear()
        self.discard_accumulated()


class TentMethod(AdapterMethod):
    """`tent`: `Tent` on one process per replica."""

    name = "tent"

    def __init__(self, tent: Tent, device: torch.device):
        self.tent, self.device = tent, device
        self.adapter = tent

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        segmenter = load_segmenter(cfg, device)
        # float32 weights for Adam; bf16 compute by autocast under either bf16 preset
        tent = Tent(segmenter, cfg.tta.segmenter_lr, working_dtype(ds_config), cfg.tta.accumulation_steps)
        return Built(cls(tent, device), segmenter, [parameter_counts(segmenter, "segmenter")],
                     f"{replicas.describe()}: tent")

    def step(self, task: str, item: dict) -> StepResult:
        logits, loss = self.tent.step(item["image"].to(self.device))
        return StepResult(logits, loss, self.tent.skipped, [])

    def end_task(self) -> None:
        self.tent.discard_accumulated()

