"""launch/calibrate.py: a card's per-layer cost table, in the form the planner reads (tiny models, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dusa.partition import balanced_partition, table_costs
from pipeline.run.checks import read_cost_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_tiny_calibration_writes_a_table_the_planner_reads(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "launch/calibrate.py", "--tiny", "--out", str(tmp_path / "out"),
                           "--classes", "2", "--warmup", "0"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path, = (tmp_path / "out").glob("*.json")
    assert path.name == "cpu-sd3-tiny-segformer-tiny-autocast.json"
    assert f"cost table: {path}" in proc.stdout
    table = read_cost_table(path, "the calibration")  # the launcher's own check of --pipeline.cost_table
    assert table["card"] == "cpu" and set(table["classes"]) == {"2"}
    assert table["signature"]["window_size"] == 128 and table["signature"]["precision"] == "autocast"
    costs = table_costs(table)
    assert len(costs) == 1 and all(len(c.forward) == len(table["layers"]) for c in costs)
    assert all(f > 0 for c in costs for f in c.forward)
    assert len(balanced_partition([f + b for f, b in zip(costs[0].forward, costs[0].backward)], 2)) == 3
    assert {p.name for p in (tmp_path / "out").iterdir()} == {path.name, "checkpoints"}  # only into --out


@pytest.mark.parametrize("args,message", [
    (["--classes", "0"], "--classes must be >= 1"),
    (["--deepspeed", "no/such.json"], "--deepspeed no/such.json does not exist"),
])
def test_bad_arguments_get_one_line(tmp_path, args, message, capsys):
    from launch.calibrate import main
    assert main(["--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
