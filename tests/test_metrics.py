import math

import numpy as np
import pytest
import torch

from data.metrics import SegmentationMetric, ade_label_to_train_id

# 5 classes; the last target pixel is ignored (255) and its prediction 4 must not count.
TARGET = torch.tensor([[0, 0, 1, 1],
                       [1, 2, 2, 255]])
PRED = torch.tensor([[0, 1, 1, 1],
                     [3, 2, 0, 4]])
# Valid (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (1,3) (2,2) (2,0) -> 7 pixels, 4 correct.
# class 0: inter 1, gt 2, pred 2 (from (0,0), (2,0)) -> union 3 -> IoU 1/3, Acc 1/2
# class 1: inter 2, gt 3, pred 3                      -> union 4 -> IoU 1/2, Acc 2/3
# class 2: inter 1, gt 2, pred 1                      -> union 2 -> IoU 1/2, Acc 1/2
# class 3: inter 0, gt 0, pred 1                      -> union 1 -> IoU 0,   Acc nan (no gt)
# class 4: only predicted on the ignored pixel        -> union 0 -> IoU nan, Acc nan
# mIoU over classes with union > 0: (1/3 + 1/2 + 1/2 + 0) / 4 = 1/3;  aAcc = 4/7. All reported in percent.
EXPECTED_IOU = [100 / 3, 100 / 2, 100 / 2, 0.0, math.nan]
EXPECTED_ACC = [100 / 2, 200 / 3, 100 / 2, math.nan, math.nan]


def assert_list_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w), (got, want)


def test_hand_computed_example():
    m = SegmentationMetric(5)
    m.update(PRED, TARGET)
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100 / 3)
    assert r["aAcc"] == pytest.approx(400 / 7)
    assert_list_close(r["IoU"], EXPECTED_IOU)
    assert_list_close(r["Acc"], EXPECTED_ACC)
    assert isinstance(r["mIoU"], float) and isinstance(r["aAcc"], float)


def test_two_updates_equal_one_update_of_concatenation():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 6, (2, 9, 11), generator=g)
    target = torch.randint(0, 6, (2, 9, 11), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    split = SegmentationMetric(6)
    split.update(pred[0], target[0])
    split.update(pred[1], target[1])
    whole = SegmentationMetric(6)
    whole.update(torch.cat([pred[0], pred[1]]), torch.cat([target[0], target[1]]))
    a, b = split.compute(), whole.compute()
    assert a["mIoU"] == pytest.approx(b["mIoU"]) and a["aAcc"] == pytest.approx(b["aAcc"])
    assert_list_close(a["IoU"], b["IoU"])
    assert_list_close(a["Acc"], b["Acc"])
    assert 0.0 <= a["mIoU"] <= 100.0 and 0.0 <= a["aAcc"] <= 100.0


def test_batched_input_and_reset():
    m = SegmentationMetric(5)
    m.update(torch.stack([PRED, PRED]), torch.stack([TARGET, TARGET]))
    r = m.compute()  # doubling every count leaves every ratio unchanged
    assert r["mIoU"] == pytest.approx(100 / 3) and r["aAcc"] == pytest.approx(400 / 7)
    m.reset()
    m.update(TARGET.clamp(max=4), TARGET)  # perfect prediction after reset
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100.0) and r["aAcc"] == pytest.approx(100.0)
    assert_list_close(r["IoU"], [100.0, 100.0, 100.0, math.nan, math.nan])


def test_compute_before_update_is_nan():
    r = SegmentationMetric(3).compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["aAcc"]) and len(r["IoU"]) == 3


def test_shape_mismatch_names_both_shapes():
    m = SegmentationMetric(5)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(4, 2\)"):
        m.update(PRED, TARGET.T)


def test_invalid_values():
    m = SegmentationMetric(5)
    with pytest.raises(ValueError, match="prediction 5"):
        m.update(torch.full((2, 2), 5), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prediction -1"):
        m.update(torch.full((2, 2), -1), torch.full((2, 2), 255))  # even on ignored pixels
    with pytest.raises(ValueError, match="target 7"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2))


def test_ade_label_to_train_id():
    raw = np.array([[0, 1, 2], [149, 150, 0]], dtype=np.uint8)
    out = ade_label_to_train_id(raw)
    assert out.dtype == torch.long
    assert out.tolist() == [[255, 0, 1], [148, 149, 255]]
    assert ade_label_to_train_id(torch.from_numpy(raw)).tolist() == out.tolist()
    with pytest.raises(ValueError, match="151"):
        ade_label_to_train_id(np.array([[0, 151]], dtype=np.uint8))


def test_update_reads_nothing_back_to_the_host():
    # Meta tensors have no data: any host read (.item(), bool(), nonzero) in update would raise.
    m = SegmentationMetric(5)
    m.update(PRED.to("meta"), TARGET.to("meta"))
    m.update(PRED.to("meta"), TARGET)  # a CPU target joins the prediction's device
    assert m._hist is not None and m._hist.device.type == "meta"


