#!/usr/bin/env python
"""The frozen VAE encoder of the DUSA step, one 512 x 512 window, as the step runs it and in candidate forms.

    python bench/vae_encoder.py --out bench/results       # on one GPU: about a minute
    python bench/vae_encoder.py --tiny --out /tmp/vae     # dry run on the CPU, tiny widths (dynamo's eager backend)

The step encodes each window once (no grad) under bf16 autocast, with the encoder's Linear/Conv weights stored
in bf16 (`cast_frozen_layers`) and its group norms in float32 (autocast's rule). Rows: that form, one window
per call (the step's); two windows in one call; and torch.compile (inductor, eager's bf16 roundings kept) of
one window. Each row has the median device milliseconds per window and the latent's relative L2 distance from
float32 math (float32 weights, no autocast, no TF32); the compiled row also its first call (the compile) and
its distance from the eager form's latent. Writes <out>/<date>-<card>-vae-encoder.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# This folder off the import path (bench/bench.py would shadow the `bench` package).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.layer_throughput import device_and_config, result_path, vae_config  # noqa: E402
from pipeline.dusa.layers import inductor_options  # noqa: E402
from pipeline.dusa.low_precision import cast_frozen_layers  # noqa: E402
from pipeline.run.log import LOG  # noqa: E402


def device_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` (device time between CUDA events; host clock on a CPU), after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    from diffusers import AutoencoderKL

    from models.sd3 import LatentEncoder
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <date>-<card>-vae-encoder.json")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (the median is kept)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (a dry run of this script)")
    args = parser.parse_args()
    device, _, card = device_and_config(parser, args.tiny)
    config, side = vae_config(args.tiny), 64 if args.tiny else 512
    torch.manual_seed(0)
    reference = LatentEncoder(AutoencoderKL(**config)).to(device)
    step_form = LatentEncoder(AutoencoderKL(**config)).to(device)
    step_form.load_state_dict(reference.state_dict())
    cast_frozen_layers([step_form])
    # Two windows of a smooth random picture in [0, 1] (what the step crops from an image).
    pictures = torch.sigmoid(3 * F.interpolate(torch.randn(2, 3, side // 16, side // 16), size=(side, side),
                                               mode="bicubic", align_corners=False)).to(device)
    one, two = pictures[:1], pictures

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, cache_enabled=False)

    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        exact = reference(two)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32

    rows = []
    with torch.no_grad(), autocast():
        eager = step_form(one)
        rows.append(dict(form="eager, one window per call (the step's)", ms_per_window=device_ms(
            lambda: step_form(one), device, args.repeats), latent_vs_float32=relative(eager, exact[:1])))
        both = step_form(two)
        rows.append(dict(form="eager, two windows per call", ms_per_window=device_ms(
            lambda: step_form(two), device, args.repeats) / 2, latent_vs_float32=relative(both, exact),
            latent_vs_one_per_call=relative(both[:1], eager)))
    # (the dry run compiles with dynamo's eager backend: through torch.compile, without inductor's C++ build)
    backend = "eager" if args.tiny else "inductor"
    compiled = torch.compile(step_form, dynamic=False, backend=backend, **inductor_options(backend))
    try:
        with torch.no_grad(), autocast():
            t0 = time.perf_counter()
            latent = compiled(one)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            rows.append(dict(form=f"compiled ({backend}), one window per call", first_call_s=first,
                             ms_per_window=device_ms(lambda: compiled(one), device, args.repeats),
                             latent_vs_float32=relative(latent, exact[:1]), latent_vs_eager=relative(latent, eager)))
    except Exception as exc:  # noqa: BLE001  (a node without a compiler: the row says why)
        rows.append(dict(form=f"compiled ({backend}), one window per call", error=f"{type(exc).__name__}: {exc}"[:300]))
    path = result_path(args.out, card, args.tiny, "vae-encoder")
    report = dict(date=path.name[:10], card=card, torch=torch.__version__, window=f"1 x 3 x {side} x {side}",
                  rows=rows, command="python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]))
    path.write_text(json.dumps(report, indent=1) + "\n")
    for r in rows:
        LOG.info(f"{r['form']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in r.items() if k != "form"))
    LOG.info(f"saved {path}")


if __name__ == "__main__":
    main()
