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


def demo_models_and_data(root: Path) -> Path:
    """The demo's tiny models and a 2-image demo dataset under `root` (for launcher tests of bad input)."""
    from data.classes import ADE20K_CLASSES
    from data.demo import make_demo_dataset
    from models.tiny import ensure_demo_models
    ensure_demo_models(str(root / "segformer"), str(root / "sd3"), str(root / "classes.safetensors"), ADE20K_CLASSES)
    make_demo_dataset(root / "data", num_images=2, create=True)
    return root
