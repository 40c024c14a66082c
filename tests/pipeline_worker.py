"""Runs TTA steps through the real 2-stage pipeline for tests/test_pipeline.py.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/pipeline_worker.py --assets DIR \
        --jobs '{"grads": ["--mode", "grads"], "reset": ["--mode", "reset", "--preset", "ds_configs/ds_tta.json"]}'

The jobs run one after another in the same processes (one launcher start for all of them), each on a pipeline
built afresh from the files. Each rank writes DIR/<job>-rank<r>.pt with what the test checks.
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pipeline.dusa.deepspeed_seam import wrap_instructions  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from pipeline.dusa.block_graphs import EagerRecorder  # noqa: E402
from pipeline.dusa.engine import TTAEngine, load_ds_config  # noqa: E402
from pipeline.dusa.layers import SD3Head, chain_joint_blocks  # noqa: E402
from pipeline.dusa.module import build_pipeline  # noqa: E402
from pipeline.run.log import LOG  # noqa: E402
from pipeline.dusa.windows import draw_windows  # noqa: E402
from tests.tiny_setup import (ACCUMULATE_LR, ACCUMULATION, ACCUMULATION_IMAGES, ADAPTIVE_TEST_RULE, CLASSES,  # noqa: E402
                              SHARP_SEGFORMER, WINDOW, WINDOW_TAU, fixed_windows, run_configs)


class GradRecorder(torch.optim.SGD):
    """lr 0: records the gradients DeepSpeed hands to the optimizer, changes nothing."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.recorded: dict[int, torch.Tensor] = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.recorded[id(p)] = p.grad.detach().clone()
        return super().step(closure)


def job_parser() -> argparse.ArgumentParser:
    """One job's arguments."""
    parser = argparse.ArgumentParser(prog="job")
    parser.add_argument("--mode", choices=["grads", "bf16grads", "reset", "wiring", "nan", "lrs", "options",
                                           "accumulate"], required=True)
    parser.add_argument("--bf16", action="store_true", help="accumulate: bf16 weights, ZeRO 1")
    parser.add_argument("--preset", help="reset, nan: a DeepSpeed JSON of ds_configs/ instead of bf16 ZeRO 1")
    parser.add_argument("--immediate", action="store_true", help="bf16grads: DeepSpeed's immediate_grad_update")
    parser.add_argument("--autocast_casts", action="store_true",
                        help="autocast's own per-window casts instead of the engine's working weights")
    parser.add_argument("--ignore", type=int, nargs="*", default=[], help="dusa.ignore_classes")
    parser.add_argument("--block_graphs", action="store_true",
                        help="grads: the last stage's joint blocks through the graph chain (re-run on the CPU), 2 steps")
    return parser


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="JSON object: job name -> that job's arguments")
    parser.add_argument("--assets", required=True)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    deepspeed.init_distributed()
    for name, job in json.loads(args.jobs).items():
        run_job(name, job_parser().parse_args(job), Path(args.assets), args.stages)


