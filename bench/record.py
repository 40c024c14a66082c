#!/usr/bin/env python
"""The benchmark of record: the program users run, timed, beside the step benchmark of the same layout.

    python bench/record.py --workdir /tmp/record                         # on a GPU node: every layout of its GPUs
    python bench/record.py --layouts 1x1 --classes 10 --tag after        # one layout
    python bench/record.py --layouts 1x1 --classes 10 --no_step --set pipeline.compile_blocks=false --tag eager-blocks
                                                                         # a baseline: the launch with a setting changed
    DS_ACCELERATOR=cpu python bench/record.py --tiny --workdir /tmp/rt    # a dry run on the CPU (tiny models)

For each layout (replicas x stages over the node's GPUs) and class count, in one call:
  1. the step benchmark (bench/bench.py: one image's `TTAEngine.step` repeated on one 512 x 683 image; the
     1-stage or the pipeline variant) at that class count;
  2. `launch/tta.py` itself, through DeepSpeed's launcher, on `--tasks` corruption tasks of `--images`
     images each whose sizes follow an ADE20K-like mix of shapes (SHAPE_MIX below: the mix of the CUDA-graph
     hit-rate simulation in bench/graph_cache.py), every window at exactly that many candidate classes, with
     `--logging.timing true`: start-up (broken down), the first image, the steady seconds per image (the
     tasks after the first two: the tasks are the same images, so by then SegFormer's CUDA-graph cache holds
     their shapes, as for most of a sweep of 15 tasks over ADE20K's 2000) and where each steady image's time
     goes (host and device seconds per phase).
Writes <out>/<date>-<card>-record[-<tag>].json (a list of rows, one per layout and class count; --out defaults
to <workdir>/results, `--out bench/results` publishes) and prints a table; exits 1 when a launch failed. The corrupted data needs imagecorruptions: made here unless `--data` names it made before
(the GPU image lacks the package: make it on a CPU machine with `--data_only` and carry it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where bench.py would stand in for the bench package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from pipeline.run.log import LOG  # noqa: E402
from pipeline.run.timing import phase_means  # noqa: E402
from bench.common import (IMAGE_SIZE, PIPELINE_SWITCHES, WORKDIR_MARKER, checkpoints,  # noqa: E402
                          pipeline_switches, run, say)
from bench.graph_cache import SHAPE_MIX, shape_sequence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("defocus_blur", "brightness", "contrast", "fog", "jpeg_compression")  # smooth: small JPEGs to carry
TINY_SHAPES = {(512, 683): (128, 171)}  # --tiny: every shape scaled by 1/4 (the tiny models' window is 128)


def make_data(root: Path, tasks: int, images: int, tiny: bool) -> Path:
    """`tasks` corruption tasks of the same `images` images, sized by the shape mix (fixed seed)."""
    from data.demo import make_demo_dataset
    sizes = shape_sequence(images)
    if tiny:
        sizes = [(max(h // 4, 128), max(w // 4, 128)) for h, w in sizes]
    return make_demo_dataset(root, corruptions=TASKS[:tasks], severity=3, sizes=sizes, create=True)


def step_benchmark(args, paths: dict, stages: int, classes: int, workdir: Path) -> float | None:
    """Seconds per image of the step benchmark (bench/bench.py) of an S-stage pipeline at `classes`."""
    out = workdir / f"step-{stages}-{classes}"
    variant = "single" if stages == 1 else "pipeline"
    cmd = [sys.executable, "bench/bench.py", "--workdir", str(out), "--out", str(out), "--variants", variant,
           "--stages", str(stages), "--classes", str(classes), "--steps", str(args.steps), "--warmup", "3"]
    cmd += (["--tiny"] if args.tiny else []) + (["--ds_config", args.ds_config] if args.ds_config else [])
    cmd += pipeline_switches(**{key.split(".", 1)[1]: value for key, value in settings(args).items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / WORKDIR_MARKER).touch()  # bench.py's own kind of workdir: it clears its old results there
    for old in out.glob("*.json"):
        old.unlink()
    # bench.py makes (or finds) the same random checkpoints under its workdir: point it at ours.
    (out / "checkpoints").mkdir(exist_ok=True)
    if not args.tiny:
        for name in Path(paths["segmenter"]).parent.iterdir():
            link = out / "checkpoints" / name.name
            if not link.exists():
                link.symlink_to(name.resolve())
    else:
        for key in ("segmenter", "generator", "class_embeddings"):
            link = out / Path(paths[key]).name
            if not link.exists():
                link.symlink_to(Path(paths[key]).resolve())
    failed = run(cmd, out / "bench.log", args.timeout)
    reports = sorted(p for p in out.glob("*.json") if "-rank" not in p.name and not p.name.startswith("costs"))
    if failed or not reports:
        return None
    entry = json.loads(reports[-1].read_text())["by_classes"].get(str(classes), {})
    return entry.get("single_gpu_s_per_image" if stages == 1 else "pipeline_s_per_image")


def launcher_run(args, paths: dict, data: Path, gpus: int, stages: int, classes: int, workdir: Path, port: int) -> dict:
    """launch/tta.py on the tasks with --logging.timing; the timing files and results of every process."""
    run_dir = workdir / f"run-{gpus // stages}x{stages}-{classes}"
    log = workdir / f"run-{gpus // stages}x{stages}-{classes}.log"
    import shutil
    shutil.rmtree(run_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    config = ROOT / "ds_configs" / ("demo.json" if args.tiny else "tta.json")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--num_gpus", str(gpus),
           "launch/tta.py", "--config", str(config), "--model.segmenter", paths["segmenter"],
           "--model.generator", paths["generator"], "--model.class_embeddings", paths["class_embeddings"],
           "--data.root", str(data), "--data.severity", "3", "--data.corruptions", "[" + ",".join(TASKS[:args.tasks]) + "]",
           "--logging.wandb.enabled", "false", "--logging.progress", "false", "--logging.timing", "true",
           "--pipeline.num_stages", str(stages), "--dusa.max_classes", str(classes), "--dusa.min_classes", str(classes),
           "--output_dir", str(run_dir)]
    cmd += ["--deepspeed", args.ds_config] if args.ds_config else []
    for key, value in settings(args).items():
        cmd += [f"--{key}", value]
    if args.tiny:  # the demo config's own models, data and split are not the benchmark's
        cmd += ["--model.build_demo_models", "false", "--data.build_demo_data", "false", "--pipeline.partition", "null"]
    timing: dict = {}
    started = time.time()
    failed = run(cmd, log, args.timeout, timing)
    files = {int(p.stem.rsplit("rank", 1)[1]): json.loads(p.read_text()) for p in run_dir.glob("timing-rank*.json")}
    results = run_dir / "results.json"
    return {"failed": failed, "wall_s": timing.get("wall_s"), "started": started, "timing": files, "run_dir": str(run_dir),
            "results": json.loads(results.read_text()) if results.is_file() else None,
            "log_tail": log.read_text(errors="replace").splitlines()[-20:] if failed and log.is_file() else None}


def settings(args) -> dict[str, str]:
    """--set's pipeline settings (key -> value), for the step benchmark and the launch alike."""
    return dict(item.split("=", 1) for item in args.set or [])


