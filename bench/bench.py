#!/usr/bin/env python
"""Benchmark of one DUSA TTA step per image at full size (random weights of the published models).

    python bench/bench.py --workdir /tmp/bench --check --profile   # on a node with 2 GPUs
    DS_ACCELERATOR=cpu python bench/bench.py --tiny --workdir /tmp/bench-tiny  # dry run, CPU
    python bench/bench.py --generator sd3.5-large --variants pipeline --classes 10   # SD3.5-large, 2 stages
    python bench/bench.py --sweep --classes 10 20 --sweep_images 40            # layouts of the real launcher

Variants, each timed over --steps images after --warmup, per number of candidate classes:
  (a) pipeline: the project's pipeline, default config (2 stages, bf16, ZeRO-1), through the very
                step users run (`TTAEngine.step`: its own instruction table, NaN guard included,
                SegFormer once per image, the scored prediction)
  (b) single:   the same on 1 GPU (1 stage)
  (c) naive:    the old design: the blocks split over 2 GPUs, one busy at a time, float32 weights
                under bf16 autocast, eager SegFormer once on the full image, torch AdamW
--check: loss, gradients and update of one optimizer step of (a) against (b), and of each
--pipeline_variants run against its base (the joint blocks' graphs replay from that step); --profile:
torch.profiler traces and where each stage's time goes; --sweep: the real launcher over a synthetic sweep
per layout and class count. Every run records the memory estimate beside the measured peaks. Details and
the output files: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import gzip
import functools
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where this file would stand in for the bench package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# One build folder of DeepSpeed's extensions per environment (see launch/tta.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

import torch  # noqa: E402


from bench.common import (PIPELINE_SWITCHES, WORK, WORKDIR_MARKER, argument_error, StageStop, Spans,  # noqa: E402
                          breakdown, checkpoints, default_ds_config, instrument, kernel_summary, matmul_tflops,
                          memory_model, merge, peak_memory_gib, peak_reserved_gib, pipeline_switches, run, sample,
                          say, sync, synthetic_image, window_size)
from bench.graph_cache import SHAPE_MIX, graph_cache_simulation  # noqa: E402
from bench.naive import naive_worker  # noqa: E402
from bench.report import collect, print_table  # noqa: E402
from bench.sweep import sweep  # noqa: E402
from pipeline.run.log import LOG  # noqa: E402


# ----------------------------------------------------------------------------- (a), (b): the pipeline
def pipeline_worker(args) -> None:
    import deepspeed
    import torch.distributed as dist
    from pipeline.dusa.deepspeed_seam import wrap_instructions
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from data.classes import ADE20K_CLASSES
    from pipeline.run.config import DataConfig, ModelConfig, PipelineConfig, RunConfig, TTAConfig
    from pipeline.dusa.engine import TTAEngine, load_ds_config, precision_of
    from pipeline.methods.dusa import Dusa, DusaOptions
    from pipeline.dusa.module import build_pipeline
    from pipeline.run.images import predict
    from pipeline.dusa.windows import window_boxes

    deepspeed.init_distributed()
    rank = dist.get_rank()
    if torch.cuda.is_available():  # this rank's GPU before anything touches CUDA (as launch/tta.py does)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tag = f"{args.name}-rank{rank}"
    paths = json.loads(args.paths)
    size, stride = window_size(args.tiny)
    data = DataConfig(window_size=size, window_stride=stride)
    dusa = DusaOptions(min_classes=args.classes[0], max_classes=max(args.classes))  # (the step sets each count)
    pipe = PipelineConfig(num_stages=args.stages, partition=json.loads(args.partition) if args.partition else None,
                          cost_table=args.cost_table)
    if args.segmenter_graphs is not None:
        pipe.segmenter_graphs = args.segmenter_graphs
    if args.transformer_graphs is not None:
        pipe.transformer_graphs = args.transformer_graphs
    if args.compile_blocks is not None:
        pipe.compile_blocks = bool(args.compile_blocks)
    if args.compile_vae is not None:
        pipe.compile_vae = bool(args.compile_vae)
    if args.attention_backend is not None:
        pipe.attention_backend = args.attention_backend
    ds = load_ds_config(args.ds_config or default_ds_config(args.tiny),
                        lr=1e-5)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    out: dict = {"stage": rank, "stages": args.stages, "name": args.name, "results": {}}
    stopper = StageStop(Path(args.workdir), args.name, rank, out, Path(args.workdir) / f"{tag}.json")
    try:
        module = build_pipeline(ModelConfig(**paths), data, dusa, pipe, ADE20K_CLASSES,
                                stage_report=LOG.info,
                                dtype=torch.bfloat16 if bf16 else torch.float32, precision=precision_of(ds))
        say(f"rank {rank}: stage built")
        engine = TTAEngine(module, ds, TTAConfig(), dusa, working_weights=not args.autocast_casts)
    except torch.cuda.OutOfMemoryError as exc:
        stopper.fail(None, exc, "loading the stage")
    stage = engine.engine.stage_id
    out.update(stage=stage, partition=list(module.parts))
    say(f"rank {rank}: engine ready")
    front = module.front
    say(f"rank {rank}: stage {stage} on {engine.device} (current device "
        f"{torch.cuda.current_device() if torch.cuda.is_available() else 'cpu'}, weights on "
        f"{next(module.parameters()).device})")
    image = synthetic_image(args.tiny)
    corners = window_boxes(image.shape[-2], image.shape[-1], size, stride)
    if front is not None and torch.cuda.is_available() and args.graph_check:
        try:
            out["graphs"] = graph_check(front, image)
        except RuntimeError as exc:  # reported, and the timing goes on
            out["graphs"] = {"error": str(exc)}
        say(f"rank {rank}: graph check {json.dumps(out['graphs'])}")

    # Gradients and the parameter update of the first optimizer step (check): strided samples per tensor.
    captured: dict = {}
    hooks = {}

    def capturing_step(eng, *a, optimizer_step, **k):
        if not captured.get("armed"):
            return optimizer_step(eng, *a, **k)
        captured["armed"] = False
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        captured["grads"] = {n: sample(safe_get_full_grad(p)) for n, p in named}
        def master(p):  # the float32 master weight (the parameter itself without a mixed-precision optimizer)
            weight = safe_get_full_fp32_param(p)
            return p if weight is None else weight
        before = {n: sample(master(p)) for n, p in named}
        result = optimizer_step(eng, *a, **k)
        captured["updates"] = {n: sample(master(p)) - before[n] for n, p in named}
        return result
    hooks["OptimizerStep"] = lambda step: functools.partial(capturing_step, optimizer_step=step)
    if args.inject_oom and args.inject_oom.split(":")[0] == str(stage):  # tests: an out-of-memory inside the step,
        def failing_forward(*a, forward_pass, **k):                      # where the other stages wait on this one
            if args.inject_oom == f"{stage}:{stopper.current}":
                raise torch.cuda.OutOfMemoryError("injected by --inject_oom (test)")
            return forward_pass(*a, **k)
        hooks["ForwardPass"] = lambda forward: functools.partial(failing_forward, forward_pass=forward)
    wrap_instructions(engine.engine, hooks)
    spans = Spans()
    instrument(engine, spans)
    if args.check and getattr(module, "block_chain", None) is not None:
        module.block_chain.shapes.capture_after = 1  # the checked first step replays the joint blocks' graphs

    # Stage 0 runs the users' step (pipeline/methods/dusa.py: Dusa.step, the draws seeded per image as in a run);
    # the other stages take their part of it with the same window count.
    method = Dusa(engine, RunConfig(data=data, dusa=dusa), ADE20K_CLASSES)

    def one_step(i: int):
        if front is None:
            return engine.step(None, [None] * len(corners))
        result = method.step("bench", {"image": image, "name": f"image{i}", "corners": corners})
        predict(result.logits, image.shape[-2:])  # the scored prediction, as the TTA loop makes it
        return result

    for c in args.classes:
        if front is not None:
            front.min_classes = front.max_classes = c
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stopper.current = c
        times, busies, optimizer, oom, loss, first = [], [], [], False, None, None
        for i in range(args.warmup + args.steps):
            captured["armed"] = args.check and c == args.classes[0] and i == 0
            sync()
            t0 = time.perf_counter()
            try:
                loss = one_step(i).loss
                sync()
            except torch.cuda.OutOfMemoryError as exc:  # the other stages wait inside this step: end them too
                stopper.fail(c, exc, f"step {i}")
            elapsed = time.perf_counter() - t0
            first = elapsed if first is None else first
            if "grads" in captured:
                torch.save({"loss": float(loss), "grads": captured.pop("grads"), "updates": captured.pop("updates")},
                           Path(args.workdir) / f"check-{args.name}-rank{rank}.pt")
            step_spans = spans.take()
            busy = sum(step_spans.get(k, 0.0) for k in WORK) - step_spans.get("segmenter backward", 0.0)
            say(f"rank {rank}: {c} classes, step {i}: {elapsed:.3f} s, busy {busy:.3f} s, loss {float(loss) if loss is not None else float('nan'):.6f}, "
                f"peak {peak_memory_gib() or 0:.1f} GiB")
            if i >= args.warmup:
                times.append(elapsed)
                busies.append(busy)
                optimizer.append(step_spans.get("OptimizerStep", 0.0))
        out["results"][str(c)] = {"oom": oom, "s_per_image": statistics.median(times) if times else None,
                                  "first_step_s": first,  # with compilation or graph captures
                                  "busy_s": statistics.median(busies) if busies else None,
                                  "optimizer_s": statistics.median(optimizer) if optimizer else None,
                                  "peak_mem_gib": peak_memory_gib(), "peak_reserved_gib": peak_reserved_gib(),
                                  "loss": float(loss) if loss is not None else None}
        stopper.save()  # what is measured so far stays if a later class count runs out of memory
        if args.profile and not oom:
            out.setdefault("profile", {})[str(c)] = profile_steps(one_step, spans,
                                                                  Path(args.workdir) / f"trace-{tag}-{c}.json")
    for key, graphed in (("graph_cache", front.graphed if front is not None else None),
                         ("block_graphs", getattr(module, "block_chain", None))):
        if graphed is not None:
            stats = graphed.stats
            out[key] = {"calls": stats.calls, "hits": stats.hits, "captures": stats.captures,
                        "capture_s": stats.capture_seconds, "capture_bytes": stats.capture_bytes}
    stopper.save()


def profile_steps(one_step, spans: Spans, trace: Path, steps: int = 2) -> dict:
    """Two more steps under torch.profiler: the trace (gzip) and where this stage's time goes."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    spans.take()
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            if i == steps - 1:
                spans.mark()
            one_step(1000 + i)
        sync()
    wall = time.perf_counter() - t0
    timeline = [(name, round(a, 2), round(b, 2)) for name, a, b in spans.timeline()
                if b >= 0]  # the last step's instructions, ms on this GPU since its start
    result = {"breakdown_s_per_step": breakdown(spans.take(), wall, steps), "timeline_ms_last_step": timeline}
    spans.origin = None
    say("profile breakdown (s/step): " + ", ".join(f"{k} {v:.4f}" for k, v in result["breakdown_s_per_step"].items()))
    say("timeline of the last step (ms): " + "; ".join(f"{n} {a:.1f}-{b:.1f}" for n, a, b in timeline))
    if torch.cuda.is_available():
        kernels = kernel_summary(prof)
        result["kernels_s_per_step"] = {k: v / steps for k, v in kernels["kernel_s_by_category"].items()}
        result["kernel_busy_s_per_step"] = kernels["kernel_busy_union_s"] / steps
        result["kernels_per_step"] = kernels["kernels"] / steps
        result["top_kernels_per_step"] = [{**k, "s": k["s"] / steps, "calls": k["calls"] / steps}
                                          for k in kernels["top_kernels"]]
        if "idle_s" in kernels:  # where the host was while the GPU waited
            result["gpu_idle_s_per_step"] = kernels["idle_s"] / steps
            for kind in ("annotation", "operator"):
                result[f"gpu_idle_s_per_step_by_host_{kind}"] = {
                    k: v / steps for k, v in kernels[f"idle_s_by_host_{kind}"].items()}
                say(f"GPU idle by host {kind} (s/step): " + ", ".join(
                    f"{k} {v:.4f}" for k, v in list(result[f"gpu_idle_s_per_step_by_host_{kind}"].items())[:8]))
        say(f"kernels (s/step): busy union {result['kernel_busy_s_per_step']:.4f}, " +
            ", ".join(f"{k} {v:.4f}" for k, v in result["kernels_s_per_step"].items()))
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    return result


