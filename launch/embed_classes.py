#!/usr/bin/env python
"""Builds the class-embedding cache: SD3's three text encoders run once over one prompt per class.

    python launch/embed_classes.py --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --out class_embeddings/sd3-medium-ade20k.safetensors [--dataset ade20k|cityscapes|acdc] [--classes FILE] \\
        [--template "a photo of a {}"] \\
        [--max_sequence_length 256] [--device cuda|cpu] [--dtype fp16|bf16|fp32] [--batch_size 16]

The builder itself is `models.class_embeddings.write_class_embeddings` (row c of the cache equals SD3's
`encode_prompt` for the prompt of class c; the three encoders load one at a time).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from models.class_embeddings import (DEFAULT_TEMPLATE, EmbedError, check_output_file,  # noqa: E402
                                     make_prompts, read_class_list, read_custom_prompts, write_class_embeddings)
from pipeline.run.log import LOG  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/embed_classes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A diffusers SD3 folder or hub id (text encoders are read).")
    parser.add_argument("--out", required=True, help="The cache file to write (.safetensors).")
    parser.add_argument("--dataset", default="ade20k", choices=["ade20k", "cityscapes", "acdc"],
                        help="Whose class list (default ade20k: its 150 classes; cityscapes and acdc: the 19 "
                             "Cityscapes train ids), unless --classes gives a file.")
    parser.add_argument("--classes", default=None,
                        help="A file of class names, one a line (#-comment and blank lines skipped); "
                             "default: the classes of --dataset.")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="The prompt; {} is replaced by the class name.")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="JSON or YAML mapping class name -> full prompt, used verbatim for those classes "
                             "(the others use --template); recorded in the cache.")
    parser.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens (SD3 trains with 256).")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="Encoder dtype (default fp16: the reference encodes its prompts in fp16). The cache is "
                             "stored in it and records it.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per encoder call.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise EmbedError(f"--device {args.device!r} is not a torch device (cuda, cuda:1, cpu)") from None
        dtype = DTYPES[args.dtype]
        if args.max_sequence_length < 1 or args.batch_size < 1:
            raise EmbedError("--max_sequence_length and --batch_size must be positive")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EmbedError("--device cuda but no CUDA device is visible (use --device cpu)")
        if args.classes is None:
            from data.classes import load_class_names
            from data.datasets import DATASETS

            classes = list(load_class_names(DATASETS[args.dataset].class_list))
        else:
            classes = read_class_list(args.classes)
        check_output_file(args.out)
        custom = read_custom_prompts(args.prompts) if args.prompts else {}
        make_prompts(args.template, classes, custom)  # fail on the prompts before loading anything
        out = write_class_embeddings(args.out, args.model, classes, args.template, args.max_sequence_length,
                                     device, dtype, args.batch_size, custom=custom)
    except EmbedError as e:
        LOG.error(f"error: {e}")
        return 2
    except OSError as e:  # writing the cache (a full disk, a read-only folder)
        LOG.error(f"error: cannot write {args.out}: {e.strerror or e}")
        return 2

    with safe_open(str(out), framework="pt") as f:  # shapes from the header: no tensor is read back
        prompt, pooled = (f.get_slice(key).get_shape() for key in ("prompt_embeds", "pooled"))
    size_mb = out.stat().st_size / 2**20
    LOG.info(f"wrote {out}: prompt_embeds {tuple(prompt)}, pooled {tuple(pooled)}, "
             f"{str(dtype).removeprefix('torch.')}, {len(classes)} classes, {size_mb:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