def windows_from_data(run_dir: Path) -> dict[str, list[int]]:
    """Per task, the windows of each image in the order the run adapted them, from the run's effective config
    (config.json, or the copy in results.json) and the images' headers (for timing files written before they
    recorded it themselves; grid windows only)."""
    from data.ade20k_c import ADE20KC
    from pipeline.run.config import DataConfig
    from pipeline.run.images import task_order
    from pipeline.dusa.windows import resized_size, window_boxes
    config = run_config(run_dir)
    data = DataConfig(**{k: v for k, v in config["data"].items() if k in DataConfig.__dataclass_fields__})
    out = {}
    for task in data.corruptions:
        dataset = ADE20KC(data.root, task, data.severity, data.limit, 150)
        out[task] = [len(window_boxes(*resized_size(*dataset.image_size(i), data.window_size), data.window_size,
                                      data.window_stride))
                     for i in task_order(data, config["seed"], task, len(dataset))]
    return out


def run_config(run_dir: Path) -> dict:
    """The effective config a run recorded (config.json, else results.json's copy)."""
    if (run_dir / "config.json").is_file():
        return json.loads((run_dir / "config.json").read_text())
    return json.loads((run_dir / "results.json").read_text())["config"]


def by_windows(images: list[dict]) -> dict[str, dict]:
    """Images grouped by their number of windows (micro-batches of the step): count, mean and median seconds."""
    groups: dict[int, list[float]] = {}
    for im in images:
        groups.setdefault(im.get("windows", 0), []).append(im["wall_s"])
    return {str(w): {"images": len(v), "mean_s": statistics.mean(v), "median_s": statistics.median(v)}
            for w, v in sorted(groups.items())}