def graph_check(front, image: torch.Tensor) -> dict:
    """SegFormer through CUDA graphs against eager (logits, parameter gradients), and per shape the
    eager and graphed forward+backward time and the capture's time and memory."""
    from pipeline.dusa.graphs import GraphedModule
    segmenter = front.segmenter
    params = [p for p in segmenter.parameters() if p.requires_grad]
    graphed = GraphedModule(segmenter, max_graphs=8, capture_after=1)

    def fwd_bwd(fn, x, grad):
        out = fn(x)
        return out, torch.autograd.grad(out, params, grad, allow_unused=True)

    def median_time(fn, x, grad, n=5):
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fwd_bwd(fn, x, grad)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    x = image.cuda()
    out = segmenter(x)
    grad = torch.randn_like(out)
    eager_grads = torch.autograd.grad(out, params, grad, allow_unused=True)
    graph_out, graph_grads = fwd_bwd(graphed, x, grad)
    pairs = [(a.float(), b.float()) for a, b in zip(eager_grads, graph_grads) if a is not None]
    diff = sum((a - b).square().sum() for a, b in pairs).sqrt()
    graph_out, out = graph_out.detach().float(), out.detach().float()
    result = {"logits_rel_err": float((graph_out - out).norm() / out.norm()),
              "grads_rel_err": float(diff / sum(a.square().sum() for a, _ in pairs).sqrt()),
              "params": len(params), "shapes": {}}
    del out, graph_out, eager_grads, graph_grads
    for h, w in ((512, 683), (683, 512), (512, 512), (512, 768), (512, 910)):
        x = synthetic_image(False, (h, w), seed=h + w).cuda()
        grad = torch.randn(1, 150, (h + 3) // 4, (w + 3) // 4, device="cuda", dtype=next(segmenter.parameters()).dtype)
        eager = median_time(segmenter, x, grad)
        before = len(graphed.stats.capture_seconds)
        graphed(x)  # capture
        capture = graphed.stats.capture_seconds[before:] + [None]
        result["shapes"][f"{h}x{w}"] = {"eager_s": eager, "graphed_s": median_time(graphed, x, grad),
                                       "capture_s": capture[0],
                                       "capture_gib": (graphed.stats.capture_bytes[before:] + [0])[0] / 2**30}
    del graphed
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/dusa-bench",
                        help="scratch folder (made here, or one this tool made: its old JSON files are removed)")
    parser.add_argument("--out", help="where the results JSON goes (default: <workdir>/results; bench/results/ "
                                      "only when named here)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--partition", help="explicit stage boundaries of (a) as JSON (default: planned from costs)")
    parser.add_argument("--cost_table", help="cost table for (a)'s partition (default: pipeline/dusa/costs/ lookup)")
    parser.add_argument("--segmenter_graphs", type=int, help="pipeline.segmenter_graphs of (a) and (b) (default: the "
                                                             "project's)")
    parser.add_argument("--transformer_graphs", type=int, help="pipeline.transformer_graphs of (a) and (b) (default: "
                                                               "the project's)")
    parser.add_argument("--compile_blocks", type=int, choices=[0, 1], help="pipeline.compile_blocks of (a) and (b) "
                                                                          "(default: the project's)")
    parser.add_argument("--compile_vae", type=int, choices=[0, 1], help="pipeline.compile_vae of (a) and (b) "
                                                                       "(default: the project's)")
    parser.add_argument("--attention_backend", help="pipeline.attention_backend of (a) and (b) (default: the "
                                                    "project's)")
    parser.add_argument("--variants", nargs="+", default=["single", "pipeline", "naive"])
    parser.add_argument("--pipeline_variants", default="{}",
                        help='more (a) runs as JSON {name: DeepSpeed JSON merged over the default, and optionally '
                             '"partition": [...], "segmenter_graphs": N, "transformer_graphs": N}, e.g. '
                             '\'{"immediate": {"bf16": {"immediate_grad_update": true}}}\'; engine switches: '
                             '"autocast_casts": true (autocast\'s own per-window casts), "compile_blocks": false '
                             '(eager blocks), "compile_vae": false (eager VAE encoder)')
    parser.add_argument("--ds_config", help="DeepSpeed JSON of (a) and (b) (default: ds_configs/ds_tta.json)")
    parser.add_argument("--check", action="store_true", help="compare loss, gradients and update of (a) and (b)")
    parser.add_argument("--profile", action="store_true",
                        help="profile two more steps of (a) on every stage at every class count (traces beside the report)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a dry run that fits a CPU)")
    parser.add_argument("--log", help="worker output (default: <workdir>/bench.log)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each variant")
    parser.add_argument("--generator", choices=["sd3-medium", "sd3.5-large"], default="sd3-medium",
                        help="the random SD3 of the run (results file <date>-<card>-<generator>.json unless sd3-medium)")
    parser.add_argument("--tag", help="appended to the results file's name (e.g. the precision preset)")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the variants: images/s of the real launcher over a sweep of synthetic tasks, "
                             "per layout (replicas x stages) and class count")
    parser.add_argument("--sweep_images", type=int, default=40, help="images per task of the sweep")
    parser.add_argument("--sweep_data", help="an ADE20K-C root holding the sweep's tasks (default: built in the "
                                             "workdir by data/demo.py)")
    parser.add_argument("--sweep_tasks", nargs="+", default=["gaussian_noise", "defocus_blur"],
                        help="the sweep's corruptions (one task each)")
    parser.add_argument("--sweep_stages", type=int, nargs="+", default=[2, 1],
                        help="pipeline.num_stages of each layout (replicas = GPUs / stages)")
    parser.add_argument("--sweep_gpus", type=int, help="GPUs (processes) of each launch (default: every GPU; 2 on a CPU)")
    parser.add_argument("--sweep_run_unfit", action="store_true",
                        help="also launch layouts whose estimated memory exceeds the card (default: recorded as skipped)")
    parser.add_argument("--inject_oom", help=argparse.SUPPRESS)  # STAGE:CLASSES, tests of the out-of-memory stop
    parser.add_argument("--worker", choices=["pipeline", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--name", default="pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--graph_check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--autocast_casts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "pipeline":
        return pipeline_worker(args)
    if args.worker == "naive":
        return naive_worker(args)

    wrong = argument_error(args)
    if wrong:
        LOG.error(f"error: {wrong}")
        sys.exit(2)
    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else workdir / "results"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).touch()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*workdir.glob("*.json"), *workdir.glob("check-*.pt"), *workdir.glob("trace-*.gz")]:
        old.unlink()
    t0 = time.perf_counter()
    paths = checkpoints(workdir, args.tiny, args.generator)
    checkpoints_s = time.perf_counter() - t0
    say(f"checkpoints ready in {checkpoints_s:.0f} s")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # GPU 0 is stage 0's: this process keeps only its context there
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = card.lower().replace("nvidia ", "").split()[0] if card != "cpu" else "cpu"
    suffix = (f"-{args.generator}" if args.generator != "sd3-medium" else "") + (f"-{args.tag}" if args.tag else "") \
        + ("-tiny" if args.tiny else "")
    from pipeline.run.config import PipelineConfig
    # The launcher's SegFormer graphs capture up to pipeline.segmenter_graphs shapes (the sweep's images vary in
    # size); the variants here see one shape.
    memory, table = memory_model(paths, args, card, PipelineConfig().segmenter_graphs if args.sweep else 1)
    if args.sweep:
        return sweep(args, paths, workdir, out, card, slug, suffix, memory, table, checkpoints_s)
    tflops = matmul_tflops()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    switches = pipeline_switches(segmenter_graphs=args.segmenter_graphs, transformer_graphs=args.transformer_graphs,
                                 compile_blocks=args.compile_blocks, compile_vae=args.compile_vae,
                                 attention_backend=args.attention_backend)
    common = ["bench/bench.py", "--workdir", str(workdir), "--paths", json.dumps(paths), "--classes",
              *map(str, args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup), *switches] + \
             (["--tiny"] if args.tiny else []) + (["--check"] if args.check else []) + \
             (["--inject_oom", args.inject_oom] if args.inject_oom else [])
    card_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if "pipeline" in args.variants and not args.partition and table is None and card_bytes:
        # No measured costs for these models: the worker would plan with relative times and no memory figures;
        # plan the split with the memory estimate instead (the fastest that fits, else the least memory).
        from pipeline.dusa.memory import BUDGET
        from pipeline.dusa.partition import default_costs, plan_partition
        bounds, planned = plan_partition([default_costs(memory.geometry.num_blocks)], args.stages,
                                         memory_budget=BUDGET * card_bytes, memory=memory.totals(max(args.classes)))
        args.partition = json.dumps(bounds)
        say(f"partition {bounds} planned with pipeline/dusa/memory.py's estimate at {max(args.classes)} classes "
            f"({'fits' if planned['fits'] else 'no split fits'} {BUDGET:.0%} of the card)")
    log = Path(args.log) if args.log else workdir / "bench.log"
    ports = itertools.count(29533)  # a port per launch: a stuck earlier launch cannot meet a later one

    def launcher():
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(next(ports))]
    base_ds = ["--ds_config", args.ds_config] if args.ds_config else []
    if "single" in args.variants:
        run(launcher() + ["--num_gpus", "1", *common, *base_ds, "--worker", "pipeline", "--stages", "1", "--name", "single"]
            + (["--profile"] if args.profile and "pipeline" not in args.variants else []), log, args.timeout)
    pipeline_args = ["--num_gpus", str(args.stages), *common, "--worker", "pipeline", "--stages", str(args.stages)]
    pipeline_args += ["--partition", args.partition] if args.partition else []
    pipeline_args += ["--cost_table", str(args.cost_table)] if args.cost_table else []
    if "pipeline" in args.variants:
        run(launcher() + pipeline_args + base_ds + ["--name", "pipeline"] + (["--profile"] if args.profile else [])
            + ["--graph_check"], log, args.timeout)
    from pipeline.dusa.engine import load_ds_config
    for name, override in json.loads(args.pipeline_variants).items():
        override = dict(override)
        partition = override.pop("partition", None)
        switches = ["--autocast_casts"] if override.pop("autocast_casts", False) else []
        switches += pipeline_switches(**{key: override.pop(key) for key in PIPELINE_SWITCHES if key in override})
        ds = load_ds_config(args.ds_config or default_ds_config(args.tiny),
                            lr=1.0)
        ds["optimizer"]["params"].pop("lr")
        path = workdir / f"ds-{name}.json"
        path.write_text(json.dumps(merge(ds, override)))
        variant_args = list(pipeline_args) + switches  # (argparse keeps an option's last value)
        if partition is not None:
            variant_args += ["--partition", json.dumps(partition)]
        run(launcher() + variant_args + ["--ds_config", str(path), "--name", f"pipeline-{name}"], log, args.timeout)
    if "naive" in args.variants:
        run([sys.executable, *[a for a in common if a != "--check"], "--worker", "naive"], log, args.timeout)

    report = collect(workdir, args, card, tflops, paths, memory)
    report.update(generator=args.generator, ds_config=args.ds_config or str(default_ds_config(args.tiny)),
                  checkpoints_s=checkpoints_s, command=" ".join(sys.argv))
    if card_bytes:  # the fewest stages of this card, and of an 80 GB card, that the estimate fits in
        from pipeline.dusa.memory import smallest_layout
        report["smallest_layouts"] = {
            str(c): {name: smallest_layout(memory, c, size) for name, size in ((card, card_bytes),
                                                                               ("80 GB card", 79.6 * 2**30))}
            for c in args.classes}
    shapes = (report.get("graphs") or {}).get("shapes", {})
    captures = [v["capture_s"] for v in shapes.values() if v.get("capture_s")]
    if shapes.get("512x683") and captures:  # (512 x 683 itself was captured by the equality check before)
        shape = shapes["512x683"]
        report["graph_cache_policy"] = {"shape_mix": SHAPE_MIX, "capture_s_used": statistics.median(captures),
                                        **graph_cache_simulation(shape["eager_s"], shape["graphed_s"],
                                                                 statistics.median(captures))}
    measured = [e for e in report["by_classes"].values() for k in ("pipeline_s_per_image", "single_gpu_s_per_image",
                                                                   "naive_split_s_per_image") if e.get(k)]
    if not measured and not any(report["pipeline_variants"].values()):
        LOG.error(f"error: nothing was measured (every variant failed or was left out): see {log}")
        sys.exit(1)
    path = out / f"{report['date']}-{slug}{suffix}.json"
    path.write_text(json.dumps(report, indent=2))
    for trace in sorted(workdir.glob("trace-*.json.gz")):  # trace-<variant>-rank<r>-<classes>.json.gz
        shutil.copy(trace, out / f"{report['date']}-{slug}{suffix}-{trace.name}")
    print_table(report)
    LOG.info(f"written {path}")


if __name__ == "__main__":
    main()
