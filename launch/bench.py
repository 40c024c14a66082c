#!/usr/bin/env python
"""Benchmark of one DUSA TTA step per image at full size (random weights of the published models).

    python launch/bench.py --workdir /tmp/bench                  # on a node with 2 GPUs
    DS_ACCELERATOR=cpu python launch/bench.py --tiny --workdir /tmp/bench-tiny   # dry run, CPU

Variants, each timed over --steps images after --warmup, per number of candidate classes:
  (a) pipeline: the project's pipeline, default config (2 stages, bf16, ZeRO-1)
  (b) single:   the same on 1 GPU (1 stage)
  (c) naive:    the old design: the blocks split over 2 GPUs, one busy at a time, float32 weights
                under bf16 autocast, eager SegFormer once on the full image, torch AdamW
With --check, the first step of (a) and (b) also dumps loss and gradients and they are compared.
Writes bench/results/<date>-<card>.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
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


def window_size(tiny: bool) -> tuple[int, int]:
    return (128, 43) if tiny else (512, 171)


def synthetic_image(tiny: bool) -> torch.Tensor:
    """A smooth random image [1, 3, H, W] in [0, 1] (fixed seed), already at the segmenter's size."""
    h, w = (128, 171) if tiny else IMAGE_SIZE
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.85 * image + 0.15 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Busy:
    """Time spent inside wrapped calls: CUDA events on a GPU (device time), a host clock on a CPU."""

    def __init__(self):
        self.spans: list = []

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.spans.append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                self.spans.append(time.perf_counter() - t0)
            return out
        return timed

    def take(self) -> float:
        sync()
        total = sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1000 for s in self.spans)
        self.spans = []
        return total