def row_from(run_out: dict, card: str, gpus: int, stages: int, classes: int, step_s: float | None) -> dict:
    """One row of the record: the launcher's figures (rank 0, and each stage's busy time) beside the step's.
    The step benchmark's image has 2 windows; the mix's images have 1 to 5 (2.27 on average in 3 x 100): the
    like-for-like ratio is the steady 2-window images' mean over the step."""
    row: dict = {"card": card, "gpus": gpus, "replicas": gpus // stages, "stages": stages, "classes": classes,
                 "step_s_per_image": step_s, "status": run_out["failed"] or "ok", "launcher_wall_s": run_out["wall_s"]}
    files = run_out["timing"]
    if 0 not in files:
        row["log_tail"] = run_out["log_tail"]
        return row
    zero = files[0]
    if run_out.get("run_dir") and any("windows" not in im for im in zero["images"]):
        counts = windows_from_data(Path(run_out["run_dir"]))
        seen: dict[str, int] = {}
        for im in zero["images"]:
            im["windows"] = counts[im["task"]][seen.setdefault(im["task"], 0)]
            seen[im["task"]] += 1
    marks = zero["marks"]
    spawn = zero["process_start"] - run_out["started"]  # the deepspeed launcher until this process began
    startup = {"launcher": spawn, **{k: v for k, v in marks.items() if k != "first image done"}}
    tasks = zero["tasks"]
    images = sum(t["images"] for t in tasks)
    # Steady: the images of the tasks after this process's first two (the tasks are the same images: by the
    # third, SegFormer's graph cache holds its shapes, as for most of a sweep of 15 tasks); with fewer, the last.
    settled = [t["task"] for t in tasks[2:]] or [tasks[-1]["task"]]
    later = [im for im in zero["images"] if im["task"] in settled]
    steady = statistics.mean(im["wall_s"] for im in later)
    first = zero["images"][0]["wall_s"] if zero["images"] else None

    def means(key: str, records: list[dict]) -> dict:
        return {n: round(v, 5) for n, v in phase_means(records, key).items()}
    captures = [sum(v[0] for v in im.get("captures", {}).values()) for im in zero["images"]]
    capture_s = [sum(v[1] for v in im.get("captures", {}).values()) for im in zero["images"]]
    breakdown = {"host_s": means("host", later), "device_s": means("device", later),
                 "reset_s_per_task": statistics.mean(t["reset_s"] for t in tasks[1:]) if len(tasks) > 1 else 0.0,
                 "graph_captures": sum(captures), "graph_capture_s": sum(capture_s),
                 "graph_captures_after_first_task": sum(c for c, im in zip(captures, zero["images"])
                                                        if im["task"] != tasks[0]["task"]),
                 "graphs": zero.get("graphs")}
    for rank, f in sorted(files.items()):
        if rank and rank < stages:  # the other stages of replica 0: how busy each was per image
            rest = [im for im in f["images"] if im["task"] != f["tasks"][0]["task"]] or f["images"]
            breakdown[f"stage {rank} host_s"] = means("host", rest)
            breakdown[f"stage {rank} device_s"] = means("device", rest)
    walls = {t["task"]: sum(im["wall_s"] for im in zero["images"] if im["task"] == t["task"]) for t in tasks}
    row.update(images=images, tasks=[{k: t[k] for k in ("task", "images", "seconds")} for t in tasks],
               # what a task spent outside its images (the loader's start, the metric, the results): invisible in
               # the per-image figures (forking the loader's workers once cost 13-17 s per task here)
               task_seconds_outside_images={t["task"]: t["seconds"] - walls[t["task"]] for t in tasks},
               steady_s_per_image=steady, steady_images=len(later),
               mean_s_per_image=statistics.mean(im["wall_s"] for im in zero["images"]),
               task_mean_s_per_image={t["task"]: statistics.mean(im["wall_s"] for im in zero["images"]
                                                                 if im["task"] == t["task"]) for t in tasks},
               median_s_per_image=statistics.median(im["wall_s"] for im in later),
               steady_by_windows=by_windows(later),
               mean_windows_per_image=statistics.mean(im.get("windows", 0) for im in zero["images"]),
               startup_s=spawn + marks.get("runner ready", 0.0), startup=startup, first_image_s=first,
               breakdown=breakdown)
    two = row["steady_by_windows"].get("2")
    if step_s:
        row["steady_over_step"] = steady / step_s  # the mix against the step's 2-window image
        if two:
            row["steady_2_windows_over_step"] = two["mean_s"] / step_s  # like for like
    return row