def mmseg_reference(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
    """mmseg's IoUMetric restated in numpy: areas of intersection, union, prediction and label per class
    over all images, IoU = intersect / union and Acc = intersect / label (NaN where 0/0), mIoU and mAcc
    their nan-means, aAcc = all intersections / all labels; in percent (each ratio times 100, as mmseg's
    summary takes them); float64 throughout."""
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    intersect = np.bincount(target[pred == target], minlength=num_classes).astype(np.float64)
    area_pred = np.bincount(pred, minlength=num_classes).astype(np.float64)
    area_label = np.bincount(target, minlength=num_classes).astype(np.float64)
    union = area_pred + area_label - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = intersect / union, intersect / area_label
    return {"mIoU": 100 * np.nanmean(iou), "aAcc": 100 * (intersect.sum() / area_label.sum()),  # ratios, then %
            "IoU": list(100 * iou), "Acc": list(100 * acc)}


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_the_mmseg_reference_bit_for_bit_with_absent_classes(seed):
    """Classes 3 and 7 are in neither map, class 5 only predicted, class 6 only in the labels; a random share
    of pixels is ignored. IoU and mIoU in float64 from the counts, Acc and aAcc from torchmetrics in float64:
    every value equal to the float64 reference, bit for bit (NaN where it has NaN)."""
    rng = np.random.default_rng(seed)
    num_classes, present = 9, [0, 1, 2, 4, 8]
    metric = SegmentationMetric(num_classes)
    preds, targets = [], []
    for _ in range(3):
        target = rng.choice(present + [6], size=(2, 17, 23))
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.choice(present + [5], size=target.shape))
        pred = np.where(pred == 6, 0, pred)  # 6 is never predicted
        target = np.where(rng.random(target.shape) < 0.1, 255, target)
        metric.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred.ravel())
        targets.append(target.ravel())
    got, want = metric.compute(), mmseg_reference(np.concatenate(preds), np.concatenate(targets), num_classes)
    assert math.isnan(got["IoU"][3]) and math.isnan(got["IoU"][7]) and got["IoU"][5] == 0.0
    assert math.isnan(got["Acc"][5]) and got["IoU"][6] == 0.0
    assert_bitwise_equal(got, want)


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got["mIoU"] == want["mIoU"] and got["aAcc"] == want["aAcc"], (got["mIoU"], want["mIoU"])
    for key in ("IoU", "Acc"):
        assert len(got[key]) == len(want[key])
        assert all(math.isnan(g) and math.isnan(w) or g == w for g, w in zip(got[key], want[key])), key


def large_task(seed: int, num_classes: int, present: int, shape: tuple, correct: float):
    """A task's metric over images of `shape` whose labels hold `present` of the classes, a `correct` share of
    the predictions right (the rest uniform over all classes) and 5 % of the pixels ignored: (metric, pred,
    target)."""
    rng = np.random.default_rng(seed)
    target = rng.choice(rng.permutation(num_classes)[:present], size=shape)
    pred = np.where(rng.random(target.shape) < correct, target, rng.integers(0, num_classes, size=target.shape))
    target = np.where(rng.random(target.shape) < 0.05, 255, target)
    metric = SegmentationMetric(num_classes)
    for p, t in zip(pred, target):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    return metric, pred, target


@pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method")  # its state is set
def test_150_classes_of_a_large_task_equal_the_float64_reference_where_float32_does_not():
    """ADE20K's 150 classes (a dozen absent), counts far above float32's exact integers' reach in the
    divisions' results: the scores equal the float64 reference bit for bit. torchmetrics' Jaccard index is
    float32 (why IoU is computed here, not by it): its mIoU differs from the reference."""
    from torchmetrics.classification import MulticlassJaccardIndex
    num_classes = 150
    metric, pred, target = large_task(0, num_classes, 138, (4, 300, 400), 0.7)
    got, want = metric.compute(), mmseg_reference(pred.ravel(), target.ravel(), num_classes)
    assert_bitwise_equal(got, want)
    jaccard = MulticlassJaccardIndex(num_classes, average="macro", sync_on_compute=False, validate_args=False)
    jaccard.merge_state({"confmat": metric._hist[:num_classes ** 2].view(num_classes, num_classes)})
    float32 = jaccard.compute()
    assert float32.dtype == torch.float32 and 100 * float(float32) != want["mIoU"]
    assert float(100 * float32) == pytest.approx(want["mIoU"], rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method")  # its state is set
def test_accuracies_equal_torchmetrics_multiclass_accuracy_on_float64_counts_bit_for_bit():
    """Acc and aAcc, divided here in float64, are those of torchmetrics' `MulticlassAccuracy` (the authors'
    library) holding the same counts in float64, bit for bit (a class without labelled pixels: NaN here, where
    torchmetrics says 0)."""
    from torchmetrics.classification import MulticlassAccuracy
    num_classes = 150
    metric, _, _ = large_task(1, num_classes, 140, (3, 200, 300), 0.6)
    got = metric.compute()
    confmat = metric._hist[:num_classes ** 2].view(num_classes, num_classes)
    tp = confmat.diag()
    fp, fn = confmat.sum(0) - tp, confmat.sum(1) - tp
    state = {k: v.double() for k, v in {"tp": tp, "fp": fp, "fn": fn, "tn": confmat.sum() - tp - fp - fn}.items()}
    per_class, overall = [MulticlassAccuracy(num_classes, average=average, sync_on_compute=False, validate_args=False)
                          for average in ("none", "micro")]
    for reference in (per_class, overall):
        reference.merge_state(state)
    labelled = confmat.sum(1) > 0
    want = (100 * per_class.compute()).tolist()
    assert not labelled.all() and all(math.isnan(g) for g, k in zip(got["Acc"], labelled) if not k)
    assert [g for g, k in zip(got["Acc"], labelled) if k] == [w for w, k in zip(want, labelled) if k]
    assert got["aAcc"] == float(100 * overall.compute())


def test_compute_runs_no_collective(monkeypatch):
    """A replica's scores never wait for the other replicas: compute calls no torch.distributed collective
    even where a process group would exist."""
    import torch.distributed as dist
    called = []
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, lambda *a, _name=name, **k: called.append(_name))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    metric = SegmentationMetric(5)
    metric.update(PRED, TARGET)
    assert metric.compute()["mIoU"] == pytest.approx(100 / 3)
    assert called == []
