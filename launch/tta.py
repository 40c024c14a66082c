#!/usr/bin/env python
"""Test-time adaptation of SegFormer on ADE20K-C: DUSA (SD3 feedback through a DeepSpeed pipeline), Tent or none.

    deepspeed --num_gpus 2 launch/tta.py --config ds_configs/tta.json
    deepspeed --num_gpus 2 launch/tta.py --config ds_configs/demo.json --tta.lr 5e-6
    deepspeed --num_gpus 1 launch/tta.py --config ds_configs/tta.json --tta.method tent
    python launch/tta.py --print_config
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings  # noqa: E402

from pipeline.config import (DataConfig, LoggingConfig, ModelConfig, PipelineConfig, RunConfig,  # noqa: E402
                             TTAConfig)

GROUPS = {"model": ModelConfig, "data": DataConfig, "tta": TTAConfig, "pipeline": PipelineConfig,
          "logging": LoggingConfig}


def make_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the config fields' docstrings are the help
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
                        help="Where results.json/.csv, the effective config, pictures and W&B offline files go.")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="Seeds noise, timesteps and candidate sampling per image.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    return parser


def parse(argv=None) -> tuple[RunConfig, dict, list[str]]:
    """(config, its JSON record, the config files given with --config)."""
    parser = make_parser()
    ns = parser.parse_args(argv)
    objects = parser.instantiate(ns)
    cfg = RunConfig(**{name: objects[name] for name in GROUPS}, deepspeed=ns.deepspeed,
                    output_dir=ns.output_dir, seed=ns.seed)
    return cfg, asdict(cfg), [str(path) for path in ns.get("config") or []]


def parameter_counts(module, part: str) -> tuple[str, int, int]:
    """(part, trainable, total) parameters of a module on this rank."""
    params = list(module.parameters())
    return part, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# Failures a user can fix (bad paths, data, config values, numerics): one line, exit code 2.
USER_ERRORS = (FileNotFoundError, ValueError, OSError, FloatingPointError, NotImplementedError)
OOM_HELP = ("out of GPU memory: lower --tta.max_classes (the transformer batch per window), set "
            "--pipeline.activation_checkpoint_interval 1, or spread the model over more GPUs "
            "(--pipeline.num_stages with deepspeed --num_gpus)")


def main(argv=None) -> int:
    try:
        return run(argv)
    except Exception as exc:  # noqa: BLE001 - sorted below: only user-facing failures are shortened
        import torch
        oom = isinstance(exc, torch.OutOfMemoryError)
        if not (oom or isinstance(exc, USER_ERRORS)) or os.environ.get("DUSA_TRACEBACK"):
            raise
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        rank = int(os.environ.get("RANK", "0"))
        if rank:  # rank 0 mostly fails alike: give the launcher time to stop this process first
            time.sleep(3)
        # Leading newline: a progress bar may hold the current line.
        print(f"\nerror: {f'[rank {rank}] ' if rank else ''}{OOM_HELP if oom else lines[0]}"
              f"{' (DUSA_TRACEBACK=1 shows the traceback)' if not oom else ''}", file=sys.stderr, flush=True)
        release_cpu_shared_memory()
        os._exit(2)  # no atexit / process-group teardown: it can wait forever on peers that are gone


def release_cpu_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce keeps a 69 MB buffer per rank in /dev/shm (RAM) after exit: drop ours.
    (Peers that still map it keep their mapping; the name goes.)"""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '0')}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def run(argv=None) -> int:
    cfg, record, config_files = parse(argv)

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from data.classes import ADE20K_CLASSES
    from data.demo import make_demo_dataset
    from models.segformer import Segmenter
    from models.tiny import ensure_demo_models, make_tiny_segformer
    from pipeline.engine import TTAEngine, load_ds_config
    from pipeline.module import build_pipeline
    from pipeline.reporting import RunLogger, startup_summary
    from pipeline.tent import Tent
    from pipeline.tta import TTARunner, finished_tasks, open_tasks

    if "RANK" not in os.environ:  # started without a launcher: one process, like `deepspeed --num_gpus 1`
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    if torch.cuda.is_available():  # this rank's GPU before anything touches CUDA
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if get_accelerator().device_name() == "cpu":
        import atexit
        atexit.register(release_cpu_shared_memory)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    method = cfg.tta.method
    if cfg.logging.image_every < 0:
        raise ValueError(f"logging.image_every={cfg.logging.image_every}: use 0 for no pictures or N > 0")
    if method == "dusa" and world != cfg.pipeline.num_stages:
        raise ValueError(f"pipeline.num_stages={cfg.pipeline.num_stages} but {world} processes were started: "
                         f"run `deepspeed --num_gpus {cfg.pipeline.num_stages} launch/tta.py ...` "
                         f"or set --pipeline.num_stages {world}")
    if method == "dusa" and not (cfg.tta.update_segmenter or cfg.tta.update_generator):
        raise ValueError("tta.update_segmenter and tta.update_generator are both false: nothing adapts "
                         "(use --tta.method source for the unadapted model)")
    if method == "dusa" and cfg.tta.learnable_embedding and not cfg.tta.update_generator:
        raise ValueError("tta.learnable_embedding adapts with the generator: it needs tta.update_generator true")
    class_names = ADE20K_CLASSES
    if any(not 0 <= c < len(class_names) for c in cfg.tta.ignore_classes):
        raise ValueError(f"tta.ignore_classes {cfg.tta.ignore_classes} must be class ids in 0..{len(class_names) - 1}")
    ds_config = load_ds_config(cfg.deepspeed, cfg.tta.lr)
    # Bad data or a clashing output folder fail now, before any model loads.
    datasets = None if cfg.data.build_demo_data else open_tasks(cfg.data)
    record["deepspeed"] = ds_config
    finished_tasks(cfg, record, ADE20K_CLASSES)
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    autocast = ds_config.get("torch_autocast", {}).get("enabled", False)  # float32 weights, bf16 compute
    if rank == 0:
        if cfg.data.build_demo_data:
            make_demo_dataset(cfg.data.root, corruptions=tuple(cfg.data.corruptions), severity=cfg.data.severity)
        if cfg.model.build_demo_models and method == "dusa":
            ensure_demo_models(cfg.model.segmenter, cfg.model.generator, cfg.model.class_embeddings, class_names)
        elif cfg.model.build_demo_models and not (Path(cfg.model.segmenter) / "config.json").is_file():
            make_tiny_segformer(cfg.model.segmenter, class_names)  # source and tent need no generator
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(record, indent=2))
    dist.barrier()
    if datasets is None:  # the demo data exists only now
        datasets = open_tasks(cfg.data)
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    visible = f"{accelerator.device_count()} x {accelerator.device_name()} visible"

    engine = tent = segmenter = None
    stage, num_stages = 0, 1
    if method == "dusa":
        module = build_pipeline(cfg.model, cfg.data, cfg.tta, cfg.pipeline, class_names,
                                stage_report=print if rank == 0 else (lambda _: None),
                                dtype=torch.bfloat16 if bf16 else torch.float32)
        engine = TTAEngine(module, ds_config, cfg.tta, adaptive_windows=cfg.data.windows == "adaptive")
        stage, num_stages = engine.engine.stage_id, engine.engine.num_stages
        checked = module.front.segmenter if stage == 0 else None
        counts: list = [None] * world
        dist.all_gather_object(counts, (stage, parameter_counts(module, f"stage {stage}")))
        parameters = [c for _, c in sorted(counts)]
        processes = f"{world} ({num_stages} pipeline stages), {visible}"
    elif rank == 0:  # source and tent: the segmenter alone, on rank 0, no generator and no pipeline
        checked = Segmenter.from_pretrained(cfg.model.segmenter).eval().to(device)
        if method == "tent":  # fp32 weights for Adam; bf16 compute by autocast
            tent = Tent(checked, cfg.tta.segmenter_lr, torch.bfloat16 if bf16 or autocast else None,
                        cfg.tta.accumulation_steps)
        else:
            segmenter = (checked.to(torch.bfloat16) if bf16 else checked).requires_grad_(False)
        parameters = [parameter_counts(checked, "segmenter")]
        processes = f"{world} (rank 0 runs {method}, the others exit), {visible}"
    else:
        print(f"rank {rank}: nothing to do for tta.method={method} (it runs on rank 0 alone)")
        return 0
    if checked is not None and checked.num_classes != len(class_names):
        raise ValueError(f"segmenter {cfg.model.segmenter} predicts {checked.num_classes} "
                         f"classes, ADE20K has {len(class_names)}")

    logger = RunLogger(cfg.logging, cfg.output_dir, record, class_names) if rank == 0 else None
    runner = TTARunner(cfg, class_names, device, engine=engine, tent=tent, segmenter=segmenter, stage=stage,
                       num_stages=num_stages, logger=logger, config_record=record,
                       datasets=datasets)
    if rank == 0:
        print(startup_summary(cfg, config_files, processes, parameters, runner.total_images), flush=True)
    runner.run()
    if rank == 0:
        print(f"results: {Path(cfg.output_dir) / 'results.json'} (and .csv); config: "
              f"{Path(cfg.output_dir) / 'config.json'}")
    if method == "dusa":  # every stage leaves together: one that tears down its communication threads while
        dist.barrier()   # another still finishes (results, W&B) can abort the process at exit
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
