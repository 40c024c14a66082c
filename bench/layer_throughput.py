#!/usr/bin/env python
"""Achieved TFLOP/s of each layer of the DUSA step, at full size (random weights of the published configs).

    python bench/layer_throughput.py --out bench/results            # on one GPU: a few minutes
    python bench/layer_throughput.py --tiny --out /tmp/layers         # dry run on the CPU, tiny widths

Each row times one layer's forward and backward (or forward only where the step has no backward: the frozen
VAE encoder) in the precision the step uses: the generator's joint blocks with bf16 working weights under
bf16 autocast (pipeline/low_precision.py), SegFormer-B5 with float32 weights under autocast, attention alone
under each of SDPA's backends, and the fused AdamW update over the adapted parameters. FLOPs are counted by
torch's FlopCounterMode (matmuls, convolutions, attention), time is the median of --repeats runs after a
warm-up, and the card's reach is a large bf16 matmul measured in the same run. Writes
<out>/<date>-<card>-layers.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.run.log import LOG
from models.architectures import SD3_MEDIUM_TRANSFORMER, SD3_TEXT_TOKENS, SD3_VAE, SEGFORMER_B5

WINDOW = 512  # the generator's window side (pixels)
IMAGE = (512, 683)  # SegFormer's whole image, a typical ADE20K size after resizing
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn over `repeats` runs, each ended by a device sync."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_of(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=10) / 1e12


def forward_backward(fn: Callable, make_inputs: Callable[[], tuple], autocast: bool, device: torch.device,
                     owner: torch.nn.Module | None = None) -> Callable[[], None]:
    """One forward and one backward of `fn` from fresh inputs, the output's gradient all ones (as the sum
    of every float output); the gradients of `owner`'s parameters are dropped after each run."""
    params = [p for p in owner.parameters() if p.requires_grad] if owner is not None else []

    def run():
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = fn(*make_inputs())
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
        for p in params:
            p.grad = None
    return run


def block_rows(config: dict, classes: list[int], device: torch.device, repeats: int, compile_block: bool) -> list:
    """SD3's joint blocks (a middle block and the last, text-stream-free one) at each class count, with bf16
    weights (the working weights) under autocast; attention alone under each SDPA backend."""
    from diffusers import SD3Transformer2DModel
    cfg = dict(config, num_layers=2)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg).to(torch.bfloat16)
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = (cfg["sample_size"] // 2 if device.type == "cpu" else WINDOW // 8 // cfg["patch_size"]) ** 2
    text = 8 if device.type == "cpu" else SD3_TEXT_TOKENS
    rows = []

    def inputs(n):
        def make():
            h = torch.randn(n, tokens, width, device=device, dtype=torch.bfloat16, requires_grad=True)
            e = torch.randn(n, text, width, device=device, dtype=torch.bfloat16, requires_grad=True)
            t = torch.randn(n, width, device=device, dtype=torch.bfloat16, requires_grad=True)
            return h, e, t
        return make

    def block_call(block):
        return lambda h, e, t: block(hidden_states=h, encoder_hidden_states=e, temb=t)

    variants = [("joint block", model.transformer_blocks[0]), ("last joint block", model.transformer_blocks[1])]
    from pipeline.dusa.layers import INDUCTOR_OPTIONS  # as pipeline.compile_blocks compiles them
    compiled = torch.compile(model.transformer_blocks[0], dynamic=False, options=INDUCTOR_OPTIONS) \
        if compile_block else None
    for n in classes:
        for name, block in variants:
            run = forward_backward(block_call(block), inputs(n), True, device, block)
            rows.append(row(name, n, f"{n} x ({tokens} + {text}) tokens, width {width}", run, device, repeats))
        if compiled is not None:
            t0 = time.perf_counter()
            run = forward_backward(block_call(compiled), inputs(n), True, device, compiled)
            run()
            sync(device)
            r = row("joint block, torch.compile", n, f"compiled in {time.perf_counter() - t0:.1f} s", run, device,
                    repeats)
            rows.append(r)
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]

        def qkv(n=n):
            return tuple(torch.randn(n, heads, tokens + text, head_dim, device=device, dtype=torch.bfloat16,
                                     requires_grad=True) for _ in range(3))
        for backend, kind in BACKENDS.items():
            if device.type == "cpu" and backend not in ("math", "flash"):
                continue

            def attention(q, k, v, kind=kind):
                with sdpa_kernel([kind]):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                run = forward_backward(attention, qkv, False, device)
                rows.append(row(f"attention ({backend})", n, f"{n} x {heads} heads x {tokens + text} tokens",
                                run, device, repeats))
            except RuntimeError as exc:  # the backend does not take these shapes on this card
                rows.append(dict(layer=f"attention ({backend})", classes=n, error=str(exc).splitlines()[0][:200]))
    return rows


