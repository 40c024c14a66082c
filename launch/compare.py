#!/usr/bin/env python
"""Compare finished runs side by side: one row per run (its method and output folder), mIoU % per corruption
and the run's average, read from each RUN_DIR/results.json.

    python launch/compare.py runs/source runs/tent runs/dusa
    python launch/compare.py runs/ --format markdown   # every run in runs/; best per column in bold
    python launch/compare.py runs/source runs/dusa --classes 10   # per corruption, the 10 largest per-class IoU changes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline.run.log import LOG
from pipeline.run.reporting import read_results, task_result_problem

AVERAGE = "average"


def load_run(run_dir: str | Path) -> tuple[str, dict[str, float | None]]:
    """(row label "method (folder)", mIoU % per corruption in run order, then the run's average)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no results.json (not a run's output_dir, or no task finished yet)")
    try:
        results = read_results(path)  # in percent, whichever version wrote it
        method = results.get("config", {}).get("tta", {}).get("method", "?")
        for task, res in results["tasks"].items():
            wrong = task_result_problem(res)
            if wrong:
                raise ValueError(f"task {task}: {wrong}")
        scores = {task: res["mIoU"] for task, res in results["tasks"].items()}
        average = results["average"]["mIoU"]
        if average is not None and not (isinstance(average, (int, float)) and not isinstance(average, bool)):
            raise ValueError(f"average mIoU {average!r} is not a number")
        scores[AVERAGE] = average
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a results.json of launch/tta.py "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    return f"{method} ({Path(run_dir).resolve().name})", scores


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path that is a run's output folder as it is; a folder that is none but holds runs, the runs in it
    (sorted by name); anything else as it is (load_run names what it lacks)."""
    runs = []
    for path in map(Path, paths):
        inside = sorted(p.parent for p in path.glob("*/results.json")) if not (path / "results.json").exists() else []
        runs += inside or [path]
    return runs


def compare_table(runs: Sequence[tuple[str, dict[str, float | None]]], markdown: bool = False) -> str:
    """Rows: runs; columns: every corruption in order of first appearance, then the average (mIoU %).

    A run without a corruption shows "-"; each run's average is over its own tasks, as it reported it.
    """
    columns = list(dict.fromkeys(t for _, scores in runs for t in scores if t != AVERAGE)) + [AVERAGE]
    shown = [{c: None if s.get(c) is None else round(s[c], 2) for c in columns} for _, s in runs]
    # Best as shown: values equal to two decimals are all bold.
    best = {c: max((s[c] for s in shown if s[c] is not None), default=None) for c in columns}

    def cell(scores: dict[str, float | None], column: str) -> str:
        value = scores[column]
        if value is None:
            return "-"
        return f"**{value:.2f}**" if markdown and value == best[column] else f"{value:.2f}"

    header = ["run", *columns]
    rows = [[label, *(cell(scores, c) for c in columns)] for (label, _), scores in zip(runs, shown)]
    if markdown:
        def cells(row: list[str]) -> str:  # a | in a name would end its cell
            return "| " + " | ".join(v.replace("|", "\\|") for v in row) + " |"
        lines = [cells(header), "| --- |" + " ---: |" * len(columns)]
        return "\n".join(lines + [cells(row) for row in rows])
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(row: list[str]) -> str:  # labels left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])


def load_class_iou(run_dir: str | Path) -> dict[str, dict[str, float | None]]:
    """Per-class IoU % per corruption of a run (None: the class is in neither the prediction nor the truth)."""
    results = read_results(Path(run_dir) / "results.json")  # load_run has checked it
    return {task: dict(res["IoU"]) for task, res in results["tasks"].items()}


def class_changes(before: dict[str, dict[str, float | None]], after: dict[str, dict[str, float | None]],
                  top: int) -> list[tuple[str, list[tuple[str, float | None, float | None]]]]:
    """Per corruption that both runs hold (in the first run's order): its `top` classes with the largest IoU change
    (after - before), largest first, as (class, before, after); classes scored in one run only come after them."""
    out = []
    for task in [t for t in before if t in after]:
        a, b = before[task], after[task]
        if set(a) != set(b):
            raise ValueError(f"{task}: the two runs score different classes (another data.classes)")
        both = sorted((c for c in a if a[c] is not None and b[c] is not None), key=lambda c: -abs(b[c] - a[c]))
        one = [c for c in a if (a[c] is None) != (b[c] is None)]
        out.append((task, [(c, a[c], b[c]) for c in both[:top]] + [(c, a[c], b[c]) for c in one]))
    return out


def class_table(changes: list[tuple[str, list[tuple[str, float | None, float | None]]]], labels: Sequence[str],
                markdown: bool = False) -> str:
    """One row per (corruption, class): IoU % in each run and the change."""
    def number(value: float | None, sign: bool = False) -> str:
        return "-" if value is None else f"{value:+.2f}" if sign else f"{value:.2f}"

    header = ["corruption", "class", *labels, "change"]
    rows = [[task, c, number(a), number(b), number(None if a is None or b is None else b - a, sign=True)]
            for task, entries in changes for c, a, b in entries]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * 3]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if k < 2 else v.rjust(w) for k, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="Output folders of launch/tta.py runs, or folders holding them (runs/).")
    parser.add_argument("--format", choices=("text", "markdown"), default="text",
                        help="text (default) or a Markdown table with the best value per column in bold.")
    parser.add_argument("--classes", type=int, default=0, metavar="N",
                        help="With two runs: also, per corruption that both hold, the N classes whose IoU changed "
                             "most from the first run to the second (and classes scored in one run only).")
    args = parser.parse_args(argv)
    if args.classes < 0 or args.classes and len(args.run_dirs) != 2:
        print("error: --classes N (N >= 0) compares exactly two runs", file=sys.stderr)
        return 2
    try:
        folders = expand_runs(args.run_dirs)
        runs = [load_run(d) for d in folders]
        changes = class_changes(*[load_class_iou(d) for d in folders], args.classes) if args.classes else None
    except (OSError, ValueError) as exc:
        LOG.error(f"error: {exc}")
        return 2
    # Markdown: the title is a paragraph of its own, a blank line before the table.
    print(f"mIoU % per corruption ({len(runs)} runs)" + ("\n" if args.format == "markdown" else ""))
    print(compare_table(runs, markdown=args.format == "markdown"))
    if changes is not None:
        print(f"\nIoU % per class: the {args.classes} largest changes per corruption, {runs[0][0]} -> {runs[1][0]}")
        print(class_table(changes, [label for label, _ in runs], markdown=args.format == "markdown"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
