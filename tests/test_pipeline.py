"""The DUSA step through the real 2-stage DeepSpeed pipeline (2 processes, CPU, gloo) against a
single-process computation of README's "The method, exactly", written here with the unsplit model."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from models.class_embeddings import load_class_embeddings
from models.sd3 import LatentEncoder, TransformerParts
from models.segformer import Segmenter
from pipeline.dusa.loss import select_candidates
from tests.helpers import free_port
from pipeline.dusa.windows import draw_windows
from tests.tiny_setup import (ACCUMULATE_LR, ACCUMULATION, ACCUMULATION_IMAGES, ADAPTIVE_TEST_RULE, CLASSES,
                              NUM_BLOCKS, SHARP_SEGFORMER, WINDOW, WINDOW_TAU, fixed_windows, make_assets, run_configs)

ROOT = Path(__file__).resolve().parents[1]
# Starts DeepSpeed launcher processes: minutes on a CPU (`-m 'not slow'` skips them).
pytestmark = pytest.mark.slow


def run_worker(assets: Path, jobs: dict[str, list[str]], stages: int = 2) -> dict[str, list[dict]]:
    """Every job in one launch of `stages` processes: job name -> what each rank recorded."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(stages),
           "--master_port", str(free_port()), str(ROOT / "tests" / "pipeline_worker.py"), "--jobs", json.dumps(jobs),
           "--assets", str(assets), "--stages", str(stages)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: [torch.load(assets / f"{name}-rank{r}.pt") for r in range(stages)] for name in jobs}


AUTOCAST = ["--preset", "ds_configs/ds_tta.json"]
# The 2-stage jobs of this file, run by one launcher start (each on a pipeline built afresh from the files).
TWO_STAGE_JOBS = {
    "grads": ["--mode", "grads"],
    "grads-autocast": ["--mode", "grads", *AUTOCAST],
    "grads-autocast-casts": ["--mode", "grads", *AUTOCAST, "--autocast_casts"],
    "grads-autocast-graphs": ["--mode", "grads", *AUTOCAST, "--block_graphs"],
    "reset-bf16": ["--mode", "reset"], "reset-autocast": ["--mode", "reset", *AUTOCAST],
    "wiring": ["--mode", "wiring"],
    "nan-bf16": ["--mode", "nan"], "nan-autocast": ["--mode", "nan", *AUTOCAST],
    "bf16grads": ["--mode", "bf16grads"], "bf16grads-immediate": ["--mode", "bf16grads", "--immediate"],
    "lrs": ["--mode", "lrs"], "options": ["--mode", "options"],
    "accumulate": ["--mode", "accumulate"], "accumulate-bf16": ["--mode", "accumulate", "--bf16"],
}


@pytest.fixture(scope="module")
def two_stages(assets) -> dict[str, list[dict]]:
    return run_worker(assets, TWO_STAGE_JOBS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.mktemp("pipeline") / "assets")


