#!/usr/bin/env python
"""Which SDPA backend SD3's joint blocks run with, and whether each path's gradients are right.

    python bench/attention_backends.py --out bench/results     # on one GPU: about a minute
    python bench/attention_backends.py --tiny --out /tmp/ab    # dry run on the CPU, tiny widths

With `pipeline.attention_backend default` the blocks take torch's own order, which differs between torch
versions and cards. This reports torch's choice for the blocks' query/key/value at 2 and 10 classes, then runs
SD3-medium's two block forms (a middle block and the last, text-stream-free one; random weights, 2 classes,
the last block's backward first as in the step) eager and compiled (the step's JointBlock, as
pipeline.compile_blocks compiles it: inductor, the class count dynamic), under torch's order, flash and cuDNN,
all in one process: cuDNN's backward has been seen to return wrong input gradients when one process hands it
the output's gradient in two memory layouts for the same shapes. Each path's input and parameter gradients are
compared with float32 math attention and float32 weights (relative L2 error), with the attention kernels it
launched. Writes <out>/<date>-<card>-attention-backends.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where bench/bench.py would stand in for the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from bench.layer_throughput import device_and_config, result_path  # noqa: E402
from models.architectures import SD3_TEXT_TOKENS  # noqa: E402
from pipeline.dusa.layers import JointBlock  # noqa: E402

LATENT_TOKENS = (512 // 8 // 2) ** 2  # a 512-pixel window's latent, in 2 x 2 patches


def sdp_choices(device: torch.device, heads: int, head_dim: int, tokens: int) -> dict:
    """torch's own backend choice for bf16 query/key/value that need gradients, at 2 and 10 classes, laid out as
    diffusers' attention makes them (a head view of [n, tokens, heads x dim]) and contiguous."""
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    out = {}
    for n in (2, 10):
        for layout in ("BSHD memory (diffusers)", "BHSD contiguous"):
            def make():
                if layout.startswith("BSHD"):
                    x = torch.randn(n, tokens, heads, head_dim, device=device, dtype=torch.bfloat16)
                    return x.requires_grad_().transpose(1, 2)
                return torch.randn(n, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            out[f"sdp choice, {n} classes, {layout}"] = names.get(int(torch._fused_sdp_choice(make(), make(), make())))
    return out


def block_gradients(config: dict, device: torch.device, compile_blocks: bool, n: int = 2) -> dict:
    """Each path's gradient errors against float32 math, per block form, and its attention kernels."""
    from diffusers import SD3Transformer2DModel
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dict(config, num_layers=2)).to(device)
    blocks = list(model.transformer_blocks)[::-1]  # the last block's backward first, as in the step
    width = config["num_attention_heads"] * config["attention_head_dim"]
    latent = LATENT_TOKENS if device.type == "cuda" else (config["sample_size"] // 2) ** 2
    text = SD3_TEXT_TOKENS if device.type == "cuda" else 8
    g = torch.Generator(device=device).manual_seed(1)
    inputs = (torch.randn(n, latent, width, device=device, generator=g),
              torch.randn(n, text, width, device=device, generator=g), torch.randn(n, width, device=device, generator=g))

    def run(layers, autocast: bool):
        grads = []
        for layer, block in zip(layers, blocks):
            h, e, t = (x.clone().requires_grad_() for x in inputs)
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):  # as JointBlock.forward runs it
                context, hidden = layer.run(hidden_states=h, encoder_hidden_states=e, temb=t)
            out = hidden.flatten() if context is None else torch.cat([context.flatten(), hidden.flatten()])
            weight = torch.linspace(-1, 1, out.numel(), device=device)
            grads.append(torch.autograd.grad((out.float() * weight).sum(), [h, e, t, *block.parameters()],
                                             allow_unused=True))
        return grads

    def layers(order, compiled=False):  # the step's JointBlock, compiled as pipeline.compile_blocks compiles it
        return [JointBlock(b, compile_backend="inductor" if compiled else None, attention=order) for b in blocks]

    flash, cudnn, math = ([getattr(SDPBackend, n)] for n in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"))
    variants = {"eager, torch's order": layers(None), "eager, flash": layers(flash)}
    if compile_blocks:
        variants = {"compiled, torch's order": layers(None, True), **variants, "compiled, flash": layers(flash, True)}
    if device.type == "cuda":
        variants["eager, cudnn"] = layers(cudnn)
    reference = run(layers(math), False)
    out = {}
    for name, path in variants.items():
        rows = []
        for form, got, ref in zip(("last block", "middle block"), run(path, True), reference):
            errors = [float((a.float() - b).norm() / b.norm()) for a, b in zip(got, ref)
                      if a is not None and b.norm() > 0]
            params = sorted(errors[3:])
            rows.append({"form": form, "inputs h,e,t": [round(x, 4) for x in errors[:3]],
                         "params median": round(params[len(params) // 2], 4), "params max": round(params[-1], 4)})
        with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
            run(path, True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        kernels = sorted({e.name[:70] for e in prof.events()
                          if any(k in e.name.lower() for k in ("sdpa", "flash", "fmha", "attention"))})
        out[name] = {"vs float32 math (relative)": rows, "attention kernels": kernels}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for <date>-<card>-attention-backends.json")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (a dry run of this script)")
    parser.add_argument("--no_compile", action="store_true", help="leave out the compiled blocks")
    args = parser.parse_args()
    device, config, card = device_and_config(parser, args.tiny)
    path = result_path(args.out, card, args.tiny, "attention-backends")
    report = {"date": path.name[:10], "card": card, "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        report.update(sdp_choices(device, config["num_attention_heads"], config["attention_head_dim"],
                                  LATENT_TOKENS + SD3_TEXT_TOKENS))
    report["blocks"] = block_gradients(config, device, compile_blocks=not args.no_compile)
    report["command"] = "python " + " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
