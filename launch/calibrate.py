#!/usr/bin/env python
"""Measure this GPU's per-layer cost table, which the stage planner reads (pipeline/dusa/partition.py).

    python launch/calibrate.py --out runs/calibrate                          # SD3-medium + SegFormer-B5
    python launch/calibrate.py --out runs/calibrate --generator sd3.5-large
    python launch/calibrate.py --out runs/calibrate --deepspeed ds_configs/ds_tta_bf16.json

One process on one GPU holds every layer (random weights of the published architectures, built in
<out>/checkpoints; the costs depend on the shapes, not the values): a few steps of the engine users run,
then each layer's forward and backward seconds per window micro-batch at each class count, its activation
and state memory, and SegFormer's forward and backward. Writes <out>/<card>-<generator>-<segmenter>-
<precision>.json. Copy it into pipeline/dusa/costs/ to make it the planner's table for this card and these
models, or pass it to a run with --pipeline.cost_table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# One build folder of DeepSpeed's extensions per environment (see launch/tta.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from pipeline.run.log import LOG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = ("sd3-medium", "sd3.5-large")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/calibrate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the table and the random checkpoints")
    parser.add_argument("--generator", choices=GENERATORS, default="sd3-medium", help="the SD3 architecture")
    parser.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "ds_tta.json"),
                        help="DeepSpeed JSON of the runs the table is for (its precision preset is in the table)")
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 5, 10, 20],
                        help="candidate classes per window to measure at (the planner interpolates between them)")
    parser.add_argument("--warmup", type=int, default=3, help="engine steps before measuring (graphs, allocator)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and windows of 128 (a dry run on a CPU)")
    parser.add_argument("--verbose", action="store_true", help="also show what DeepSpeed and the model libraries print")
    return parser


def checkpoints(folder: Path, generator: str, tiny: bool) -> dict[str, str]:
    """Random checkpoints of the published architectures (or tiny ones of the same kinds) in `folder`."""
    from data.classes import ADE20K_CLASSES
    if tiny:
        from models.tiny import ensure_demo_models
        paths = {"segmenter": str(folder / "segformer-tiny"), "generator": str(folder / "sd3-tiny"),
                 "class_embeddings": str(folder / "classes-tiny.safetensors")}
        ensure_demo_models(paths["segmenter"], paths["generator"], paths["class_embeddings"], ADE20K_CLASSES)
        return paths
    import torch
    from models.architectures import make_random_checkpoints
    return make_random_checkpoints(folder, ADE20K_CLASSES, device="cuda" if torch.cuda.is_available() else "cpu",
                                   generator=generator)


def calibrate(args: argparse.Namespace) -> Path:
    import deepspeed
    import torch
    from transformers import SegformerConfig

    from data.classes import ADE20K_CLASSES
    from models.sd3 import TransformerParts
    from pipeline.dusa.calibration import (IMAGE_SIZE, cost_table, cost_table_name, measure_layer_costs,
                                           smooth_random_image, sync)
    from pipeline.dusa.deepspeed_seam import wrap_instructions
    from pipeline.dusa.engine import TTAEngine, load_ds_config, precision_of
    from pipeline.dusa.module import build_pipeline
    from pipeline.dusa.partition import model_signature
    from pipeline.dusa.windows import window_boxes
    from pipeline.methods.dusa import Dusa, DusaOptions
    from pipeline.run.config import DataConfig, ModelConfig, PipelineConfig, RunConfig, TTAConfig
    from pipeline.run.folder import free_local_port

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(out / "checkpoints", args.generator, args.tiny)
    if "RANK" not in os.environ:  # one process, as `deepspeed --num_gpus 1` would start it
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_local_port()))
    deepspeed.init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    size, stride = (128, 64) if args.tiny else (512, 256)
    data = DataConfig(window_size=size, window_stride=stride)
    dusa = DusaOptions(min_classes=args.classes[0], max_classes=args.classes[0])
    ds = load_ds_config(args.deepspeed, lr=1e-5)
    precision = precision_of(ds)
    # One stage holds every layer. Layers are timed one by one, each several times in a row and its backward
    # with retain_graph: the joint blocks' CUDA graphs (a window's chain, in order) and compiled blocks
    # (their backward frees its buffers) cannot be timed so; the table holds the eager blocks' costs.
    pipe = PipelineConfig(num_stages=1, transformer_graphs=0, compile_blocks=False)
    module = build_pipeline(ModelConfig(**paths), data, dusa, pipe, ADE20K_CLASSES, stage_report=LOG.debug,
                            dtype=torch.bfloat16 if precision == "bf16" else torch.float32, precision=precision)
    engine = TTAEngine(module, ds, TTAConfig(), dusa)
    optimizer_s: list[float] = []

    def timed_step(step):
        def instruction(*a, **k):
            sync()
            t0 = time.perf_counter()
            result = step(*a, **k)
            sync()
            optimizer_s.append(time.perf_counter() - t0)
            return result
        return instruction
    wrap_instructions(engine.engine, {"OptimizerStep": timed_step})
    image = smooth_random_image(*((128, 171) if args.tiny else IMAGE_SIZE))
    corners = window_boxes(image.shape[-2], image.shape[-1], size, stride)
    method = Dusa(engine, RunConfig(data=data, dusa=dusa), ADE20K_CLASSES)
    for i in range(args.warmup + 2):  # the users' step, the optimizer timed in the last two
        method.step("calibrate", {"image": image, "name": f"image{i}", "corners": corners})
    latent = (16, size // 8, size // 8)
    costs = measure_layer_costs(engine, image, corners, latent, args.classes, statistics.median(optimizer_s[-2:]))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    signature = model_signature(dict(TransformerParts(paths["generator"]).config),
                                SegformerConfig.from_pretrained(paths["segmenter"]).to_dict(), size, precision)
    table = cost_table(costs, card, signature, tuple(image.shape[-2:]),
                       "launch/calibrate.py (one stage, random weights, medians of 5)")
    path = out / cost_table_name(card, Path(paths["generator"]).name, Path(paths["segmenter"]).name, precision)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    bad = next((c for c in args.classes if c < 1), None)
    if bad is not None or args.warmup < 0:
        LOG.error(f"error: --classes must be >= 1 and --warmup >= 0 (got {bad if bad is not None else args.warmup})")
        return 2
    if not Path(args.deepspeed).is_file():
        LOG.error(f"error: --deepspeed {args.deepspeed} does not exist")
        return 2
    if not args.verbose:
        from launch.tta import quiet_libraries
        quiet_libraries()
    path = calibrate(args)
    LOG.info(f"cost table: {path}\ncopy it into pipeline/dusa/costs/ to make it the planner's table for this card "
             f"and these models, or pass it to a run with --pipeline.cost_table {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
