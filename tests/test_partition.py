"""Independent tests of the stage split: pipeline.dusa.partition.balanced_partition / check_partition.

balanced_partition(costs, num_stages) -> boundaries [0, b1, ..., len(costs)] of a contiguous split
into `num_stages` non-empty parts minimising the largest part's summed cost.
"""
import itertools
import json
import random

import pytest

from pipeline.dusa.partition import (StepCosts, balanced_partition, check_partition, default_costs, find_cost_table,
                                model_signature, plan_partition, simulate_step, table_costs)


def part_costs(costs, bounds):
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


def brute_force_optimum(costs, num_stages):
    """Smallest possible largest part over every contiguous split into non-empty parts."""
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(part_costs(costs, bounds)))
    return best


def assert_valid_bounds(bounds, n, num_stages):
    bounds = list(bounds)
    assert len(bounds) == num_stages + 1
    assert bounds[0] == 0 and bounds[-1] == n
    assert all(a < b for a, b in zip(bounds, bounds[1:]))  # non-empty parts
    assert all(isinstance(b, int) for b in bounds)


def test_partition_matches_brute_force_random():
    rng = random.Random(1234)
    checked = 0
    for trial in range(300):
        n = rng.randint(1, 9)
        if trial % 3 == 0:
            costs = [rng.randint(1, 10) for _ in range(n)]  # integer costs: many ties
        elif trial % 3 == 1:
            costs = [rng.uniform(0.05, 5.0) for _ in range(n)]
        else:
            costs = [rng.choice([0.2, 1.0, 1.0, 3.5]) for _ in range(n)]
        for num_stages in range(1, min(4, n) + 1):
            bounds = balanced_partition(costs, num_stages)
            assert_valid_bounds(bounds, n, num_stages)
            got = max(part_costs(costs, bounds))
            want = brute_force_optimum(costs, num_stages)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (costs, num_stages, bounds)
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("costs,num_stages,expected", [
    ([1, 1, 1, 1], 2, [0, 2, 4]),
    ([1, 1, 1, 1], 4, [0, 1, 2, 3, 4]),
    ([5, 1, 1, 1, 1, 1], 2, [0, 1, 6]),
    ([1, 1, 1, 1, 1, 5], 2, [0, 5, 6]),
    ([3.0], 1, [0, 1]),
    ([2, 7, 3], 1, [0, 3]),
])
def test_partition_unique_optimum_examples(costs, num_stages, expected):
    # each of these has a single optimal split
    assert list(balanced_partition(costs, num_stages)) == expected


def test_partition_dusa_like_costs():
    # front (heavy), embed 0.2, 24 joint blocks of 1, head 0.2
    costs = [6.0, 0.2] + [1.0] * 24 + [0.2]
    for num_stages in (1, 2, 3, 4, 8):
        bounds = balanced_partition(costs, num_stages)
        assert_valid_bounds(bounds, len(costs), num_stages)
        largest = max(part_costs(costs, bounds))
        # lower bounds on any split: the heaviest layer and the mean stage load
        assert largest >= max(6.0, sum(costs) / num_stages) - 1e-9
    # two stages: total 30.4, split after 9 blocks -> 15.2 + 15.2
    assert list(balanced_partition(costs, 2)) == [0, 11, 27]
    for num_stages in (2, 3, 4):
        got = max(part_costs(costs, balanced_partition(costs, num_stages)))
        assert got == pytest.approx(brute_force_optimum(costs, num_stages))


@pytest.mark.parametrize("costs,num_stages", [
    ([1, 2, 3], 0),
    ([1, 2, 3], -1),
    ([1, 2, 3], 4),   # more stages than layers: some part would be empty
    ([], 1),
])
def test_partition_invalid_num_stages(costs, num_stages):
    with pytest.raises(ValueError):
        balanced_partition(costs, num_stages)


# ----------------------------------------------------------------------------------------------
# check_partition
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bounds,num_layers,num_stages", [
    ([0, 5], 5, 1),
    ([0, 1, 2, 3], 3, 3),
    ([0, 10, 27], 27, 2),
    ((0, 4, 9, 12), 12, 3),
])
def test_check_partition_accepts_valid(bounds, num_layers, num_stages):
    result = check_partition(bounds, num_layers, num_stages)
    assert result == list(bounds)  # a list, equal to the bounds given


@pytest.mark.parametrize("bounds,num_layers,num_stages", [
    ([0, 5, 10], 10, 3),         # too short
    ([0, 3, 5, 7, 10], 10, 3),   # too long
    ([1, 5, 10], 10, 2),         # does not start at 0
    ([0, 5, 9], 10, 2),          # does not end at num_layers
    ([0, 5, 11], 10, 2),         # ends beyond num_layers
    ([0, 5, 5, 10], 10, 3),      # empty stage (not strictly increasing)
    ([0, 6, 4, 10], 10, 3),      # decreasing
    ([0, 0, 10], 10, 2),         # empty first stage
    ([0, 10, 10], 10, 2),        # empty last stage
])
def test_check_partition_rejects_invalid(bounds, num_layers, num_stages):
    with pytest.raises(ValueError):
        check_partition(bounds, num_layers, num_stages)


