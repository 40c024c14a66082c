"""Which image shapes keep a CUDA graph of SegFormer (pipeline/dusa/graphs.py: FrequentShapes; bookkeeping only, no GPU)."""
from __future__ import annotations

import random

from bench.graph_cache import graph_cache_simulation, shape_sequence
from pipeline.dusa.graphs import FrequentShapes


def visit_all(policy: FrequentShapes, shapes: list) -> list[str]:
    return [policy.visit(s)[0] for s in shapes]


def test_a_shape_is_captured_at_its_second_sighting_while_there_is_room():
    policy = FrequentShapes(capacity=2, capture_after=2)
    assert visit_all(policy, ["a", "a", "a", "b", "c", "b"]) == ["eager", "capture", "hit", "eager", "eager", "capture"]
    assert list(policy.held) == ["a", "b"]


def test_a_full_cache_admits_only_a_shape_seen_twice_more_than_its_least_frequent_one():
    policy = FrequentShapes(capacity=2, capture_after=2)
    visit_all(policy, ["a"] * 5 + ["b"] * 3)  # a: 5 sightings, b: 3
    assert visit_all(policy, ["c", "c", "c", "c"]) == ["eager"] * 4  # c: 4, not 2 more than b's 3
    action, evicted = policy.visit("c")  # 5 >= 3 + 2: c takes b's place
    assert (action, evicted) == ("capture", "b") and set(policy.held) == {"a", "c"}
    # Of equal counts, the least recently used goes first.
    policy = FrequentShapes(capacity=2, capture_after=2)
    visit_all(policy, ["x", "x", "y", "y", "x", "y", "z", "z", "z", "z"])  # x: 3, y: 3, y used last
    assert policy.visit("z") == ("capture", "x")


def test_a_failed_capture_gives_the_place_back_and_uncapturable_shapes_run_eagerly():
    policy = FrequentShapes(capacity=1, capture_after=1)
    assert policy.visit("a") == ("capture", None)
    policy.drop("a")
    assert policy.visit("b", capturable=False) == ("eager", None) and not policy.held


def test_the_sightings_remembered_are_bounded_and_held_shapes_are_never_forgotten():
    policy = FrequentShapes(capacity=1, capture_after=2, memory=10)
    visit_all(policy, ["held", "held"])
    visit_all(policy, [f"once{i}" for i in range(100)])
    assert len(policy.counts) <= 10 and policy.counts["held"] == 2 and "held" in policy.held


def test_over_a_sweep_the_cache_settles_where_least_recently_used_kept_recapturing():
    """The tasks of a sweep are the same images under other corruptions: every shape comes back once per task.
    With the benchmark's ADE-like mix, captures stop after the first tasks, and far fewer happen than with the
    least-recently-used cache this replaced (which recaptured the tail's shapes in every task)."""
    shapes = shape_sequence(300)
    policy = FrequentShapes(16, 2)
    captures = []
    for task in range(6):
        order = list(shapes)
        random.Random(task).shuffle(order)
        captures.append(visit_all(policy, order).count("capture"))
    assert captures[0] > 0 and sum(captures[3:]) == 0
    simulated = graph_cache_simulation(eager_s=0.19, graphed_s=0.045, capture_s=0.8, images=300, tasks=6)
    frequent, lru = simulated["policies"]["frequent16-capture-at-sight-2"], simulated["policies"]["lru16-capture-at-sight-2"]
    assert frequent["captures"] == sum(captures) < lru["captures"] / 3
    assert frequent["segmenter_s_per_image"] < lru["segmenter_s_per_image"]


def test_cached_capture_counts_captures_hits_evictions_and_a_capture_out_of_memory():
    """The bookkeeping both graph caches share (SegFormer's and the joint blocks'): a shape is captured on its
    second sighting, replayed after, evicted by a more frequent one; a capture that runs out of memory leaves
    its shape eager for good."""
    import torch
    from pipeline.dusa.graphs import FrequentShapes, GraphStats, cached_capture
    cache, stats, too_large, shapes = {}, GraphStats(), set(), FrequentShapes(2, capture_after=2)
    made = []

    def capture(key):
        def run():
            if key == "big":
                raise torch.OutOfMemoryError("no room")
            made.append(key)
            return f"graphs of {key}"
        return run
    keys = ["a"] * 3 + ["big"] * 3 + ["b"] * 2 + ["c"] * 5
    got = [cached_capture(k, cache, shapes, stats, too_large, capture(k), lambda: "no memory") for k in keys]
    assert got[:3] == [None, "graphs of a", "graphs of a"] and got[3:6] == [None] * 3
    assert got[6:8] == [None, "graphs of b"]
    # c takes the place of b (the least seen held shape) once seen twice more than b
    assert got[8:] == [None] * 3 + ["graphs of c"] * 2
    assert made == ["a", "b", "c"] and too_large == {"big"} and sorted(cache) == ["a", "c"]
    assert (stats.calls, stats.hits, stats.evictions, stats.eager) == (13, 2, 1, 8)