def load_reference_models(assets: Path, segmenter: str | None = None):
    model, *_ = run_configs(assets)
    segmenter = Segmenter.from_pretrained(segmenter or model.segmenter).eval()
    encoder = LatentEncoder.from_pretrained(model.generator)
    transformer = SD3Transformer2DModel.from_pretrained(model.generator, subfolder="transformer").eval()
    prompt, pooled = load_class_embeddings(model.class_embeddings, CLASSES, model.generator)
    return segmenter, encoder, transformer, prompt, pooled


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[C, ...] raw logits -> per-pixel entropy (natural log) of softmax over classes."""
    p = torch.softmax(logits, dim=0)
    return -(p * torch.log(p)).sum(0)


def adaptive_windows_by_hand(entropy_map: torch.Tensor, rule) -> list[tuple[int, int, int]]:
    """The reference's entropy-guided placement, written out: threshold, 3 x 3 dilation, 4-connected
    components by breadth-first search in raster order, boxes by mean entropy, clamp, centre, shift,
    distance, cap, fallback (empty: use the grid)."""
    height, width = entropy_map.shape
    hot = (entropy_map > entropy_map.mean() + rule.std * entropy_map.std()).tolist()
    for _ in range(rule.dilation):
        hot = [[any(hot[y][x] for y in range(max(r - 1, 0), min(r + 2, height))
                    for x in range(max(c - 1, 0), min(c + 2, width))) for c in range(width)] for r in range(height)]
    seen = [[False] * width for _ in range(height)]
    boxes = []
    for r in range(height):
        for c in range(width):
            if not hot[r][c] or seen[r][c]:
                continue
            queue, seen[r][c], pixels = [(r, c)], True, []
            while queue:
                y, x = queue.pop()
                pixels.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < height and 0 <= nx < width and hot[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            top, bottom = min(y for y, _ in pixels), max(y for y, _ in pixels) + 1
            left, right = min(x for _, x in pixels), max(x for _, x in pixels) + 1
            boxes.append((float(entropy_map[top:bottom, left:right].mean()), top, bottom, left, right))
    boxes.sort(key=lambda b: -b[0])
    chosen = []
    for _, top, bottom, left, right in boxes:
        side = min(max(max(bottom - top, right - left), rule.min_size), rule.max_size, height, width)
        y = min(max((top + bottom) // 2 - side // 2, 0), height - side)
        x = min(max((left + right) // 2 - side // 2, 0), width - side)
        if all(((y + side / 2 - cy) ** 2 + (x + side / 2 - cx) ** 2) ** 0.5 >= rule.min_distance
               for cy, cx in [(a + s / 2, b + s / 2) for a, b, s in chosen]):
            chosen.append((y, x, side))
        if len(chosen) == rule.max_windows:
            break
    return chosen if len(chosen) >= rule.min_windows else []


def reference_step(assets: Path, seed: int, ignore: list[int] = (), models=None, options: bool = False,
                   scale: float = 1.0):
    """Loss and gradients of one TTA step, computed directly from the specification. `options`: the
    options test's settings (entropy-weighted adaptive windows, a learnable pooled embedding); `scale`
    multiplies the loss before its backward (gradient accumulation)."""
    _, _, _, dusa, _ = run_configs(assets)
    segmenter, encoder, transformer, prompt, pooled = models or load_reference_models(
        assets, str(assets / SHARP_SEGFORMER) if options else None)
    image, draws = fixed_windows(assets, seed)
    raw = segmenter(image)
    # LogitNorm over the classes at the segmenter's resolution, then up to the image (as the reference).
    normed = raw / (raw.norm(dim=1, keepdim=True) + 1e-7)
    logits = F.interpolate(normed, size=image.shape[-2:], mode="bilinear", align_corners=False)
    offset = torch.zeros(pooled.shape[-1], requires_grad=True)
    weights = torch.ones(len(draws))
    if options:
        with torch.no_grad():
            raw_full = F.interpolate(raw, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
            boxes = adaptive_windows_by_hand(entropy(raw_full), ADAPTIVE_TEST_RULE)
        assert boxes and any(side != WINDOW for *_, side in boxes), "the test image must get adaptive windows"
        draws = draw_windows(boxes, (16, WINDOW // 8, WINDOW // 8), dusa.timestep_range,
                             torch.Generator().manual_seed(seed))
        with torch.no_grad():  # entropy weights of the windows as the generator sees them
            h = torch.stack([entropy(F.interpolate(raw_full[None, :, d.corner[0]:d.corner[0] + d.side,
                                                            d.corner[1]:d.corner[1] + d.side],
                                                   size=(WINDOW, WINDOW), mode="bilinear")[0]).mean()
                             for d in draws]) / math.log(len(CLASSES))
            weights = len(draws) * torch.softmax(h / WINDOW_TAU, dim=0)
    losses = []
    for d, weight in zip(draws, weights):
        (top, left), side = d.corner, d.side or WINDOW
        crop = logits[0, :, top:top + side, left:left + side]
        window = image[..., top:top + side, left:left + side]
        if side != WINDOW:  # adaptive: crop resized to the generator's window size
            crop = F.interpolate(crop[None], size=(WINDOW, WINDOW), mode="bilinear", align_corners=False)[0]
            window = F.interpolate(window, size=(WINDOW, WINDOW), mode="bilinear", align_corners=False)
        small = F.interpolate(crop[None], size=d.noise.shape[-2:], mode="bilinear", align_corners=False)[0]
        small = small.index_fill(0, torch.tensor(ignore, dtype=torch.long), float("-inf"))  # never candidates
        z0 = encoder(window)
        x_t = (1 - d.t) * z0 + d.t * d.noise
        target = (d.noise - z0)[0]
        classes, mask = select_candidates(small, dusa.topk, dusa.max_classes, dusa.min_classes,
                                          torch.Generator().manual_seed(d.seed))
        n = len(classes)
        velocity = transformer(hidden_states=x_t.expand(n, -1, -1, -1), encoder_hidden_states=prompt[classes],
                               pooled_projections=pooled[classes] + offset, timestep=(1000 * d.t).expand(n)).sample
        p = torch.softmax(small[classes] / dusa.temperature, dim=0)
        v_bar = (p[:, None] * velocity).sum(0)
        losses.append(weight * ((v_bar - target) ** 2)[mask[None].expand_as(v_bar)].mean())
    loss = torch.stack(losses).mean()
    (scale * loss).backward()
    grads = {f"segmenter.{n}": p.grad for n, p in segmenter.named_parameters()}
    grads.update({f"transformer.{n}": p.grad for n, p in transformer.named_parameters()})
    if options:
        grads["transformer.pooled_offset"] = offset.grad
    return loss.item(), grads, [(*d.corner, d.side or WINDOW) for d in draws]


def check_gradients(ranks: list[dict], ref_grads: dict[str, torch.Tensor]) -> None:
    """Every trainable parameter of every stage got the reference's gradient (relative error 1e-4), and
    every parameter of both models (not the VAE) is among them."""
    # Attention key biases have an analytically zero gradient (softmax ignores a constant shift):
    # both sides hold rounding noise there, so those are checked against the overall scale.
    zero = 1e-9 * max(g.norm() for g in ref_grads.values())
    seen = set()
    for r in ranks:
        assert sorted(r["grads"]) == r["trainable"], "every trainable parameter must get a gradient"
        for name, grad in r["grads"].items():
            ref = ref_grads[reference_name(name)]
            assert ref is not None, name
            if ref.norm() < zero:
                assert grad.norm() < zero, name
            else:
                err = (grad - ref).norm() / ref.norm()
                assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
            seen.add(reference_name(name))
    assert seen == set(ref_grads)


def reference_name(pipeline_name: str) -> str:
    """Pipeline layer parameter name -> name in the unsplit models."""
    layer, rest = pipeline_name.split(".", 1)
    layer = int(layer)
    if layer == 0:
        return rest  # "segmenter.model..."
    if layer == NUM_BLOCKS + 2:  # head
        return f"transformer.{rest}"
    if layer == 1:  # embeddings
        return f"transformer.{rest}"
    return f"transformer.transformer_blocks.{layer - 2}.{rest.removeprefix('block.')}"


def checkpoint_layer(key: str) -> int:
    """Pipeline layer index that holds a transformer checkpoint tensor."""
    if key.startswith("transformer_blocks."):
        return int(key.split(".")[1]) + 2
    return NUM_BLOCKS + 2 if key.startswith(("norm_out.", "proj_out.")) else 1


@pytest.mark.parametrize("stages,ignore", [(2, []), (4, [0, 12])])
def test_pipeline_step_equals_single_process_reference(assets, two_stages, stages, ignore):
    ranks = two_stages["grads"] if stages == 2 else \
        run_worker(assets, {"grads": ["--mode", "grads", "--ignore", *map(str, ignore)]}, stages)["grads"]
    ref_loss, ref_grads, _ = reference_step(assets, seed=0, ignore=ignore)
    assert [r["stage"] for r in ranks] == list(range(stages))
    # SegFormer runs once for the step's three windows, on stage 0 only.
    assert [r["segmenter_forwards"] for r in ranks] == [1] + [0] * (stages - 1)
    # The loss reaches every stage (DeepSpeed broadcasts it from the last).
    for r in ranks:
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-5)

    check_gradients(ranks, ref_grads)
    # Each rank read only transformer tensors of its own layers, and every tensor was read once.
    read = [key for r in ranks for key in r["loaded_keys"]]
    assert sorted(read) == sorted(TransformerParts(str(assets / "sd3")).weight_map)
    for r in ranks:
        own_layers = {int(n.split(".", 1)[0]) for n in r["trainable"]}
        assert {checkpoint_layer(k) for k in r["loaded_keys"]} <= own_layers


def test_autocast_working_weights_equal_autocasts_own_casts_bit_for_bit(two_stages):
    """The default preset (float32 weights, bf16 autocast): the generator's weights cast once per step and
    its gradients folded once per window give exactly the loss and gradients of autocast's per-window casts."""
    working, casts = two_stages["grads-autocast"], two_stages["grads-autocast-casts"]
    assert [r["working_weights"] for r in working] == [True, True]
    assert [r["working_weights"] for r in casts] == [False, False]
    for a, b in zip(working, casts):
        assert a["loss"] == b["loss"]
        assert sorted(a["grads"]) == sorted(b["grads"]) == a["trainable"]
        for name, grad in a["grads"].items():
            assert torch.equal(grad, b["grads"][name]), name


