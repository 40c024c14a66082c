#!/usr/bin/env python
"""Fair tuning for the miniature benchmark: each method's learning rate chosen on held-out corruptions only.

    python bench/select_lr.py --workdir runs/miniature --gpus 2                 # after `miniature.py train`
    python bench/select_lr.py --workdir W --gpus 2 --methods cotta sar --limit 20
    python bench/select_lr.py --tiny --workdir /tmp/m --methods sar --rates 3.125e-05 --limit 2   # CPU smoke

Protocol: for every method of bench/miniature.py's CANDIDATE_RATES and every candidate rate, one run (seed 0,
autocast preset, the benchmark's config) adapts on imagecorruptions' four validation corruptions (speckle noise,
gaussian blur, spatter, saturate, at the benchmark's severity), never on a test corruption. The rate with the
highest mean mIoU over them is the method's (a tie goes to the smaller rate); <workdir>/selected_lr.json records
every candidate's score and the choice. Then (unless --no-test) the method runs on the test corruptions at the
chosen rate with every seed: these are the grid's "held-out lr" rows, which `miniature.py adapt` also runs
and `miniature.py report` reports (with the DUSA ablations, at dusa's chosen rate).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from bench import miniature as mini  # noqa: E402


def selection_runs(methods: list[str], rates: dict[str, tuple[float, ...]]) -> list[dict]:
    """The held-out runs: each method at each candidate rate, seed 0, on the validation corruptions."""
    runs = [dict(method=m, preset="autocast", lr=lr, seed=0, corruptions=list(mini.VALIDATION_CORRUPTIONS))
            for m in methods for lr in rates[m]]
    for run in runs:
        run["name"] = mini.run_name(run)
    return runs


def validation_score(wd: mini.Workdir, run: dict) -> float | None:
    """Mean mIoU % over the validation corruptions of a finished selection run (None: not finished)."""
    from pipeline.run.reporting import read_results
    path = wd.runs / run["name"] / "results.json"
    if not mini.finished(wd, run):
        return None
    tasks = read_results(path)["tasks"]
    return sum(tasks[c]["mIoU"] for c in mini.VALIDATION_CORRUPTIONS) / len(mini.VALIDATION_CORRUPTIONS)


def choose(scores: dict[float, float | None]) -> float | None:
    """The rate with the highest score; a tie goes to the smaller rate; None while a candidate has no score."""
    if not scores or any(v is None for v in scores.values()):
        return None
    return max(sorted(scores), key=lambda lr: (scores[lr], -lr))


def write_selection(wd: mini.Workdir, methods: list[str], rates: dict[str, tuple[float, ...]],
                    limit: int | None) -> dict:
    """<workdir>/selected_lr.json: the protocol, each candidate's score and each method's choice (methods whose
    runs all finished; an earlier file's other methods are kept)."""
    path = wd.root / "selected_lr.json"
    record = json.loads(path.read_text()) if path.is_file() else {"methods": {}}
    record.update(protocol="mean mIoU % over the validation corruptions, seed 0, autocast preset; the best rate, "
                           "ties to the smaller", corruptions=list(mini.VALIDATION_CORRUPTIONS),
                  severity=mini.SEVERITY, seed=0)
    for method in methods:
        scores = {lr: validation_score(wd, run) for lr, run in
                  zip(rates[method], selection_runs([method], rates))}
        chosen = choose(scores)
        if chosen is not None:
            record["methods"][method] = {"candidates": {repr(lr): s for lr, s in scores.items()}, "selected": chosen,
                                         "images_per_corruption": limit}
    mini.write_json(path, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--workdir", default="runs/miniature", help="the miniature benchmark's workdir (trained)")
    parser.add_argument("--tiny", action="store_true", help="a --tiny workdir (CPU smoke run)")
    parser.add_argument("--methods", nargs="+", default=list(mini.CANDIDATE_RATES), choices=list(mini.CANDIDATE_RATES),
                        help="methods to select a rate for (default: all)")
    parser.add_argument("--rates", nargs="+", type=float, default=None,
                        help="candidate rates instead of CANDIDATE_RATES (every method; a smoke run's shortcut)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (default: all visible; 0: CPU)")
    parser.add_argument("--parallel", type=int, default=None, help="runs at a time (default 6; CPU 1)")
    parser.add_argument("--limit", type=int, default=None, help="images per corruption (default all)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that corrupt images")
    parser.add_argument("--no-test", dest="test", action="store_false",
                        help="stop after the selection (no test runs at the chosen rates)")
    args = parser.parse_args(argv)
    args.deadline = None
    if args.tiny:
        args.gpus = 0 if args.gpus is None else args.gpus
    try:
        wd = mini.Workdir(args.workdir, args.tiny)
        mini.need_models(wd)
        mini.make_test_data(wd, args.workers)
        mini.make_test_data(wd, args.workers, mini.VALIDATION_CORRUPTIONS)
        rates = {m: tuple(args.rates) if args.rates else mini.CANDIDATE_RATES[m] for m in args.methods}
        mini.run_launches(wd, selection_runs(args.methods, rates), args)
        record = write_selection(wd, args.methods, rates, args.limit)
        for method in args.methods:
            entry = record["methods"].get(method)
            if entry:
                scores = ", ".join(f"{float(lr):g}: {s:.2f}" for lr, s in entry["candidates"].items())
                mini.log(f"{method}: validation mIoU {scores} -> lr {entry['selected']:g}")
        if args.test:
            chosen = {m: record["methods"][m]["selected"] for m in args.methods if m in record["methods"]}
            runs = [mini.resolve(dict(method=m, preset="autocast", lr=mini.SELECTED, seed=seed), chosen)
                    for m in chosen for seed in (mini.SEEDS if not wd.tiny else (0,))]
            mini.run_launches(wd, runs, args)
            mini.log("test corruptions at the chosen rates: " + ", ".join(r["name"] for r in runs)
                     + " (python bench/miniature.py report for the table)")
    except (ValueError, OSError) as exc:
        mini.LOG.error(f"error: {' '.join(str(exc).split())}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
