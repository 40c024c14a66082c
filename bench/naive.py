"""(c) of the step benchmark: the old design (the blocks split over 2 GPUs, one busy at a time)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import (peak_memory_gib, say, sync, synthetic_image, window_size)

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
