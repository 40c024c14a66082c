#!/usr/bin/env python
"""Benchmark of one DUSA TTA step per image at full size (random weights of the published models).

    python bench/bench.py --workdir /tmp/bench --check --profile --calibrate   # on a node with 2 GPUs
    DS_ACCELERATOR=cpu python bench/bench.py --tiny --workdir /tmp/bench-tiny  # dry run, CPU

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
writes the cost table that the partition of (a) and of users' runs reads (pipeline/costs/); the
GPU run also checks SegFormer's CUDA graphs against eager and times their capture.
Writes bench/results/<date>-<card>.json (+ the profile tables) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (512, 683)  # a typical ADE20K image after resizing: 2 windows of 512


# ----------------------------------------------------------------------------- shared pieces
def checkpoints(workdir: Path, tiny: bool) -> dict[str, str]:
    from data.classes import ADE20K_CLASSES
    if tiny:
        from models.tiny import ensure_demo_models
        paths = {"segmenter": str(workdir / "segformer"), "generator": str(workdir / "sd3"),
                 "class_embeddings": str(workdir / "classes.safetensors")}
        ensure_demo_models(paths["segmenter"], paths["generator"], paths["class_embeddings"], ADE20K_CLASSES)
        return paths
    from models.architectures import make_random_checkpoints
    return make_random_checkpoints(workdir / "checkpoints", ADE20K_CLASSES,
                                   device="cuda" if torch.cuda.is_available() else "cpu")


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
    from deepspeed.runtime.pipe import schedule
    table = dict(engine.engine._INSTRUCTION_MAP)
    for kind in (schedule.LoadMicroBatch, schedule.ForwardPass, schedule.BackwardPass, schedule.SendActivation,
                 schedule.RecvActivation, schedule.SendGrad, schedule.RecvGrad, schedule.ReduceTiedGrads,
                 schedule.ReduceGrads, schedule.OptimizerStep):
        table[kind] = spans.wrap(kind.__name__, table[kind])
    engine.engine._INSTRUCTION_MAP = table
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
    from deepspeed.runtime.pipe import schedule
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from data.classes import ADE20K_CLASSES
    from pipeline.config import DataConfig, ModelConfig, PipelineConfig, RunConfig, TTAConfig
    from pipeline.engine import TTAEngine, load_ds_config, precision_of
    from pipeline.methods import Dusa
    from pipeline.module import build_pipeline
    from pipeline.images import predict
    from pipeline.windows import window_boxes

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
    ds = load_ds_config(args.ds_config or default_ds_config(args.tiny),
                        lr=1e-5)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    module = build_pipeline(ModelConfig(**paths), data, tta, pipe, ADE20K_CLASSES,
                            stage_report=print if rank == 0 else (lambda _: None),
                            dtype=torch.bfloat16 if bf16 else torch.float32, precision=precision_of(ds))
    say(f"rank {rank}: stage built")
    engine = TTAEngine(module, ds, tta)
    stage = engine.engine.stage_id
    say(f"rank {rank}: engine ready")
    front = module.front
    say(f"rank {rank}: stage {stage} on {engine.device} (current device "
        f"{torch.cuda.current_device() if torch.cuda.is_available() else 'cpu'}, weights on "
        f"{next(module.parameters()).device})")
    image = synthetic_image(args.tiny)
    corners = window_boxes(image.shape[-2], image.shape[-1], size, stride)
    out: dict = {"stage": stage, "stages": args.stages, "name": args.name, "partition": list(module.parts),
                 "results": {}}
    if front is not None and torch.cuda.is_available() and args.graph_check:
        try:
            out["graphs"] = graph_check(front, image)
        except RuntimeError as exc:  # reported, and the timing goes on
            out["graphs"] = {"error": str(exc)}
        say(f"rank {rank}: graph check {json.dumps(out['graphs'])}")

    # Gradients and the parameter update of the first optimizer step (check): strided samples per tensor.
    captured: dict = {}
    table = dict(engine.engine._INSTRUCTION_MAP)
    optimizer_step = table[schedule.OptimizerStep]

    def capturing_step(eng, *a, **k):
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
    table[schedule.OptimizerStep] = capturing_step
    engine.engine._INSTRUCTION_MAP = table
    spans = Spans()
    instrument(engine, spans)

    latent = (16, size // 8, size // 8)
    # Stage 0 runs the users' step (pipeline/methods.py: Dusa.step, the draws seeded per image as in a run);
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
        times, busies, optimizer, oom, loss = [], [], [], False, None
        for i in range(args.warmup + args.steps):
            captured["armed"] = args.check and c == args.classes[0] and i == 0
            sync()
            t0 = time.perf_counter()
            try:
                loss = one_step(i).loss
                sync()
            except torch.cuda.OutOfMemoryError:
                oom = True
                break
            elapsed = time.perf_counter() - t0
            if "grads" in captured:
                torch.save({"loss": float(loss), "grads": captured.pop("grads"), "updates": captured.pop("updates")},
                           Path(args.workdir) / f"check-{args.stages}stage-rank{rank}.pt")
            step_spans = spans.take()
            busy = sum(step_spans.get(k, 0.0) for k in WORK) - step_spans.get("segmenter backward", 0.0)
            say(f"rank {rank}: {c} classes, step {i}: {elapsed:.3f} s, busy {busy:.3f} s, "
                f"peak {peak_memory_gib() or 0:.1f} GiB")
            if i >= args.warmup:
                times.append(elapsed)
                busies.append(busy)
                optimizer.append(step_spans.get("OptimizerStep", 0.0))
        out["results"][str(c)] = {"oom": oom, "s_per_image": statistics.median(times) if times else None,
                                  "busy_s": statistics.median(busies) if busies else None,
                                  "optimizer_s": statistics.median(optimizer) if optimizer else None,
                                  "peak_mem_gib": peak_memory_gib(), "loss": float(loss) if loss is not None else None}
        if args.profile and c == args.classes[0] and not oom:
            out["profile"] = profile_steps(one_step, spans, Path(args.workdir) / f"trace-{tag}.json", args.stages)
    if front is not None and front.graphed is not None:
        stats = front.graphed.stats
        out["graph_cache"] = {"calls": stats.calls, "hits": stats.hits, "captures": stats.captures,
                              "capture_s": stats.capture_seconds, "capture_bytes": stats.capture_bytes}
    if args.calibrate:
        out["calibration"] = calibrate(engine, image, corners, latent, args.classes,
                                       out["results"][str(args.classes[0])]["optimizer_s"] or 0.0)
    (Path(args.workdir) / f"{tag}.json").write_text(json.dumps(out, indent=2))


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
    from pipeline.graphs import GraphedModule
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
    from pipeline.windows import draw_windows
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
    from pipeline.layers import DusaLoss, JointBlock, SD3Embed, SD3Head, pack
    from pipeline.loss import logit_norm, select_candidates
    from pipeline.windows import window_boxes

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


def graph_cache_simulation(eager_s: float, graphed_s: float, capture_s: float, images: int = 2000) -> dict:
    """Hit rate and SegFormer seconds per task of `images` for LRU caches of several sizes, capturing a
    shape on its first sight (as the pipeline does) or its second (a unique shape then runs eagerly)."""
    from collections import Counter, OrderedDict
    shapes = shape_sequence(images)
    out = {"distinct_shapes": len(set(shapes)), "seen_once": sum(1 for v in Counter(shapes).values() if v == 1),
           "policies": {}}
    for size in (4, 8, 16, 32):
        for sightings in (1, 2):
            cache: OrderedDict = OrderedDict()
            seen: Counter = Counter()
            hits = captures = 0
            seconds = 0.0
            for shape in shapes:
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
            out["policies"][f"lru{size}-capture-at-sight-{sightings}"] = {
                "hit_rate": hits / images, "captures": captures, "segmenter_s_per_task": seconds}
    out["all_eager_s_per_task"] = eager_s * images
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


def run(cmd: list[str], log: Path, timeout: float) -> None:
    """Runs one variant in its own process group; whatever it leaves running (ranks of a failed launch)
    is killed before the next variant starts, so no variant shares the GPUs with another's leftovers."""
    print(f"[{time.strftime('%H:%M:%S')}] $", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            failed = code != 0 and f"exit {code}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:.0f} s"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(2)  # the driver releases the killed processes' GPU memory
    print(f"[{time.strftime('%H:%M:%S')}] " + (f"failed ({failed}); see {log}" if failed else "done"), flush=True)


def compare_check(workdir: Path, stages: int) -> dict | None:
    """Loss, gradients and the first optimizer step's parameter update of the pipeline against the
    1-stage run on the same weights and inputs (strided samples of every tensor)."""
    def load(n):
        files = sorted(workdir.glob(f"check-{n}stage-rank*.pt"))
        if not files:
            return None
        dumps = [torch.load(f) for f in files]
        return (dumps[0]["loss"], {k: v for d in dumps for k, v in d["grads"].items()},
                {k: v for d in dumps for k, v in d["updates"].items()})
    a, b = load(stages), load(1)
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
    from pipeline.partition import model_signature
    from transformers import SegformerConfig
    from models.sd3 import TransformerParts
    signature = model_signature(dict(TransformerParts(paths["generator"]).config),
                                SegformerConfig.from_pretrained(paths["segmenter"]).to_dict(), window_size(tiny)[0],
                                precision)
    return {"card": card, "signature": signature, "measured": f"{datetime.date.today().isoformat()}, "
            "bench/bench.py --calibrate (one stage, random weights, medians of 5, the benchmark's DeepSpeed preset)",
            "image_size": list(synthetic_image(tiny).shape[-2:]), **calibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/dusa-bench")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--partition", help="explicit stage boundaries of (a) as JSON (default: planned from costs)")
    parser.add_argument("--cost_table", help="cost table for (a)'s partition (default: pipeline/costs/ lookup)")
    parser.add_argument("--segmenter_graphs", type=int, help="pipeline.segmenter_graphs of (a) (default: the project's)")
    parser.add_argument("--variants", nargs="+", default=["single", "pipeline", "naive"])
    parser.add_argument("--pipeline_variants", default="{}",
                        help='more (a) runs as JSON {name: DeepSpeed JSON merged over the default, and optionally '
                             '"partition": [...], "segmenter_graphs": N}, e.g. '
                             '\'{"immediate": {"bf16": {"immediate_grad_update": true}}}\'')
    parser.add_argument("--ds_config", help="DeepSpeed JSON of (a) and (b) (default: ds_configs/ds_tta.json)")
    parser.add_argument("--check", action="store_true", help="compare loss, gradients and update of (a) and (b)")
    parser.add_argument("--profile", action="store_true", help="profile two more steps of (a) on every stage")
    parser.add_argument("--calibrate", action="store_true", help="measure the per-layer cost table in (b)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a dry run that fits a CPU)")
    parser.add_argument("--log", help="worker output (default: <workdir>/bench.log)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each variant")
    parser.add_argument("--worker", choices=["pipeline", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--name", default="pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--graph_check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "pipeline":
        return pipeline_worker(args)
    if args.worker == "naive":
        return naive_worker(args)

    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*workdir.glob("*.json"), *workdir.glob("check-*.pt"), *workdir.glob("trace-*.gz")]:
        old.unlink()
    t0 = time.perf_counter()
    paths = checkpoints(workdir, args.tiny)
    say(f"checkpoints ready in {time.perf_counter() - t0:.0f} s")
    tflops = matmul_tflops()
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = card.lower().replace("nvidia ", "").split()[0] if card != "cpu" else "cpu"
    common = ["bench/bench.py", "--workdir", str(workdir), "--paths", json.dumps(paths), "--classes",
              *map(str, args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
             (["--tiny"] if args.tiny else []) + (["--check"] if args.check else [])
    log = Path(args.log) if args.log else workdir / "bench.log"
    ports = itertools.count(29533)  # a port per launch: a stuck earlier launch cannot meet a later one

    def launcher():
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(next(ports))]
    base_ds = ["--ds_config", args.ds_config] if args.ds_config else []
    table_path = None
    if "single" in args.variants:
        run(launcher() + ["--num_gpus", "1", *common, *base_ds, "--worker", "pipeline", "--stages", "1", "--name", "single"]
            + (["--calibrate"] if args.calibrate else []), log, args.timeout)
        single_out = workdir / "single-rank0.json"
        if args.calibrate and single_out.is_file():
            from pipeline.engine import load_ds_config, precision_of
            precision = precision_of(load_ds_config(args.ds_config or default_ds_config(args.tiny), lr=1.0))
            table = cost_table_from(json.loads(single_out.read_text())["calibration"], card, paths, args.tiny, precision)
            name = f"{slug}-{Path(paths['generator']).name}-{Path(paths['segmenter']).name}-{precision}.json"
            table_path = (workdir if args.tiny else ROOT / "pipeline" / "costs") / name
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
    from pipeline.engine import load_ds_config
    for name, override in json.loads(args.pipeline_variants).items():
        override = dict(override)
        partition = override.pop("partition", None)
        graphs = override.pop("segmenter_graphs", None)
        ds = load_ds_config(args.ds_config or default_ds_config(args.tiny),
                            lr=1.0)
        ds["optimizer"]["params"].pop("lr")
        path = workdir / f"ds-{name}.json"
        path.write_text(json.dumps(merge(ds, override)))
        variant_args = [a for a in pipeline_args if a != "--check"]
        if partition is not None:
            variant_args = [a for a in variant_args if a != "--partition"] + ["--partition", json.dumps(partition)]
        if graphs is not None:
            variant_args += ["--segmenter_graphs", str(graphs)]
        run(launcher() + variant_args + ["--ds_config", str(path), "--name", f"pipeline-{name}"], log, args.timeout)
    if "naive" in args.variants:
        run([sys.executable, *[a for a in common if a != "--check"], "--worker", "naive"], log, args.timeout)

    report = collect(workdir, args, card, tflops, paths)
    shapes = (report.get("graphs") or {}).get("shapes", {})
    captures = [v["capture_s"] for v in shapes.values() if v.get("capture_s")]
    if shapes.get("512x683") and captures:  # (512 x 683 itself was captured by the equality check before)
        shape = shapes["512x683"]
        report["graph_cache_policy"] = {"shape_mix": SHAPE_MIX, "capture_s_used": statistics.median(captures),
                                        **graph_cache_simulation(shape["eager_s"], shape["graphed_s"],
                                                                 statistics.median(captures))}
    path = out / f"{report['date']}-{slug}{'-tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    for r in range(args.stages):
        trace = workdir / f"trace-pipeline-rank{r}.json.gz"
        if trace.is_file():
            shutil.copy(trace, out / f"{report['date']}-{slug}-trace-stage{r}.json.gz")
    print_table(report)
    print(f"written {path}")


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def collect(workdir: Path, args, card: str, tflops, paths: dict) -> dict:
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
    variants = {}
    for name in json.loads(args.pipeline_variants):
        ranks = [read(f"pipeline-{name}-rank{r}.json") for r in range(args.stages)]
        if all(ranks):
            variants[name] = {c: {"s_per_image": ranks[0]["results"][c]["s_per_image"],
                                  "peak_mem_gib": [r["results"][c]["peak_mem_gib"] for r in ranks]}
                              for c in ranks[0]["results"]}
    report["pipeline_variants"] = variants
    for c in map(str, args.classes):
        entry: dict = {"classes": int(c)}
        if all(pipe):
            r0 = pipe[0]["results"][c]
            entry["pipeline_s_per_image"] = r0["s_per_image"]
            entry["stage_busy_s"] = [p["results"][c]["busy_s"] for p in pipe]
            entry["peak_mem_gib"] = [p["results"][c]["peak_mem_gib"] for p in pipe]
            entry["pipeline_oom"] = any(p["results"][c]["oom"] for p in pipe)
            if r0["s_per_image"]:
                entry["bubble_fraction"] = 1 - sum(b or 0 for b in entry["stage_busy_s"]) / (args.stages * r0["s_per_image"])
        if single:
            entry["single_gpu_s_per_image"] = single["results"][c]["s_per_image"]
            entry["single_gpu_peak_mem_gib"] = single["results"][c]["peak_mem_gib"]
            entry["single_gpu_oom"] = single["results"][c]["oom"]
        if naive:
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
        report["check"] = compare_check(workdir, args.stages)
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


if __name__ == "__main__":
    main()
