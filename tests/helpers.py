"""Helpers shared by the tests that start processes: a free port and the demo's launcher command."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.run.folder import free_local_port

ROOT = Path(__file__).resolve().parents[1]


free_port = free_local_port  # the tests' name for it


def demo_command(tmp: Path, out: str, *overrides: str) -> list[str]:
    """`deepspeed --num_gpus 2 launch/tta.py --config ds_configs/demo.json` (run it from ROOT) into `tmp/out`,
    on the tiny models under `tmp/assets` and the demo data in `tmp/data`. Both folders are made here, empty:
    the demo builds its data and models only in folders that exist (or under its own `demo_assets/`)."""
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "assets").mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            "launch/tta.py", "--config", "ds_configs/demo.json", "--output_dir", str(tmp / out),
            "--model.segmenter", str(tmp / "assets/segformer"), "--model.generator", str(tmp / "assets/sd3"),
            "--model.class_embeddings", str(tmp / "assets/classes.safetensors"), "--data.root", str(tmp / "data"),
            *overrides]


def copy_demo_models(models: Path, root: Path) -> Path:
    """The session's demo models (the `demo_models` fixture) copied under `root`, as the demo builds them: the
    launcher then finds them there and builds nothing."""
    import shutil
    root.mkdir(parents=True, exist_ok=True)
    for name in ("segformer", "sd3"):
        shutil.copytree(models / name, root / name)
    shutil.copy2(models / "classes.safetensors", root / "classes.safetensors")
    return root


def demo_models_and_data(root: Path, models: Path) -> Path:
    """The demo's tiny models (copied from `models`) and a 2-image demo dataset under `root` (for launcher
    tests of bad input)."""
    from data.demo import make_demo_dataset
    copy_demo_models(models, root)
    make_demo_dataset(root / "data", num_images=2, create=True)
    return root


def refused_runs(cases: dict[str, list[str]], env: dict[str, str]) -> dict:
    """`python launch/tta.py ARGS` for each case, run by tests/refusals_worker.py in one process (the imports
    paid once): case -> its returncode, stdout and stderr, as a subprocess.CompletedProcess has them."""
    import json
    import subprocess
    from types import SimpleNamespace
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "refusals_worker.py")], input=json.dumps(cases),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {case: SimpleNamespace(**result) for case, result in json.loads(proc.stdout.splitlines()[-1]).items()}


class RunsCode:
    """Pickled, a file that runs code when unpickled (it creates `marker`): planted in a state file, it shows
    whether the run loaded it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
