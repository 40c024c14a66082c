"""--sweep of the step benchmark: the real launcher over a synthetic sweep, once per layout and class count."""
from __future__ import annotations

import datetime
import itertools
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from bench.common import (ROOT, run, say, IMAGE_SIZE)
from pipeline.run.log import LOG

# ----------------------------------------------------------------------------- sweep: which layout finishes first
def sweep(args, paths: dict, workdir: Path, out: Path, card: str, slug: str, suffix: str, memory, table,
          checkpoints_s: float) -> None:
    """The real launcher over a synthetic sweep (`--sweep_tasks` x `--sweep_images` images of 512 x 683) on G
    GPUs, once per layout (`--sweep_stages` S: G / S replicas of S stages) and class count (min = max classes
    per window, so every window is one fixed transformer batch); images/s from the tasks' seconds in
    results.json (the replicas' tasks scheduled as the shared queue hands them out: the makespan) and from the
    launcher's wall time (start-up and loading included), beside the prediction from the measured cost table."""
    from data.demo import make_demo_dataset
    from pipeline.dusa.memory import GIB, memory_split, predict_layouts
    from pipeline.dusa.partition import table_costs
    gpus = args.sweep_gpus or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    card_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    size = (128, 171) if args.tiny else IMAGE_SIZE
    data = Path(args.sweep_data) if args.sweep_data else workdir / "sweep-data"
    t0 = time.perf_counter()
    if not args.sweep_data:  # else made beforehand (the GPU image may lack imagecorruptions)
        make_demo_dataset(data, num_images=args.sweep_images, corruptions=tuple(args.sweep_tasks), size=size,
                          create=True)
    dataset_s = time.perf_counter() - t0
    say(f"sweep data ready in {dataset_s:.0f} s: {len(args.sweep_tasks)} tasks x {args.sweep_images} images")
    report: dict = {"card": card, "gpus": gpus, "date": datetime.date.today().isoformat(), "tiny": args.tiny,
                    "generator": args.generator, "ds_config": args.ds_config or "the config's (ds_configs/ds_tta.json)",
                    "tasks": args.sweep_tasks, "images_per_task": args.sweep_images, "image_size": list(size),
                    "classes": args.classes, "checkpoints_s": checkpoints_s, "dataset_s": dataset_s,
                    "command": " ".join(sys.argv), "layouts": []}
    if table is not None:
        costs = dict(zip(sorted(int(c) for c in table[1]["classes"]), table_costs(table[1])))
        report["predicted"] = {"table": table[0].name, "measured_on": table[1]["card"],
                               "layouts": predict_layouts(costs, gpus, card_bytes, memory)}
    path = out / f"{report['date']}-{slug}-sweep{suffix}.json"
    ports = itertools.count(29633)
    for classes in args.classes:
        for stages in args.sweep_stages:
            replicas = gpus // stages
            row: dict = {"layout": f"{replicas} x {stages}", "replicas": replicas, "stages": stages, "classes": classes}
            report["layouts"].append(row)
            if gpus % stages:
                row["status"] = f"skipped: {stages} stages do not divide {gpus} GPUs"
                continue
            bounds = memory_split(memory, stages, classes)
            peaks = [st["total"] / GIB for st in memory.stages(bounds, classes)]
            row["estimated_peak_gib"] = [round(m, 1) for m in peaks]
            if card_bytes and max(peaks) * GIB > card_bytes and not args.sweep_run_unfit:
                row["status"] = (f"skipped: estimated {max(peaks):.1f} GiB per GPU at the least-memory split "
                                 f"{bounds}, the card has {card_bytes / GIB:.1f} (--sweep_run_unfit runs it)")
                say(f"{row['layout']} at {classes} classes {row['status']}")
                continue
            name = f"{replicas}x{stages}-{classes}"
            run_dir, log = workdir / "sweep" / name, workdir / "sweep" / f"{name}.log"
            shutil.rmtree(run_dir, ignore_errors=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.unlink(missing_ok=True)
            config = ROOT / "ds_configs" / ("demo.json" if args.tiny else "tta.json")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(next(ports)), "--num_gpus",
                   str(gpus), "launch/tta.py", "--config", str(config), "--model.segmenter", paths["segmenter"],
                   "--model.generator", paths["generator"], "--model.class_embeddings", paths["class_embeddings"],
                   "--data.root", str(data), "--data.corruptions", "[" + ",".join(args.sweep_tasks) + "]",
                   "--logging.wandb.enabled", "false", "--logging.progress", "false", "--logging.image_every", "0",
                   "--pipeline.num_stages", str(stages), "--dusa.max_classes", str(classes),
                   "--dusa.min_classes", str(classes), "--output_dir", str(run_dir)]
            cmd += ["--deepspeed", args.ds_config] if args.ds_config else []
            if args.tiny:  # the demo config's own models, data and split are not the sweep's
                cmd += ["--model.build_demo_models", "false", "--data.build_demo_data", "false",
                        "--pipeline.partition", "null"]
            timing: dict = {}
            failed = run(cmd, log, args.timeout, timing)
            row["launcher_wall_s"] = timing["wall_s"]
            text = log.read_text(errors="replace") if log.is_file() else ""
            row["startup"] = [line.strip() for line in text.splitlines()
                              if line.lstrip().startswith(("partition", "stage ", "layout", "memory per GPU"))][:12]
            errors = [line.strip() for line in text.splitlines() if line.startswith("error:")]
            row["status"] = ("out of memory" if "out of GPU memory" in text else failed) if failed else "ok"
            if errors:
                row["error"] = errors[0][:400]
            results = run_dir / "results.json"
            if results.is_file():
                tasks = json.loads(results.read_text()).get("tasks", {})
                seconds = {t: r["seconds"] for t, r in tasks.items()}
                images = sum(r["images"] for r in tasks.values())
                # Each replica's tasks one after another: the replica of each task from the log's task lines
                # ("task: mIoU ... (N images, S s, replica R)"; none: replica 0), else as the shared queue hands
                # them out (the next task to the replica free first, in the config's order).
                named = dict(re.findall(r"^(\w+): mIoU .*?\(\d+ images, [\d.]+ s(?:, replica (\d+))?\)", text, re.M))
                free = [0.0] * replicas
                for task in args.sweep_tasks:
                    if task in seconds:
                        r = int(named[task] or 0) if task in named else free.index(min(free))
                        free[min(r, replicas - 1)] += seconds[task]
                row.update(task_seconds=seconds, images=images, tasks_span_s=max(free),
                           images_per_s=images / max(free) if max(free) else None,
                           images_per_s_wall=images / row["launcher_wall_s"])
            say(f"{row['layout']} at {classes} classes: {row['status']}, "
                f"{row.get('images_per_s') or 0:.2f} images/s over the tasks, "
                f"{row.get('images_per_s_wall') or 0:.2f} over the launcher's {row['launcher_wall_s']:.0f} s")
            path.write_text(json.dumps(report, indent=2))  # after every launch: a cut-off sweep keeps its rows
    path.write_text(json.dumps(report, indent=2))
    if not any(row["status"] == "ok" for row in report["layouts"]):
        LOG.error(f"error: no layout ran to the end (see the status of each in {path})")
        sys.exit(1)
    print(f"\n{card}, {gpus} GPUs, {len(args.sweep_tasks)} tasks x {args.sweep_images} images of {list(size)}")
    predicted = {(p["replicas"], p["stages"]): p["classes"] for p in (report.get("predicted") or {}).get("layouts", [])}
    print(f"{'layout':>7} {'classes':>7} {'images/s':>9} {'wall':>9} {'predicted':>9} {'est. GiB':>12}  status")
    for row in report["layouts"]:
        guess = predicted.get((row["replicas"], row["stages"]), {}).get(row["classes"], {}).get("images_per_s")
        print(f"{row['layout']:>7} {row['classes']:>7} {row.get('images_per_s') or 0:>9.2f} "
              f"{row.get('images_per_s_wall') or 0:>9.2f} {guess or 0:>9.2f} "
              f"{'/'.join(f'{m:.0f}' for m in row.get('estimated_peak_gib', [])):>12}  {row['status']}")
    LOG.info(f"written {path}")