def test_check_partition_accepts_balanced_partition_output():
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 12)
        costs = [rng.uniform(0.1, 3.0) for _ in range(n)]
        s = rng.randint(1, n)
        bounds = balanced_partition(costs, s)
        result = check_partition(bounds, n, s)
        assert result == list(bounds)  # a list, equal to the bounds given


# ----------------------------------------------------------------------------------------------
# the step model and the partition planned from per-layer costs
# ----------------------------------------------------------------------------------------------
def test_step_model_one_stage_is_the_sum_of_the_work():
    costs = StepCosts([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], (5.0, 7.0), [0.5, 0.5, 1.0])
    sim = simulate_step(costs, [0, 3], num_windows=3)
    assert sim["step"] == pytest.approx(5 + 3 * (6 + 12) + 7 + 2)
    assert sim["stage_busy"] == [pytest.approx(5 + 3 * 18 + 7 + 2)]


def test_step_model_two_stages_by_hand():
    # Stage 0: forward 1, backward 2 per window; stage 1: forward 3, backward 4; SegFormer 10 / 20.
    # 1F1B with 2 windows. Stage 0: F0 [10, 11], F1 [11, 12], B0 after stage 1's B0, B1 after its B1.
    # Stage 1: F0 [11, 14], B0 [14, 18], F1 [18, 21], B1 [21, 25].
    # Stage 0: B0 [18, 20], B1 [25, 27], SegFormer backward [27, 47]; optimizer 1 / 3 after both.
    costs = StepCosts([1.0, 3.0], [2.0, 4.0], (10.0, 20.0), [1.0, 3.0])
    sim = simulate_step(costs, [0, 1, 2], num_windows=2)
    assert sim["step"] == pytest.approx(47 + 3)
    assert sim["stage_busy"] == [pytest.approx(10 + 2 * 3 + 20 + 1), pytest.approx(2 * 7 + 3)]


def test_plan_partition_is_the_best_split_of_the_step_model():
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(3, 9)
        costs = StepCosts([rng.uniform(0.1, 2) for _ in range(n)], [rng.uniform(0.1, 4) for _ in range(n)],
                          (rng.uniform(0, 3), rng.uniform(0, 6)), [rng.uniform(0, 0.3) for _ in range(n)])
        stages = rng.randint(1, min(4, n))
        bounds, sim = plan_partition([costs], stages)
        assert_valid_bounds(bounds, n, stages)
        best = min(simulate_step(costs, [0, *cuts, n], 2)["step"]
                   for cuts in itertools.combinations(range(1, n), stages - 1))
        assert sim["step"] == pytest.approx(best)


def test_plan_partition_moves_blocks_off_a_stage_that_holds_the_segmenter():
    # SD3-medium-like: the front's work is 2 blocks' forward; SegFormer adds per-image work on stage 0.
    costs = default_costs(24)
    bounds, _ = plan_partition([costs], 2)
    assert 2 < bounds[1] < 27


def test_measured_cost_table_is_found_for_its_card_and_models_only(tmp_path):
    signature = model_signature({"num_layers": 3}, {"depths": [1], "id2label": {0: "a", 1: "b"}}, 64)
    table = {"card": "NVIDIA H100 80GB HBM3", "signature": signature, "segmenter_ms": [1.0, 2.0],
             "optimizer_ms": [0.1] * 5,
             "classes": {"10": {"forward_ms": [1.0] * 5, "backward_ms": [2.0] * 5},
                         "20": {"forward_ms": [2.0] * 5, "backward_ms": [4.0] * 5}}}
    (tmp_path / "h100.json").write_text(json.dumps(table))
    found = find_cost_table("NVIDIA H100 80GB HBM3", signature, tmp_path)
    assert found is not None and found[0].name == "h100.json"
    assert [c.forward[0] for c in table_costs(found[1])] == [0.001, 0.002]  # ms -> s, by class count
    assert find_cost_table("NVIDIA H200", signature, tmp_path)[0].name == "h100.json"  # another card's, if alone
    (tmp_path / "h200.json").write_text(json.dumps({**table, "card": "NVIDIA H200"}))
    assert find_cost_table("NVIDIA H200", signature, tmp_path)[0].name == "h200.json"  # this card's first
    other = model_signature({"num_layers": 4}, {"depths": [1], "id2label": {0: "a", 1: "b"}}, 64)
    assert find_cost_table("NVIDIA H100 80GB HBM3", other, tmp_path) is None
