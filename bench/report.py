"""The step benchmark's report: its workers' files collected, the checks of (a) against (b), the printed table."""
from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

import torch

from bench.common import (synthetic_image)


def relative_errors(x: dict, ref: dict) -> dict:
    """Per tensor name, the relative L2 distance of `x`'s tensor from `ref`'s; analytically-zero ones (attention
    key biases' gradients: norms under 1e-6 of the largest) left out."""
    norms = {k: g.norm().item() for k, g in ref.items()}
    floor = 1e-6 * max(norms.values())
    return {k: (x[k] - g).norm().item() / norms[k] for k, g in ref.items() if norms[k] > floor}


def compare_check(workdir: Path, name: str, reference: str = "single") -> dict | None:
    """Loss, gradients and the first optimizer step's parameter update of run `name` (the pipeline, or a
    variant) against the `reference` run on the same weights and inputs (strided samples of every tensor)."""
    def load(n):
        files = sorted(workdir.glob(f"check-{n}-rank*.pt"))
        if not files:
            return None
        dumps = [torch.load(f) for f in files]
        return (dumps[0]["loss"], {k: v for d in dumps for k, v in d["grads"].items()},
                {k: v for d in dumps for k, v in d["updates"].items()})
    a, b = load(name), load(reference)
    if a is None or b is None:
        return None

    grad_err, update_err = relative_errors(a[1], b[1]), relative_errors(a[2], b[2])
    segmenter = [k for k in b[2] if ".segmenter." in k]
    return {"loss_pipeline": a[0], "loss_single": b[0], "loss_rel_err": abs(a[0] - b[0]) / abs(b[0]),
            "grad_rel_err_max": max(grad_err.values()), "grad_rel_err_median": statistics.median(grad_err.values()),
            "update_rel_err_max": max(update_err.values()),
            "update_rel_err_median": statistics.median(update_err.values()),
            "segmenter_tensors_updated": sum(1 for k in segmenter if a[2][k].abs().max() > 0),
            "segmenter_tensors": len(segmenter),
            "same_parameters": sorted(a[1]) == sorted(b[1]), "tensors_compared": len(grad_err)}


def compare_memory(memory, bounds, classes: int, measured: list | None, reserved: list | None = None) -> dict:
    """The estimate per stage beside the measured peaks (GiB; error in % of the measured)."""
    from pipeline.dusa.memory import GIB
    stages = []
    for s, est in enumerate(memory.stages(list(bounds), classes)):
        row = {k: round(est[k] / GIB, 3) for k in ("params", "grads", "optimizer", "activations", "total")}
        got = measured[s] if measured and s < len(measured) else None
        row.update(measured_gib=got, reserved_gib=reserved[s] if reserved and s < len(reserved) else None,
                   error_pct=round(100 * (est["total"] / GIB / got - 1), 1) if got else None)
        stages.append(row)
    return {"partition": list(bounds), "source": memory.source, "stages": stages}