def run_job(name: str, args: argparse.Namespace, assets: Path, stages: int) -> None:
    rank = dist.get_rank()
    model, data, tta, dusa, pipe = run_configs(assets, stages)
    dusa.ignore_classes = args.ignore
    if args.mode == "options":  # entropy-weighted adaptive windows and a learnable pooled embedding
        model.segmenter, data.windows = str(assets / SHARP_SEGFORMER), "adaptive"
        for key, value in ADAPTIVE_TEST_RULE._asdict().items():
            setattr(data, f"adaptive_{key}", value)
        dusa.window_weighting, dusa.window_tau, dusa.learnable_embedding = "entropy", WINDOW_TAU, True
    if args.mode == "accumulate":
        tta.accumulation_steps = ACCUMULATION
    module = build_pipeline(model, data, dusa, pipe, CLASSES, stage_report=LOG.debug)
    out: dict = {}
    chain = None
    if args.block_graphs and any(isinstance(f, SD3Head) for f in module.forward_funcs):
        chain = chain_joint_blocks(module.forward_funcs, 4, len(CLASSES), recorder=EagerRecorder(), capture_after=1)
    forwards = []  # SegFormer forwards actually run on this rank
    if module.front is not None:
        module.front.segmenter.model.register_forward_hook(lambda *_: forwards.append(1))

    if args.mode == "grads":  # float32, or a preset of ds_configs/ (its optimizer replaced by the recorder)
        ds = load_ds_config(str(ROOT / args.preset) if args.preset else
                            {"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}, lr=0.0)
        tte = TTAEngine(module, ds, tta, dusa, optimizer=GradRecorder, working_weights=not args.autocast_casts)
        out["working_weights"] = tte.working is not None
        out["loss"] = float(tte.step(*fixed_windows(assets, seed=0)).loss)
        if args.block_graphs:  # lr 0: the same step again, now replaying what the first step captured
            out["loss"] = float(tte.step(*fixed_windows(assets, seed=0)).loss)
            out["block_graphs"] = None if chain is None else (chain.stats.captures, chain.stats.hits)
        names = {id(p): n for n, p in module.named_parameters()}
        out["grads"] = {names[k]: g for k, g in tte.engine.optimizer.recorded.items()}
        out["trainable"] = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        out["loaded_keys"] = list(module.loaded_keys)

    elif args.mode == "bf16grads":  # the float32 gradients the bf16 optimizer steps with, and its update
        ds = load_ds_config({"bf16": {"enabled": True, "immediate_grad_update": args.immediate},
                             "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}}, lr=1e-3)
        tte = TTAEngine(module, ds, tta, dusa)
        names = [n for n, p in module.named_parameters() if p.requires_grad]

        def recording_step(eng, *a, optimizer_step, **k):
            params = dict(module.named_parameters())
            out["grads"] = {n: safe_get_full_grad(params[n]).float().clone() for n in names}
            before = {n: safe_get_full_fp32_param(params[n]).clone() for n in names}
            result = optimizer_step(eng, *a, **k)
            # Which float32 master weights the step changed (bf16 copies of values near 1 may not move).
            out["moved"] = {n: bool((safe_get_full_fp32_param(params[n]) != before[n]).any()) for n in names}
            return result
        wrap_instructions(tte.engine, {"OptimizerStep": lambda step: functools.partial(recording_step,
                                                                                       optimizer_step=step)})
        out["loss"] = float(tte.step(*fixed_windows(assets, seed=0)).loss)

    elif args.mode == "reset":
        ds = load_ds_config(str(ROOT / args.preset) if args.preset else {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                                            "zero_optimization": {"stage": 1}}, lr=1e-3)
        tte = TTAEngine(module, ds, tta, dusa)

        def masters():  # the float32 weights the optimizer updates (the parameters themselves without bf16)
            flat = getattr(tte.engine.optimizer, "fp32_groups_flat_partition", None)
            return [t.detach().clone() for t in (flat or [p for p in module.parameters() if p.requires_grad])]
        params0 = {n: p.detach().clone() for n, p in module.named_parameters()}
        masters0 = masters()
        first = float(tte.step(*fixed_windows(assets, seed=0)).loss)
        after_first = {n: p.detach().clone() for n, p in module.named_parameters()}
        for seed in (1, 2):  # "task A" goes on with other images
            tte.step(*fixed_windows(assets, seed=seed))
        out["moved_before_reset"] = any(not torch.equal(params0[n], p) for n, p in module.named_parameters())
        tte.reset()
        out["params_equal"] = all(torch.equal(params0[n], p) for n, p in module.named_parameters())
        out["masters_equal"] = all(torch.equal(a, b) for a, b in zip(masters0, masters()))
        out["state_empty"] = len(getattr(tte.engine.optimizer, "optimizer", tte.engine.optimizer).state) == 0
        out["dtype"] = str(next(module.parameters()).dtype)
        # The first step of the next task is the first step of a fresh run, bit for bit.
        again = float(tte.step(*fixed_windows(assets, seed=0)).loss)
        out["first_loss"], out["again_loss"] = first, again
        out["same_update"] = all(torch.equal(after_first[n], p) for n, p in module.named_parameters())

    elif args.mode == "nan":
        ds = load_ds_config(str(ROOT / args.preset) if args.preset else {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                                            "zero_optimization": {"stage": 1}}, lr=1e-3)
        tte = TTAEngine(module, ds, tta, dusa)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        image, draws = fixed_windows(assets, seed=0)
        image[..., :4, :4] = float("nan")  # a corrupt pixel block: SegFormer's logits go NaN
        out["nan_loss"] = float(tte.step(image, draws).loss)
        out["nan_skipped"] = tte.skipped
        out["unchanged"] = all(torch.equal(before[n], p) for n, p in module.named_parameters())
        out["next_loss"] = float(tte.step(*fixed_windows(assets, seed=0)).loss)
        out["next_skipped"] = tte.skipped
        out["moved_after"] = any(not torch.equal(before[n], p) for n, p in module.named_parameters())

    elif args.mode == "options":
        ds = load_ds_config({"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}, lr=0.0)
        tte = TTAEngine(module, ds, tta, dusa, optimizer=GradRecorder, adaptive_windows=True)
        image, _ = fixed_windows(assets, seed=0)
        sampler = functools.partial(draw_windows, latent_shape=(16, WINDOW // 8, WINDOW // 8),
                                    timestep_range=dusa.timestep_range, generator=torch.Generator().manual_seed(0))
        result = tte.step(image, sampler) if module.front is not None else tte.step(None, None)
        out["loss"] = float(result.loss)
        out["windows"] = result.windows
        names = {id(p): n for n, p in module.named_parameters()}
        out["grads"] = {names[k]: g for k, g in tte.engine.optimizer.recorded.items()}
        out["trainable"] = sorted(n for n, p in module.named_parameters() if p.requires_grad)

    elif args.mode == "accumulate":  # SGD (momentum 0.9 by default) from the DeepSpeed JSON, k images per update
        precision = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                     "zero_optimization": {"stage": 1}} if args.bf16 else \
            {"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}
        ds = load_ds_config({**precision, "optimizer": {"type": "SGD", "params": {}}}, lr=ACCUMULATE_LR)
        tte = TTAEngine(module, ds, tta, dusa)

        def masters():  # the float32 weights the optimizer updates (bf16: its master copies)
            return {n: (safe_get_full_fp32_param(p) if args.bf16 else p).detach().float().clone()
                    for n, p in module.named_parameters() if p.requires_grad}
        out["params"], out["losses"] = [masters()], []
        for seed in range(ACCUMULATION_IMAGES):
            out["losses"].append(float(tte.step(*fixed_windows(assets, seed=seed)).loss))
            out["params"].append(masters())
        tte.discard_accumulated()  # the task's end: the last image's gradients never reach the weights
        out["grads_after_discard"] = max(
            (float(safe_get_full_grad(p).abs().max()) for p in module.parameters()
             if p.requires_grad and safe_get_full_grad(p) is not None), default=0.0)
        out["momentum"] = tte.engine.optimizer.param_groups[0]["momentum"]

    elif args.mode == "lrs":  # a learning rate per model: the segmenter's 0 keeps it, the generator moves
        tta.lr_segmenter, dusa.lr_generator = 0.0, 2e-3
        ds = load_ds_config({"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}, lr=1e-3)
        tte = TTAEngine(module, ds, tta, dusa)
        start = {n: p.detach().clone() for n, p in module.named_parameters()}
        for _ in range(3):
            tte.step(*fixed_windows(assets, seed=0))
        moved = {n: (p - start[n]).abs().max().item() for n, p in module.named_parameters() if p.requires_grad}
        out["segmenter_moved"] = max((v for n, v in moved.items() if ".segmenter." in n), default=None)
        out["generator_moved"] = max((v for n, v in moved.items() if ".segmenter." not in n), default=None)
        out["lrs"] = [g["lr"] for g in tte.engine.optimizer.param_groups]

    else:  # wiring
        ds = load_ds_config({"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}, lr=2e-3)
        tte = TTAEngine(module, ds, tta, dusa)
        start = {n: p.detach().clone() for n, p in module.named_parameters()}
        # The same micro-batches every step: one image, fixed noise, timestep and sampling seed.
        out["losses"] = [float(tte.step(*fixed_windows(assets, seed=0)).loss) for _ in range(20)]
        moved = {n: (p - start[n]).abs().max().item() for n, p in module.named_parameters()}
        out["segmenter_moved"] = max((v for n, v in moved.items() if ".segmenter." in n), default=None)
        out["generator_moved"] = max((v for n, v in moved.items() if ".segmenter." not in n
                                      and ".encoder." not in n), default=None)
        out["vae_moved"] = max((v for n, v in moved.items() if ".encoder." in n), default=None)

    out["stage"] = tte.engine.stage_id
    out["segmenter_forwards"] = len(forwards)
    torch.save(out, assets / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main()
