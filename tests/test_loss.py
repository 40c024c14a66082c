"""Independent tests of pipeline.dusa.loss against the objective ("The method, exactly" in the README).

The reference below is written from the specification only, with explicit loops over pixels in
float64. The logits it takes are already LogitNormed (at the segmenter's resolution) and resized:
    p_n          = softmax over the N selected classes of logits / temperature
    v_bar        = sum_n p_n * v_n          (broadcast over the 16 channels)
    L_w          = mean over unmasked pixels and channels of (v_bar - target)^2
"""
import math

import pytest
import torch

from pipeline.dusa.loss import area_k_candidates, area_scores, dusa_loss, logit_norm, select_candidates

CH = 16


# ----------------------------------------------------------------------------------------------
# Reference implementation (spec, explicit loops, float64)
# ----------------------------------------------------------------------------------------------
def reference_loss(logits, classes, mask, velocity, target, temperature=1.0):
    """Loop over pixels; differentiable w.r.t. logits/velocity/target (float64 torch scalars)."""
    num_classes, h, w = logits.shape
    cls = [int(c) for c in classes]
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(h):
        for j in range(w):
            if not bool(mask[i, j]):
                continue
            vec = logits[:, i, j].double()
            z = [vec[c] / temperature for c in cls]
            zmax = max(float(x.detach()) for x in z)
            e = [torch.exp(x - zmax) for x in z]
            denom = sum(e)
            p = [x / denom for x in e]
            v_bar = sum(p[n] * velocity[n, :, i, j].double() for n in range(len(cls)))  # [CH]
            total = total + ((v_bar - target[:, i, j].double()) ** 2).sum()
            count += velocity.shape[1]
    return total / count


def random_case(seed, num_classes, n, h, w, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, h, w, generator=g, dtype=torch.float64) * 3.0
    classes = torch.randperm(num_classes, generator=g)[:n]
    if mask_kind == "random":
        mask = torch.rand(h, w, generator=g) < 0.6
        mask[0, 0] = True  # at least one pixel counts
    else:
        mask = torch.ones(h, w, dtype=torch.bool)
    velocity = torch.randn(n, CH, h, w, generator=g, dtype=torch.float64)
    target = torch.randn(CH, h, w, generator=g, dtype=torch.float64)
    return logits, classes, mask, velocity, target


def rel_close(a, b, rel=1e-5):
    a, b = float(a), float(b)
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# ----------------------------------------------------------------------------------------------
# dusa_loss: values
# ----------------------------------------------------------------------------------------------
CASES = [
    # seed, C, N, h, w, mask kind, temperature
    (0, 7, 1, 4, 5, "all", 1.0),
    (1, 7, 3, 4, 5, "random", 1.0),
    (2, 10, 2, 3, 4, "random", 0.5),
    (3, 19, 6, 4, 5, "all", 2.0),
    (4, 33, 4, 4, 5, "random", 2.0),
    (5, 150, 5, 4, 5, "random", 0.5),
    (6, 150, 6, 4, 5, "all", 1.0),
    (7, 150, 1, 2, 3, "random", 2.0),
    (8, 64, 2, 5, 4, "all", 0.5),
]


@pytest.mark.parametrize("seed,num_classes,n,h,w,mask_kind,temperature", CASES)
def test_loss_matches_loop_reference(seed, num_classes, n, h, w, mask_kind, temperature):
    logits, classes, mask, velocity, target = random_case(seed, num_classes, n, h, w, mask_kind)
    got = dusa_loss(logits, classes, mask, velocity, target, temperature=temperature)
    want = reference_loss(logits, classes, mask, velocity, target, temperature)
    assert got.dim() == 0
    assert rel_close(got, want), (float(got), float(want))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_loss_float32_inputs_match_reference(seed):
    logits, classes, mask, velocity, target = random_case(seed, 150, 4, 4, 5)
    got = dusa_loss(logits.float(), classes, mask, velocity.float(), target.float())
    want = reference_loss(logits, classes, mask, velocity, target)
    assert got.dtype == torch.float32
    assert rel_close(got, want), (float(got), float(want))


