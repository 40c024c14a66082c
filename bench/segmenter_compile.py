#!/usr/bin/env python
"""SegFormer-B5's forward + backward on one image, as the step runs it (float32 weights, bf16 autocast), with
and without torch.compile, eager or replayed through the step's CUDA graphs (pipeline/dusa/graphs.py).

    python bench/segmenter_compile.py --out bench/results                       # a GPU: the full-size model
    python bench/segmenter_compile.py --variants eager layers --out /tmp/sc      # a CPU: a tiny SegFormer

Variants: `eager`, `graphs` (the step's default), `layers` / `layers_graphs` (each SegFormer layer through
torch.compile, the token count dynamic), `whole` / `whole_graphs` (the model's forward compiled, height and
width marked dynamic). Inductor's layout optimisation is off for the compiled ones: with it, dynamic shapes
fail to compile in torch 2.13 ("cannot determine truth value of Relational"). Per variant: seconds of each
first call (compiles, captures), the median milliseconds per call after them (device time on a GPU), and the
parameter gradients against the eager variant's (relative; analytically-zero ones left out). Each variant is
saved as soon as it ends (`--time_limit` may stop a long compile); the file is
`<out>/<date>-<card>-segmenter-compile.json`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from datetime import date
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where this file would stand in for the bench package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

VARIANTS = {"eager": (None, False), "graphs": (None, True), "layers": ("layers", False),
            "layers_graphs": ("layers", True), "whole": ("whole", False), "whole_graphs": ("whole", True)}
SHAPES = ((512, 683), (512, 768), (683, 512))
TINY_SHAPES = ((128, 171), (128, 192), (171, 128))


def make_segmenter(device: torch.device, tiny: bool):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from models.architectures import SEGFORMER_B5
    from models.segformer import Segmenter
    torch.manual_seed(0)
    cfg = dict(SEGFORMER_B5, num_labels=150)
    if tiny:
        cfg.update(depths=[1, 2, 2, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=32)
    return Segmenter(SegformerForSemanticSegmentation(SegformerConfig(**cfg))).to(device).eval()


def compile_segmenter(segmenter, how: str) -> None:
    """Each SegformerLayer's forward (`layers`) or the model's (`whole`) through torch.compile, in place."""
    import torch._inductor.config as inductor_config
    from transformers.models.segformer.modeling_segformer import SegformerLayer

    from pipeline.dusa.layers import INDUCTOR_OPTIONS
    inductor_config.layout_optimization = False
    options = dict(backend="inductor", options=INDUCTOR_OPTIONS)
    if how == "layers":
        for m in segmenter.modules():
            if isinstance(m, SegformerLayer):
                m.forward = torch.compile(m.forward, dynamic=True, **options)
        return
    compiled = torch.compile(segmenter.model.forward, dynamic=None, **options)

    def forward(*args, **kwargs):
        for dim in (2, 3):
            torch._dynamo.maybe_mark_dynamic(kwargs["pixel_values"], dim)
        return compiled(*args, **kwargs)
    segmenter.model.forward = forward


def measure(name: str, device: torch.device, tiny: bool, shapes: int, repeats: int) -> tuple[dict, list]:
    from bench.layer_throughput import sync as device_sync
    from pipeline.dusa.graphs import GraphedModule
    how, graphed = VARIANTS[name]
    segmenter = make_segmenter(device, tiny)
    if how:
        compile_segmenter(segmenter, how)
    fn = GraphedModule(segmenter, 8, capture_after=1) if graphed else segmenter

    def sync():
        device_sync(device)

    def forward_backward(x):
        with torch.autocast(device.type, torch.bfloat16, cache_enabled=False):
            out = fn(x)
        out.float().backward(torch.ones(out.shape, device=device))

    row, grads = {}, []
    for h, w in (TINY_SHAPES if tiny else SHAPES)[:shapes]:
        x = torch.rand(1, 3, h, w, device=device, generator=torch.Generator(device).manual_seed(1))
        sync()
        start = time.perf_counter()
        forward_backward(x)
        sync()
        row[f"first_s_{h}x{w}"] = time.perf_counter() - start
        if not grads:
            grads = [None if p.grad is None else p.grad.float().clone() for p in segmenter.parameters()]
        segmenter.zero_grad(set_to_none=True)
    x = torch.rand(1, 3, *(TINY_SHAPES if tiny else SHAPES)[0], device=device)
    times = []
    for i in range(repeats + 3):
        sync()
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        forward_backward(x)
        if device.type == "cuda":
            end.record()
        sync()
        if i >= 3:
            times.append(begin.elapsed_time(end) if device.type == "cuda" else (time.perf_counter() - start) * 1e3)
    segmenter.zero_grad(set_to_none=True)
    row["ms_median"] = statistics.median(times)
    row["ms_is"] = "device time" if device.type == "cuda" else "wall time"
    if graphed:
        row["graphs"] = {k: v for k, v in vars(fn.stats).items()}
    return row, grads


def agreement(grads: list, reference: list) -> dict:
    from bench.report import relative_errors
    both = [i for i, (g, r) in enumerate(zip(grads, reference)) if g is not None and r is not None]
    rel = sorted(relative_errors({i: grads[i] for i in both}, {i: reference[i] for i in both}).values())
    return {"grad_rel_median": rel[len(rel) // 2], "grad_rel_max": rel[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["eager", "graphs", "layers_graphs", "whole_graphs"])
    parser.add_argument("--shapes", type=int, default=2, help="image shapes to call first (each may compile)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", required=True, help="folder of the result file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type == "cpu"
    torch._dynamo.config.recompile_limit = 64
    card = torch.cuda.get_device_name().replace("NVIDIA ", "").lower().replace(" ", "-") if not tiny else "cpu-tiny"
    path = Path(args.out) / f"{date.today()}-{card}-segmenter-compile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"card": torch.cuda.get_device_name() if not tiny else "cpu (tiny SegFormer)", "torch": torch.__version__,
              "image": "x".join(map(str, (TINY_SHAPES if tiny else SHAPES)[0])), "rows": {},
              "command": "python " + " ".join(sys.argv)}
    reference = None
    for name in args.variants:
        try:
            row, grads = measure(name, device, tiny, args.shapes, args.repeats)
        except Exception as exc:  # a variant that fails to compile is a result too
            traceback.print_exc(limit=2)
            row, grads = {"failed": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}, None
        if name == "eager":
            reference = grads
        elif grads and reference:
            row.update(agreement(grads, reference))
        result["rows"][name] = row
        print(name, json.dumps(row), flush=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"written {path}")


if __name__ == "__main__":
    main()
