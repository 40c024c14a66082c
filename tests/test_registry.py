"""The method registry (pipeline/methods/__init__.py) is the single source: a method is one file, and its name
and option section reach the CLI, the run's config record and the resume signature without another edit."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.methods import METHODS, Method

ROOT = Path(__file__).resolve().parents[1]

TOY_METHOD = '''
    from dataclasses import dataclass

    from pipeline.methods.base import Method


    @dataclass
    class ToyOptions:
        """The toy method's options."""

        strength: float = 0.5
        """How strongly the toy adapts."""


    class Toy(Method):
        """A method in one file."""

        name, options = "toy", ToyOptions
'''


def test_the_registry_holds_every_method_file_by_name():
    assert set(METHODS) == {"source", "tent", "dusa", "bn_adapt", "cotta", "sar"}
    assert all(issubclass(cls, Method) and cls.name == name for name, cls in METHODS.items())


def test_a_new_method_file_reaches_the_cli_the_record_and_the_resume_signature(tmp_path):
    """A method file put beside the others (here through the package's search path, in a fresh process)."""
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY_METHOD))
    script = textwrap.dedent(f'''
        import json, sys
        import pipeline.methods as methods
        methods.__path__.append({str(tmp_path)!r})
        methods.METHODS.clear()
        methods.METHODS.update(methods._discover())
        import launch.tta as launcher
        from pipeline.run.resume import resume_signature
        cfg, record, _ = launcher.parse(["--tta.method", "toy", "--toy.strength", "2"])
        record["deepspeed"] = {{}}  # the launcher puts the effective DeepSpeed JSON here
        help_text = launcher.make_parser().format_help()
        print(json.dumps({{"strength": cfg.toy.strength, "record": record["toy"], "method": record["tta"]["method"],
                           "signature": resume_signature(record)["toy"], "choices": "{{bn_adapt,cotta,dusa,sar,source,tent,toy}}" in help_text,
                           "help": "How strongly the toy adapts." in help_text}}))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"strength": 2.0, "record": {"strength": 2.0}, "method": "toy", "signature": {"strength": 2.0},
                   "choices": True, "help": True}