def test_loss_default_temperature_is_one():
    logits, classes, mask, velocity, target = random_case(21, 12, 3, 4, 5)
    assert rel_close(dusa_loss(logits, classes, mask, velocity, target),
                     dusa_loss(logits, classes, mask, velocity, target, temperature=1.0), rel=1e-7)
    assert rel_close(dusa_loss(logits, classes, mask, velocity, target),
                     reference_loss(logits, classes, mask, velocity, target, 1.0))


def test_loss_hand_computed_single_pixel():
    # C=2, one pixel with LogitNormed logits (0.6, 0.8) (raw (3, 4), norm 5); p = softmax(0.6, 0.8).
    logits = logit_norm(torch.tensor([3.0, 4.0]).view(2, 1, 1))
    classes = torch.tensor([0, 1])
    mask = torch.ones(1, 1, dtype=torch.bool)
    velocity = torch.zeros(2, CH, 1, 1)
    velocity[0] = 1.0
    velocity[1] = -1.0
    target = torch.full((CH, 1, 1), 0.25)
    p0 = math.exp(0.6) / (math.exp(0.6) + math.exp(0.8))
    v_bar = p0 * 1.0 + (1 - p0) * -1.0
    want = (v_bar - 0.25) ** 2
    assert rel_close(dusa_loss(logits, classes, mask, velocity, target), want)
    # temperature 0.5: softmax(1.2, 1.6)
    p0 = math.exp(1.2) / (math.exp(1.2) + math.exp(1.6))
    want = (p0 - (1 - p0) - 0.25) ** 2
    assert rel_close(dusa_loss(logits, classes, mask, velocity, target, temperature=0.5), want)


def test_single_class_loss_is_plain_mse():
    # N = 1: p = 1 everywhere, so L = mean over unmasked pixels/channels of (v_1 - target)^2.
    logits, classes, mask, velocity, target = random_case(31, 20, 1, 4, 5)
    m = mask.unsqueeze(0).expand(CH, -1, -1)
    want = ((velocity[0] - target) ** 2)[m].mean()
    assert rel_close(dusa_loss(logits, classes, mask, velocity, target, temperature=0.5), want)


def test_masked_pixels_do_not_count():
    logits, classes, mask, velocity, target = random_case(41, 15, 3, 4, 5)
    base = dusa_loss(logits, classes, mask, velocity, target)
    off = ~mask
    assert off.any()
    logits2, velocity2, target2 = logits.clone(), velocity.clone(), target.clone()
    logits2[:, off] = 100.0 * torch.randn(logits.shape[0], int(off.sum()), dtype=torch.float64)
    velocity2[:, :, off] = 50.0
    target2[:, off] = -50.0
    assert rel_close(dusa_loss(logits2, classes, mask, velocity2, target2), base, rel=1e-7)
    # the mean is over unmasked pixels only (not over all pixels)
    mse = ((torch.einsum("nhw,nchw->chw",
                         torch.softmax(logits[classes], 0),
                         velocity) - target) ** 2)
    assert rel_close(base, mse[:, mask].mean())
    assert not rel_close(base, mse.mean(), rel=1e-3)


