"""Run reporting: Weights & Biases logging (rank 0 only), `results.json` / `results.csv`, terminal tables.

Metric values (`mIoU`, `aAcc`, per-class `IoU`) are in percent everywhere, as the metric computes them and
the field prints them: console, results files (`results.json` says so in `metric_unit`) and W&B.
W&B is optional: it is imported lazily and any failure in it only prints a warning.
"""
from __future__ import annotations

import csv
import io
import json
import math
import netrc
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.methods import METHODS
from pipeline.run.config import LoggingConfig, RunConfig, WandbConfig
from pipeline.run.log import LOG

DEFAULT_PROJECT = "dusa-seg-tta"
DEFAULT_HOST = "api.wandb.ai"
# Where an output folder keeps the id of its W&B run, so that resuming the sweep continues that run.
RUN_ID_FILE = "wandb_run_id"
METRIC_UNIT = "percent"

# Legacy $WANDB_MODE spellings that wandb itself still accepts.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def wandb_credentials_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when an API key is in the environment or the netrc has an entry for the W&B host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    base_url = env.get("WANDB_BASE_URL")
    parsed = urlparse(base_url) if base_url else None
    # `wandb login` writes the host; accept host:port too for self-hosted servers.
    hosts = {parsed.hostname, parsed.netloc} - {None, ""} if parsed else {DEFAULT_HOST}
    path = Path(env["NETRC"]) if env.get("NETRC") else Path.home() / ".netrc"
    try:
        entries = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError):
        return False  # missing or unreadable netrc: simply no credentials
    for host in hosts:
        auth = entries.authenticators(host)
        if auth is not None and auth[2]:
            return True
    return False


def resolve_wandb_mode(cfg: WandbConfig, env: Mapping[str, str] | None = None) -> str:
    """W&B mode: the config field, else $WANDB_MODE, else online with credentials and offline without."""
    env = os.environ if env is None else env
    if cfg.mode:
        return cfg.mode
    if env.get("WANDB_MODE"):
        mode = env["WANDB_MODE"].strip().lower()
        return _MODE_ALIASES.get(mode, mode)
    return "online" if wandb_credentials_configured(env) else "offline"


