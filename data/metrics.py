"""ADE20K label conversion and the segmentation metric (mIoU / aAcc over a whole task), in percent.

The metric is mmseg's `IoUMetric`: one confusion matrix over the task, label 255 ignored, IoU and Acc
per class from its totals, mIoU the mean over classes with a non-empty union (the others are NaN),
aAcc the correct share of all non-ignored pixels; every value in percent, as mmseg reports them
(not rounded here: rounding is for display). The counts are kept on the device, as int64, and every ratio is
taken in float64 from them: IoU = intersection / union, mIoU their mean as mmseg takes it (`np.nanmean`),
Acc = correct / labelled per class, aAcc = all correct / all labelled. Each equals mmseg's computation in
float64 bit for bit, and Acc and aAcc equal those of torchmetrics' `MulticlassAccuracy` (the authors' library)
given float64 counts (tests/test_metrics.py). torchmetrics itself is not imported here: importing it imports
every optional library it finds (matplotlib, scipy.signal, torchvision, ...): 478 modules that the run needs
no other way, 1.6 s of its imports on the H200 node's image. Its `MulticlassJaccardIndex` (1.9) would not do
for IoU anyway: it casts the confusion matrix to float32 before dividing, about 1e-8 (relative) off the float64
value.
"""
from __future__ import annotations

import math

import numpy as np
import torch

ADE_NUM_CLASSES = 150
IGNORE_INDEX = 255


def ade_label_to_train_id(label: np.ndarray | torch.Tensor, num_classes: int = ADE_NUM_CLASSES) -> torch.Tensor:
    """ADE20K annotation values -> train ids: 0 ("other") -> 255 (ignored), 1..K -> 0..K-1 (K = 150 for
    ADE20K; another class list, `--data.classes`, has its own K)."""
    # astype copies, so read-only arrays (np.asarray of a PIL image) are fine for from_numpy.
    label = torch.from_numpy(label.astype(np.int64)) if isinstance(label, np.ndarray) else label.long()
    if label.numel():
        # One host read per annotation: labels come from files, so this is on the CPU anyway.
        lo, hi = int(label.min()), int(label.max())
        if hi > num_classes or lo < 0:
            bad = hi if hi > num_classes else lo
            raise ValueError(f"annotation value {bad} is outside 0..{num_classes} (0 ignored, 1..{num_classes} "
                             f"the classes)")
    return torch.where(label == 0, torch.full_like(label, IGNORE_INDEX), label - 1)


class SegmentationMetric:
    """Confusion matrix accumulated over a task; IoU per class from the totals (not per image).

    `update` stays on the device of the first prediction and never reads values back to the
    host, so it does not stall an accelerator stream. Out-of-range predictions are checked at
    once for CPU tensors; on other devices they are counted on the device and reported by
    `compute()`, which reads the results back anyway (every ratio in float64).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        # hist[t * C + p] counts pixels of target t predicted p; one extra bin collects the
        # skipped pixels so that update needs no data-dependent (host-syncing) indexing.
        self._hist: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors [H, W] or [B, H, W] of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() not in (2, 3):
            raise ValueError(f"expected [H, W] or [B, H, W], got shape {tuple(pred.shape)}")
        for name, t in (("pred", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        n = self.num_classes
        if self._hist is None:
            self._hist = torch.zeros(n * n + 1, dtype=torch.long, device=pred.device)
            self._bad = torch.zeros((), dtype=torch.long, device=pred.device)
        assert self._bad is not None
        pred = pred.to(self._hist.device).long().flatten()
        target = target.to(self._hist.device, non_blocking=True).long().flatten()

        pred_ok = (pred >= 0) & (pred < n)
        target_ok = (target >= 0) & (target < n)
        ignored = target == self.ignore_index
        # Invalid: any prediction out of range, or a target that is neither a class nor ignored.
        bad = ~pred_ok | (~target_ok & ~ignored)
        if pred.device.type == "cpu" and bool(bad.any()):
            self._raise_bad(pred, target, bad)
        self._bad += bad.sum()

        keep = pred_ok & target_ok
        idx = torch.where(keep, target * n + pred, torch.full_like(pred, n * n))
        # index_add_ rather than torch.bincount: bincount reads the input max back to the host.
        self._hist.index_add_(0, idx, torch.ones_like(idx))

    def _raise_bad(self, pred: torch.Tensor, target: torch.Tensor, bad: torch.Tensor) -> None:
        i = int(bad.nonzero()[0])
        p, t = int(pred[i]), int(target[i])
        if not 0 <= p < self.num_classes:
            raise ValueError(f"prediction {p} is outside [0, {self.num_classes})")
        raise ValueError(f"target {t} is outside [0, {self.num_classes}) and is not "
                         f"ignore_index {self.ignore_index}")

    def compute(self) -> dict:
        """mIoU, aAcc (floats in percent, [0, 100]), per-class IoU and Acc (lists in percent, nan where undefined)."""
        n = self.num_classes
        if self._hist is None:
            nan = float("nan")
            return {"mIoU": nan, "aAcc": nan, "IoU": [nan] * n, "Acc": [nan] * n}
        assert self._bad is not None
        num_bad = int(self._bad)
        if num_bad:
            raise ValueError(f"{num_bad} pixels had a prediction outside [0, {n}) or a target "
                             f"that is neither a class nor ignore_index {self.ignore_index}")
        confmat = self._hist[: n * n].view(n, n)  # rows: target, cols: prediction
        intersection = confmat.diag().double()  # integers: exact in float64
        labelled, predicted = confmat.sum(1).double(), confmat.sum(0).double()
        union = predicted + labelled - intersection
        iou = (intersection / union).cpu().numpy()  # 0 / 0: NaN, mmseg's undefined IoU of a class in neither map
        acc = (intersection / labelled).cpu().numpy()  # NaN for a class without labelled pixels, as mmseg's
        total = float(labelled.sum())
        defined = ~np.isnan(iou)
        return {"mIoU": float(100 * np.nanmean(iou)) if defined.any() else math.nan,
                "aAcc": 100 * (float(intersection.sum()) / total) if total > 0 else math.nan,
                "IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}