def test_logitnorm_divides_each_pixel_by_its_norm_over_all_classes():
    logits = torch.randn(30, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(51)) * 3
    normed = logit_norm(logits)
    torch.testing.assert_close(normed.norm(dim=0), torch.ones(4, 5, dtype=torch.float64))
    scale = torch.rand(1, 4, 5, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(logit_norm(logits * scale), normed)  # scale-invariant per pixel
    torch.testing.assert_close(logit_norm(logits[None], dim=1)[0], normed)  # batched: classes on dim 1
    assert torch.isfinite(logit_norm(torch.zeros(3, 2, 2))).all()  # an all-zero pixel stays finite


def test_class_order_permutation_invariance():
    logits, classes, mask, velocity, target = random_case(61, 40, 5, 4, 5)
    base = dusa_loss(logits, classes, mask, velocity, target)
    for seed in range(4):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        got = dusa_loss(logits, classes[perm], mask, velocity[perm], target)
        assert rel_close(got, base, rel=1e-6)
    # permuting only the classes (not the velocities) does change it
    perm = torch.tensor([1, 0, 2, 3, 4])
    assert not rel_close(dusa_loss(logits, classes[perm], mask, velocity, target), base, rel=1e-4)


def test_unselected_class_logits_do_not_enter_the_loss():
    # LogitNorm over all classes happens before, at the segmenter's resolution: here only the
    # candidates' (normalised) logits set p.
    logits, _, _, velocity, target = random_case(71, 8, 2, 4, 5, "all")
    classes = torch.tensor([0, 1])
    mask = torch.ones(4, 5, dtype=torch.bool)
    base = dusa_loss(logits, classes, mask, velocity, target)
    changed = logits.clone()
    changed[5] += 10.0  # class 5 is not selected
    assert rel_close(dusa_loss(changed, classes, mask, velocity, target), base, rel=1e-12)
    changed[1, 2, 3] += 1.0  # a candidate's logit does
    got = dusa_loss(changed, classes, mask, velocity, target)
    assert not rel_close(got, base, rel=1e-6)
    assert rel_close(got, reference_loss(changed, classes, mask, velocity, target))


def test_bf16_velocity_gives_float32_result():
    logits, classes, mask, velocity, target = random_case(81, 150, 3, 4, 5)
    got = dusa_loss(logits.float(), classes, mask, velocity.bfloat16(), target.float())
    assert got.dtype == torch.float32
    # the value is that of the bf16-rounded velocities, computed in (at least) float32
    want = reference_loss(logits, classes, mask, velocity.bfloat16().double(), target)
    assert rel_close(got, want, rel=1e-5)
    # all-bf16 inputs too
    got = dusa_loss(logits.bfloat16(), classes, mask, velocity.bfloat16(), target.bfloat16())
    assert got.dtype == torch.float32
    want = reference_loss(logits.bfloat16().double(), classes, mask, velocity.bfloat16().double(),
                          target.bfloat16().double())
    assert rel_close(got, want, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# dusa_loss: gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,num_classes,n,temperature", [(91, 7, 3, 1.0), (92, 20, 2, 0.5),
                                                             (93, 150, 4, 2.0), (94, 9, 1, 1.0)])
def test_gradients_match_reference_autograd(seed, num_classes, n, temperature):
    logits, classes, mask, velocity, target = random_case(seed, num_classes, n, 3, 4)
    leaves = [t.clone().requires_grad_(True) for t in (logits, velocity, target)]
    got = dusa_loss(leaves[0], classes, mask, leaves[1], leaves[2], temperature=temperature)
    got_grads = torch.autograd.grad(got, leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (logits, velocity, target)]
    want = reference_loss(ref_leaves[0], classes, mask, ref_leaves[1], ref_leaves[2], temperature)
    want_grads = torch.autograd.grad(want, ref_leaves)
    for name, g, r in zip(("logits", "velocity", "target"), got_grads, want_grads):
        assert g.shape == r.shape
        scale = r.abs().max().item()
        assert torch.allclose(g.double(), r, rtol=1e-4, atol=1e-5 * max(scale, 1e-12)), name
    # no gradient through masked-out pixels
    assert (got_grads[0][:, ~mask] == 0).all()
    assert (got_grads[1][:, :, ~mask] == 0).all()
    # only the candidates' logits get a gradient (LogitNorm was applied before), and none when N = 1
    unselected = torch.ones(num_classes, dtype=torch.bool)
    unselected[classes] = False
    assert got_grads[0][unselected].abs().max() == 0
    if n == 1:
        assert got_grads[0].abs().max() == 0  # p == 1: logits cannot matter


def test_gradcheck_logits_and_velocity():
    # finite differences in float64; the loss may compute in float32, so tolerances are loose.
    logits, classes, mask, velocity, target = random_case(101, 6, 3, 2, 3)

    def f(lg, vel):
        return dusa_loss(lg, classes, mask, vel, target, temperature=0.5)

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),
                                        velocity.clone().requires_grad_(True)),
                                    eps=1e-3, atol=2e-3, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# select_candidates
# ----------------------------------------------------------------------------------------------
def ranked_logits(num_classes, rankings, h, w):
    """Logits [C, h, w] where pixel (row-major index k) ranks classes rankings[k][0] > [1] > ...

    Listed classes get 10, 9, 8, ...; every other class gets a small negative value (distinct,
    lower for higher ids) so no ties exist anywhere.
    """
    assert len(rankings) == h * w
    base = -torch.arange(num_classes, dtype=torch.float32) * 0.01 - 1.0
    logits = base.view(-1, 1, 1).repeat(1, h, w)
    for k, ranking in enumerate(rankings):
        i, j = divmod(k, w)
        for r, c in enumerate(ranking):
            logits[c, i, j] = 10.0 - r
    return logits