def test_the_last_stages_block_graphs_give_the_eager_steps_gradients(two_stages):
    """pipeline.transformer_graphs: the last stage's joint blocks through the graph chain (on the CPU its
    recorder re-runs what a GPU would replay) inside the real pipeline step, with the working weights: the
    loss and every gradient of the eager step; the time embedding's gradient sums the same terms grouped per
    block: a last-bit difference that the time embedder's bf16 backward rounds to bf16 noise (its gradients only)."""
    graphed, eager = two_stages["grads-autocast-graphs"], two_stages["grads-autocast"]
    assert graphed[0]["block_graphs"] is None and graphed[1]["block_graphs"][0] >= 1  # captured on stage 1 only
    assert graphed[1]["block_graphs"][1] >= 1  # and replayed
    for a, b in zip(graphed, eager):
        assert a["loss"] == b["loss"]
        assert sorted(a["grads"]) == sorted(b["grads"]) == a["trainable"]
        for name, grad in a["grads"].items():
            if "time_text_embed" in name:
                error = ((grad - b["grads"][name]).norm() / b["grads"][name].norm()).item()
                assert error < 4e-3, (name, error)  # under bf16's relative precision, 2 ** -8
            else:
                assert torch.equal(grad, b["grads"][name]), name


@pytest.mark.parametrize("preset", [None, "ds_configs/ds_tta.json"])
def test_reset_restores_parameters_masters_and_optimizer_state(two_stages, preset):
    """bf16 ZeRO 1 (float32 masters in the optimizer), and the default autocast preset (float32 weights)."""
    for r in two_stages["reset-autocast" if preset else "reset-bf16"]:
        assert r["dtype"] == ("torch.float32" if preset else "torch.bfloat16")
        assert r["moved_before_reset"]
        assert r["params_equal"] and r["masters_equal"] and r["state_empty"]
        # After the reset the run repeats its first step exactly: nothing stale survived.
        assert r["again_loss"] == r["first_loss"]
        assert r["same_update"]


