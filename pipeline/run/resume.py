"""Resuming an interrupted sweep: which tasks results.json already holds for this very configuration,
and whether the saved continual state is the one the run wrote."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from pipeline.methods import METHODS
from pipeline.run.config import MOVED_OPTIONS, RunConfig, safe_name
from pipeline.run.identity import changed_inputs
from pipeline.run.reporting import read_results, task_result_problem
from pipeline.run.folder import verify_files
from pipeline.run.protocol import task_sequence


# The data options added with the datasets and protocols, as every run before them had them.
LEGACY_DATA = {"dataset": "ade20k", "short_edge": None, "gradual": False}
# DUSA's options added since, likewise (its p was always the softmax over the candidates).
LEGACY_DUSA = {"candidate_weights": "softmax"}
# Options that moved to another section (DUSA's, from `tta` to `dusa`): a record written before the move holds
# them in their old section, as its run read them.
LEGACY_MOVES = MOVED_OPTIONS


def resume_signature(record: dict[str, Any]) -> dict[str, Any]:
    """What makes results comparable: a rerun resumes only when this is unchanged (logging, workers,
    the task list's tail and the stage split may change; the stage split does not change the math)."""
    record = json.loads(json.dumps(record))  # tuples and lists compare alike, as saved
    data = record["data"]
    for key, before in LEGACY_DATA.items():  # results written before these options existed: what they ran
        data.setdefault(key, before)
    for old, new in LEGACY_MOVES.items():
        (section, key), (new_section, new_key) = old.split("."), new.split(".")
        if key in record[section]:
            record.setdefault(new_section, {}).setdefault(new_key, record[section].pop(key))
    if "dusa" in record:
        for key, before in LEGACY_DUSA.items():
            record["dusa"].setdefault(key, before)
    # `inputs` (the digests of the files behind these options) is compared apart, to name what changed.
    signature = {"model": {k: v for k, v in record["model"].items() if k != "build_demo_models"},
                 "data": {k: v for k, v in data.items()
                          if k not in ("corruptions", "rounds", "num_workers", "build_demo_data")},
                 "tta": record["tta"], "seed": record["seed"],
                 "deepspeed": {k: v for k, v in (record.get("deepspeed") or {}).items()
                               if k not in ("steps_per_print", "wall_clock_breakdown")}}
    method = record["tta"]["method"]
    if METHODS[method].options is not None:  # the method's own options; other methods' sections do not count
        signature[method] = record.get(method)
    return signature


def state_path(output_dir: str, task: str) -> Path:
    """Where a continual run keeps the adapted state after `task` (the latest only): always a direct entry of
    `<output_dir>/state/` (the task's name is one safe path component, as `validate` checks)."""
    if not safe_name(task):
        raise ValueError(f"task name {task!r} cannot name a state folder (letters, digits and _ - . + only)")
    return Path(output_dir) / "state" / task


def saved_results(output_dir: str) -> dict[str, Any] | None:
    """results.json of the output folder (None when there is none), checked to be a results document."""
    path = Path(output_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        saved = read_results(path)  # metrics in percent (older files converted)
        if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
                and isinstance(saved.get("tasks", {}), dict)):
            raise ValueError("not a results document")
        for task, result in saved.get("tasks", {}).items():
            wrong = task_result_problem(result)
            if wrong:
                raise ValueError(f"task {task}: {wrong}")
        if "state" in saved and not isinstance(saved["state"], dict):
            raise ValueError("its state record is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged ({' '.join(str(exc).split())}): delete {output_dir} to start over, "
                         f"or use another --output_dir") from None
    return saved


def check_saved_state(output_dir: str, saved: dict[str, Any], task: str) -> None:
    """The state after `task` is the one the run wrote: every file's SHA-256 as recorded in results.json
    when it was saved (`pipeline.run.loop.TTARunner._save_state`); checked before anything is loaded from it."""
    record = saved.get("state") if isinstance(saved.get("state"), dict) else {}
    root = state_path(output_dir, task).parent
    fix = f"delete {output_dir} to start over"
    if record.get("task") != task:
        raise ValueError(f"continual run: results.json records no saved state after task {task}; {fix}")
    verify_files(root, [task], record.get("files") or {}, fix)


def finished_tasks(cfg: RunConfig, record: dict[str, Any], class_names: Sequence[str],
                   check_state: bool = True) -> dict[str, dict]:
    """Tasks that results.json in the output folder already holds for this very configuration.

    Raises for an output folder that holds another configuration's results, or tasks in another
    order, or (continual, `check_state`) no saved state to go on from, or one that is not the state the
    run wrote: mixing them would give wrong numbers, and a planted state file could run code.
    """
    path = Path(cfg.output_dir) / "results.json"
    saved = saved_results(cfg.output_dir)
    if saved is None:
        return {}
    try:
        before, now = resume_signature(saved["config"]), resume_signature(record)
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is damaged (its config is incomplete): delete {cfg.output_dir} to start over, "
                         f"or use another --output_dir") from None
    differing = [k for k in now if before[k] != now[k]]
    if differing:
        raise ValueError(f"{path} holds results of another configuration (differs in: {', '.join(differing)}): "
                         f"use another --output_dir, or delete that folder to start over")
    tasks, order = list(saved.get("tasks", {})), [task.key for task in task_sequence(cfg.data)]
    if "inputs" in record:  # the launcher's record: what the results depend on besides the options
        changed = changed_inputs(saved["config"].get("inputs"), record["inputs"], tasks)
        if changed:
            raise ValueError(f"{path} holds results made from other inputs: {changed}; use another --output_dir, "
                             f"or delete that folder to start over")
    # Tasks are independent unless continual: replicas finish them in any order, and a resumed sweep runs the
    # rest. A continual run is one sequence: what is done must be its beginning.
    continual = cfg.tta.continual and METHODS[cfg.tta.method].adapts
    if continual and tasks != order[:len(tasks)] or not set(tasks) <= set(order):
        raise ValueError(f"{path} holds tasks {tasks}, not {'a beginning' if continual else 'a part'} of this run's "
                         f"{order}: use another --output_dir")
    if tasks and continual and len(tasks) < len(order):
        if not state_path(cfg.output_dir, tasks[-1]).exists():
            raise ValueError(f"continual run: no saved state after task {tasks[-1]} in "
                             f"{state_path(cfg.output_dir, tasks[-1])}; delete {cfg.output_dir} to start over")
        if check_state:
            check_saved_state(cfg.output_dir, saved, tasks[-1])
    def restore(value):
        return math.nan if value is None else value
    try:
        return {t: {**r, "IoU": [restore(r["IoU"].get(n)) for n in class_names], "mIoU": restore(r["mIoU"]),
                    "aAcc": restore(r["aAcc"])} for t, r in saved["tasks"].items()}
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is damaged (a task's results are incomplete): delete {cfg.output_dir} to start "
                         f"over, or use another --output_dir") from None
