"""The adaptation methods, one file each, and the registry that names them.

`METHODS` (`--tta.method` value -> class) is the single source: the CLI's method choices and its
per-method option sections (pipeline/run/config.py), the launcher's checks and builds (launch/tta.py),
the resume signature (pipeline/run/resume.py) and the start-up summary (pipeline/run/reporting.py) all
read it; nothing else compares method names.

To add a method, write one file here, `pipeline/methods/<name>.py`, holding:
- a subclass of `pipeline.methods.base.Method` with a unique `name` (its `--tta.method` value) and the
  class attributes that say what it needs (`adapts`, `pipeline`, `generator`);
- if it has settings of its own, a dataclass of them (each field with a default and a docstring: the
  `--<name>.<field>` help) set as the class's `options`; `check` refuses values it cannot run with;
- `build` (its models on this process) and `step` (one image -> `StepResult`), and, if it adapts,
  `reset`, `save`, `load` and `end_task`.
Every module of this package is imported and each `Method` subclass defined in it is registered under
its `name`; then add the method's line to the README. The loop has no method branches.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from pipeline.methods.base import Built, Method, StepResult, parameter_counts

__all__ = ["METHODS", "Built", "Method", "StepResult", "parameter_counts"]


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in vars(module).values():  # classes defined there, not the ones it imports
            if inspect.isclass(cls) and issubclass(cls, Method) and cls.__module__ == module.__name__ and cls.name:
                if cls.name in found:
                    raise TypeError(f"two methods are named {cls.name!r}: {found[cls.name].__module__} and "
                                    f"{module.__name__}")
                found[cls.name] = cls
    return found


# tta.method -> the class that checks its settings, builds its models and runs its steps.
METHODS: dict[str, type[Method]] = _discover()