class RunLogger:
    """Logs steps, per-task results and the final summary to W&B. Create it only on the logging rank.

    One output folder is one W&B run: its id is kept in `<output_dir>/wandb_run_id`, and a rerun that
    resumes the sweep continues that run (`resume="allow"`), its global step going on from the images of
    the tasks that results.json already holds. A rerun with every task already done opens no run.
    Without W&B (disabled, nothing left to do, or `wandb.init` failed) every method is a cheap no-op.
    """

    def __init__(self, logging: LoggingConfig, output_dir: str | Path, config: dict,
                 class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.output_dir = Path(output_dir)
        self._run: Any = None
        self._wandb: Any = None
        self._run_dir: Path | None = None
        self._global_step = 0
        self._tasks_defined: set[str] = set()

        cfg = logging.wandb
        if not cfg.enabled:
            return
        mode = resolve_wandb_mode(cfg)
        if mode == "disabled":
            return
        done = _finished_tasks(self.output_dir)
        tasks = list((config.get("data") or {}).get("corruptions") or [])
        if tasks and set(tasks) <= set(done):
            LOG.info(f"[reporting] W&B: every task is already done in {self.output_dir}: no W&B run opened")
            return
        # As in an uninterrupted sweep: one global step per image of the tasks before.
        self._global_step = sum(int(res.get("images", 0)) for res in done.values())
        run_id = _read_run_id(self.output_dir / RUN_ID_FILE)
        env = os.environ
        tags = list(cfg.tags) + [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
        try:
            import wandb

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=cfg.project or env.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                entity=cfg.entity or env.get("WANDB_ENTITY") or None,
                name=cfg.name or env.get("WANDB_NAME") or None,
                tags=list(dict.fromkeys(tags)),  # dedupe, keep order
                config=config,
                dir=str(self.output_dir),
                mode=mode,
                id=run_id,  # None: W&B makes one, kept below
                resume="allow",
                settings=wandb.Settings(silent=not logging.verbose),  # banner and summary: one line below instead
            )
            self._wandb = wandb
            _write_atomic(self.output_dir / RUN_ID_FILE, f"{self._run.id}\n")
            self._run_dir = Path(self._run.settings.sync_dir)
            # Per-task charts share one x axis that keeps increasing across tasks.
            self._run.define_metric("global_step")
        except Exception as exc:  # W&B must never stop the adaptation run
            LOG.info(f"[reporting] WARNING: W&B disabled, wandb.init failed: {type(exc).__name__}: {exc}")
            if self._run is not None:  # started but could not be set up: close it, ignore further errors
                try:
                    self._run.finish()
                except Exception:
                    pass
            self._run = self._run_dir = None
            return
        if run_id:
            LOG.info(f"[reporting] W&B: continuing run {run_id} of {self.output_dir} "
                     f"from global step {self._global_step}")
        auto = not cfg.mode and not env.get("WANDB_MODE")
        if auto and mode == "offline":
            # A resumed run has one offline folder per attempt: wandb sync uploads them in order, as one run.
            sync = f"{self._run_dir.parent}/offline-run-*" if run_id else str(self.run_dir)
            LOG.info(f"[reporting] W&B: no credentials found, logging offline to {self.run_dir}; "
                     f"upload later with `wandb sync {sync}`")
        elif not logging.verbose:  # where the run goes: the one line of W&B's own (silenced) worth keeping
            LOG.info(f"[reporting] W&B ({mode}): {getattr(self._run, 'url', None) or self.run_dir}")

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def run_dir(self) -> Path | None:
        """The W&B run folder (what `wandb sync` takes), None without W&B; still set after `finish`."""
        return self._run_dir

    def _log(self, task: str, data: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            if task not in self._tasks_defined:
                self._run.define_metric(f"{task}/*", step_metric="global_step")
                self._tasks_defined.add(task)
            self._run.log({"global_step": self._global_step, **data})
        except Exception as exc:
            self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        LOG.info(f"[reporting] WARNING: W&B logging stopped after an error: {type(exc).__name__}: {exc}")
        self._run = None

    def log_step(self, task: str, step: int, loss: float | None, running_miou: float | None = None,
                 extra: dict | None = None) -> None:
        """One adaptation step of `task` (`step` counts within the task; the global step runs across tasks)."""
        if self._run is None:
            return
        self._global_step += 1
        data: dict[str, Any] = {f"{task}/step": step}
        if loss is not None:
            data[f"{task}/loss"] = float(loss)
        if running_miou is not None:
            data[f"{task}/running_mIoU"] = float(running_miou)
        for key, value in (extra or {}).items():
            data[key if "/" in key else f"{task}/{key}"] = value
        self._log(task, data)

    def log_task(self, task: str, result: dict) -> None:
        """Final metrics of one task (percent) plus a per-class IoU table."""
        if self._run is None:
            return
        try:
            rows = [[name, _finite_or_none(v)] for name, v in zip(self.class_names, result["IoU"], strict=True)]
            table = self._wandb.Table(columns=["class", "IoU %"], data=rows)
        except Exception as exc:
            self._disable(exc)
            return
        self._log(task, {f"{task}/mIoU": float(result["mIoU"]), f"{task}/aAcc": float(result["aAcc"]),
                         f"{task}/nonfinite_steps": int(result.get("nonfinite_steps", 0)),
                         f"{task}/per_class_IoU": table})

    def log_picture(self, task: str, picture: Any, caption: str) -> None:
        """A picture (PIL image) of `task` at the current global step (call it after that step's `log_step`)."""
        if self._run is None:
            return
        try:
            image = self._wandb.Image(picture, caption=caption)
        except Exception as exc:
            self._disable(exc)
            return
        self._log(task, {f"{task}/picture": image})

    def finish(self, results: dict) -> None:
        """Write the run summary (averages and per-task mIoU), a class x task IoU table, and close the run."""
        if self._run is None:
            return
        run, self._run = self._run, None  # finish at most once
        try:
            summary = run.summary
            summary["average/mIoU"] = results["average"]["mIoU"]
            summary["average/aAcc"] = results["average"]["aAcc"]
            for entry in results.get("rounds") or []:  # several rounds: each one's mean
                summary[f"round{entry['round']}/mIoU"] = entry["mIoU"]
            for task, res in results["tasks"].items():
                summary[f"{task}/mIoU"] = res["mIoU"]
                summary[f"{task}/aAcc"] = res["aAcc"]
            bars = [[task, res["mIoU"]] for task, res in results["tasks"].items() if res["mIoU"] is not None]
            if bars:
                table = self._wandb.Table(columns=["corruption", "mIoU %"], data=bars)
                run.log({"global_step": self._global_step, "summary/mIoU_per_corruption": self._wandb.plot.bar(
                    table, "corruption", "mIoU %", title="mIoU per corruption")})
            # From the results document: the tasks of earlier attempts of a resumed sweep are in it too.
            tasks = list(results["tasks"])
            if tasks:
                rows = [[name, *(_finite_or_none(results["tasks"][t]["IoU"].get(name)) for t in tasks)]
                        for name in self.class_names]
                run.log({"global_step": self._global_step,
                         "summary/per_class_IoU": self._wandb.Table(columns=["class", *tasks], data=rows)})
            run.finish()
        except Exception as exc:
            LOG.info(f"[reporting] WARNING: W&B finish failed: {type(exc).__name__}: {exc}")


def _read_run_id(path: Path) -> str | None:
    """The W&B run id an earlier attempt kept in the output folder; None (a new run) when absent or unusable."""
    try:
        run_id = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        LOG.info(f"[reporting] WARNING: cannot read {path} ({exc.strerror}): starting a new W&B run")
        return None
    except UnicodeDecodeError:  # damaged (binary): W&B problems warn, never stop the run
        LOG.info(f"[reporting] WARNING: {path} is not text (damaged): starting a new W&B run")
        return None
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", run_id):
        LOG.info(f"[reporting] WARNING: {path} does not hold a W&B run id ({run_id[:40]!r}): starting a new W&B run")
        return None
    return run_id


def _finished_tasks(output_dir: Path) -> dict[str, dict]:
    """The tasks results.json in `output_dir` holds (none without one; the runner has checked it already)."""
    path = output_dir / "results.json"
    if not path.is_file():
        return {}
    try:
        return dict(read_results(path)["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None]
    # A task with an undefined metric makes the average undefined rather than silently biased.
    if not values or len(finite) != len(values):
        return None
    return sum(finite) / len(finite)


def summarize(task_results: dict[str, dict], config: dict, class_names: Sequence[str]) -> dict:
    """The results document: per-task metrics in percent (IoU keyed by class, NaN -> None), averages over
    tasks, config."""
    names = list(class_names)
    tasks: dict[str, dict] = {}
    for task, res in task_results.items():  # dicts keep insertion order: the task order of the run
        iou = list(res["IoU"])
        if len(iou) != len(names):
            raise ValueError(f"task {task}: {len(iou)} IoU values for {len(names)} classes")
        tasks[task] = {
            "mIoU": _finite_or_none(res["mIoU"]),
            "aAcc": _finite_or_none(res["aAcc"]),
            "IoU": {name: _finite_or_none(v) for name, v in zip(names, iou)},
            "images": int(res["images"]),
            "seconds": float(res["seconds"]),
            "nonfinite_steps": int(res.get("nonfinite_steps", 0)),
            "loss": _finite_or_none(res.get("loss")),  # the mean adaptation loss of the task's steps (None: source)
        }
        for key in ("round", "domain", "severity"):  # its place in the run's sequence (pipeline/run/protocol.py)
            if key in res:
                tasks[task][key] = res[key]
    average = {key: _mean([t[key] for t in tasks.values()]) for key in ("mIoU", "aAcc")}
    document = {"metric_unit": METRIC_UNIT, "tasks": tasks, "average": average, "config": config}
    from pipeline.run.protocol import round_means
    rounds = round_means(tasks, int(((config or {}).get("data") or {}).get("rounds") or 1))
    if rounds is not None:
        document["rounds"] = rounds
    return document


def _number(value, empty: bool = True) -> bool:
    return (value is None and empty) or isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def task_result_problem(result) -> str | None:
    """What is wrong with one task's entry of results.json (its schema, as `summarize` writes it), or None."""
    if not isinstance(result, dict):
        return "not an object"
    for key in ("mIoU", "aAcc", "loss"):
        if not _number(result.get(key)):
            return f"{key} {result.get(key)!r} is not a number"
    iou = result.get("IoU")
    if not isinstance(iou, dict) or not all(isinstance(k, str) and _number(v) for k, v in iou.items()):
        return "IoU is not an object of class name -> number"
    for key in ("images", "nonfinite_steps"):
        value = result.get(key, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"{key} {value!r} is not a count"
    if not _number(result.get("seconds"), empty=False) and "seconds" in result:
        return f"seconds {result.get('seconds')!r} is not a number"
    return None


def read_results(path: str | Path) -> dict:
    """A results.json, metrics in percent. Files written before `metric_unit` existed hold fractions in
    [0, 1]: they are converted, so a sweep started then resumes and compares correctly."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} is not a results document (a JSON object)")
    unit = results.get("metric_unit")
    if unit == METRIC_UNIT:
        return results
    if unit is not None:
        raise ValueError(f"{path} has metric_unit {unit!r}; only {METRIC_UNIT!r} (or none: fractions) is known")

    def percent(value: Any) -> Any:
        return None if value is None else 100 * value

    try:
        for res in (results.get("tasks") or {}).values():
            res["mIoU"], res["aAcc"] = percent(res.get("mIoU")), percent(res.get("aAcc"))
            res["IoU"] = {name: percent(v) for name, v in (res.get("IoU") or {}).items()}
        average = results.get("average") or {}
        results["average"] = {key: percent(average.get(key)) for key in ("mIoU", "aAcc")}
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"{path} is not a results document ({exc})") from None
    return {"metric_unit": METRIC_UNIT, **results}


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None anywhere in the document (JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_atomic(target: Path, text: str) -> None:
    """Write through a temporary file and a rename, so readers never see a half-written file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 gets the umask's permissions, like any other file (mkstemp would give 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def results_csv(results: dict) -> str:
    """One row per task, then the average row: task, mIoU, aAcc, images, seconds, loss (the task's mean
    adaptation loss), nonfinite_steps, then `IoU/<class>` per class; percent, rounded as the console shows
    them (empty: n/a). The average row holds the averages of mIoU and aAcc and the totals of the counts."""
    tasks = results["tasks"]
    classes = list(next(iter(tasks.values()))["IoU"]) if tasks else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def shown(value, digits: int):
        return "" if value is None else f"{value:.{digits}f}"

    writer.writerow(["task", "mIoU", "aAcc", "images", "seconds", "loss", "nonfinite_steps",
                     *(f"IoU/{c}" for c in classes)])
    for task, res in tasks.items():
        writer.writerow([task, shown(res["mIoU"], 2), shown(res["aAcc"], 2), res["images"], shown(res["seconds"], 1),
                         shown(res.get("loss"), 4), res.get("nonfinite_steps", 0),
                         *(shown(res["IoU"][c], 2) for c in classes)])
    if tasks:
        average = results.get("average") or {}
        writer.writerow(["average", shown(average.get("mIoU"), 2), shown(average.get("aAcc"), 2),
                         sum(res["images"] for res in tasks.values()),
                         shown(sum(res["seconds"] for res in tasks.values()), 1), "",
                         sum(res.get("nonfinite_steps", 0) for res in tasks.values()), *([""] * len(classes))])
    return buffer.getvalue()


def write_results(results: dict, output_dir: str | Path) -> Path:
    """Write `<output_dir>/results.json` and `results.csv` atomically; returns the JSON's path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = _json_safe(results)
    target = out / "results.json"
    _write_atomic(target, json.dumps(safe, indent=2, allow_nan=False) + "\n")
    _write_atomic(out / "results.csv", results_csv(safe))
    return target


def format_results_table(results: dict) -> str:
    """Plain-text table: one row per task (mIoU %, aAcc %, images, seconds), then the average."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"

    tasks = results["tasks"]
    width = max([len("average"), len("task"), *(len(t) for t in tasks)])
    header = f"{'task':<{width}}  {'mIoU %':>8}  {'aAcc %':>8}  {'images':>7}  {'seconds':>9}"
    lines = [header, "-" * len(header)]
    for task, res in tasks.items():
        lines.append(f"{task:<{width}}  {pct(res['mIoU']):>8}  {pct(res['aAcc']):>8}  "
                     f"{res['images']:>7d}  {res['seconds']:>9.1f}")
    lines.append("-" * len(header))
    for entry in results.get("rounds") or []:  # a run of several rounds: each round's mean
        if entry["tasks"]:
            lines.append(f"{'round ' + str(entry['round']):<{width}}  {pct(entry['mIoU']):>8}  {pct(entry['aAcc']):>8}"
                         f"  {entry['tasks']:>7d} tasks")
    avg = results["average"]
    lines.append(f"{'average':<{width}}  {pct(avg['mIoU']):>8}  {pct(avg['aAcc']):>8}")
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def startup_summary(cfg: RunConfig, config_files: Sequence[str], processes: str,
                    parameters: Sequence[tuple[str, int, int]], images: int) -> str:
    """What is about to run, printed once before the first step: method, models, parameters
    (part, trainable, total), processes, data, config files and output folder."""
    tta = cfg.tta
    method = tta.method
    if METHODS[method].adapts:
        lr = getattr(getattr(cfg, method, None), "lr", tta.lr)  # a method with its own section's lr (cotta, sar)
        method += f" (lr {lr:g}, {'continual' if tta.continual else 'reset before each task'})"
    rows = [("method", method), ("segmenter", cfg.model.segmenter)]
    if METHODS[tta.method].generator:
        rows += [("generator", cfg.model.generator), ("class embeddings", cfg.model.class_embeddings)]
    rows.append(("processes", processes))
    rows += [(f"parameters, {part}", f"{_count(trainable)} trainable / {_count(total)}")
             for part, trainable, total in parameters]
    from pipeline.run.protocol import describe_tasks
    rows += [("data", f"{cfg.data.root}: {describe_tasks(cfg.data)}, {images} images"),
             ("config", ", ".join(config_files) or "(defaults)"), ("output", cfg.output_dir)]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def overridden_ds_keys(user: Mapping[str, Any], effective: Mapping[str, Any]) -> dict[str, Any]:
    """The user's DeepSpeed JSON values that the effective config drops or changes (`load_ds_config` sets
    the batch sizes per image), by dotted key, in the user's order."""
    found: dict[str, Any] = {}
    for key, value in user.items():
        if isinstance(value, Mapping) and isinstance(effective.get(key), Mapping):
            found.update({f"{key}.{k}": v for k, v in overridden_ds_keys(value, effective[key]).items()})
        elif key not in effective or effective[key] != value:
            found[key] = value
    return found


def warn_overridden_ds_keys(user: Mapping[str, Any], effective: Mapping[str, Any]) -> None:
    """One warning line on stderr (first rank only) naming the user's DeepSpeed keys that this program overrides."""
    found = overridden_ds_keys(user, effective)
    if found and os.environ.get("RANK", "0") == "0":
        shown = ", ".join(f"{key}={json.dumps(value)}" for key, value in found.items())
        LOG.warning(f"warning: DeepSpeed config values ignored, this program sets these keys itself: {shown}")