def step_block_rows(config: dict, classes: list[int], device: torch.device, repeats: int) -> list:
    """The joint block as the step runs it unreplayed (pipeline/dusa/layers.py JointBlock, compiled as
    pipeline.compile_blocks compiles it: inductor, the class count dynamic; bf16 weights under autocast), forward
    and backward: the device time, and the host's time to issue the same work with the device idle before it
    (when it exceeds the device time, a chain of such blocks waits on the host)."""
    from diffusers import SD3Transformer2DModel

    from pipeline.dusa.layers import JointBlock, pack, unpack
    cfg = dict(config, num_layers=1)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg).to(torch.bfloat16)
    block = JointBlock(model.transformer_blocks[0], compile_backend="inductor" if device.type == "cuda" else None)
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = (cfg["sample_size"] // 2 if device.type == "cpu" else WINDOW // 8 // cfg["patch_size"]) ** 2
    text = 8 if device.type == "cpu" else SD3_TEXT_TOKENS
    rows = []
    for n in classes:
        acts = [torch.randn(n, length, width, device=device, dtype=torch.bfloat16, requires_grad=True)
                for length in (tokens, text)] + [torch.randn(n, width, device=device, dtype=torch.bfloat16,
                                                             requires_grad=True)]
        grads: list = []

        def forward():
            with torch.autocast(device.type, torch.bfloat16, cache_enabled=False):
                outs = [t for t in unpack(block(pack(*acts))) if t.requires_grad]
            grads[:] = [torch.ones_like(t) for t in outs]
            return outs

        def backward(outs):
            torch.autograd.backward(outs, grads)
            for p in block.parameters():
                p.grad = None
        for _ in range(3):  # compile and warm up
            backward(forward())
        host_fwd, host_bwd, dev = [], [], []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            start = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
            if start is not None:
                start.record()
            outs = forward()
            t1 = time.perf_counter()
            backward(outs)
            t2 = time.perf_counter()
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                dev.append(start.elapsed_time(end))
            host_fwd.append((t1 - t0) * 1e3)
            host_bwd.append((t2 - t1) * 1e3)
        rows.append(dict(layer="joint block as the step compiles it", classes=n,
                         device_ms=statistics.median(dev) if dev else None,
                         host_forward_ms=statistics.median(host_fwd), host_backward_ms=statistics.median(host_bwd)))
    return rows


def row(layer: str, classes: int | None, shape: str, run: Callable[[], None], device: torch.device,
        repeats: int) -> dict:
    seconds = timed(run, device, repeats)
    flops = flops_of(run)
    return dict(layer=layer, classes=classes, shape=shape, ms=seconds * 1e3, gflop=flops / 1e9,
                tflops=flops / seconds / 1e12)


def attention_precision(device: torch.device, n: int, heads: int, tokens: int, head_dim: int) -> dict:
    """Each SDPA backend's output and input gradients in bf16 against float32 math on the same inputs:
    relative L2 error (the backends differ only in rounding; the bf16 flash figure is the yardstick). The
    output's gradient is handed back contiguous and, as `<backend> (grad in the output's layout)`, with the
    output's own strides (cuDNN's input gradients came out wrong on an H200 after the same shapes had run
    with the other layout in the process: the timing rows above hand it the output's layout)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, heads, tokens, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn(n, heads, tokens, head_dim, device=device, dtype=torch.bfloat16)

    def run(kind, dtype, like_output=False):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        with sdpa_kernel([kind]):
            out = F.scaled_dot_product_attention(*leaves)
        out.backward(torch.empty_like(out).copy_(grad) if like_output else grad.to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in leaves]
    reference = run(SDPBackend.MATH, torch.float32)
    out = {}
    for backend, kind in BACKENDS.items():
        if device.type == "cpu" and backend not in ("math", "flash"):
            continue
        for like_output in (False, True):
            name = backend + (" (grad in the output's layout)" if like_output else "")
            try:
                got = run(kind, torch.bfloat16, like_output)
            except RuntimeError as exc:
                out[name] = str(exc).splitlines()[0][:200]
                continue
            out[name] = {part: float((g - r).norm() / r.norm()) for part, g, r in zip(("out", "dq", "dk", "dv"), got,
                                                                                        reference)}
    return out


def top_kernels(fn: Callable[[], None], device: torch.device, count: int = 15) -> list:
    """The `count` kernels (or CPU ops, without a GPU) with the most total time over one run of fn."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        sync(device)
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [dict(name=e.key[:120], ms=getattr(e, key) / 1e3, calls=e.count) for e in events[:count]]


def vae_config(tiny: bool) -> dict:
    """SD3's VAE config (`AutoencoderKL`'s arguments), at tiny widths for a dry run on the CPU."""
    config = dict(SD3_VAE)
    if tiny:
        config.update(block_out_channels=(8, 8, 16, 16), norm_num_groups=8, layers_per_block=1)
    return config


def model_rows(device: torch.device, repeats: int, tiny: bool, profiles: dict | None = None) -> list:
    """SegFormer-B5 forward + backward on the whole image (float32 weights, autocast), the VAE encoder's
    forward on one window (bf16, frozen); with `profiles`, SegFormer's top kernels go there."""
    from diffusers import AutoencoderKL
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    seg_cfg = dict(SEGFORMER_B5, num_labels=150)
    vae_cfg = vae_config(tiny)
    image, window = IMAGE, WINDOW
    if tiny:
        seg_cfg.update(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=32)
        image, window = (64, 85), 64
    with torch.device(device):
        segformer = SegformerForSemanticSegmentation(SegformerConfig(**seg_cfg)).eval()
        encoder = AutoencoderKL(**vae_cfg).encoder.to(torch.bfloat16).requires_grad_(False)

    def seg_inputs():
        return (torch.randn(1, 3, *image, device=device),)
    run = forward_backward(lambda x: segformer(pixel_values=x).logits, seg_inputs, True, device, segformer)
    rows = [row("SegFormer-B5", None, f"1 x 3 x {image[0]} x {image[1]}", run, device, repeats)]
    if profiles is not None:
        profiles["SegFormer-B5 forward + backward"] = top_kernels(run, device)
    x = torch.randn(1, 3, window, window, device=device, dtype=torch.bfloat16)

    @torch.no_grad()
    def encode():
        encoder(x)
    rows.append(row("VAE encoder (forward)", None, f"1 x 3 x {window} x {window}", encode, device, repeats))
    # The same encoder in channels-last memory (cuDNN's native layout for tensor cores): a candidate for the
    # step, with its latent's distance from the default layout's.
    with torch.no_grad():
        latent = encoder(x).float()
        last = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        relative = float((last(x_last).float() - latent).norm() / latent.norm())

    @torch.no_grad()
    def encode_last():
        last(x_last)
    rows.append(dict(row("VAE encoder (forward), channels-last", None, f"1 x 3 x {window} x {window}", encode_last,
                         device, repeats), latent_relative_to_default=relative))
    return rows


def segmenter_attention_agreement(device: torch.device, tiny: bool) -> dict:
    """SegFormer-B5's parameter gradients on one image (autocast, float32 weights, as the step) under SDPA's
    default backend order (on an H200 cuDNN takes SegFormer's shapes), with flash first and with cuDNN first,
    each against float32 weights and math attention: the relative L2 error of all gradients together and its
    median over tensors. The default is run twice (the second reuses whatever the first left cached)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    cfg = dict(SEGFORMER_B5, num_labels=150)
    image = IMAGE
    if tiny:
        cfg.update(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=32)
        image = (64, 85)
    torch.manual_seed(0)
    with torch.device(device):
        segformer = SegformerForSemanticSegmentation(SegformerConfig(**cfg)).eval()
        x = torch.randn(1, 3, *image)
        weight = None  # a fixed random weighting of the logits (made at the first forward: their size)
    params = [p for p in segformer.parameters() if p.requires_grad]

    def grads(order, autocast):
        nonlocal weight
        segformer.zero_grad(set_to_none=True)
        with sdpa_kernel(order, set_priority=True) if order else contextlib.nullcontext(), \
                torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            logits = segformer(pixel_values=x).logits
        if weight is None:
            weight = torch.randn(logits.shape, device=device, generator=torch.Generator(device).manual_seed(1))
        (logits.float() * weight).sum().backward()
        return [p.grad.float().clone() for p in params]
    reference = grads([SDPBackend.MATH], False)
    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    orders = {"default": None, "default, again": None, "flash first": others,
              "cudnn first": [SDPBackend.CUDNN_ATTENTION] + others}
    out = {}
    for name, order in orders.items():
        if device.type == "cpu" and name == "cudnn first":
            continue
        got = grads(order, True)
        total = sum((g - r).square().sum() for g, r in zip(got, reference)).sqrt() / \
            sum(r.square().sum() for r in reference).sqrt()
        each = [float((g - r).norm() / r.norm()) for g, r in zip(got, reference) if r.norm() > 0]
        out[name] = {"all": float(total), "median tensor": statistics.median(each)}
    return out


def optimizer_row(numel: int, device: torch.device, repeats: int) -> dict:
    """Fused AdamW over `numel` float32 parameters in 16 tensors: a memory-bound update, as GB/s."""
    chunks = [torch.zeros(numel // 16, device=device, requires_grad=True) for _ in range(16)]
    for p in chunks:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(chunks, lr=1e-5, fused=device.type == "cuda")
    seconds = timed(optimizer.step, device, repeats)
    moved = numel * 4 * 7  # reads parameter, gradient, 2 moments; writes parameter, 2 moments
    return dict(layer="AdamW (fused) update", classes=None, shape=f"{numel / 1e9:.2f} B float32 parameters",
                ms=seconds * 1e3, gbytes_per_s=moved / seconds / 1e9)


def markdown(rows: list, peak: float) -> str:
    lines = ["| layer | classes | shape | ms | GFLOP | TFLOP/s | of measured matmul peak |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['classes']} | - | - | - | - | {r['error']} |")
        elif "tflops" in r:
            lines.append(f"| {r['layer']} | {r['classes'] or '-'} | {r['shape']} | {r['ms']:.2f} | {r['gflop']:.1f} | "
                         f"{r['tflops']:.1f} | {r['tflops'] / peak:.0%} |")
        else:
            lines.append(f"| {r['layer']} | - | {r['shape']} | {r['ms']:.2f} | - | {r['gbytes_per_s']:.0f} GB/s | - |")
    return "\n".join(lines)


def device_and_config(parser: argparse.ArgumentParser, tiny: bool) -> tuple[torch.device, dict, str]:
    """The device (a GPU; the CPU with --tiny, tiny widths), SD3-medium's transformer config at its widths and
    the card's name; without a GPU and --tiny, the parser's error line."""
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not tiny:
        parser.error("no GPU here: add --tiny for a dry run with tiny widths")
    config = SD3_MEDIUM_TRANSFORMER if not tiny else dict(
        SD3_MEDIUM_TRANSFORMER, sample_size=16, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32)
    return device, config, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def result_path(out: Path, card: str, tiny: bool, kind: str) -> Path:
    """<out>/<date>-<card>[-tiny]-<kind>.json (the folder made)."""
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower().replace("nvidia", "")).strip("-") + ("-tiny" if tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{datetime.date.today().isoformat()}-{slug}-{kind}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <date>-<card>-layers.json")
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 10, 20], help="candidate classes per window")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row (the median is kept)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (a dry run of this script)")
    parser.add_argument("--no_compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--profile", action="store_true", help="also the top kernels of SegFormer's step")
    parser.add_argument("--host", action="store_true", help="only the step's compiled joint block: its device time "
                                                            "and the host's time to issue it (-block-host.json)")
    args = parser.parse_args()
    device, config, card = device_and_config(parser, args.tiny)
    torch.manual_seed(0)
    if args.host:
        rows = step_block_rows(config, args.classes, device, args.repeats)
        path = result_path(args.out, card, args.tiny, "block-host")
        path.write_text(json.dumps(dict(date=path.name[:10], card=card, torch=torch.__version__, rows=rows, command=(
            "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]))), indent=1) + "\n")
        for r in rows:
            LOG.info(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        LOG.info(f"saved {path}")
        return
    peak = matmul_tflops(device, 256 if args.tiny else 8192)
    rows = block_rows(config, args.classes, device, args.repeats, compile_block=not args.no_compile and not args.tiny)
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    tokens = 72 if args.tiny else (WINDOW // 16) ** 2 + SD3_TEXT_TOKENS
    precision = attention_precision(device, 10, heads, tokens, head_dim)
    segmenter_agreement = segmenter_attention_agreement(device, args.tiny)
    profiles: dict | None = {} if args.profile else None
    rows += model_rows(device, args.repeats, args.tiny, profiles)
    numel = 2_028_328_000 if not args.tiny else 1_600_000  # SD3-medium's transformer + SegFormer-B5 (adapted)
    rows.append(optimizer_row(numel, device, args.repeats))
    path = result_path(args.out, card, args.tiny, "layers")
    report = dict(date=path.name[:10], card=card, torch=torch.__version__, matmul_bf16_tflops=peak, rows=rows,
                  attention_relative_error_vs_float32_math_at_10_classes=precision,
                  segformer_gradients_vs_float32_math=segmenter_agreement,
                  **({"top_kernels": profiles} if profiles else {}),
                  command="python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]))
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{card}: bf16 matmul {peak:.0f} TFLOP/s\n")
    print(markdown(rows, peak))
    print("\nattention in bf16 vs float32 math, relative L2 error at 10 classes (out, dq, dk, dv):")
    for backend, errors in precision.items():
        print(f"  {backend}: " + (", ".join(f"{v:.2e}" for v in errors.values()) if isinstance(errors, dict) else errors))
    print("\nSegFormer-B5's gradients under autocast vs float32 math, relative L2 error (all, median tensor):")
    for order, errors in segmenter_agreement.items():
        print(f"  {order}: " + ", ".join(f"{v:.2e}" for v in errors.values()))
    for r in rows:
        if "latent_relative_to_default" in r:
            print(f"\n{r['layer']}: latent relative to the default layout's {r['latent_relative_to_default']:.2e}")
    for name, kernels in (profiles or {}).items():
        print(f"\n{name}, top kernels by total time (ms, calls):")
        for k in kernels:
            print(f"  {k['ms']:8.2f} {k['calls']:5d}  {k['name']}")
    LOG.info(f"\nsaved {path}")


if __name__ == "__main__":
    main()