def peak_memory_gib(device: int | None = None) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- (a), (b): the pipeline
def pipeline_worker(args) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.pipe import schedule
    from deepspeed.utils import safe_get_full_grad

    from data.classes import ADE20K_CLASSES
    from pipeline.config import DataConfig, ModelConfig, PipelineConfig, TTAConfig
    from pipeline.engine import TTAEngine, load_ds_config
    from pipeline.module import build_pipeline
    from pipeline.tta import microbatches, predict
    from pipeline.windows import window_boxes

    deepspeed.init_distributed()
    rank = dist.get_rank()
    paths = json.loads(args.paths)
    size, stride = window_size(args.tiny)
    model = ModelConfig(**paths)
    data = DataConfig(window_size=size, window_stride=stride)
    tta = TTAConfig(min_classes=args.classes[0], max_classes=args.classes[0])
    pipe = PipelineConfig(num_stages=args.stages, segmenter_cost=args.segmenter_cost)
    ds = load_ds_config(args.ds_config or ROOT / "ds_configs" / ("ds_demo.json" if args.tiny else "ds_tta.json"),
                        lr=1e-5)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    module = build_pipeline(model, data, tta, pipe, ADE20K_CLASSES, stage_report=print if rank == 0 else (lambda _: None),
                            dtype=torch.bfloat16 if bf16 else torch.float32)
    say(f"rank {rank}: stage built")
    engine = TTAEngine(module, ds, tta)
    stage = engine.engine.stage_id
    say(f"rank {rank}: engine ready")
    front = module.front

    # Device time of forward, backward and optimizer work on this stage; optional gradient capture.
    busy = Busy()
    captured: dict = {}
    instructions = dict(type(engine.engine)._INSTRUCTION_MAP)
    for kind in (schedule.ForwardPass, schedule.BackwardPass):
        instructions[kind] = busy.wrap(instructions[kind])
    step_fn = instructions[schedule.OptimizerStep]

    def optimizer_step(self, *a, **k):
        if captured.get("armed"):
            captured["armed"] = False
            captured["grads"] = {n: safe_get_full_grad(p).to(torch.bfloat16).cpu() for n, p in module.named_parameters()
                                 if p.requires_grad}
        return step_fn(self, *a, **k)
    instructions[schedule.OptimizerStep] = busy.wrap(optimizer_step)
    engine.engine._INSTRUCTION_MAP = instructions

    image = synthetic_image(args.tiny)
    corners = window_boxes(image.shape[-2], image.shape[-1], size, stride)
    results = {}
    for c in args.classes:
        if front is not None:
            front.min_classes = front.max_classes = c
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times, busies, oom = [], [], False
        for i in range(args.warmup + args.steps):
            captured["armed"] = args.check and c == args.classes[0] and i == 0
            if front is not None:
                latent = (16, size // front.encoder.downsample, size // front.encoder.downsample)
                batches = microbatches(image, corners, latent, (0.25, 0.25), torch.Generator().manual_seed(i))
            else:
                batches = [(None, torch.zeros(1))] * len(corners)
            sync()
            t0 = time.perf_counter()
            try:
                loss = engine.step(batches)
                if front is not None:  # the scored prediction, as the TTA loop makes it
                    predict(front.last_logits, IMAGE_SIZE if not args.tiny else image.shape[-2:])
                sync()
            except torch.cuda.OutOfMemoryError:
                oom = True
                break
            elapsed = time.perf_counter() - t0
            if i == 0 and "grads" in captured:
                torch.save({"loss": float(loss), "grads": captured.pop("grads")},
                           Path(args.workdir) / f"grads-{args.stages}stage-rank{rank}.pt")
            step_busy = busy.take()
            say(f"rank {rank}: {c} classes, step {i}: {elapsed:.3f} s, busy {step_busy:.3f} s")
            if i >= args.warmup:
                times.append(elapsed)
                busies.append(step_busy)
        results[str(c)] = {"oom": oom, "s_per_image": statistics.median(times) if times else None,
                           "busy_s": statistics.median(busies) if busies else None,
                           "peak_mem_gib": peak_memory_gib(), "loss": float(loss) if not oom else None}
    out = {"stage": stage, "stages": args.stages, "results": results}
    (Path(args.workdir) / f"pipeline-{args.stages}stage-rank{rank}.json").write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------- (c): the old design
def naive_worker(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from data.classes import ADE20K_CLASSES
    from models.class_embeddings import load_class_embeddings
    from models.sd3 import LatentEncoder, TransformerParts
    from models.segformer import Segmenter
    from pipeline.layers import DusaLoss, JointBlock, SD3Embed, SD3Head, pack
    from pipeline.loss import select_candidates
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
        full = torch.nn.functional.interpolate(logits.float(), size=image.shape[-2:], mode="bilinear")
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
                                  mask.to(torch.uint8), target))
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
    print(f"[{time.strftime('%H:%M:%S')}] $", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            failed = proc.returncode != 0 and f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:.0f} s"
    print(f"[{time.strftime('%H:%M:%S')}] " + (f"failed ({failed}); see {log}" if failed else "done"), flush=True)


