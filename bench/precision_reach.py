#!/usr/bin/env python
"""Adaptation reach of the precision presets: which adapted weights does the forward actually see move?

    python bench/precision_reach.py                      # both presets, 20 steps at lr 1e-5, CPU is fine

For each DeepSpeed preset (`ds_configs/ds_tta_bf16.json`: bf16 weights with float32 masters;
`ds_configs/ds_tta.json`, the default: float32 weights under bf16 autocast), the demo models run `--steps`
TTA steps on one image through the real 2-stage pipeline, and every trainable parameter's *forward
value* is compared before and after: the bf16 weight itself in the bf16 preset; under autocast, the
bf16 cast of Linear/Conv weights (the ops autocast runs in bf16) and the float32 value of the others
(norm layers, which autocast keeps in float32). Reported: the fraction of trainable parameter elements
whose forward value changed, overall and for normalization layers' own affine parameters alone; and
after the first step, among norm elements whose gradient exceeds Adam's eps (Adam then steps them by at
least lr / 2), the fraction that moved, and how many of the norm tensors with a gradient moved. Writes <out>/<date>-precision-reach-cpu.json (default <workdir>/results; `--out bench/results` publishes).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from pipeline.run.folder import free_local_port  # noqa: E402
from pipeline.run.log import LOG  # noqa: E402

PRESETS = ["ds_configs/ds_tta_bf16.json", "ds_configs/ds_tta.json"]
LOWER_PRECISION_MODULES = ("Linear", "Conv1d", "Conv2d", "Conv3d")  # run in bf16 under autocast


def forward_values(module, autocast: bool) -> dict:
    """name -> the value the forward computes with, float32 on the host."""
    import torch
    values = {}
    for owner_name, owner in module.named_modules():
        for name, p in owner.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            value = p.detach()
            if autocast and type(owner).__name__ in LOWER_PRECISION_MODULES:
                value = value.to(torch.bfloat16)
            values[f"{owner_name}.{name}" if owner_name else name] = value.float().cpu().clone()
    return values


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from pipeline.dusa.deepspeed_seam import wrap_instructions
    from deepspeed.utils import safe_get_full_grad

    from data.classes import ADE20K_CLASSES
    from pipeline.methods.dusa import DusaOptions
    from pipeline.run.config import DataConfig, ModelConfig, PipelineConfig, TTAConfig
    from pipeline.dusa.engine import TTAEngine, is_norm_module, load_ds_config
    from pipeline.dusa.module import build_pipeline
    from pipeline.dusa.windows import draw_windows, resize_short_edge, window_boxes

    deepspeed.init_distributed()
    work = Path(args.workdir)
    ds = load_ds_config(str(ROOT / args.preset), args.lr)
    autocast = ds.get("torch_autocast", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    model = ModelConfig(segmenter=str(work / "segformer"), generator=str(work / "sd3"),
                        class_embeddings=str(work / "classes.safetensors"))
    data, tta, dusa = DataConfig(window_size=128, window_stride=64), TTAConfig(lr=args.lr), DusaOptions(max_classes=8)
    module = build_pipeline(model, data, dusa, PipelineConfig(num_stages=2, partition=[0, 4, 7]), ADE20K_CLASSES,
                            stage_report=LOG.debug, dtype=torch.bfloat16 if bf16 else torch.float32)
    engine = TTAEngine(module, ds, tta, dusa)
    # A normalization layer's own affine parameters (LayerNorm, GroupNorm, BatchNorm, RMSNorm), which autocast
    # computes in float32; not the Linear layers inside SD3's adaptive norms (those run in bf16).
    norm = {f"{o}.{n}" if o else n for o, m in module.named_modules() if is_norm_module(m)
            for n, p in m.named_parameters(recurse=False) if p.requires_grad}
    first_grads: dict = {}

    def recording_step(eng, *a, optimizer_step, **k):  # the float32 gradients of the first update
        if not first_grads:
            for n, p in module.named_parameters():
                if p.requires_grad:
                    grad = safe_get_full_grad(p)
                    first_grads[n] = torch.zeros(p.shape) if grad is None else grad.detach().float().cpu().clone()
        return optimizer_step(eng, *a, **k)
    wrap_instructions(engine.engine, {"OptimizerStep": lambda step: functools.partial(recording_step,
                                                                                      optimizer_step=step)})

    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=generator), size=(192, 256),
                                             mode="bilinear")
    image = resize_short_edge((0.8 * smooth + 0.2 * torch.rand(1, 3, 192, 256, generator=generator)).clamp(0, 1), 128)
    corners = window_boxes(image.shape[-2], image.shape[-1], 128, 64)
    before = forward_values(module, autocast)
    for step in range(args.steps):  # one image, the same draws every step
        draws = draw_windows(corners, (16, 16, 16), dusa.timestep_range, torch.Generator().manual_seed(0))
        engine.step(image if module.front is not None else None, draws)
        if step == 0:
            after_one = forward_values(module, autocast)
    after = forward_values(module, autocast)
    # Adam's step is lr g / (|g| + eps) (first step): a gradient above eps moves a weight by at least lr / 2.
    eps = ds["optimizer"]["params"].get("eps", 1e-8)
    out = {}
    for name in before:
        moved, graded = after_one[name] != before[name], first_grads[name].abs() > eps
        out[name] = {"norm": name in norm, "numel": before[name].numel(),
                     "changed": int((after[name] != before[name]).sum()),
                     "graded": bool((first_grads[name] != 0).any()), "moved_first_step": bool(moved.any()),
                     "graded_elements": int(graded.sum()), "graded_moved_first_step": int((graded & moved).sum())}
    (work / f"{Path(args.preset).stem}-rank{dist.get_rank()}.json").write_text(json.dumps(out))


def summarize(records: dict) -> dict:
    def fraction(keys, num, den):
        total = sum(r[den] for r in records.values() if keys(r))
        return sum(r[num] for r in records.values() if keys(r)) / total if total else None
    graded_norm = [r for r in records.values() if r["norm"] and r["graded"]]
    return {"changed_all": fraction(lambda r: True, "changed", "numel"),
            "changed_norm": fraction(lambda r: r["norm"], "changed", "numel"),
            "norm_elements_above_eps_moved_first_step": fraction(lambda r: r["norm"], "graded_moved_first_step",
                                                                 "graded_elements"),
            "norm_tensors_with_gradient": len(graded_norm),
            "norm_tensors_with_gradient_moved_first_step": sum(r["moved_first_step"] for r in graded_norm),
            "trainable_elements": sum(r["numel"] for r in records.values()),
            "norm_elements": sum(r["numel"] for r in records.values() if r["norm"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--workdir", default=None, help="where the demo models are built (default: a temporary folder)")
    parser.add_argument("--out", help="where the results JSON goes (default: <workdir>/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from data.classes import ADE20K_CLASSES
    from models.tiny import ensure_demo_models
    problem = (f"--steps {args.steps} must be >= 1" if args.steps < 1 else
               f"--lr {args.lr} must be a finite number >= 0" if not 0 <= args.lr < float("inf") else
               next((f"--presets {p}: no such DeepSpeed JSON" for p in args.presets if not (ROOT / p).is_file()), None)
               or (f"--workdir {args.workdir} is a file" if args.workdir and Path(args.workdir).is_file() else None))
    if problem:
        LOG.error(f"error: {problem}")
        sys.exit(2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="precision-reach-"))
    ensure_demo_models(str(work / "segformer"), str(work / "sd3"), str(work / "classes.safetensors"), ADE20K_CLASSES)
    results = {"steps": args.steps, "lr": args.lr, "models": "demo (models/tiny.py)", "device": "cpu", "presets": {}}
    for preset in args.presets:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_local_port()),
               str(Path(__file__).resolve()), "--worker", "--preset", preset, "--workdir", str(work),
               "--steps", str(args.steps), "--lr", str(args.lr)]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{preset}: the worker failed\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        records = {}
        for rank in range(2):
            records.update(json.loads((work / f"{Path(preset).stem}-rank{rank}.json").read_text()))
        results["presets"][preset] = summarize(records)
    print(f"{'preset':34} {'changed: all':>13} {'norm':>7} {'norm, |g| > eps, 1st step':>26} {'norm tensors moved':>19}")
    for preset, r in results["presets"].items():
        print(f"{preset:34} {100 * r['changed_all']:12.1f}% {100 * r['changed_norm']:6.1f}% "
              f"{100 * r['norm_elements_above_eps_moved_first_step']:25.1f}% "
              f"{r['norm_tensors_with_gradient_moved_first_step']:>10} of {r['norm_tensors_with_gradient']}")
    out = Path(args.out or work / "results") / f"{datetime.date.today()}-precision-reach-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    LOG.info(f"written {out}")


if __name__ == "__main__":
    main()