def print_table(rows: list[dict]) -> None:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)
    print(f"\n{'layout':>7} {'classes':>7} {'images':>6} {'step s':>7} {'steady s':>8} {'2-win s':>8} {'ratio':>6} "
          f"{'mean s':>7} {'start-up s':>10} {'1st image s':>11} status")
    for r in rows:
        two = (r.get("steady_by_windows") or {}).get("2", {}).get("mean_s")
        print(f"{r['replicas']}x{r['stages']:<5} {r['classes']:>7} {f(r.get('images'), '{}'):>6} "
              f"{f(r['step_s_per_image']):>7} {f(r.get('steady_s_per_image')):>8} {f(two):>8} "
              f"{f(r.get('steady_2_windows_over_step'), '{:.2f}'):>6} "
              f"{f(r.get('mean_s_per_image')):>7} {f(r.get('startup_s'), '{:.1f}'):>10} "
              f"{f(r.get('first_image_s'), '{:.2f}'):>11} {r['status']}")
        if r.get("steady_by_windows"):
            print("   steady s/image by windows: " + ", ".join(
                f"{w}: {v['mean_s']:.3f} ({v['images']})" for w, v in r["steady_by_windows"].items()))
        if r.get("breakdown"):
            host = r["breakdown"]["host_s"]
            print("   host s/image: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(host.items(), key=lambda x: -x[1])
                                                  if v >= 0.002))
            device = r["breakdown"]["device_s"]
            if device:
                print("   device s/image: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                        sorted(device.items(), key=lambda x: -x[1]) if v >= 0.002))
            print("   start-up: " + ", ".join(f"{k} {v:.1f}" for k, v in r["startup"].items()))
            print("   task seconds outside the images: " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["task_seconds_outside_images"].items()))


def summarise(args) -> None:
    """The record's row of a run folder that launch/tta.py wrote with --logging.timing."""
    run_dir = Path(args.summarise)
    files = {int(p.stem.rsplit("rank", 1)[1]): json.loads(p.read_text()) for p in run_dir.glob("timing-rank*.json")}
    if not files or not any((run_dir / name).is_file() for name in ("config.json", "results.json")):
        LOG.error(f"error: {run_dir} holds no timing-rank*.json and config.json (run launch/tta.py with "
                  f"--logging.timing true)")
        sys.exit(2)
    cfg = run_config(run_dir)
    stages = cfg["pipeline"]["num_stages"] if cfg["tta"]["method"] == "dusa" else 1
    gpus = max(files) + 1
    # The process start is the launcher's start here: the launcher's own seconds are not in the files.
    out = {"failed": None, "wall_s": None, "started": files[0]["process_start"], "timing": files, "run_dir": str(run_dir)}
    row = row_from(out, args.card or "unknown", gpus, stages, cfg["dusa"]["max_classes"], args.step_s)
    row.update(run_dir=str(run_dir), command=" ".join(sys.argv))
    print_table([row])
    if args.out:
        path = Path(args.out) / f"{run_dir.name}-record.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([row], indent=1) + "\n")
        LOG.info(f"written {path}")


