#!/usr/bin/env python
"""Benchmark of one DUSA TTA step per image at full size (random weights of the published models).

    python bench/bench.py --workdir /tmp/bench --check --profile --calibrate   # on a node with 2 GPUs
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
Options: --check compares loss, gradients and the parameter update of one optimizer step of (a) and
(b) (same weights and inputs); --profile records two more steps of (a) per stage (torch.profiler
traces + a table of where each stage's time goes); --calibrate measures per-layer costs in (b) and
writes the cost table that the partition of (a) and of users' runs reads (pipeline/dusa/costs/); the
GPU run also checks SegFormer's CUDA graphs against eager and times their capture. Every run records
pipeline/dusa/memory.py's estimate per stage beside the measured peaks; a stage that runs out of memory ends
every stage of its launch at once (recorded, with each stage's peak so far). --generator sd3.5-large runs
random SD3.5-large weights (split by the memory estimate when no cost table exists for it).
--sweep: instead of the variants, the real launcher (launch/tta.py on ds_configs/tta.json) over a synthetic
sweep, once per layout (replicas x stages) and class count: images/s over the sweep, beside the layouts'
prediction from the measured cost table.
Writes <out>/<date>-<card>[-<generator>][-<tag>].json (+ the profile tables; the sweep:
<date>-<card>-sweep...json; --out defaults to <workdir>/results, `--out bench/results` publishes) and prints a
table; exits non-zero when nothing was measured.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import functools
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

# One build folder of DeepSpeed's extensions per environment (see launch/tta.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (512, 683)  # a typical ADE20K image after resizing: 2 windows of 512


# ----------------------------------------------------------------------------- shared pieces
def checkpoints(workdir: Path, tiny: bool, generator: str = "sd3-medium") -> dict[str, str]:
    """Random checkpoints of the published architectures (`generator`: SD3-medium or SD3.5-large), or tiny
    ones of the same kinds (--tiny: SD3.5-large's tiny stand-in has its RMS q/k norm)."""
    from data.classes import ADE20K_CLASSES
    if tiny:
        from models.tiny import ensure_demo_models, make_tiny_class_embeddings, make_tiny_sd3
        name = "sd3" if generator == "sd3-medium" else f"{generator}-tiny"
        paths = {"segmenter": str(workdir / "segformer"), "generator": str(workdir / name),
                 "class_embeddings": str(workdir / ("classes.safetensors" if name == "sd3" else f"{name}.safetensors"))}
        if generator != "sd3-medium" and not (workdir / name / "transformer" / "config.json").is_file():
            make_tiny_sd3(paths["generator"], num_layers=6, qk_norm="rms_norm")
            make_tiny_class_embeddings(paths["class_embeddings"], ADE20K_CLASSES, paths["generator"])
        ensure_demo_models(paths["segmenter"], paths["generator"], paths["class_embeddings"], ADE20K_CLASSES)
        return paths
    from models.architectures import make_random_checkpoints
    return make_random_checkpoints(workdir / "checkpoints", ADE20K_CLASSES,
                                   device="cuda" if torch.cuda.is_available() else "cpu", generator=generator)


def default_ds_config(tiny: bool) -> Path:
    return ROOT / "ds_configs" / ("ds_demo.json" if tiny else "ds_tta.json")


def window_size(tiny: bool) -> tuple[int, int]:
    return (128, 64) if tiny else (512, 256)


def synthetic_image(tiny: bool, size: tuple[int, int] | None = None, seed: int = 0) -> torch.Tensor:
    """A smooth random image [1, 3, H, W] in [0, 1] (fixed seed), already at the segmenter's size."""
    h, w = size or ((128, 171) if tiny else IMAGE_SIZE)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.85 * image + 0.15 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib(device: int | None = None) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.cuda.is_available() else None


def peak_reserved_gib(device: int | None = None) -> float | None:
    """What the caching allocator held at most: also the blocks of CUDA-graph pools that replays reuse."""
    return torch.cuda.max_memory_reserved(device) / 2**30 if torch.cuda.is_available() else None


class StageStop:
    """Ends every stage of a pipeline launch promptly when one runs out of memory. The other stages then wait
    inside the step (a receive or the optimizer's all-reduce) and would wait until the variant's timeout: the
    failing rank records its failure in its result file and writes a flag file; a thread of every other rank
    watches for it, records the class count it was at (peak memory so far) and ends its process; the failing
    rank ends with exit code 3 a few seconds later (and DeepSpeed's launcher ends whatever is left)."""

    def __init__(self, workdir: Path, name: str, rank: int, out: dict, path: Path, poll_s: float = 0.2):
        self.flag, self.rank, self.out, self.path = workdir / f"stop-{name}.json", rank, out, path
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None  # threads have their own
        self.current: int | None = None  # the class count being measured
        self.poll_s = poll_s
        import threading
        threading.Thread(target=self._watch, daemon=True).start()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.out, indent=2))
        os.replace(tmp, self.path)

    def _memory(self) -> dict:
        return {"peak_mem_gib": peak_memory_gib(self.device), "peak_reserved_gib": peak_reserved_gib(self.device)}

    def fail(self, classes: int | None, exc: BaseException, where: str) -> None:
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        info = {"rank": self.rank, "stage": self.out.get("stage"), "classes": classes, "where": where, "error": error}
        say(f"rank {self.rank}: out of memory at {where} ({classes} classes): {error}")
        self.out["stopped"] = info
        if classes is not None:
            self.out["results"][str(classes)] = {"oom": True, "s_per_image": None, "busy_s": None, "optimizer_s": None,
                                                 "loss": None, "error": error, **self._memory()}
        self.save()
        tmp = self.flag.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.flag)
        time.sleep(10 * self.poll_s + 2)  # the others record their part
        os._exit(3)

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                info = json.loads(self.flag.read_text())
            except (OSError, ValueError):
                continue
            if info.get("rank") == self.rank:
                continue
            self.out["stopped"] = info
            if self.current is not None and str(self.current) not in self.out["results"]:
                self.out["results"][str(self.current)] = {
                    "oom": False, "stopped_by_stage": info.get("stage"), "s_per_image": None, "busy_s": None,
                    "optimizer_s": None, "loss": None, **self._memory()}
            self.save()
            say(f"rank {self.rank}: stage {info.get('stage')} ran out of memory: this stage stops too")
            os._exit(0)