def compare_grads(workdir: Path, stages: int) -> dict | None:
    """Loss and per-tensor gradient agreement of the pipeline with the 1-stage run on the same inputs."""
    def load(n):
        files = sorted(workdir.glob(f"grads-{n}stage-rank*.pt"))
        if not files:
            return None
        dumps = [torch.load(f) for f in files]
        return dumps[0]["loss"], {k: v for d in dumps for k, v in d["grads"].items()}
    a, b = load(stages), load(1)
    if a is None or b is None:
        return None
    norms = {k: g.float().norm().item() for k, g in b[1].items()}
    floor = 1e-6 * max(norms.values())  # analytically-zero gradients (attention key biases) left out
    errors = {k: (a[1][k].float() - g.float()).norm().item() / norms[k] for k, g in b[1].items() if norms[k] > floor}
    return {"loss_pipeline": a[0], "loss_single": b[0], "loss_rel_err": abs(a[0] - b[0]) / abs(b[0]),
            "grad_rel_err_max": max(errors.values()), "grad_rel_err_median": statistics.median(errors.values()),
            "same_parameters": sorted(a[1]) == sorted(b[1]), "tensors_compared": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/dusa-bench")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--segmenter_cost", type=float, default=None, help="default: the project's default")
    parser.add_argument("--variants", nargs="+", default=["pipeline", "single", "naive"])
    parser.add_argument("--ds_config", help="DeepSpeed JSON of (a) and (b) (default: ds_configs/ds_tta.json)")
    parser.add_argument("--check", action="store_true", help="compare loss and gradients of (a) and (b)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a dry run that fits a CPU)")
    parser.add_argument("--log", help="worker output (default: <workdir>/bench.log)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to each variant")
    parser.add_argument("--worker", choices=["pipeline", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.segmenter_cost is None:
        from pipeline.config import PipelineConfig
        args.segmenter_cost = PipelineConfig().segmenter_cost
    if args.worker == "pipeline":
        return pipeline_worker(args)
    if args.worker == "naive":
        return naive_worker(args)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.json"):
        old.unlink()
    for old in workdir.glob("grads-*.pt"):
        old.unlink()
    t0 = time.perf_counter()
    paths = checkpoints(workdir, args.tiny)
    say(f"checkpoints ready in {time.perf_counter() - t0:.0f} s")
    tflops = matmul_tflops()
    common = ["launch/bench.py", "--workdir", str(workdir), "--paths", json.dumps(paths), "--classes",
              *map(str, args.classes), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--segmenter_cost", str(args.segmenter_cost)] + (["--tiny"] if args.tiny else []) + \
             (["--check"] if args.check else []) + (["--ds_config", args.ds_config] if args.ds_config else [])
    log = Path(args.log) if args.log else workdir / "bench.log"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", "29533"]
    if "pipeline" in args.variants:
        run(launcher + ["--num_gpus", str(args.stages), *common, "--worker", "pipeline", "--stages", str(args.stages)],
            log, args.timeout)
    if "single" in args.variants:
        run(launcher + ["--num_gpus", "1", *common, "--worker", "pipeline", "--stages", "1"], log, args.timeout)
    if "naive" in args.variants:
        run([sys.executable, *common, "--worker", "naive"], log, args.timeout)

    def read(name):
        path = workdir / name
        return json.loads(path.read_text()) if path.is_file() else None
    pipe = [read(f"pipeline-{args.stages}stage-rank{r}.json") for r in range(args.stages)]
    single = read("pipeline-1stage-rank0.json")
    naive = read("naive.json")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"card": card, "gpus": torch.cuda.device_count(), "date": datetime.date.today().isoformat(),
              "tiny": args.tiny, "windows": 2, "image_size": list(synthetic_image(args.tiny).shape[-2:]), "steps": args.steps,
              "warmup": args.warmup, "stages": args.stages, "segmenter_cost": args.segmenter_cost,
              "matmul_tflops": tflops, "by_classes": {}}
    for c in map(str, args.classes):
        entry: dict = {"classes": int(c)}
        if all(pipe):
            r0 = pipe[0]["results"][c]
            entry["pipeline_s_per_image"] = r0["s_per_image"]
            entry["stage_busy_s"] = [p["results"][c]["busy_s"] for p in pipe]
            entry["peak_mem_gib"] = [p["results"][c]["peak_mem_gib"] for p in pipe]
            entry["pipeline_oom"] = any(p["results"][c]["oom"] for p in pipe)
            if r0["s_per_image"]:
                entry["bubble_fraction"] = 1 - sum(entry["stage_busy_s"]) / (args.stages * r0["s_per_image"])
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
        report["check"] = compare_grads(workdir, args.stages)
    # The top level carries the default workload (the first class count), as the issue names the fields.
    report.update({k: v for k, v in report["by_classes"][str(args.classes[0])].items() if k != "classes"},
                  classes=args.classes[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = card.lower().replace("nvidia ", "").split()[0] if card != "cpu" else "cpu"
    path = out / f"{report['date']}-{slug}{'-tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written {path}")


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
    if report.get("check"):
        print("check (a) vs (b):", json.dumps(report["check"]))


if __name__ == "__main__":
    main()
