"""Independent tests of the stage split: pipeline.module.balanced_partition / check_partition.

balanced_partition(costs, num_stages) -> boundaries [0, b1, ..., len(costs)] of a contiguous split
into `num_stages` non-empty parts minimising the largest part's summed cost.
"""
import itertools
import random

import pytest

from pipeline.module import balanced_partition, check_partition


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
    result = check_partition(bounds, num_layers, num_stages)  # must not raise
    assert result is None or list(result) == list(bounds)


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
        assert result is None or list(result) == list(bounds)