class Spans:
    """Device time inside wrapped calls, by name: CUDA events on a GPU, a host clock on a CPU.
    Ranges on the compute stream: a receive's range is mostly waiting for the other stage."""

    def __init__(self):
        self.spans: dict[str, list] = defaultdict(list)
        self.origin = None  # an event at the start of the step whose timeline is wanted

    def mark(self) -> None:
        if torch.cuda.is_available():
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()

    def timeline(self) -> list[tuple[str, float, float]]:
        """(name, start, end) in ms since `mark()`, of the instruction-level ranges (device clock)."""
        sync()
        if self.origin is None:
            return []
        rows = [(name, self.origin.elapsed_time(a), self.origin.elapsed_time(b)) for name, spans in self.spans.items()
                if not name.startswith("fwd: ") for a, b in spans if not isinstance(a, float)]
        return sorted(rows, key=lambda r: r[1])

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with torch.profiler.record_function(name):
                if torch.cuda.is_available():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = fn(*args, **kwargs)
                    end.record()
                    self.spans[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    out = fn(*args, **kwargs)
                    self.spans[name].append(time.perf_counter() - t0)
            return out
        return timed

    def hook(self, module, name: str) -> None:
        """Times a module's forward with a pre- and a post-forward hook."""
        pending = []

        def pre(*_):
            if torch.cuda.is_available():
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                pending.append(event)
            else:
                pending.append(time.perf_counter())

        def post(*_):
            start = pending.pop()
            if torch.cuda.is_available():
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.spans[name].append((start, end))
            else:
                self.spans[name].append(time.perf_counter() - start)
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def take(self) -> dict[str, float]:
        """Seconds per name since the last take."""
        sync()
        out = {name: sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1000 for s in spans)
               for name, spans in self.spans.items()}
        self.spans = defaultdict(list)
        return out


# What counts as the stage's own work (device busy); the rest of a step is p2p waiting and idle.
WORK = ("begin image (SegFormer fwd, candidates)", "ForwardPass", "BackwardPass", "segmenter backward",
        "ReduceTiedGrads", "ReduceGrads", "OptimizerStep")
P2P = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")


def instrument(engine, spans: Spans) -> None:
    """Times every instruction of the engine's own table (the wrappers TTAEngine installed included),
    the front's two per-image calls, and each layer's forward; names show in profiler traces too."""
    from pipeline.dusa.deepspeed_seam import INSTRUCTION_NAMES, wrap_instructions
    wrap_instructions(engine.engine, {name: functools.partial(spans.wrap, name) for name in INSTRUCTION_NAMES})
    front = engine.module.front
    if front is not None:
        front.begin_image = spans.wrap(WORK[0], front.begin_image)
        front.backward_segmenter = spans.wrap("segmenter backward", front.backward_segmenter)
    kinds = {"SegmenterFront": "fwd: front (window crop, VAE, noising)", "SD3Embed": "fwd: embed",
             "JointBlock": "fwd: joint blocks", "SD3Head": "fwd: head"}
    for layer in engine.module.forward_funcs:
        spans.hook(layer, kinds[type(layer).__name__])
    if engine.module.loss_fn is not None and engine.engine.is_last_stage():
        engine.module.loss_fn = spans.wrap("fwd: loss", engine.module.loss_fn)


