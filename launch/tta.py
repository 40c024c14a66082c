#!/usr/bin/env python
"""DUSA test-time adaptation of SegFormer with SD3 on ADE20K-C, through a DeepSpeed pipeline.

    deepspeed --num_gpus 2 launch/tta.py --config ds_configs/tta.json
    deepspeed --num_gpus 2 launch/tta.py --config ds_configs/demo.json --tta.lr 5e-6
    python launch/tta.py --print_config
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402

from pipeline.config import (DataConfig, LoggingConfig, ModelConfig, PipelineConfig, RunConfig,  # noqa: E402
                             TTAConfig)

GROUPS = {"model": ModelConfig, "data": DataConfig, "tta": TTAConfig, "pipeline": PipelineConfig,
          "logging": LoggingConfig}


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="launch/tta.py", description=__doc__.split("\n\n")[0], env_prefix="DUSA",
                            default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A JSON/YAML file of these arguments.")
    for name, cls in GROUPS.items():
        parser.add_class_arguments(cls, name)
    defaults = RunConfig()
    parser.add_argument("--deepspeed", type=Union[str, dict], default=defaults.deepspeed,
                        help="DeepSpeed engine JSON: a path or an inline dict (bf16, zero_optimization, "
                             "optimizer without lr, gradient_clipping, steps_per_print, ...).")
    parser.add_argument("--output_dir", type=str, default=defaults.output_dir,
                        help="Where results.json, the effective config and W&B offline files go.")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="Seeds noise, timesteps and candidate sampling per image.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    return parser


def parse(argv=None) -> tuple[RunConfig, dict]:
    parser = make_parser()
    ns = parser.parse_args(argv)
    objects = parser.instantiate(ns)
    cfg = RunConfig(**{name: objects[name] for name in GROUPS}, deepspeed=ns.deepspeed,
                    output_dir=ns.output_dir, seed=ns.seed)
    return cfg, asdict(cfg)


def main(argv=None) -> int:
    cfg, record = parse(argv)

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from data.classes import ADE20K_CLASSES
    from data.demo import make_demo_dataset
    from models.segformer import Segmenter
    from models.tiny import ensure_demo_models
    from pipeline.engine import TTAEngine, load_ds_config
    from pipeline.module import build_pipeline
    from pipeline.reporting import RunLogger
    from pipeline.tta import TTARunner

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    tta_mode = cfg.tta.forward_mode == "tta"
    if tta_mode and world != cfg.pipeline.num_stages:
        raise ValueError(f"pipeline.num_stages={cfg.pipeline.num_stages} but {world} processes were started: "
                         f"run `deepspeed --num_gpus {cfg.pipeline.num_stages} launch/tta.py ...` "
                         f"or set --pipeline.num_stages {world}")
    if tta_mode and not (cfg.tta.update_segmenter or cfg.tta.update_generator):
        raise ValueError("tta.update_segmenter and tta.update_generator are both false: nothing adapts "
                         "(use --tta.forward_mode discriminative_only for the source model)")
    class_names = ADE20K_CLASSES
    ds_config = load_ds_config(cfg.deepspeed, cfg.tta.lr)
    record["deepspeed"] = ds_config
    if rank == 0:
        if cfg.data.build_demo_data:
            make_demo_dataset(cfg.data.root, corruptions=tuple(cfg.data.corruptions), severity=cfg.data.severity)
        if cfg.model.build_demo_models:
            ensure_demo_models(cfg.model.segmenter, cfg.model.generator, cfg.model.class_embeddings, class_names)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(record, indent=2))
    dist.barrier()
    device = torch.device(get_accelerator().current_device_name())

    engine = segmenter = None
    stage, num_stages = 0, 1
    if tta_mode:
        bf16 = ds_config.get("bf16", {}).get("enabled", False)
        module = build_pipeline(cfg.model, cfg.data, cfg.tta, cfg.pipeline, class_names,
                                stage_report=print if rank == 0 else (lambda _: None),
                                dtype=torch.bfloat16 if bf16 else torch.float32)
        engine = TTAEngine(module, ds_config, cfg.tta)
        stage, num_stages = engine.engine.stage_id, engine.engine.num_stages
        if stage == 0 and module.front.segmenter.num_classes != len(class_names):
            raise ValueError(f"segmenter {cfg.model.segmenter} predicts {module.front.segmenter.num_classes} "
                             f"classes, ADE20K has {len(class_names)}")
    elif rank == 0:  # the source model needs no generator and no pipeline
        segmenter = Segmenter.from_pretrained(cfg.model.segmenter).eval().to(device)
        if ds_config.get("bf16", {}).get("enabled", False):
            segmenter = segmenter.to(torch.bfloat16)
    else:
        print(f"rank {rank}: nothing to do in forward_mode=discriminative_only")
        return 0

    logger = RunLogger(cfg.logging, cfg.output_dir, record, class_names) if rank == 0 else None
    TTARunner(cfg, class_names, device, engine=engine, segmenter=segmenter, stage=stage,
              num_stages=num_stages, logger=logger, config_record=record).run()
    if rank == 0:
        print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