def as_set(classes):
    return {int(c) for c in classes}


def check_output_format(classes, mask, h, w):
    assert classes.dtype == torch.long
    assert classes.dim() == 1
    assert torch.equal(classes, classes.sort().values)
    assert len(set(classes.tolist())) == len(classes)  # distinct
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (h, w)


def test_select_exact_candidate_set_top1():
    # two regions: top-1 class 2 on the left half, class 5 on the right half (4 x 4)
    rankings = [[2] if k % 4 < 2 else [5] for k in range(16)]
    logits = ranked_logits(10, rankings, 4, 4)
    classes, mask = select_candidates(logits, topk=1, max_classes=10, min_classes=2)
    check_output_format(classes, mask, 4, 4)
    assert classes.tolist() == [2, 5]
    assert mask.all()


def test_select_exact_candidate_set_topk():
    rankings = [[2, 7, 1] if k < 8 else [5, 2, 9] for k in range(16)]
    logits = ranked_logits(12, rankings, 4, 4)
    classes, mask = select_candidates(logits, topk=2, max_classes=10, min_classes=2)
    check_output_format(classes, mask, 4, 4)
    assert classes.tolist() == [2, 5, 7]
    assert mask.all()
    classes, mask = select_candidates(logits, topk=3, max_classes=10, min_classes=2)
    assert classes.tolist() == [1, 2, 5, 7, 9]
    assert mask.all()
    # default arguments: topk=1, max 20, min 2 (needs at least 20 classes)
    logits = ranked_logits(25, rankings, 4, 4)
    classes, mask = select_candidates(logits)
    assert classes.tolist() == [2, 5]
    assert mask.all()


def test_select_exactly_max_classes_is_not_trimmed():
    rankings = [[k % 5] for k in range(16)]
    logits = ranked_logits(8, rankings, 4, 4)
    classes, mask = select_candidates(logits, topk=1, max_classes=5, min_classes=2)
    assert classes.tolist() == [0, 1, 2, 3, 4]
    assert mask.all()


# Fill case: 4 x 4 pixels, top-1 class 3 on pixels 0-7, class 1 on pixels 8-15; second choices:
#   pixels 0-1 -> 1 (already a top-1 class), 2-5 -> 9 (4 px), 6-8 -> 4 (3 px), 9-11 -> 7 (3 px),
#   12-13 -> 2 (2 px), 14 -> 0 (1 px), 15 -> 3 (a top-1 class).
# top-2 candidates {0,1,2,3,4,7,9} (7 classes); top-1 classes {1,3}.
FILL_SECOND = [1, 1, 9, 9, 9, 9, 4, 4, 4, 7, 7, 7, 2, 2, 0, 3]
FILL_RANKINGS = [[3 if k < 8 else 1, FILL_SECOND[k]] for k in range(16)]


@pytest.mark.parametrize("max_classes", [2, 3, 4, 5, 6, 7, 9])
def test_select_fill_keeps_top1_and_draws_the_rest_uniformly(max_classes):
    logits = ranked_logits(12, FILL_RANKINGS, 4, 4)
    candidates, top1 = {0, 1, 2, 3, 4, 7, 9}, {1, 3}
    for seed in range(20):
        classes, mask = select_candidates(logits, topk=2, max_classes=max_classes, min_classes=0,
                                          generator=torch.Generator().manual_seed(seed))
        check_output_format(classes, mask, 4, 4)
        assert top1 <= as_set(classes) <= candidates
        assert len(classes) == min(max_classes, len(candidates))
        assert mask.all()
        again, _ = select_candidates(logits, topk=2, max_classes=max_classes, min_classes=0,
                                     generator=torch.Generator().manual_seed(seed))
        assert torch.equal(classes, again)  # seeded


def test_select_fill_is_uniform_over_the_other_candidates_whatever_their_pixel_counts():
    # The other candidates 0, 2, 4, 7, 9 cover 1, 2, 3, 3 and 4 pixels' top-2: each is drawn alike.
    logits = ranked_logits(12, FILL_RANKINGS, 4, 4)
    trials, counts = 2000, {c: 0 for c in (0, 2, 4, 7, 9)}
    for seed in range(trials):
        classes, _ = select_candidates(logits, topk=2, max_classes=3, min_classes=0,
                                       generator=torch.Generator().manual_seed(seed))
        (extra,) = as_set(classes) - {1, 3}
        counts[extra] += 1
    p = 1 / 5
    for c, k in counts.items():
        assert abs(k - trials * p) < 4.5 * math.sqrt(trials * p * (1 - p)), counts