def collect(workdir: Path, args, card: str, tflops, paths: dict, memory=None) -> dict:
    def read(name):
        path = workdir / name
        return json.loads(path.read_text()) if path.is_file() else None
    pipe = [read(f"pipeline-rank{r}.json") for r in range(args.stages)]
    single = read("single-rank0.json")
    naive = read("naive.json")
    report = {"card": card, "gpus": torch.cuda.device_count(), "date": datetime.date.today().isoformat(),
              "tiny": args.tiny, "windows": 2, "image_size": list(synthetic_image(args.tiny).shape[-2:]),
              "steps": args.steps, "warmup": args.warmup, "stages": args.stages, "matmul_tflops": tflops,
              "by_classes": {}}
    if all(pipe):
        report["partition"] = pipe[0].get("partition")
        report["profile"] = {f"stage{p['stage']}, {c} classes": prof for p in pipe for c, prof in p.get("profile", {}).items()}
        report["graphs"] = next((p["graphs"] for p in pipe if "graphs" in p), None)
        report["graph_cache_in_run"] = next((p["graph_cache"] for p in pipe if "graph_cache" in p), None)
    if single and "profile" in single:
        report.setdefault("profile", {}).update({f"single, {c} classes": prof for c, prof in single["profile"].items()})
    variants = {}
    for name in json.loads(args.pipeline_variants):
        ranks = [read(f"pipeline-{name}-rank{r}.json") for r in range(args.stages)]
        if all(ranks):
            variants[name] = {c: {"s_per_image": ranks[0]["results"][c]["s_per_image"],
                                  "first_step_s": ranks[0]["results"][c].get("first_step_s"),
                                  "peak_mem_gib": [r["results"][c]["peak_mem_gib"] for r in ranks]}
                              for c in ranks[0]["results"]}
    report["pipeline_variants"] = variants
    stopped = [p["stopped"] for p in [*pipe, single] if p and p.get("stopped")]
    stopped = [json.loads(t) for t in dict.fromkeys(json.dumps(x, sort_keys=True) for x in stopped)]  # once each
    if stopped:
        report["stopped"] = stopped  # a stage ran out of memory: every stage of that launch ended there
    for c in map(str, args.classes):
        entry: dict = {"classes": int(c)}
        if all(pipe) and all(c in p["results"] for p in pipe):
            r0 = pipe[0]["results"][c]
            entry["pipeline_s_per_image"] = r0["s_per_image"]
            entry["stage_busy_s"] = [p["results"][c]["busy_s"] for p in pipe]
            entry["peak_mem_gib"] = [p["results"][c]["peak_mem_gib"] for p in pipe]
            entry["peak_reserved_gib"] = [p["results"][c].get("peak_reserved_gib") for p in pipe]
            entry["pipeline_oom"] = any(p["results"][c]["oom"] for p in pipe)
            if r0["s_per_image"]:
                entry["bubble_fraction"] = 1 - sum(b or 0 for b in entry["stage_busy_s"]) / (args.stages * r0["s_per_image"])
            if memory is not None and pipe[0].get("partition"):
                entry["memory_estimate"] = compare_memory(memory, pipe[0]["partition"], int(c), entry["peak_mem_gib"],
                                                          entry["peak_reserved_gib"])
        if single and c in single["results"]:
            entry["single_gpu_s_per_image"] = single["results"][c]["s_per_image"]
            entry["single_gpu_peak_mem_gib"] = single["results"][c]["peak_mem_gib"]
            entry["single_gpu_oom"] = single["results"][c]["oom"]
            if memory is not None:
                entry["single_gpu_memory_estimate"] = compare_memory(
                    memory, [0, len(memory.layers)], int(c), [single["results"][c]["peak_mem_gib"]],
                    [single["results"][c].get("peak_reserved_gib")])
        if naive and c in naive["results"]:
            entry["naive_split_s_per_image"] = naive["results"][c]["s_per_image"]
            entry["naive_split_peak_mem_gib"] = naive["results"][c]["peak_mem_gib"]
            entry["naive_split_oom"] = naive["results"][c]["oom"]
            flops = naive["results"][c]["flops_per_image"]
            entry["flops_per_image"] = flops
            if flops and entry.get("pipeline_s_per_image"):
                entry["model_tflops"] = flops / entry["pipeline_s_per_image"] / 1e12
        a, b, cc = (entry.get(k) for k in ("pipeline_s_per_image", "single_gpu_s_per_image", "naive_split_s_per_image"))
        if a and b:
            entry["speedup_vs_single"] = b / a
        if a and cc:
            entry["speedup_vs_naive"] = cc / a
        report["by_classes"][c] = entry
    if args.check:
        report["check"] = compare_check(workdir, "pipeline")
        # Each variant against the run it changes: the pipeline, or with --variants single, the one-GPU run.
        base = "pipeline" if "pipeline" in args.variants else "single"
        report["variant_checks"] = {name: compare_check(workdir, f"pipeline-{name}", base)
                                    for name in json.loads(args.pipeline_variants)}
    # The top level carries the default workload (the first class count), as the issue names the fields.
    report.update({k: v for k, v in report["by_classes"][str(args.classes[0])].items() if k != "classes"},
                  classes=args.classes[0])
    return report


def print_table(report: dict) -> None:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)
    print(f"\n{report['card']}, matmul {f(report['matmul_tflops'], '{:.0f}')} TFLOP/s, "
          f"{report['windows']} windows of {report['image_size']}")
    print(f"{'classes':>7} {'pipeline s':>10} {'1-GPU s':>8} {'naive s':>8} {'x 1-GPU':>8} {'x naive':>8} "
          f"{'stage busy s':>16} {'bubble':>7} {'peak GiB':>14} {'TFLOP/s':>8}")
    for c, e in report["by_classes"].items():
        busy = "/".join(f(b) for b in e.get("stage_busy_s", []))
        mem = "/".join(f(m, "{:.1f}") for m in e.get("peak_mem_gib", []))
        print(f"{c:>7} {f(e.get('pipeline_s_per_image')):>10} {f(e.get('single_gpu_s_per_image')):>8} "
              f"{f(e.get('naive_split_s_per_image')):>8} {f(e.get('speedup_vs_single'), '{:.2f}'):>8} "
              f"{f(e.get('speedup_vs_naive'), '{:.2f}'):>8} {busy:>16} {f(e.get('bubble_fraction'), '{:.2f}'):>7} "
              f"{mem:>14} {f(e.get('model_tflops'), '{:.0f}'):>8}")
    for name, v in report.get("pipeline_variants", {}).items():
        print(f"variant {name}: " + ", ".join(f"{c} classes {f(e['s_per_image'])} s" for c, e in v.items()))
    for stage, prof in (report.get("profile") or {}).items():
        print(f"profile {stage} (s/step): " + ", ".join(f"{k} {v:.4f}" for k, v in prof["breakdown_s_per_step"].items()
                                                        if abs(v) >= 5e-4))
    if report.get("graphs"):
        print("graphs:", json.dumps(report["graphs"]))
    if report.get("check"):
        print("check (a) vs (b):", json.dumps(report["check"]))
    for name, check in (report.get("variant_checks") or {}).items():
        print(f"check variant {name}:", json.dumps(check))
    for c, e in report["by_classes"].items():
        for key in ("memory_estimate", "single_gpu_memory_estimate"):
            if e.get(key):
                rows = e[key]["stages"]
                print(f"{c} classes, {'pipeline' if key == 'memory_estimate' else '1 GPU'} {e[key]['partition']}: "
                      "estimate / measured GiB per stage " + ", ".join(
                          f"{r['total']:.1f} / {f(r['measured_gib'], '{:.1f}')} ({f(r['error_pct'], '{:+.1f}')} %)"
                          for r in rows))
    for stop in report.get("stopped", []):
        print(f"stopped: stage {stop.get('stage')} ran out of memory at {stop.get('where')} "
              f"({stop.get('classes')} classes): {stop.get('error')}")
