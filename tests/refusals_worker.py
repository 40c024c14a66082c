"""Runs `python launch/tta.py ARGS` once per case, in this one process, for the tests of refused runs: each
case starts as a fresh one-process run would (no launcher variables, no claimed folder), so its exit code and
its output are those of `python launch/tta.py`; the imports are paid once for every case.

    python tests/refusals_worker.py < cases.json      # {"case": [arguments], ...}

Prints {"case": {"returncode": int, "stdout": str, "stderr": str}, ...} as JSON, the last line of stdout.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "launch"), str(ROOT)]

import tta as launcher  # noqa: E402


class Exited(BaseException):
    """The launcher's hard exit (`os._exit`), turned into an exception so that the next case can run."""

    def __init__(self, code: int):
        self.code = code


def exit_(code: int) -> None:
    raise Exited(code)


def main() -> None:
    cases = json.loads(sys.stdin.read())
    environment = dict(os.environ)
    launcher.os._exit = exit_  # this process only: the worker exits normally at the end
    results = {}
    for name, argv in cases.items():
        os.environ.clear()  # a one-process run sets RANK, WORLD_SIZE, ... for itself
        os.environ.update(environment)
        launcher._run_folder, launcher._started = None, False
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = launcher.main(argv)
            except Exited as exc:
                code = exc.code
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001 - as the interpreter would: a traceback and exit code 1
                traceback.print_exc()
                code = 1
        results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    os.environ.clear()
    os.environ.update(environment)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
