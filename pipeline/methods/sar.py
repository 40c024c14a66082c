"""`sar`: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023, "Towards Stable Test-Time
Adaptation in Dynamic Wild World"), per pixel for segmentation.

The segmenter's normalisation layers' affine weights and biases adapt (as in `tent`), one image at a time:

1. reliable pixels: those whose prediction entropy is below `margin` x ln C (the paper's E_0 = 0.4 ln C);
2. a sharpness-aware step (SAM, rho `rho`): the mean entropy of the reliable pixels is differentiated, the
   weights move to w + rho g / ||g||, the entropy is taken again there over the pixels that were reliable and
   still are, and its gradient updates w (SGD with momentum 0.9);
3. recovery: an exponential moving average of that second entropy (0.9 old + 0.1 new) below
   `reset_threshold` (0.2) means the model is collapsing to trivial, confident predictions: weights and
   optimizer go back to the source and the average starts over.

Differences from the classification code, for one image of pixels: "samples" are pixels; an image with no
reliable pixel (or none left after the perturbation) makes no update (SGD's momentum would still move the
weights on a zero gradient there); BatchNorm keeps its running statistics (eval behaviour, as `tent` here:
the batch statistics SAR forces would be one image's, which is `bn_adapt`'s business); every normalisation
layer adapts (the paper's code leaves out the top blocks of ViT-Base and ResNet-50, which SegFormer has no
counterpart of). The learning rate is the code's for LayerNorm models (ViT-Base: 0.001 / 64 per image, doubled
at batch size 1): 3.125e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.methods.base import Built, StepResult, load_segmenter, parameter_counts, working_dtype
from pipeline.methods.segmenter_state import (AdapterMethod, autocast, check_domains, pixel_entropy,
                                              refuse_accumulation)
from pipeline.methods.tent import norm_affine_parameters


@dataclass
class SarOptions:
    """sar: the paper's settings."""

    lr: float = 0.001 / 64 * 2
    """SGD's learning rate (the authors' code for LayerNorm models at batch size 1: 0.001 / 64 x 2 = 3.125e-5;
    `--tta.lr` is for dusa and tent)."""
    momentum: float = 0.9
    """SGD's momentum."""
    rho: float = 0.05
    """SAM's neighbourhood radius: the weights move by rho along the normalised gradient before the update's
    gradient is taken."""
    margin: float = 0.4
    """Reliable pixels have an entropy below margin x ln C (C: the classes)."""
    reset_threshold: float = 0.2
    """Recovery: the source weights come back when the moving average of the entropy falls below this."""
    ema_momentum: float = 0.9
    """The moving average of the entropy: momentum x old + (1 - momentum) x new."""


class SAR:
    """Adapts `segmenter`'s norm layers in place; `step` returns the logits of its first forward (scored)."""

    def __init__(self, segmenter: nn.Module, options: SarOptions, num_classes: int,
                 autocast_dtype: torch.dtype | None = None):
        self.segmenter = segmenter.eval()
        self.params = norm_affine_parameters(segmenter)
        self.options, self.autocast_dtype = options, autocast_dtype
        self.margin = options.margin * math.log(num_classes)
        self.optimizer = torch.optim.SGD(self.params, lr=options.lr, momentum=options.momentum)
        self._initial = [p.detach().clone() for p in self.params]
        self.ema: float | None = None  # the moving average of the entropy, None after a reset
        self.recoveries = 0  # resets to the source by the recovery rule since the last `reset`
        self.skipped = False
        self.reliable = 0.0  # the fraction of the last image's pixels that were reliable

    def _entropy(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(image.device, self.autocast_dtype):
            logits = self.segmenter(image)
        return logits, pixel_entropy(logits)

    def step(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [1, 3, H, W] in [0, 1] -> (logits before the update; the reliable pixels' mean entropy, 0 when
        none is reliable), detached."""
        logits, entropy = self._entropy(image)
        reliable = entropy < self.margin
        self.reliable = float(reliable.float().mean())
        loss = entropy[reliable].mean() if self.reliable > 0 else entropy.sum() * 0
        self.skipped = not bool(torch.isfinite(loss))  # a NaN/inf loss must not reach the weights
        if self.reliable > 0 and not self.skipped:
            loss.backward()
            self._sharpness_aware_update(image, reliable)
            if self.ema is not None and self.ema < self.options.reset_threshold:
                self._restore_source()
                self.recoveries += 1
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach(), loss.detach()

    def _sharpness_aware_update(self, image: torch.Tensor, reliable: torch.Tensor) -> None:
        """From the first entropy's gradients: the step at the perturbed weights (and the moving average)."""
        rho = self.options.rho
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = rho / (norm + 1e-12)
            origin = [p.detach().clone() for p in self.params]
            for p, g in zip(self.params, grads):
                p.add_(g * scale)
        self.optimizer.zero_grad(set_to_none=True)
        _, entropy = self._entropy(image)
        entropy = entropy[reliable]
        still = entropy < self.margin
        second = entropy[still].mean() if bool(still.any()) else None
        if second is not None and bool(torch.isfinite(second)):
            m = self.options.ema_momentum
            value = float(second.detach())
            self.ema = value if self.ema is None else m * self.ema + (1 - m) * value
            second.backward()
        else:
            second = None
        with torch.no_grad():
            for p, o in zip(self.params, origin):
                p.copy_(o)
        if second is not None:
            self.optimizer.step()

    @torch.no_grad()
    def _restore_source(self) -> None:
        for p, p0 in zip(self.params, self._initial):
            p.copy_(p0)
        self.optimizer.state.clear()
        self.ema = None

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "ema": torch.tensor(math.nan if self.ema is None else self.ema, dtype=torch.float64)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for p, saved in zip(self.params, state["params"]):
            p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        ema = float(state["ema"])
        self.ema = None if math.isnan(ema) else ema

    def reset(self) -> None:
        """Bit-exact source norm parameters, fresh SGD state, no moving average."""
        self._restore_source()
        self.recoveries = 0
        self.optimizer.zero_grad(set_to_none=True)


class Sar(AdapterMethod):
    """`sar`: `SAR` on one process per replica."""

    name, options = "sar", SarOptions

    def __init__(self, sar: SAR, device: torch.device):
        self.sar, self.device = sar, device
        self.adapter = sar

    @classmethod
    def check(cls, cfg, processes: int) -> None:
        o = cfg.sar
        check_domains("sar", [
            ("lr", o.lr, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
            ("momentum", o.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1),
            ("rho", o.rho, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
            ("margin", o.margin, "a finite number > 0", lambda v: math.isfinite(v) and v > 0),
            ("reset_threshold", o.reset_threshold, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
            ("ema_momentum", o.ema_momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)])
        refuse_accumulation(cfg, "sar")

    @classmethod
    def build(cls, cfg, class_names, device, ds_config, report, replicas) -> Built:
        segmenter = load_segmenter(cfg, device)
        # float32 weights for SGD; bf16 compute by autocast under either bf16 preset
        sar = SAR(segmenter, cfg.sar, len(class_names), working_dtype(ds_config))
        return Built(cls(sar, device), segmenter, [parameter_counts(segmenter, "segmenter")],
                     f"{replicas.describe()}: sar")

    def step(self, task: str, item: dict) -> StepResult:
        recoveries = self.sar.recoveries
        logits, loss = self.sar.step(item["image"].to(self.device))
        notes = [f"reliable pixels {self.sar.reliable:.0%}"]
        if self.sar.recoveries > recoveries:
            notes.append("entropy average below the threshold: weights back to the source")
        return StepResult(logits, loss, self.sar.skipped, notes)