def _many_top1_logits(seed=0, num_classes=30, h=5, w=6, used=12):
    """Every pixel's top-1 class is drawn from `used` classes, each used at least once."""
    g = torch.Generator().manual_seed(seed)
    top1 = torch.cat([torch.arange(used), torch.randint(0, used, (h * w - used,), generator=g)])
    top1 = top1[torch.randperm(h * w, generator=g)]
    ids = torch.randperm(num_classes, generator=g)[:used]  # which class ids are used
    top1 = ids[top1].view(h, w)
    logits = torch.randn(num_classes, h, w, generator=g)
    logits.scatter_(0, top1.unsqueeze(0), 10.0)
    return logits, top1, set(ids.tolist())


@pytest.mark.parametrize("topk", [1, 2])
def test_select_too_many_top1_classes_samples_and_masks(topk):
    logits, top1, top1_set = _many_top1_logits()
    assert len(top1_set) == 12
    results = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        classes, mask = select_candidates(logits, topk=topk, max_classes=5, min_classes=2, generator=g)
        check_output_format(classes, mask, 5, 6)
        assert len(classes) == 5
        assert as_set(classes) <= top1_set
        expected_mask = torch.isin(top1, classes)
        assert torch.equal(mask, expected_mask)
        assert mask.any() and not mask.all()
        # same seed -> same result
        classes2, mask2 = select_candidates(logits, topk=topk, max_classes=5, min_classes=2,
                                            generator=torch.Generator().manual_seed(seed))
        assert torch.equal(classes, classes2) and torch.equal(mask, mask2)
        results.add(tuple(classes.tolist()))
    # different seeds eventually give different subsets
    assert len(results) > 5


def test_select_too_many_top1_classes_roughly_uniform():
    logits, top1, top1_set = _many_top1_logits(seed=3, used=6)
    counts = {c: 0 for c in top1_set}
    trials = 1200
    for seed in range(trials):
        classes, _ = select_candidates(logits, topk=1, max_classes=3, min_classes=1,
                                       generator=torch.Generator().manual_seed(seed))
        assert len(classes) == 3
        for c in classes.tolist():
            counts[c] += 1
    # each class kept with probability 3/6 = 0.5 whatever its pixel count; sd = sqrt(n/4) ~ 17
    for c, k in counts.items():
        assert abs(k - trials / 2) < 5 * math.sqrt(trials / 4), (c, k, counts)


def test_select_regions_too_many_top1_exact_mask():
    # 2 x 6 pixels, six top-1 regions (one column each): class ids 10..15, max 4
    rankings = [[10 + (k % 6)] for k in range(12)]
    logits = ranked_logits(20, rankings, 2, 6)
    for seed in range(10):
        classes, mask = select_candidates(logits, topk=1, max_classes=4, min_classes=2,
                                          generator=torch.Generator().manual_seed(seed))
        kept_cols = [c - 10 for c in classes.tolist()]
        expected = torch.zeros(2, 6, dtype=torch.bool)
        expected[:, kept_cols] = True
        assert len(classes) == 4
        assert as_set(classes) <= set(range(10, 16))
        assert torch.equal(mask, expected)


def constant_logits(values: dict[int, float], num_classes: int, h: int, w: int) -> torch.Tensor:
    """Logits [C, h, w] with `values` for the listed classes at every pixel, 0 elsewhere. With an L2
    norm of 1 per pixel, LogitNorm leaves them unchanged and their sums are the fill's scores."""
    logits = torch.zeros(num_classes, h, w, dtype=torch.float64)
    for c, v in values.items():
        logits[c] = v
    return logits