def breakdown(spans: dict[str, float], wall: float, steps: int) -> dict[str, float]:
    """Seconds per step by category, from the spans of `steps` steps that took `wall` seconds."""
    per = {k: v / steps for k, v in spans.items()}
    out = {"step": wall / steps}
    for name in WORK + P2P + ("LoadMicroBatch",):
        out[name] = per.get(name, 0.0)
    out["ReduceTiedGrads"] -= out["segmenter backward"]  # nested: the segmenter's backward runs inside it
    out.update({k: v for k, v in per.items() if k.startswith("fwd: ")})
    out["fwd: other (engine)"] = out["ForwardPass"] - sum(v for k, v in per.items() if k.startswith("fwd: "))
    out["busy"] = sum(out[k] for k in WORK)
    out["p2p incl. waiting"] = sum(out[k] for k in P2P)
    out["idle (host, launches)"] = out["step"] - out["busy"] - out["p2p incl. waiting"] - out["LoadMicroBatch"]
    return out


def kernel_summary(prof) -> dict:
    """GPU kernel time per category from a torch.profiler run, and the busy union over all streams."""
    categories = (("nccl (p2p, all-reduce)", ("nccl",)), ("memcpy / memset", ("memcpy", "memset")),
                  ("optimizer", ("adam", "multi_tensor", "foreach")),
                  ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
                  ("matmul", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "ampere", "xmma")),
                  ("norm", ("norm",)), ("conv", ("conv", "implicit")))
    totals: dict[str, float] = defaultdict(float)
    intervals = []
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name.lower()
        duration = (evt.time_range.end - evt.time_range.start) / 1e6
        intervals.append((evt.time_range.start, evt.time_range.end))
        totals[next((c for c, keys in categories if any(k in name for k in keys)), "other kernels")] += duration
    intervals.sort()
    union, end = 0.0, float("-inf")
    for a, b in intervals:
        if b > end:
            union += (b - max(a, end)) / 1e6
            end = b
    return {"kernel_s_by_category": dict(totals), "kernel_busy_union_s": union, "kernels": len(intervals)}


def sample(tensor: torch.Tensor, n: int = 4096) -> torch.Tensor:
    """A fixed strided sample of a tensor's elements, float32 on the host (for cross-run comparisons)."""
    flat = tensor.detach().flatten()
    index = torch.linspace(0, flat.numel() - 1, min(n, flat.numel()), device=flat.device).long()
    return flat[index].float().cpu()


