#!/usr/bin/env python
"""Regenerates the README's measured numbers, so none is typed by hand.

    python bench/readme_numbers.py --demo     # the three demo runs and their comparison table (~4 min, CPU)
    python bench/readme_numbers.py --tests    # times the README's test commands (full suite and -m "not slow")
    python bench/readme_numbers.py --demo_time   # times the quickstart's demo command as on a fresh clone (~1 min)

Each figure goes between its `<!-- NAME:start -->` / `<!-- NAME:end -->` markers in README.md, with the
command and the machine it came from; the demo runs are left in runs/demo-<method>.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.run.log import LOG

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("source", "tent", "dusa")


def replace_block(text: str, name: str, body: str) -> str:
    """The README text with the block between NAME's markers replaced (the markers must exist once)."""
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"README.md needs exactly one <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def demo_table() -> str:
    from launch.compare import compare_table, load_run
    runs = []
    for method in METHODS:
        out = ROOT / "runs" / f"demo-{method}"
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launch/tta.py", "--config",
               "ds_configs/demo.json", "--tta.method", method, "--output_dir", str(out),
               "--logging.wandb.enabled", "false", "--logging.progress", "false"]
        if (out / "results.json").exists():  # a finished folder would only be resumed: start over
            shutil.rmtree(out)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the {method} demo run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        runs.append(load_run(out))
    return (compare_table(runs, markdown=True) + "\n\n"
            f"(`python bench/readme_numbers.py --demo`, {machine()}; runs in `runs/demo-<method>`)\n")


def demo_time() -> str:
    """The quickstart's demo command, timed as on a fresh clone: its models, data and outputs are made in an
    empty temporary folder (the same work as in `demo_assets/` and `runs/demo/`), which is removed after."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="dusa-demo-time-") as tmp:
        tmp = Path(tmp)
        for folder in ("models", "data"):  # the demo builds outside demo_assets/ only into empty folders
            (tmp / folder).mkdir()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "launch/tta.py",
               "--config", "ds_configs/demo.json", "--output_dir", str(tmp / "run"),
               "--model.segmenter", str(tmp / "models/segformer"), "--model.generator", str(tmp / "models/sd3"),
               "--model.class_embeddings", str(tmp / "models/classes.safetensors"), "--data.root", str(tmp / "data"),
               "--logging.wandb.mode", "offline"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the demo failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return (f"The demo took {seconds:.0f} s, its tiny models and data built in the run (`python "
            f"bench/readme_numbers.py --demo_time`, {machine()}).\n")


def test_times() -> str:
    lines = []
    for label, extra in (("all tests", []), ('`-m "not slow"`', ["-m", "not slow"])):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *extra], cwd=ROOT, capture_output=True, text=True)
        minutes = (time.perf_counter() - start) / 60
        summary = (proc.stdout.strip().splitlines() or ["?"])[-1].strip("= ")
        if proc.returncode:
            raise SystemExit(f"{label} failed: {summary}\n{proc.stdout[-3000:]}")
        lines.append(f"- {label}: {minutes:.1f} min ({summary})")
    return "\n".join(lines) + f"\n\n(`python bench/readme_numbers.py --tests`, {machine()})\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="rerun the three demo methods and their table")
    parser.add_argument("--tests", action="store_true", help="time the test commands")
    parser.add_argument("--demo_time", action="store_true", help="time the quickstart's demo as on a fresh clone")
    args = parser.parse_args()
    if not (args.demo or args.tests or args.demo_time):  # README.md, its purpose, is written only when asked
        LOG.error("error: say what to regenerate in README.md: --demo, --tests and/or --demo_time")
        sys.exit(2)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if args.demo:
        text = replace_block(text, "demo-comparison", demo_table())
    if args.tests:
        text = replace_block(text, "test-times", test_times())
    if args.demo_time:
        text = replace_block(text, "demo-time", demo_time())
    readme.write_text(text)
    LOG.info(f"README.md updated ({', '.join(k for k in ('demo', 'tests', 'demo_time') if getattr(args, k))})")


if __name__ == "__main__":
    main()
