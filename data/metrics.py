"""ADE20K label conversion and the segmentation metric (mIoU / aAcc over a whole task), in percent.

The metric is mmseg's `IoUMetric`: one confusion matrix over the task, label 255 ignored, IoU and Acc
per class from its totals, mIoU the mean over classes with a non-empty union (the others are NaN),
aAcc the correct share of all non-ignored pixels; every value in percent, as mmseg reports them
(not rounded here: rounding is for display). The counts are kept on the device; torchmetrics (the
authors' library: `MulticlassJaccardIndex`, `MulticlassAccuracy`) computes the scores from them.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

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
    `compute()`, which reads the results back anyway and computes them with torchmetrics.
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
        with warnings.catch_warnings():  # the state is set, not updated: torchmetrics' note about it does not apply
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
            iou, miou, acc, aacc = [100 * metric.compute() for metric in self._scores(confmat)]
        union = confmat.sum(0) + confmat.sum(1) - confmat.diag()
        iou = torch.where(union > 0, iou, math.nan)  # mmseg: undefined, not 0, where a class is in neither map
        acc = torch.where(confmat.sum(1) > 0, acc, math.nan)
        return {"mIoU": float(miou), "aAcc": float(aacc) if bool(confmat.sum() > 0) else math.nan,
                "IoU": iou.tolist(), "Acc": acc.tolist()}

    def _scores(self, confmat: torch.Tensor) -> list:
        """torchmetrics' metrics (per-class IoU, mIoU, per-class Acc, aAcc) holding these counts as their state.

        The counts are handed over as the metrics' state rather than through `update` (which reads back to the
        host at every image: boolean indexing of the ignored pixels, `torch.bincount`), and `sync_on_compute`
        is off: a replica's tasks are its own, so no collective waits on the other replicas. mIoU is the macro
        average, which leaves out the classes in neither map, as mmseg's mean of the defined IoUs does."""
        n = self.num_classes
        tp = confmat.diag()
        fp, fn = confmat.sum(0) - tp, confmat.sum(1) - tp
        # float64 counts: torchmetrics divides in their dtype (its IoU casts to float32 itself)
        stats = {k: v.double() for k, v in {"tp": tp, "fp": fp, "fn": fn, "tn": confmat.sum() - tp - fp - fn}.items()}
        metrics = [MulticlassJaccardIndex(n, average="none", sync_on_compute=False, validate_args=False),
                   MulticlassJaccardIndex(n, average="macro", sync_on_compute=False, validate_args=False),
                   MulticlassAccuracy(n, average="none", sync_on_compute=False, validate_args=False),
                   MulticlassAccuracy(n, average="micro", sync_on_compute=False, validate_args=False)]
        for metric in metrics:
            metric.to(confmat.device)
            metric.merge_state({"confmat": confmat} if isinstance(metric, MulticlassJaccardIndex) else stats)
        return metrics
