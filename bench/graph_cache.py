"""How many of a sweep's images a CUDA-graph cache of SegFormer replays: a simulation of its policy on a mix of image shapes."""
from __future__ import annotations





# ----------------------------------------------------------------------------- SegFormer graph cache policy
# ADE20K-like shapes after resizing to short edge 512 (no dataset here: SceneParse150 rescaled its large
# images to short side 512; 4:3 landscape dominates, then portrait, with a long tail of aspect ratios).
SHAPE_MIX = {"512x683": 0.50, "683x512": 0.14, "512x768": 0.07, "768x512": 0.02, "512x512": 0.07, "512x910": 0.04,
             "512x640": 0.03, "tail: long edge uniform in 520..1400, 70 % landscape": 0.13}


def shape_sequence(n: int, seed: int = 0) -> list[tuple[int, int]]:
    import random
    rng = random.Random(seed)
    names, weights = zip(*SHAPE_MIX.items())
    shapes = []
    for name in rng.choices(names, weights, k=n):
        if name.startswith("tail"):
            long = rng.randint(520, 1400)
            shapes.append((512, long) if rng.random() < 0.7 else (long, 512))
        else:
            shapes.append(tuple(int(v) for v in name.split("x")))
    return shapes


def graph_cache_simulation(eager_s: float, graphed_s: float, capture_s: float, images: int = 2000,
                           tasks: int = 15) -> dict:
    """SegFormer seconds per image and captures over a sweep of `tasks` tasks of the same `images` shapes (each
    task in its own order, as a sweep of ADE20K-C's corruptions), for caches of several sizes: the pipeline's
    policy (pipeline/dusa/graphs.py: FrequentShapes, capture at the second sighting, the most frequent shapes kept)
    against a least-recently-used cache capturing at the first or second sighting."""
    import random
    from collections import Counter, OrderedDict

    from pipeline.dusa.graphs import FrequentShapes
    shapes = shape_sequence(images)
    sweep = []
    for t in range(tasks):
        order = list(shapes)
        random.Random(t).shuffle(order)
        sweep += order
    out = {"distinct_shapes": len(set(shapes)), "seen_once_per_task": sum(1 for v in Counter(shapes).values() if v == 1),
           "tasks": tasks, "images_per_task": images, "policies": {}}

    def record(name: str, hits: int, captures: int, seconds: float) -> None:
        out["policies"][name] = {"hit_rate": hits / len(sweep), "captures": captures,
                                 "segmenter_s_per_image": seconds / len(sweep)}
    for size in (8, 16, 32):
        policy, hits, captures, seconds = FrequentShapes(size, 2), 0, 0, 0.0
        for shape in sweep:
            action, _ = policy.visit(shape)
            hits += action == "hit"
            captures += action == "capture"
            seconds += {"hit": graphed_s, "capture": capture_s + graphed_s, "eager": eager_s}[action]
        record(f"frequent{size}-capture-at-sight-2", hits, captures, seconds)
        for sightings in (1, 2):
            cache: OrderedDict = OrderedDict()
            seen: Counter = Counter()
            hits = captures = 0
            seconds = 0.0
            for shape in sweep:
                seen[shape] += 1
                if shape in cache:
                    cache.move_to_end(shape)
                    hits += 1
                    seconds += graphed_s
                elif seen[shape] >= sightings:
                    cache[shape] = True
                    captures += 1
                    seconds += capture_s + graphed_s
                    if len(cache) > size:
                        cache.popitem(last=False)
                else:
                    seconds += eager_s
            record(f"lru{size}-capture-at-sight-{sightings}", hits, captures, seconds)
    out["all_eager_s_per_image"] = eager_s
    return out