def test_twenty_steps_on_one_image_lower_the_loss_and_move_both_models(two_stages):
    ranks = two_stages["wiring"]
    losses = ranks[0]["losses"]
    assert losses == ranks[1]["losses"]
    assert ranks[0]["segmenter_forwards"] == 20  # one per step
    assert losses[-1] < 0.9 * losses[0], losses
    stage0, stage1 = ranks
    assert stage0["segmenter_moved"] > 0 and stage0["generator_moved"] > 0 and stage1["generator_moved"] > 0
    assert stage0["vae_moved"] == 0.0  # frozen


@pytest.mark.parametrize("preset", [None, "ds_configs/ds_tta.json"])
def test_a_non_finite_loss_skips_the_update_on_every_stage(two_stages, preset):
    for r in two_stages["nan-autocast" if preset else "nan-bf16"]:
        assert r["nan_loss"] != r["nan_loss"] and r["nan_skipped"]  # NaN, and skipped
        assert r["unchanged"]  # no stage stepped on NaN gradients
        assert r["next_loss"] == r["next_loss"] and not r["next_skipped"] and r["moved_after"]


@pytest.mark.parametrize("immediate", [False, True])
def test_bf16_zero1_gradients_and_update_follow_the_reference(assets, two_stages, immediate):
    """In bf16 the segmenter's backward runs outside DeepSpeed's backward pass: its gradients must reach
    the optimizer's float32 gradients once, scaled like the others, and stage 0's transformer gradients
    must not count the last window twice. Such faults move gradients by 100 % or more (missing, doubled,
    3 windows unscaled); bf16 weights alone move the tiny SegFormer's by about 10 % (12 % measured, against
    the float32 reference), the transformer's by 1 to 2 %."""
    ranks = two_stages["bf16grads-immediate" if immediate else "bf16grads"]
    ref_loss, ref_grads, _ = reference_step(assets, seed=0)
    floor = 1e-3 * max(g.norm() for g in ref_grads.values())
    transformer, segmenter = [], [0.0, 0.0]
    for r in ranks:
        assert r["loss"] == pytest.approx(ref_loss, rel=2e-2)
        for name, grad in r["grads"].items():
            ref = ref_grads[reference_name(name)]
            if ref.norm() <= floor:
                continue
            assert r["moved"][name], f"{name} has a gradient but its master weight did not move"
            if ".segmenter." in name:
                segmenter[0] += (grad - ref).square().sum().item()
                segmenter[1] += ref.square().sum().item()
            else:
                transformer.append(((grad - ref).norm() / ref.norm()).item())
    assert max(transformer) < 0.05, max(transformer)
    assert segmenter[1] > 0 and (segmenter[0] / segmenter[1]) ** 0.5 < 0.3, (segmenter[0] / segmenter[1]) ** 0.5


