"""The precision presets' adaptation reach, through bench/precision_reach.py (the real 2-stage pipeline on
the demo models, one step at lr 1e-5): under the default autocast preset every normalization parameter
that gets a gradient moves in the forward; bf16 weights near 1 (LayerNorm gains) cannot move by 1e-5."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_autocast_preset_moves_every_norm_parameter_with_a_gradient(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "precision_reach.py"), "--steps", "1", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").glob("*-precision-reach-cpu.json")).read_text())["presets"]
    autocast, bf16 = results["ds_configs/ds_tta.json"], results["ds_configs/ds_tta_bf16.json"]
    assert autocast["norm_tensors_with_gradient"] > 0
    assert autocast["norm_tensors_with_gradient_moved_first_step"] == autocast["norm_tensors_with_gradient"]
    assert autocast["norm_elements_above_eps_moved_first_step"] == 1.0
    # bf16: the gains (values near 1) stay where they were; biases near 0 move.
    assert bf16["norm_tensors_with_gradient_moved_first_step"] < bf16["norm_tensors_with_gradient"]
    assert bf16["norm_elements_above_eps_moved_first_step"] < 0.9
