"""The one seam to DeepSpeed's private API (pipeline/dusa/deepspeed_seam.py): every private name it uses still
has the form it was read with, no other file uses one, and the pinned versions agree. Fast: no process starts."""
from __future__ import annotations

import re
import subprocess
import tomllib
import types
from pathlib import Path

import deepspeed
import pytest
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

from pipeline.dusa import deepspeed_seam as seam

ROOT = Path(__file__).resolve().parents[1]


def test_every_private_name_the_seam_uses_has_the_form_it_was_read_with():
    problems = seam.api_problems()
    assert not problems, (f"deepspeed {deepspeed.__version__} changed private names that "
                          f"pipeline/dusa/deepspeed_seam.py (read from {seam.READ_FROM}) relies on; re-read them "
                          f"there: " + "; ".join(problems))


def test_a_changed_signature_or_a_lost_instruction_is_named(monkeypatch):
    monkeypatch.setattr(PipelineModule, "_set_bounds", lambda self, first, last: None)
    table = dict(PipelineEngine._INSTRUCTION_MAP)
    del table[schedule.ReduceTiedGrads]
    monkeypatch.setattr(PipelineEngine, "_INSTRUCTION_MAP", table)
    problems = seam.api_problems()
    assert any("PipelineModule._set_bounds is (self, first, last), read as (self, start=None, stop=None)" in p
               for p in problems), problems
    assert any("_INSTRUCTION_MAP has no instruction ReduceTiedGrads" in p for p in problems), problems
    assert len(problems) == 2


def test_wrapped_instructions_are_the_engines_own_and_see_the_earlier_ones():
    engine = types.SimpleNamespace(_INSTRUCTION_MAP=PipelineEngine._INSTRUCTION_MAP)
    calls = []

    def tagged(tag):
        def wrap(original):
            def instruction(eng, *args):
                calls.append(tag)
                return original
            return instruction
        return wrap
    seam.wrap_instructions(engine, {"OptimizerStep": tagged("first")})
    first = engine._INSTRUCTION_MAP[schedule.OptimizerStep]
    seam.wrap_instructions(engine, {"OptimizerStep": tagged("second")})
    assert engine._INSTRUCTION_MAP[schedule.OptimizerStep](engine) is first  # the later wraps the earlier
    assert calls == ["second"]
    assert PipelineEngine._INSTRUCTION_MAP[schedule.OptimizerStep] is PipelineEngine._exec_optimizer_step  # class untouched
    with pytest.raises(KeyError, match="no instruction 'OptimiserStep'"):
        seam.wrap_instructions(engine, {"OptimiserStep": tagged("typo")})


def test_no_file_but_the_seam_and_this_test_uses_deepspeeds_private_names():
    names = sorted({entry.name for entry in seam.PRIVATE_API if entry.name.startswith("_")})
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    files = listed.stdout.split() if listed.returncode == 0 else [  # not a git checkout: every source file
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if not {".venv", ".git"} & set(p.parts)]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    seam_files = {"pipeline/dusa/deepspeed_seam.py", "tests/test_deepspeed_seam.py"}
    found = [f"{f}: {m[1]}" for f in files if f not in seam_files and (ROOT / f).is_file()
             for m in [pattern.search((ROOT / f).read_text())] if m]
    assert not found, f"DeepSpeed's private names outside pipeline/dusa/deepspeed_seam.py: {found}"


def test_the_pinned_deepspeed_is_the_version_the_seam_was_read_from():
    # pyproject.toml takes its dependencies from requirements.txt: one pin for both ways of installing.
    assert re.findall(r"deepspeed==([\w.]+)", (ROOT / "requirements.txt").read_text()) == [seam.READ_FROM]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["dependencies"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