def argument_error(args) -> str | None:
    """What is wrong with the arguments (one line), before anything is made or run."""
    if not 1 <= args.tasks <= len(TASKS):
        return f"--tasks {args.tasks} must be in 1..{len(TASKS)}"
    if args.images < 2 or args.steps < 1 or min(args.classes) < 1:
        return "--images must be at least 2, --steps and every --classes at least 1"
    for layout in args.layouts or []:
        parts = layout.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            return f"--layouts {layout}: write replicas x stages, e.g. 1x2"
    if args.data and not (Path(args.data) / "annotations").is_dir():
        return f"--data {args.data} holds no tasks made by --data_only (no annotations/ folder)"
    workdir = Path(args.workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())
                             and not (workdir / WORKDIR_MARKER).is_file()):
        return f"--workdir {workdir} is not a folder this tool made: name a new or empty folder"
    for item in args.set or []:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.startswith("pipeline.") or key.split(".", 1)[1] not in PIPELINE_SWITCHES:
            return (f"--set {item}: KEY=VALUE with KEY one of "
                    + ", ".join(f"pipeline.{k}" for k in PIPELINE_SWITCHES))
    if args.tag and not all(c.isalnum() or c in "-_." for c in args.tag):
        return f"--tag {args.tag!r}: letters, digits, '-', '_' and '.' only"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/dusa-record")
    parser.add_argument("--out", help="where the record goes (default: <workdir>/results)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10])
    parser.add_argument("--layouts", nargs="+", help="RxS layouts (default: 1xG and Gx1 for G GPUs; 1x1 on one)")
    parser.add_argument("--tasks", type=int, default=3, help=f"corruption tasks (at most {len(TASKS)})")
    parser.add_argument("--images", type=int, default=100, help="images per task")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the step benchmark")
    parser.add_argument("--data", help="the tasks' data made before (--data_only), else made in the workdir")
    parser.add_argument("--data_only", action="store_true", help="make the data in --workdir/data and stop")
    parser.add_argument("--ds_config", help="DeepSpeed JSON (default: the config's, ds_configs/ds_tta.json)")
    parser.add_argument("--no_step", action="store_true", help="skip the step benchmark")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a dry run that fits a CPU")
    parser.add_argument("--tag", help="appended to the results file's name")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a pipeline setting for the step benchmark and the launch alike, e.g. "
                             "pipeline.compile_blocks=false (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each launch")
    parser.add_argument("--summarise", metavar="RUN_DIR",
                        help="no runs: the record's row of a run folder made with --logging.timing (its timing-rank*.json, "
                             "config.json and results.json), printed and written to --out")
    parser.add_argument("--card", help="--summarise: the card the run ran on")
    parser.add_argument("--step_s", type=float, help="--summarise: the step benchmark's seconds per image to set beside it")
    args = parser.parse_args()
    if args.summarise:
        return summarise(args)
    wrong = argument_error(args)
    if wrong:
        LOG.error(f"error: {wrong}")
        sys.exit(2)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).touch()
    data = Path(args.data) if args.data else workdir / "data"
    if not args.data:
        t0 = time.perf_counter()
        make_data(data, args.tasks, args.images, args.tiny)
        say(f"data: {args.tasks} tasks x {args.images} images in {time.perf_counter() - t0:.0f} s ({data})")
    if args.data_only:
        return
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = card.lower().replace("nvidia ", "").split()[0] if card != "cpu" else "cpu"
    layouts = args.layouts or ([f"1x{gpus}", f"{gpus}x1"] if gpus > 1 else ["1x1"])
    t0 = time.perf_counter()
    paths = checkpoints(workdir / "models", args.tiny)
    say(f"checkpoints ready in {time.perf_counter() - t0:.0f} s")
    rows: list[dict] = []
    date = datetime.date.today().isoformat()
    path = Path(args.out or workdir / "results") / f"{date}-{slug}-record{'-' + args.tag if args.tag else ''}{'-tiny' if args.tiny else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    port = 29733
    for classes in args.classes:
        for layout in layouts:
            replicas, stages = (int(v) for v in layout.split("x"))
            step_s = None if args.no_step else step_benchmark(args, paths, stages, classes, workdir)
            say(f"step benchmark, {stages} stage(s), {classes} classes: {step_s} s per image")
            port += 1
            out = launcher_run(args, paths, data, replicas * stages, stages, classes, workdir, port)
            row = row_from(out, card, replicas * stages, stages, classes, step_s)
            row.update(shape_mix=SHAPE_MIX, image_size_of_step=list(IMAGE_SIZE), date=date, settings=settings(args),
                       tasks_images=f"{args.tasks} x {args.images}", command=" ".join(sys.argv))
            rows.append(row)
            path.write_text(json.dumps(rows, indent=1) + "\n")  # after every row: a cut-off call keeps its rows
    print_table(rows)
    LOG.info(f"written {path}")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