def test_a_learning_rate_per_model_reaches_the_optimizer(two_stages):
    stage0, stage1 = two_stages["lrs"]
    assert stage0["lrs"] == [0.0, 2e-3] and stage1["lrs"] == [2e-3]  # stage 1 holds no segmenter
    assert stage0["segmenter_moved"] == 0.0
    assert stage0["generator_moved"] > 0 and stage1["generator_moved"] > 0


def test_entropy_weighted_adaptive_windows_and_a_learnable_pooled_embedding_equal_the_reference(assets, two_stages):
    """One step with `data.windows adaptive` (windows placed from the step's own forward, the count sent to
    the other stage, crops resized to the window size), `dusa.window_weighting entropy` and
    `dusa.learnable_embedding`, against the specification written out in this file."""
    ranks = two_stages["options"]
    ref_loss, ref_grads, ref_windows = reference_step(assets, seed=0, options=True)
    assert ranks[0]["windows"] == ref_windows and len(ref_windows) == ADAPTIVE_TEST_RULE.max_windows
    for r in ranks:
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-5)
    check_gradients(ranks, ref_grads)  # the pooled offset's gradient included
    assert any(name.endswith("pooled_offset") for r in ranks for name in r["grads"])


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_accumulation_updates_every_k_images_and_drops_the_leftovers(assets, two_stages, bf16):
    """tta.accumulation_steps 2 with SGD from the DeepSpeed JSON (momentum 0.9 by default): nothing moves
    after the 1st and 3rd images, the 2nd and 4th update with the mean of two images' gradients (the
    second with momentum), the 5th image's gradients are dropped at the task's end."""
    ranks = two_stages["accumulate-bf16" if bf16 else "accumulate"]
    models = load_reference_models(assets)
    named = {**{f"segmenter.{n}": p for n, p in models[0].named_parameters()},
             **{f"transformer.{n}": p for n, p in models[2].named_parameters()}}
    snapshots, losses, momentum = [{n: p.detach().clone() for n, p in named.items()}], [], {}
    for seed in range(ACCUMULATION_IMAGES):
        loss, _, _ = reference_step(assets, seed, models=models, scale=1 / ACCUMULATION)  # .grad accumulates
        losses.append(loss)
        if (seed + 1) % ACCUMULATION == 0:
            with torch.no_grad():
                for n, p in named.items():  # torch SGD: buf = 0.9 buf + g (buf = g at first), p -= lr buf
                    momentum[n] = p.grad.clone() if n not in momentum else 0.9 * momentum[n] + p.grad
                    p -= ACCUMULATE_LR * momentum[n]
                    p.grad = None
        snapshots.append({n: p.detach().clone() for n, p in named.items()})
    for r in ranks:
        assert r["momentum"] == 0.9
        assert r["losses"] == pytest.approx(losses, rel=5e-2 if bf16 else 1e-5)  # bf16: rounded weights
        assert r["grads_after_discard"] == 0.0
        first = r["params"][0]
        for k, params in enumerate(r["params"][1:], start=1):
            if k % ACCUMULATION == 1:  # an image that only accumulates: nothing moves
                assert all(torch.equal(params[n], r["params"][k - 1][n]) for n in params), k
                continue
            assert any(not torch.equal(params[n], r["params"][k - 1][n]) for n in params), k
            if bf16 and k > ACCUMULATION:  # bf16 trajectories drift apart after an update: the first is compared
                continue
            # The update so far against the reference's, over each model's parameters on this stage.
            for part in ("segmenter", "generator"):
                names = [n for n in params if (".segmenter." in n) == (part == "segmenter")]
                if not names:
                    continue
                got = torch.cat([(params[n] - first[n]).flatten() for n in names])
                ref = torch.cat([(snapshots[k][reference_name(n)] - snapshots[0][reference_name(n)]).flatten()
                                 for n in names])
                err = ((got - ref).norm() / ref.norm()).item()
                # bf16: the two images' gradients partly cancel, so bf16 rounding shows as about 10 % on the
                # generator's update (and more on the tiny SegFormer's, see the bf16 test); one image dropped
                # or counted twice gives 37 % or more (measured on these assets).
                assert err < ((0.3 if part == "segmenter" else 0.2) if bf16 else 1e-4), (k, part, err)