def test_select_min_classes_adds_dominant_class():
    # every pixel's top-1 is class 3; among the other classes, class 7's summed LogitNormed logits
    # dominate (0.42 vs 0.38 per pixel, 256 pixels: a factor e^10 in the draw)
    c, h, w = 10, 16, 16
    logits = constant_logits({3: 0.8, 7: 0.42, 5: 0.38}, c, h, w)
    logits[0] = math.sqrt(1 - 0.8**2 - 0.42**2 - 0.38**2)  # the rest of the unit norm, below class 5
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        classes, mask = select_candidates(logits, topk=1, max_classes=5, min_classes=2, generator=g)
        check_output_format(classes, mask, h, w)
        assert classes.tolist() == [3, 7]
        assert mask.all()
        classes, mask = select_candidates(logits, topk=1, max_classes=5, min_classes=3,
                                          generator=torch.Generator().manual_seed(seed))
        assert classes.tolist() == [3, 5, 7]
        assert mask.all()
    # no generator works too
    classes, mask = select_candidates(logits, topk=1, max_classes=5, min_classes=2)
    assert classes.tolist() == [3, 7]
    # a class with a large logit at one pixel but a small sum is not favoured over the sum
    logits2 = logits.clone()
    logits2[1, 0, 0] = 0.7  # still below class 3 there
    classes, _ = select_candidates(logits2, topk=1, max_classes=5, min_classes=2,
                                   generator=torch.Generator().manual_seed(0))
    assert classes.tolist() == [3, 7]


def test_select_min_classes_scores_the_summed_logits_it_is_given():
    # The pipeline passes LogitNormed, resized logits: the fill's score is their plain sum per class.
    c, h, w = 10, 8, 8
    logits = constant_logits({3: 0.8, 7: 0.3, 6: 0.2}, c, h, w)
    logits[6, 0, 0] = 0.79  # one pixel (still below class 3): sum 12.6 + 0.59 < class 7's 19.2
    for seed in range(10):
        classes, _ = select_candidates(logits, topk=1, max_classes=5, min_classes=2,
                                       generator=torch.Generator().manual_seed(seed))
        assert classes.tolist() == [3, 7]


def test_select_min_classes_zero_adds_nothing():
    logits = constant_logits({3: 0.8, 7: 0.6}, 10, 4, 4)
    classes, mask = select_candidates(logits, topk=1, max_classes=5, min_classes=0)
    assert classes.tolist() == [3] and mask.all()


def test_select_min_classes_with_topk_candidates():
    rankings = [[4, 6]] * 36
    logits = ranked_logits(10, rankings, 6, 6)
    logits[8] = 8.5  # third everywhere (below class 6's 9) and by far the largest sum of the rest
    classes, mask = select_candidates(logits, topk=2, max_classes=6, min_classes=3,
                                      generator=torch.Generator().manual_seed(1))
    assert classes.tolist() == [4, 6, 8]
    assert mask.all()


def test_select_min_classes_exact_count_and_never_duplicates():
    logits = torch.zeros(6, 3, 3)
    logits[2] = 5.0  # the only candidate
    for seed in range(30):
        for min_classes in (2, 4, 6):
            classes, mask = select_candidates(logits, topk=1, max_classes=6, min_classes=min_classes,
                                              generator=torch.Generator().manual_seed(seed))
            check_output_format(classes, mask, 3, 3)
            assert len(classes) == min_classes
            assert 2 in classes.tolist()
            assert mask.all()
    assert select_candidates(logits, topk=1, max_classes=6, min_classes=6)[0].tolist() == list(range(6))


def test_select_min_classes_sampling_distribution():
    # top-1 everywhere class 0; classes 1, 2, 3 have LogitNormed pixel sums log 1, log 2, log 3
    # -> draw probabilities (without replacement, renormalised over the unchosen) 1/6, 2/6, 3/6.
    h, w = 4, 4
    logits = torch.zeros(4, h, w, dtype=torch.float64)
    for c, s in ((1, math.log(1.0)), (2, math.log(2.0)), (3, math.log(3.0))):
        logits[c] = s / (h * w)
    logits[0] = math.sqrt(1 - sum(float(logits[c, 0, 0]) ** 2 for c in (1, 2, 3)))  # unit norm per pixel
    # class 0's own (large) sum must not matter: it is already chosen
    p = {1: 1 / 6, 2: 2 / 6, 3: 3 / 6}
    trials = 3000
    single = {1: 0, 2: 0, 3: 0}
    pair_missing = {1: 0, 2: 0, 3: 0}  # with two extra draws, which class is left out
    for seed in range(trials):
        classes, _ = select_candidates(logits, topk=1, max_classes=4, min_classes=2,
                                       generator=torch.Generator().manual_seed(seed))
        assert len(classes) == 2 and classes[0] == 0
        single[int(classes[1])] += 1
        classes, _ = select_candidates(logits, topk=1, max_classes=4, min_classes=3,
                                       generator=torch.Generator().manual_seed(10_000 + seed))
        assert len(classes) == 3 and classes[0] == 0
        (missing,) = {1, 2, 3} - as_set(classes)
        pair_missing[missing] += 1
    for c in (1, 2, 3):
        sd = math.sqrt(trials * p[c] * (1 - p[c]))
        assert abs(single[c] - trials * p[c]) < 4.5 * sd, single
    # P(pair {a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b)
    for missing in (1, 2, 3):
        a, b = sorted({1, 2, 3} - {missing})
        q = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
        sd = math.sqrt(trials * q * (1 - q))
        assert abs(pair_missing[missing] - trials * q) < 4.5 * sd, pair_missing