# ----------------------------------------------------------------------------- (a), (b): the pipeline
def pipeline_worker(args) -> None:
    import deepspeed
    import torch.distributed as dist
    from pipeline.dusa.deepspeed_seam import wrap_instructions
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from data.classes import ADE20K_CLASSES
    from pipeline.run.config import DataConfig, ModelConfig, PipelineConfig, RunConfig, TTAConfig
    from pipeline.dusa.engine import TTAEngine, load_ds_config, precision_of
    from pipeline.methods.dusa import Dusa
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
    tta = TTAConfig(min_classes=args.classes[0], max_classes=args.classes[0])
    pipe = PipelineConfig(num_stages=args.stages, partition=json.loads(args.partition) if args.partition else None,
                          cost_table=args.cost_table)
    if args.segmenter_graphs is not None:
        pipe.segmenter_graphs = args.segmenter_graphs
    pipe.compile_blocks = args.compile_blocks
    ds = load_ds_config(args.ds_config or default_ds_config(args.tiny),
                        lr=1e-5)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    out: dict = {"stage": rank, "stages": args.stages, "name": args.name, "results": {}}
    stopper = StageStop(Path(args.workdir), args.name, rank, out, Path(args.workdir) / f"{tag}.json")
    try:
        module = build_pipeline(ModelConfig(**paths), data, tta, pipe, ADE20K_CLASSES,
                                stage_report=print if rank == 0 else (lambda _: None),
                                dtype=torch.bfloat16 if bf16 else torch.float32, precision=precision_of(ds))
        say(f"rank {rank}: stage built")
        engine = TTAEngine(module, ds, tta, working_weights=not args.autocast_casts)
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

    latent = (16, size // 8, size // 8)
    # Stage 0 runs the users' step (pipeline/methods/dusa.py: Dusa.step, the draws seeded per image as in a run);
    # the other stages take their part of it with the same window count.
    method = Dusa(engine, RunConfig(data=data, tta=tta), ADE20K_CLASSES)

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
            say(f"rank {rank}: {c} classes, step {i}: {elapsed:.3f} s, busy {busy:.3f} s, "
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
        if args.profile and c == args.classes[0] and not oom:
            out["profile"] = profile_steps(one_step, spans, Path(args.workdir) / f"trace-{tag}.json", args.stages)
    if front is not None and front.graphed is not None:
        stats = front.graphed.stats
        out["graph_cache"] = {"calls": stats.calls, "hits": stats.hits, "captures": stats.captures,
                              "capture_s": stats.capture_seconds, "capture_bytes": stats.capture_bytes}
    if args.calibrate:
        out["calibration"] = calibrate(engine, image, corners, latent, args.classes,
                                       out["results"][str(args.classes[0])]["optimizer_s"] or 0.0)
    stopper.save()


def profile_steps(one_step, spans: Spans, trace: Path, stages: int, steps: int = 2) -> dict:
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


def calibrate(engine, image: torch.Tensor, corners, latent, classes, optimizer_s: float) -> dict:
    """The cost table of the partition (one stage holds every layer here): per layer, forward and backward
    seconds for one window micro-batch (medians of 5) and the bytes of activations it keeps for the
    backward; SegFormer's forward and backward per image; each layer's share of the optimizer step and
    of the memory held across steps (weights, gradients, optimizer state; SegFormer's graphs and
    activations on the front)."""
    from pipeline.dusa.windows import draw_windows
    module, front = engine.module, engine.module.front
    layers = list(module.forward_funcs)
    cuda = torch.cuda.is_available()
    autocast = engine.engine.torch_autocast_enabled()

    def precision():  # the forwards under the engine's precision, as its steps run them (autocast preset)
        return torch.autocast(engine.device.type, engine.engine.torch_autocast_dtype() if autocast else torch.bfloat16,
                              enabled=autocast)

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def timed(fn, n=5):
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), result

    def as_inputs(outputs):
        # A fresh leaf per float activation that carries gradient (bit-views of constants stay integers).
        return tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in outputs)

    def window_costs(c: int) -> dict:
        """Per-layer costs of one window micro-batch at c classes (its tensors are freed on return)."""
        front.min_classes = front.max_classes = c
        draws = draw_windows(corners, latent, (0.25, 0.25), torch.Generator().manual_seed(7))
        with precision():
            x = front.begin_image(image.to(engine.device), draws).inputs[0]
        forward_ms, backward_ms, activation_mib = [], [], []
        for layer in layers:
            before = allocated()
            with precision():
                fwd, y = timed(lambda: layer(x))
            if layer is layers[-1]:  # the loss belongs to the last layer's cost
                fwd_loss, loss = timed(lambda: module.loss_fn(y, None))
                fwd, y = fwd + fwd_loss, (loss,)
            activation_mib.append((allocated() - before) / 2**20)
            outs = [t for t in y if t.is_floating_point() and t.requires_grad]
            grads = [torch.randn_like(t) for t in outs]
            bwd, _ = timed(lambda: torch.autograd.backward(outs, grads, retain_graph=True)) if outs else (0.0, None)
            forward_ms.append(1e3 * fwd)
            backward_ms.append(1e3 * bwd)
            x = as_inputs(y) if layer is not layers[-1] else x
        return {"forward_ms": forward_ms, "backward_ms": backward_ms, "activation_mib": activation_mib}

    def segmenter_costs() -> tuple[float, float, int]:
        """SegFormer's forward and backward seconds per image and the bytes of its activations."""
        before = allocated()
        with precision():
            seg_fwd, logits = timed(lambda: front._run_segmenter(image.to(engine.device)))
        activations = allocated() - before
        grad = torch.randn_like(logits)
        seg_bwd, _ = timed(lambda: logits.backward(grad, retain_graph=True))
        return seg_fwd, seg_bwd, activations

    held = allocated()  # between steps: weights, gradients, optimizer state (and SegFormer's graph pool)
    table: dict = {"classes": {}}
    for c in classes:
        table["classes"][str(c)] = window_costs(c)
        front.backward_segmenter()  # drops the step's SegFormer graph
        module.zero_grad(set_to_none=True)
    seg_fwd, seg_bwd, segmenter_activations = segmenter_costs()
    module.zero_grad(set_to_none=True)
    table["segmenter_ms"] = [1e3 * seg_fwd, 1e3 * seg_bwd]
    trainable = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    frozen = [sum(p.numel() * p.element_size() for p in layer.parameters() if not p.requires_grad)
              + sum(b.numel() * b.element_size() for b in layer.buffers()) for layer in layers]
    per_param = max(held - sum(frozen), 0) / max(sum(trainable), 1)
    state = [n * per_param + f for n, f in zip(trainable, frozen)]
    state[0] += segmenter_activations  # SegFormer's activations live through the step on the front's stage
    table["state_mib"] = [b / 2**20 for b in state]
    table["bytes_per_trainable_parameter"] = per_param
    table["optimizer_ms"] = [1e3 * optimizer_s * n / max(sum(trainable), 1) for n in trainable]
    table["layers"] = [type(layer).__name__ for layer in layers]
    table["card_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    return table


# ----------------------------------------------------------------------------- (c): the old design
def naive_worker(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from data.classes import ADE20K_CLASSES
    from models.class_embeddings import load_class_embeddings
    from models.sd3 import LatentEncoder, TransformerParts
    from models.segformer import Segmenter
    from pipeline.dusa.layers import DusaLoss, JointBlock, SD3Embed, SD3Head, pack
    from pipeline.dusa.loss import logit_norm, select_candidates
    from pipeline.dusa.windows import window_boxes

    paths = json.loads(args.paths)
    gpus = torch.cuda.device_count()
    dev0 = torch.device("cuda:0" if gpus else "cpu")
    dev1 = torch.device("cuda:1" if gpus > 1 else dev0)
    size, stride = window_size(args.tiny)
    segmenter = Segmenter.from_pretrained(paths["segmenter"]).eval().to(dev0)
    encoder = LatentEncoder.from_pretrained(paths["generator"]).to(dev0, torch.bfloat16 if gpus else torch.float32)
    parts = TransformerParts(paths["generator"], torch.float32)
    prompt, pooled = load_class_embeddings(paths["class_embeddings"], ADE20K_CLASSES, paths["generator"])
    split = parts.num_blocks // 2
    first = torch.nn.Sequential(
        SD3Embed(parts.load("pos_embed"), parts.load("time_text_embed"), parts.load("context_embedder"),
                 prompt.float(), pooled.float()),
        *[JointBlock(parts.load(f"transformer_blocks.{i}")) for i in range(split)]).to(dev0)
    second = torch.nn.Sequential(
        *[JointBlock(parts.load(f"transformer_blocks.{i}")) for i in range(split, parts.num_blocks)],
        SD3Head(parts.load("norm_out"), parts.load("proj_out"), parts.config["patch_size"], parts.out_channels)).to(dev1)
    say("naive: models loaded")
    params = [*segmenter.parameters(), *first.parameters(), *second.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)
    loss_fn = DusaLoss()
    autocast = dict(device_type=dev0.type, dtype=torch.bfloat16, enabled=bool(gpus))
    image = synthetic_image(args.tiny).to(dev0)
    corners = window_boxes(image.shape[-2], image.shape[-1], size, stride)
    latent_size = size // encoder.downsample

    def step(num_classes: int, seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        with torch.autocast(**autocast):
            logits = segmenter(image)  # once per image, on the whole image
        full = torch.nn.functional.interpolate(logit_norm(logits.float(), dim=1), size=image.shape[-2:],
                                               mode="bilinear")
        total = 0.0
        for k, (top, left) in enumerate(corners):
            window = image[..., top:top + size, left:left + size]
            small = torch.nn.functional.interpolate(full[..., top:top + size, left:left + size],
                                                    size=(latent_size, latent_size), mode="bilinear")[0]
            z0 = encoder(window)
            noise = torch.randn(z0.shape, generator=g).to(dev0)
            x_t, target = 0.75 * z0 + 0.25 * noise, (noise - z0)[0]
            classes, mask = select_candidates(small, 1, num_classes, num_classes, g)
            with torch.autocast(**autocast):
                acts = first(pack(x_t, torch.tensor([250.0], device=dev0), small, classes,
                                  mask.to(torch.uint8), target, torch.ones(1, device=dev0)))
                acts = second(tuple(t.to(dev1) for t in acts))  # one GPU busy at a time
            loss = loss_fn(acts, None) / len(corners)
            loss.backward(retain_graph=k < len(corners) - 1)  # the segmenter graph serves every window
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    results = {}
    for c in args.classes:
        if gpus:
            for d in range(min(gpus, 2)):
                torch.cuda.reset_peak_memory_stats(d)
        times, oom = [], False
        try:
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                step(c, i)
                sync()
                say(f"naive: {c} classes, step {i}: {time.perf_counter() - t0:.3f} s")
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            with FlopCounterMode(display=False) as counter:  # useful FLOPs of one image's step
                step(c, 0)
            flops = counter.get_total_flops()
        except torch.cuda.OutOfMemoryError:
            oom, flops = True, None
        results[str(c)] = {"oom": oom, "s_per_image": statistics.median(times) if times else None,
                           "flops_per_image": flops,
                           "peak_mem_gib": [peak_memory_gib(d) for d in range(min(gpus, 2))] if gpus else None}
    (Path(args.workdir) / "naive.json").write_text(json.dumps({"results": results}, indent=2))


# ----------------------------------------------------------------------------- SegFormer graph cache policy
# ADE20K-like shapes after resizing to short edge 512 (no dataset here: SceneParse150 rescaled its large
# images to short side 512; 4:3 landscape dominates, then portrait, with a long tail of aspect ratios).
SHAPE_MIX = {"512x683": 0.50, "683x512": 0.14, "512x768": 0.07, "768x512": 0.02, "512x512": 0.07, "512x910": 0.04,
             "512x640": 0.03, "tail: long edge uniform in 520..1400, 70 % landscape": 0.13}


def shape_sequence(n: int, seed: int = 0) -> list[tuple[int, int]]:
    import random
    rng = random.Random(seed)
    names, weights = zip(*SHAPE_MIX.items())
    shapes = []
    for name in rng.choices(names, weights, k=n):
        if name.startswith("tail"):
            long = rng.randint(520, 1400)
            shapes.append((512, long) if rng.random() < 0.7 else (long, 512))
        else:
            shapes.append(tuple(int(v) for v in name.split("x")))
    return shapes


def graph_cache_simulation(eager_s: float, graphed_s: float, capture_s: float, images: int = 2000,
                           tasks: int = 15) -> dict:
    """SegFormer seconds per image and captures over a sweep of `tasks` tasks of the same `images` shapes (each
    task in its own order, as a sweep of ADE20K-C's corruptions), for caches of several sizes: the pipeline's
    policy (pipeline/dusa/graphs.py: FrequentShapes, capture at the second sighting, the most frequent shapes kept)
    against a least-recently-used cache capturing at the first or second sighting."""
    import random
    from collections import Counter, OrderedDict

    from pipeline.dusa.graphs import FrequentShapes
    shapes = shape_sequence(images)
    sweep = []
    for t in range(tasks):
        order = list(shapes)
        random.Random(t).shuffle(order)
        sweep += order
    out = {"distinct_shapes": len(set(shapes)), "seen_once_per_task": sum(1 for v in Counter(shapes).values() if v == 1),
           "tasks": tasks, "images_per_task": images, "policies": {}}

    def record(name: str, hits: int, captures: int, seconds: float) -> None:
        out["policies"][name] = {"hit_rate": hits / len(sweep), "captures": captures,
                                 "segmenter_s_per_image": seconds / len(sweep)}
    for size in (8, 16, 32):
        policy, hits, captures, seconds = FrequentShapes(size, 2), 0, 0, 0.0
        for shape in sweep:
            action, _ = policy.visit(shape)
            hits += action == "hit"
            captures += action == "capture"
            seconds += {"hit": graphed_s, "capture": capture_s + graphed_s, "eager": eager_s}[action]
        record(f"frequent{size}-capture-at-sight-2", hits, captures, seconds)
        for sightings in (1, 2):
            cache: OrderedDict = OrderedDict()
            seen: Counter = Counter()
            hits = captures = 0
            seconds = 0.0
            for shape in sweep:
                seen[shape] += 1
                if shape in cache:
                    cache.move_to_end(shape)
                    hits += 1
                    seconds += graphed_s
                elif seen[shape] >= sightings:
                    cache[shape] = True
                    captures += 1
                    seconds += capture_s + graphed_s
                    if len(cache) > size:
                        cache.popitem(last=False)
                else:
                    seconds += eager_s
            record(f"lru{size}-capture-at-sight-{sightings}", hits, captures, seconds)
    out["all_eager_s_per_image"] = eager_s
    return out


# ----------------------------------------------------------------------------- orchestration
def matmul_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    sync()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def run(cmd: list[str], log: Path, timeout: float, timing: dict | None = None) -> str | None:
    """Runs one variant in its own process group; whatever it leaves running (ranks of a failed launch)
    is killed before the next variant starts, so no variant shares the GPUs with another's leftovers."""
    print(f"[{time.strftime('%H:%M:%S')}] $", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            failed = code != 0 and f"exit {code}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:.0f} s"
        if timing is not None:
            timing["wall_s"] = time.perf_counter() - start
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(2)  # the driver releases the killed processes' GPU memory
    print(f"[{time.strftime('%H:%M:%S')}] " + (f"failed ({failed}); see {log}" if failed else "done"), flush=True)
    return failed or None


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

    def errors(x: dict, ref: dict) -> dict:
        norms = {k: g.norm().item() for k, g in ref.items()}
        floor = 1e-6 * max(norms.values())  # analytically-zero gradients (attention key biases) left out
        return {k: (x[k] - g).norm().item() / norms[k] for k, g in ref.items() if norms[k] > floor}
    grad_err, update_err = errors(a[1], b[1]), errors(a[2], b[2])
    segmenter = [k for k in b[2] if ".segmenter." in k]
    return {"loss_pipeline": a[0], "loss_single": b[0], "loss_rel_err": abs(a[0] - b[0]) / abs(b[0]),
            "grad_rel_err_max": max(grad_err.values()), "grad_rel_err_median": statistics.median(grad_err.values()),
            "update_rel_err_max": max(update_err.values()),
            "update_rel_err_median": statistics.median(update_err.values()),
            "segmenter_tensors_updated": sum(1 for k in segmenter if a[2][k].abs().max() > 0),
            "segmenter_tensors": len(segmenter),
            "same_parameters": sorted(a[1]) == sorted(b[1]), "tensors_compared": len(grad_err)}


def cost_table_from(calibration: dict, card: str, paths: dict, tiny: bool, precision: str) -> dict:
    from pipeline.dusa.partition import model_signature
    from transformers import SegformerConfig
    from models.sd3 import TransformerParts
    signature = model_signature(dict(TransformerParts(paths["generator"]).config),
                                SegformerConfig.from_pretrained(paths["segmenter"]).to_dict(), window_size(tiny)[0],
                                precision)
    return {"card": card, "signature": signature, "measured": f"{datetime.date.today().isoformat()}, "
            "bench/bench.py --calibrate (one stage, random weights, medians of 5, the benchmark's DeepSpeed preset)",
            "image_size": list(synthetic_image(tiny).shape[-2:]), **calibration}


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
                   "--pipeline.num_stages", str(stages), "--tta.max_classes", str(classes),
                   "--tta.min_classes", str(classes), "--output_dir", str(run_dir)]
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
        print(f"error: no layout ran to the end (see the status of each in {path})", file=sys.stderr)
        sys.exit(1)
    print(f"\n{card}, {gpus} GPUs, {len(args.sweep_tasks)} tasks x {args.sweep_images} images of {list(size)}")
    predicted = {(p["replicas"], p["stages"]): p["classes"] for p in (report.get("predicted") or {}).get("layouts", [])}
    print(f"{'layout':>7} {'classes':>7} {'images/s':>9} {'wall':>9} {'predicted':>9} {'est. GiB':>12}  status")
    for row in report["layouts"]:
        guess = predicted.get((row["replicas"], row["stages"]), {}).get(row["classes"], {}).get("images_per_s")
        print(f"{row['layout']:>7} {row['classes']:>7} {row.get('images_per_s') or 0:>9.2f} "
              f"{row.get('images_per_s_wall') or 0:>9.2f} {guess or 0:>9.2f} "
              f"{'/'.join(f'{m:.0f}' for m in row.get('estimated_peak_gib', [])):>12}  {row['status']}")
    print(f"written {path}")


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
    parser.add_argument("--segmenter_graphs", type=int, help="pipeline.segmenter_graphs of (a) (default: the project's)")
    parser.add_argument("--variants", nargs="+", default=["single", "pipeline", "naive"])
    parser.add_argument("--pipeline_variants", default="{}",
                        help='more (a) runs as JSON {name: DeepSpeed JSON merged over the default, and optionally '
                             '"partition": [...], "segmenter_graphs": N}, e.g. '
                             '\'{"immediate": {"bf16": {"immediate_grad_update": true}}}\'; engine switches: '
                             '"autocast_casts": true (autocast\'s own per-window casts), "compile_blocks": true')
    parser.add_argument("--ds_config", help="DeepSpeed JSON of (a) and (b) (default: ds_configs/ds_tta.json)")
    parser.add_argument("--check", action="store_true", help="compare loss, gradients and update of (a) and (b)")
    parser.add_argument("--profile", action="store_true", help="profile two more steps of (a) on every stage")
    parser.add_argument("--calibrate", action="store_true", help="measure the per-layer cost table in (b)")
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
    parser.add_argument("--compile_blocks", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "pipeline":
        return pipeline_worker(args)
    if args.worker == "naive":
        return naive_worker(args)

    wrong = argument_error(args)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
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
    common = ["bench/bench.py", "--workdir", str(workdir), "--paths", json.dumps(paths), "--classes",
              *map(str, args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
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
    table_path = None
    if "single" in args.variants:
        run(launcher() + ["--num_gpus", "1", *common, *base_ds, "--worker", "pipeline", "--stages", "1", "--name", "single"]
            + (["--calibrate"] if args.calibrate else [])
            + (["--profile"] if args.profile and "pipeline" not in args.variants else []), log, args.timeout)
        single_out = workdir / "single-rank0.json"
        if args.calibrate and single_out.is_file():
            from pipeline.dusa.engine import load_ds_config, precision_of
            precision = precision_of(load_ds_config(args.ds_config or default_ds_config(args.tiny), lr=1.0))
            table = cost_table_from(json.loads(single_out.read_text())["calibration"], card, paths, args.tiny, precision)
            name = f"{slug}-{Path(paths['generator']).name}-{Path(paths['segmenter']).name}-{precision}.json"
            table_path = workdir / name  # copied to --out; into pipeline/dusa/costs/ by hand, to be the default
            table_path.parent.mkdir(parents=True, exist_ok=True)
            table_path.write_text(json.dumps(table, indent=1) + "\n")
            shutil.copy(table_path, out / f"costs-{name}")
            say(f"cost table written: {table_path}")
    pipeline_args = ["--num_gpus", str(args.stages), *common, "--worker", "pipeline", "--stages", str(args.stages)]
    pipeline_args += ["--partition", args.partition] if args.partition else []
    pipeline_args += ["--cost_table", str(args.cost_table or table_path)] if (args.cost_table or table_path) else []
    if "pipeline" in args.variants:
        run(launcher() + pipeline_args + base_ds + ["--name", "pipeline"] + (["--profile"] if args.profile else [])
            + ["--graph_check"], log, args.timeout)
    from pipeline.dusa.engine import load_ds_config
    for name, override in json.loads(args.pipeline_variants).items():
        override = dict(override)
        partition = override.pop("partition", None)
        graphs = override.pop("segmenter_graphs", None)
        switches = [flag for key, flag in (("autocast_casts", "--autocast_casts"), ("compile_blocks", "--compile_blocks"))
                    if override.pop(key, False)]
        ds = load_ds_config(args.ds_config or default_ds_config(args.tiny),
                            lr=1.0)
        ds["optimizer"]["params"].pop("lr")
        path = workdir / f"ds-{name}.json"
        path.write_text(json.dumps(merge(ds, override)))
        variant_args = list(pipeline_args) + switches
        if partition is not None:
            variant_args = [a for a in variant_args if a != "--partition"] + ["--partition", json.dumps(partition)]
        if graphs is not None:
            variant_args += ["--segmenter_graphs", str(graphs)]
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
        print(f"error: nothing was measured (every variant failed or was left out): see {log}", file=sys.stderr)
        sys.exit(1)
    path = out / f"{report['date']}-{slug}{suffix}.json"
    path.write_text(json.dumps(report, indent=2))
    for r in range(args.stages):
        trace = workdir / f"trace-pipeline-rank{r}.json.gz"
        if trace.is_file():
            shutil.copy(trace, out / f"{report['date']}-{slug}-trace-stage{r}.json.gz")
    print_table(report)
    print(f"written {path}")


VARIANTS = ("single", "pipeline", "naive")
WORKDIR_MARKER = ".dusa-bench"  # a workdir this tool made: the only kind whose old JSON files it removes


def argument_error(args) -> str | None:
    """The first argument the benchmark cannot run with, checked before anything is built (None: all fine)."""
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        return f"--variants {unknown[0]!r} is not one of {', '.join(VARIANTS)}"
    for name, low in (("classes", 1), ("steps", 1), ("warmup", 0), ("stages", 1), ("sweep_images", 1)):
        values = getattr(args, name)
        if any(v < low for v in (values if isinstance(values, list) else [values])):
            return f"--{name} {values} must be >= {low}"
    if not (args.timeout > 0):
        return f"--timeout {args.timeout} must be > 0"
    from data.classes import safe_name
    if args.tag is not None and not safe_name(args.tag):  # it becomes part of the results file's name
        return f"--tag {args.tag!r} must be letters, digits and _ - . + (it names the results file)"
    try:
        partition = json.loads(args.partition) if args.partition else None
        variants = json.loads(args.pipeline_variants)
    except json.JSONDecodeError as exc:
        return f"--partition / --pipeline_variants is not JSON ({exc.msg})"
    if partition is not None and not (isinstance(partition, list) and len(partition) == args.stages + 1
                                      and all(isinstance(b, int) and not isinstance(b, bool) for b in partition)
                                      and partition[0] == 0 and all(a < b for a, b in zip(partition, partition[1:]))):
        return (f"--partition {args.partition} must be {args.stages + 1} increasing layer indices from 0 "
                f"(one range per stage of --stages {args.stages})")
    if not (isinstance(variants, dict) and all(isinstance(v, dict) for v in variants.values())):
        return "--pipeline_variants must be a JSON object {name: DeepSpeed JSON override}"
    for option in ("cost_table", "ds_config", "sweep_data"):
        value = getattr(args, option)
        if value and not Path(value).exists():
            return f"--{option} {value} does not exist"
    workdir = Path(args.workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())
                             and not (workdir / WORKDIR_MARKER).is_file()):
        return (f"--workdir {workdir} is not a folder this tool made (its JSON files would be removed): "
                f"name a new or empty folder")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file, not a folder"
    return None


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def memory_model(paths: dict, args, card: str, graph_shapes: int = 1):
    """pipeline/dusa/memory.py's model of the benchmark's runs (its activations from the measured cost table of
    these models where there is one), and that table (path, table) or None. `graph_shapes`: image shapes
    whose SegFormer CUDA graphs stay captured (one here; up to pipeline.segmenter_graphs in the launcher)."""
    from pipeline.run.config import ModelConfig, TTAConfig
    from pipeline.dusa.engine import load_ds_config, precision_of
    from pipeline.dusa.memory import build_memory_model, read_configs
    from pipeline.dusa.partition import find_cost_table, model_signature
    ds = load_ds_config(args.ds_config or default_ds_config(args.tiny), lr=1e-5)
    generator, vae, segmenter, shape, dtype = read_configs(ModelConfig(**paths))
    size = window_size(args.tiny)[0]
    found = find_cost_table(card, model_signature(generator, segmenter, size, precision_of(ds)))
    if args.cost_table:
        found = Path(args.cost_table), json.loads(Path(args.cost_table).read_text())
    model = build_memory_model(generator, vae, segmenter, TTAConfig(), ds, size, shape, None, dtype,
                               found[1] if found else None,
                               graph_shapes=graph_shapes if torch.cuda.is_available() else 0,  # graphs: GPU only
                               image=tuple(synthetic_image(args.tiny).shape[-2:]))
    return model, found


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
        report["profile"] = {f"stage{p['stage']}": p["profile"] for p in pipe if "profile" in p}
        report["graphs"] = next((p["graphs"] for p in pipe if "graphs" in p), None)
        report["graph_cache_in_run"] = next((p["graph_cache"] for p in pipe if "graph_cache" in p), None)
    if single and "profile" in single:
        report.setdefault("profile", {})["single"] = single["profile"]
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


if __name__ == "__main__":
    main()