def test_select_is_deterministic_without_sampling():
    logits = ranked_logits(12, FILL_RANKINGS, 4, 4)
    a = select_candidates(logits, topk=2, max_classes=7, min_classes=2,
                          generator=torch.Generator().manual_seed(0))
    b = select_candidates(logits, topk=2, max_classes=7, min_classes=2,
                          generator=torch.Generator().manual_seed(123))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_select_does_not_modify_logits_and_accepts_grad_tensors():
    logits = ranked_logits(12, FILL_RANKINGS, 4, 4).requires_grad_(True)
    before = logits.detach().clone()
    classes, mask = select_candidates(logits, topk=2, max_classes=7, min_classes=2)
    assert classes.tolist() == [0, 1, 2, 3, 4, 7, 9]
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("kwargs", [
    dict(topk=0),
    dict(topk=-1),
    dict(topk=11),                      # C = 10
    dict(min_classes=5, max_classes=3),
    dict(min_classes=3, max_classes=2),
    dict(min_classes=-1),
    dict(min_classes=0, max_classes=0),
])
def test_select_invalid_arguments(kwargs):
    logits = torch.randn(10, 3, 3)
    with pytest.raises(ValueError):
        select_candidates(logits, **kwargs)


def test_select_valid_edge_arguments():
    logits = torch.randn(10, 3, 3, generator=torch.Generator().manual_seed(0))
    classes, mask = select_candidates(logits, topk=10, max_classes=10, min_classes=2)
    assert classes.tolist() == list(range(10))  # every class is in every pixel's top-10
    assert mask.all()
    classes, mask = select_candidates(logits, topk=1, max_classes=3, min_classes=3,
                                      generator=torch.Generator().manual_seed(0))
    assert len(classes) == 3


# ----------------------------------------------------------------------------------------------
# area-k candidates
# ----------------------------------------------------------------------------------------------
def reference_area_candidates(raw, area_k, threshold):
    """Loops: per pixel keep the area_k largest softmax probabilities, sum per class, threshold."""
    num_classes, h, w = raw.shape
    score = [0.0] * num_classes
    for i in range(h):
        for j in range(w):
            q = torch.softmax(raw[:, i, j].double(), 0).tolist()
            for c in sorted(range(num_classes), key=lambda c: -q[c])[:area_k]:
                score[c] += q[c]
    chosen = [c for c in range(num_classes) if score[c] > threshold]
    return chosen or [max(range(num_classes), key=lambda c: score[c])]


@pytest.mark.parametrize("seed,area_k,threshold", [(0, 5, 2.0), (1, 1, 3.0), (2, 3, 0.5), (3, 5, 100.0)])
def test_area_k_candidates_match_a_direct_implementation(seed, area_k, threshold):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, 12, 6, 7, generator=g, dtype=torch.float64) * 2
    raw[1, 4] += 3.0  # one dominant class in the second window
    scores = area_scores(raw, area_k)
    assert scores.shape == (2, 12)
    for b in range(2):
        got = area_k_candidates(scores[b], threshold)
        assert got.tolist() == reference_area_candidates(raw[b], area_k, threshold)
    assert area_k_candidates(scores[1], 1e9).tolist() == [4]  # none qualifies: the best class
    with pytest.raises(ValueError):
        area_scores(raw, 13)
