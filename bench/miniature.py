#!/usr/bin/env python
"""A miniature benchmark in which every weight is trained here: procedural scenes of 12 classes, a SegFormer,
an SD3-style VAE and SD3 transformer trained on them, then `source`, `tent` and `dusa` through the real launcher
on corrupted test images made by data/make_ade20k_c.py.

    python bench/miniature.py all --workdir runs/miniature --gpus 2        # everything, in order
    python bench/miniature.py data     --workdir W       # train split (npy) and test split (ADE layout), ADE20K-C of it
    python bench/miniature.py train    --workdir W [--part segmenter|vae|transformer|all] [--minutes M]
    python bench/miniature.py sanity   --workdir W       # the DUSA signal before any adaptation (sanity.json)
    python bench/miniature.py adapt    --workdir W --gpus 2 [--parallel P] [--limit N] [--deadline MIN]
    python bench/miniature.py report   --workdir W [--out bench/results]   # default: W/report
    python bench/miniature.py all --tiny --workdir /tmp/m  # CPU smoke run of the whole chain (no quality claim)

Every step is resumable: what exists is skipped (data, each trained part, each finished run; the launcher
itself resumes a run's finished corruptions). Training is seeded and each part stops at its step cap or its
time cap (`--minutes`, whichever comes first), with its learning-rate schedule over that span, so one part fits
one budget and still saves; training.json records the steps each part ran.

The declared grid (fixed before any adaptation result was seen; nothing else is tuned on the test split):
  corruptions CORRUPTIONS at severity SEVERITY; seeds SEEDS;
  source (deterministic: one run per precision preset);
  tent at LEARNING_RATES (its bf16 autocast is the same under both presets: autocast preset only);
  dusa at LEARNING_RATES, one 2-stage pipeline, under both presets (PRESETS);
  the continual row: the corruptions in sequence for CONTINUAL_ROUNDS rounds without a reset (--tta.continual
  true --data.rounds 3), for source, tent and dusa at LEARNING_RATES, seed 0, autocast preset (--tiny: dusa);
  everything else is ds_configs/miniature.json (the launcher's defaults, window 256 / stride 128).
Declared before their results (issue 24), after the rows above, autocast preset, seeds SEEDS:
  bn_adapt; tent, dusa, cotta and sar at the learning rate that bench/select_lr.py picked on the held-out
  VALIDATION_CORRUPTIONS among CANDIDATE_RATES (seed 0; <workdir>/selected_lr.json); the DUSA_ABLATIONS at
  dusa's selected rate. These rows wait (are skipped, and said so) until that selection exists.
The analysis (bench/miniature_analysis.py), declared before its results (issue 24): dusa at ANALYSIS_LR against
  source, autocast preset, per seed (SEEDS) and per training (`report --retrained W2`: the benchmark trained
  again with another `train --seed`, each run against its own training's source), then their mean and spread;
  per corruption and pooled, the per-class IoU change, DUSA's candidate-class recall and its loss against the
  pixel error after adaptation (Spearman, Pearson, the error per loss quartile; from each run's images.csv). Rule:
  a corruption's gain (over 1 mIoU point) is explained when, in every run, the loss ranks its images by their
  error (Spearman >= 0.3); the report says whether the gain is explained, partly explained or unexplained.
With GPUs every run is `deepspeed --num_gpus G launch/tta.py --config ds_configs/miniature.json ...` (source and
tent: G one-process replicas sharing the corruptions); several runs share the GPUs at once (`--parallel`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on the path and its bench.py would stand in for the `bench` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.classes import VALIDATION_CORRUPTIONS  # noqa: E402
from pipeline.run.folder import free_local_port  # noqa: E402
from pipeline.run.log import LOG  # noqa: E402
from bench.miniature_make import (CLASSES, FULL, TINY, K, Sizes, encode_windows, latent_labels,  # noqa: E402
                                  render_split, sizes_record, train_segmenter, train_transformer, train_vae,
                                  write_json)

# Chosen before any adaptation from a CPU pilot (a smaller segmenter trained minutes at half this resolution):
# at severity 3 these five cost it 40-63 % of its clean mIoU, while noise, blur, pixelate, elastic and JPEG cost
# under 15 % even at severity 5 (colour and texture statistics define the classes, and they survive those).
CORRUPTIONS = ("snow", "frost", "fog", "brightness", "contrast")
TINY_CORRUPTIONS = ("fog", "contrast")
SEVERITY = 3
SEEDS = (0, 1)
LEARNING_RATES = (1e-5, 1e-4, 1e-3)  # the launcher's default lr and one and two decades above
PRESETS = {"autocast": "ds_configs/ds_tta.json", "bf16": "ds_configs/ds_tta_bf16.json"}
CONTINUAL_ROUNDS = 3  # the continual row: whether adaptation holds or collapses over time
# Held-out learning-rate selection (bench/select_lr.py): imagecorruptions' four validation corruptions
# (VALIDATION_CORRUPTIONS, from data/classes.py), never a test one; per method a decade either side of its default (tent and dusa: the grid's rates; cotta and sar: their
# papers' rates, 6e-5 / 8 and 0.001 / 64 x 2).
CANDIDATE_RATES = {"tent": LEARNING_RATES, "dusa": LEARNING_RATES, "cotta": (7.5e-7, 7.5e-6, 7.5e-5),
                   "sar": (3.125e-6, 3.125e-5, 3.125e-4)}
SELECTED = "selected"  # a run's lr: the method's held-out choice, read from <workdir>/selected_lr.json
# DUSA's ablations: the options of one run each (t = 0.25, the default, is the dusa row itself).
DUSA_ABLATIONS = {
    "segmenter only": ["--dusa.update_generator", "false"],
    "segmenter norm only": ["--dusa.update_generator", "false", "--dusa.norm_only", "true"],
    "uniform p": ["--dusa.candidate_weights", "uniform"],
    "t 0.1": ["--dusa.timestep_range", "[0.1, 0.1]"],
    "t 0.5": ["--dusa.timestep_range", "[0.5, 0.5]"],
    "topk 5": ["--dusa.topk", "5"],
    "top-5 area 20": ["--dusa.candidates", "area_k", "--dusa.area_k", "5", "--dusa.area_threshold", "20"],
}
# The analysis section (bench/miniature_analysis.py), declared before its results: dusa at the launcher's default
# lr (the row whose gain the README quotes; --tiny: the tiny grid's dusa) against the source, autocast preset.
ANALYSIS_LR = 1e-5
TINY_ANALYSIS_LR = 1e-4
LOSS_QUANTILES = 4
EXPLAINED_SPEARMAN = 0.3  # a moderate rank correlation at least, in every seed
GAIN_POINTS = 1.0  # mIoU points over the source for a corruption to count as gaining
CONFIG = "ds_configs/miniature.json"
MINUTES = {"segmenter": 2.0, "vae": 1.5, "transformer": 2.5}  # per part, on one H100
TINY_MINUTES = 0.2
PARTS = ("segmenter", "vae", "transformer")
SEGMENTER, GENERATOR, CACHE = "segformer-miniature", "sd3-miniature", "sd3-miniature-classes.safetensors"


# ------------------------------------------------------------------------------------------------ workdir
class MiniatureError(ValueError):
    """A user's mistake (a workdir of another scale, a step run before the one it needs): one line, exit 2."""


class Workdir:
    """Where one benchmark lives. `models/` and `sanity.json` are what a later machine needs carried over
    (megabytes); the data is remade from its seeds."""

    def __init__(self, root: str | Path, tiny: bool):
        self.root = Path(root).resolve()  # the launcher runs from the repository root
        self.tiny = tiny
        self.sizes: Sizes = TINY if tiny else FULL
        self.corruptions = TINY_CORRUPTIONS if tiny else CORRUPTIONS
        if self.root.exists() and not self.root.is_dir():
            raise MiniatureError(f"--workdir {root} is a file, not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        marker, scale = self.root / "scale.json", {"tiny": tiny}
        if marker.is_file() and json.loads(marker.read_text()) != scale:
            raise MiniatureError(f"{self.root} holds a {'tiny' if not tiny else 'full'} benchmark; "
                                 f"use another --workdir")
        write_json(marker, scale)

    classes = property(lambda self: self.root / "classes.txt")
    train = property(lambda self: self.root / "train")
    clean = property(lambda self: self.root / "clean")  # ADE's source layout: images/validation, annotations/validation
    corrupted = property(lambda self: self.root / "ade20k_c")
    models = property(lambda self: self.root / "models")
    segmenter = property(lambda self: self.models / SEGMENTER)
    generator = property(lambda self: self.models / GENERATOR)
    cache = property(lambda self: self.models / CACHE)
    training = property(lambda self: self.models / "training.json")
    sanity = property(lambda self: self.root / "sanity.json")
    runs = property(lambda self: self.root / "runs")
    logs = property(lambda self: self.root / "logs")

    def records(self) -> dict:
        return json.loads(self.training.read_text()) if self.training.is_file() else {}


def log(message: str) -> None:
    LOG.info(f"[miniature {time.strftime('%H:%M:%S')}] {message}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ data
def make_train_data(wd: Workdir, workers: int) -> None:
    done = wd.train / "done.json"
    if done.is_file():
        return
    s = wd.sizes
    start = time.perf_counter()
    images, labels = render_split("train", s.train_images, s.height, s.width, workers)
    wd.train.mkdir(parents=True, exist_ok=True)
    np.save(wd.train / "images.npy", images)
    np.save(wd.train / "labels.npy", labels)
    write_json(done, {"images": len(images), "size": [s.height, s.width],
                      "seconds": round(time.perf_counter() - start, 1),
                      "class_pixels": np.bincount(labels.ravel(), minlength=K + 1).tolist()})
    log(f"train split: {len(images)} images in {time.perf_counter() - start:.1f} s")


def make_test_data(wd: Workdir, workers: int, corruptions: tuple[str, ...] | None = None) -> None:
    """The clean test split in ADE20K's source layout, then its corruptions by data/make_ade20k_c.py's build()."""
    from PIL import Image

    from data.make_ade20k_c import build
    wd.classes.write_text("".join(f"{name}\n" for name in CLASSES))
    done = wd.clean / "done.json"
    s = wd.sizes
    if not done.is_file():
        images, labels = render_split("test", s.test_images, s.height, s.width, workers)
        for sub in ("images", "annotations"):
            (wd.clean / sub / "validation").mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(wd.clean / "images" / "validation" / f"mini_{i + 1:06d}.png")
            Image.fromarray(label).save(wd.clean / "annotations" / "validation" / f"mini_{i + 1:06d}.png")
        write_json(done, {"images": len(images), "class_pixels": np.bincount(labels.ravel(), minlength=K + 1).tolist()})
    start = time.perf_counter()
    corruptions = corruptions or wd.corruptions
    written, _ = build(wd.clean, wd.corrupted, list(corruptions), [SEVERITY], workers=workers, progress=False)
    if written:
        log(f"corrupted test split: {written} images ({len(corruptions)} corruptions, severity {SEVERITY}) in "
            f"{time.perf_counter() - start:.1f} s")


def cmd_data(wd: Workdir, args) -> None:
    make_train_data(wd, args.workers)
    make_test_data(wd, args.workers)


# ------------------------------------------------------------------------------------------------ training
def clean_test_miou(segmenter, wd: Workdir, device: torch.device) -> float:
    """mIoU (percent) of the segmenter on the clean test split, scored as the launcher scores (`source`)."""
    from PIL import Image

    from data.metrics import SegmentationMetric, ade_label_to_train_id
    from pipeline.run.images import predict
    from pipeline.dusa.windows import resize_short_edge
    metric = SegmentationMetric(K)
    for path in sorted((wd.clean / "images" / "validation").glob("*.png")):
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        label = ade_label_to_train_id(np.asarray(Image.open(wd.clean / "annotations" / "validation" / path.name)))
        with torch.no_grad():
            logits = segmenter(resize_short_edge(image, wd.sizes.window).unsqueeze(0).to(device))
        metric.update(predict(logits, label.shape), label.to(device))
    return metric.compute()["mIoU"]


def cmd_train(wd: Workdir, args) -> None:
    """Trains the parts not yet trained (a part is done once its record is in training.json, written after its
    files), in order: segmenter, VAE, transformer (on the VAE's latents: a retrained VAE retrains it)."""
    from diffusers import AutoencoderKL

    from models.checkpoints import readable_weights
    from models.class_embeddings import save_class_embeddings
    from models.segformer import Segmenter
    make_train_data(wd, args.workers)
    make_test_data(wd, args.workers)
    records = wd.records()
    todo = [part for part in (PARTS if args.part == "all" else (args.part,)) if part not in records]
    if not todo:
        log(f"train: {', '.join(PARTS if args.part == 'all' else (args.part,))} already trained in {wd.models}")
        return
    if "transformer" in todo and "vae" not in records and "vae" not in todo:
        raise MiniatureError("the transformer is trained on the VAE's latents: train --part vae first")
    device = torch.device(args.device) if args.device else default_device()
    torch.backends.cudnn.benchmark = True  # fixed shapes: the VAE's convolutions pick their fastest kernels
    s = wd.sizes
    images = torch.from_numpy(np.load(wd.train / "images.npy")).to(device)
    labels = torch.from_numpy(np.load(wd.train / "labels.npy")).to(device)

    def minutes(part: str) -> float:
        return args.minutes if args.minutes is not None else TINY_MINUTES if wd.tiny else MINUTES[part]

    def save_record(part: str, record: dict) -> None:
        # Merged with the file: another process may have trained another part meanwhile (one part per GPU).
        merged = {**wd.records(), **records}
        merged[part] = {**record, "device": device_name(device), "seed": args.seed}
        merged["sizes"] = sizes_record(s)
        if part == "vae":
            merged.pop("transformer", None)  # trained on the old latents
        records.clear()
        records.update(merged)
        write_json(wd.training, records)

    if "segmenter" in todo:
        log(f"training the segmenter ({minutes('segmenter')} min at most)")
        model, record = train_segmenter(images, labels, s, 60 * minutes("segmenter"), device, args.seed, log)
        record["clean_test_mIoU"] = clean_test_miou(Segmenter(model).eval(), wd, device)
        model.save_pretrained(wd.segmenter)
        readable_weights(wd.segmenter)
        log(f"segmenter: {record['steps']} steps, clean test mIoU {record['clean_test_mIoU']:.2f}")
        save_record("segmenter", record)
    vae_folder = wd.generator / "vae"
    if "vae" in todo:
        records.pop("transformer", None)  # trained on the old latents
        log(f"training the VAE ({minutes('vae')} min at most)")
        vae, record = train_vae(images, s, 60 * minutes("vae"), device, args.seed, log)
        vae.save_pretrained(vae_folder)
        readable_weights(vae_folder)
        log(f"vae: {record['steps']} steps, reconstruction PSNR {record['reconstruction_psnr_db']:.1f} dB")
        save_record("vae", record)
        todo = list(dict.fromkeys([*todo, "transformer"])) if args.part == "all" else todo
    if "transformer" in todo:
        vae = AutoencoderKL.from_pretrained(vae_folder).to(device).eval()
        start = time.perf_counter()
        latents, ids = encode_windows(vae, images, labels, s.window, s.window // 2, device)
        del vae
        log(f"training the transformer on {len(latents)} window latents ({time.perf_counter() - start:.1f} s to "
            f"encode; {minutes('transformer')} min at most)")
        transformer, prompt, pooled, record = train_transformer(latents, ids, s, 60 * minutes("transformer"), device,
                                                                args.seed, log)
        transformer.save_pretrained(wd.generator / "transformer")
        readable_weights(wd.generator / "transformer")
        save_class_embeddings(wd.cache, prompt, pooled, CLASSES, str(wd.generator),
                              template="learned per-class embeddings (bench/miniature.py)",
                              extra={"dtype": "float32", "t5_sequence_length": "0"})
        record["encode_seconds"] = round(time.perf_counter() - start - record["seconds"], 1)
        log(f"transformer: {record['steps']} steps, final masked loss {record['final_loss']:.4f}")
        save_record("transformer", record)


def need_models(wd: Workdir) -> None:
    missing = [part for part in PARTS if part not in wd.records()]
    if missing:
        raise MiniatureError(f"{', '.join(missing)} not trained in {wd.models}: run `bench/miniature.py train` "
                         f"first (or carry that folder here)")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, " \
        f"{os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------------ sanity
def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n), n >= 2, that moves every element."""
    while True:
        perm = torch.randperm(n, generator=generator)
        if bool((perm != torch.arange(n)).all()):
            return perm


def paired(true: list[float], wrong: list[float]) -> dict:
    """Per-window errors with the true labels against wrong ones: means, the mean relative gap
    (wrong - true) / true, the share of windows where the true labels give the lower error, and the
    Wilcoxon signed-rank test's two-sided p."""
    from scipy.stats import wilcoxon
    t, w = np.asarray(true), np.asarray(wrong)
    if not len(t):
        return {"windows": 0}
    return {"windows": len(t), "true": float(t.mean()), "wrong": float(w.mean()),
            "relative_gap": float(((w - t) / t).mean()), "true_lower": float((t < w).mean()),
            "wilcoxon_p": float(wilcoxon(t, w).pvalue) if len(t) > 1 and (t != w).any() else None}


def weighted_velocity_error(velocity: torch.Tensor, target: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean over labelled latent pixels and channels of (sum_c w_c v_c - v)^2 with one-hot weights w: each
    pixel takes the velocity of its class in `ids` (long [h, w], 255: not counted). velocity [K, ch, h, w]."""
    keep = ids != 255
    chosen = velocity.gather(0, ids.clamp(max=K - 1)[None, None].expand(1, velocity.shape[1], -1, -1))[0]
    err = (chosen - target).square()
    return float(err[:, keep].mean())


def rank_correlation(x: list[float], y: list[float]) -> dict:
    from scipy.stats import pearsonr, spearmanr
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"n": len(x), "spearman": None, "pearson": None}
    return {"n": len(x), "spearman": float(spearmanr(x, y).statistic), "pearson": float(pearsonr(x, y).statistic)}


@torch.no_grad()
def cmd_sanity(wd: Workdir, args) -> None:
    """Before any adaptation, on the corrupted test images (one process, no DeepSpeed, the pipeline's own
    pieces: LatentEncoder, logit_norm, window_resampler, select_candidates, dusa_loss; t = 0.25 as the
    launcher's default): per window the class-weighted velocity error with the true labels' one-hot weights
    against wrong labels (every class moved to another by a random derangement) and against the source's
    top-1, per image the DUSA loss of the source prediction against its pixel error, and per window the
    candidate-class recall: the share of the window's true classes that the source's candidates hold."""
    from diffusers import SD3Transformer2DModel

    from data.ade20k_c import ADE20KC
    from data.metrics import SegmentationMetric
    from models.class_embeddings import load_class_embeddings
    from models.sd3 import LatentEncoder
    from models.segformer import Segmenter
    from pipeline.run.checks import check_class_embedding_file, check_generator_files, check_segmenter_files
    from pipeline.run.images import PreparedImages, image_seed, predict
    from pipeline.dusa.loss import dusa_loss, logit_norm, select_candidates
    from pipeline.dusa.windows import resample_window, window_resampler

    need_models(wd)
    make_test_data(wd, args.workers)
    device = torch.device(args.device) if args.device else default_device()
    size, t = wd.sizes.window, 0.25
    # The launcher's pre-load checks first, then its loaders.
    check_segmenter_files(str(wd.segmenter), K)
    check_class_embedding_file(str(wd.cache), CLASSES, str(wd.generator), check_generator_files(str(wd.generator)))
    segmenter = Segmenter.from_pretrained(str(wd.segmenter)).eval().to(device)
    encoder = LatentEncoder.from_pretrained(str(wd.generator)).to(device)
    transformer = SD3Transformer2DModel.from_pretrained(str(wd.generator), subfolder="transformer").eval().to(device)
    prompt, pooled = (e.to(device) for e in load_class_embeddings(wd.cache, CLASSES, str(wd.generator)))
    latent = size // encoder.downsample
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def velocities(window: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_c for every class [K, ch, s, s] from one shared x_t, the target eps - z0 [ch, s, s])."""
        z0 = encoder(window)
        eps = torch.randn(z0.shape, generator=generator).to(device)
        with autocast:
            v = transformer(hidden_states=((1 - t) * z0 + t * eps).expand(K, -1, -1, -1),
                            encoder_hidden_states=prompt, pooled_projections=pooled,
                            timestep=torch.full((K,), 1000 * t, device=device), return_dict=False)[0]
        return v.float(), (eps - z0)[0]

    report: dict = {"t": t, "severity": SEVERITY, "tasks": {}}
    pooled_loss, pooled_error = [], []
    all_errors: dict[str, list[float]] = {kind: [] for kind in ("true", "other_classes", "swapped", "true_of_swapped",
                                                                "source_top1")}
    for task in wd.corruptions:
        dataset = PreparedImages(ADE20KC(wd.corrupted, task, SEVERITY, args.sanity_limit, num_classes=K),
                                 size, size // 2)
        errors = {kind: [] for kind in ("true", "other_classes", "swapped", "true_of_swapped", "source_top1")}
        losses, pixel_errors = [], []  # per image
        recalls, complete = [], []  # per labelled window: true classes among the candidates (share; all of them)
        metric = SegmentationMetric(K)
        for i in range(len(dataset)):
            item = dataset[i]
            image, label = item["image"].to(device), item["label"].to(device)
            with autocast:
                logits = segmenter(image)
            prediction = predict(logits, label.shape)
            metric.update(prediction, label)
            normed = logit_norm(logits.float(), dim=1)[0]
            (height, width), (h, w) = image.shape[-2:], normed.shape[-2:]
            generator = torch.Generator().manual_seed(image_seed(0, task, item["name"]))
            window_losses = []
            for top, left in item["corners"]:
                velocity, target = velocities(image[..., top:top + size, left:left + size], generator)
                rows = window_resampler(h, height, top, size, latent, device, scaled=size)
                cols = window_resampler(w, width, left, size, latent, device, scaled=size)
                window_logits = resample_window(normed, rows, cols)
                classes, mask = select_candidates(window_logits, 1, 20, 0, generator)
                window_losses.append(float(dusa_loss(window_logits, classes, mask, velocity[classes], target)))
                # The annotation's train ids back to ADE values (255 -> 0) for the latent pixels' majority labels.
                crop = label[top:top + size, left:left + size]
                ids = latent_labels(torch.where(crop == 255, 0, crop + 1)[None], encoder.downsample)[0]
                if (ids == 255).all():
                    continue
                # Wrong labels: every class moved to another of the K; and, a sharper control that keeps the
                # window's set of classes (so no class's general quality enters), its classes swapped among
                # themselves (windows with two or more).
                clamped = ids.clamp(max=K - 1)
                present = ids[ids != 255].unique()
                found = torch.isin(present, classes.to(present.device))
                recalls.append(float(found.float().mean()))
                complete.append(bool(found.all()))
                swap = torch.arange(K, device=device)
                if len(present) > 1:
                    swap[present] = present[derangement(len(present), generator).to(device)]
                kinds = {"true": ids, "other_classes": derangement(K, generator).to(device)[clamped],
                         "swapped": swap[clamped], "source_top1": window_logits.argmax(0)}
                for kind, weights in kinds.items():
                    if kind != "swapped" or len(present) > 1:
                        errors[kind].append(weighted_velocity_error(velocity, target, torch.where(ids == 255, ids,
                                                                                                  weights)))
                if len(present) > 1:
                    errors["true_of_swapped"].append(errors["true"][-1])
            labelled = label != 255
            if labelled.any():  # an image without labelled pixels has no error to correlate
                losses.append(float(np.mean(window_losses)))
                pixel_errors.append(100 * float((prediction[labelled] != label[labelled]).float().mean()))
        pooled_loss += losses
        pooled_error += pixel_errors
        for kind, values in errors.items():
            all_errors[kind] += values
        row = report["tasks"][task] = {
            "images": len(dataset), "source_mIoU": metric.compute()["mIoU"],
            "true_vs_other_classes": paired(errors["true"], errors["other_classes"]),
            "true_vs_swapped": paired(errors["true_of_swapped"], errors["swapped"]),
            "true_vs_source_top1": paired(errors["true"], errors["source_top1"]),
            "dusa_loss_vs_source_pixel_error": rank_correlation(losses, pixel_errors),
            "candidate_recall": float(np.mean(recalls)) if recalls else None,
            "windows_with_every_true_class": float(np.mean(complete)) if complete else None,
            "mean_dusa_loss": float(np.mean(losses)), "mean_source_pixel_error": float(np.mean(pixel_errors))}
        other, swapped = row["true_vs_other_classes"], row["true_vs_swapped"]
        log(f"{task}: source mIoU {row['source_mIoU']:.1f}; velocity error, true labels {other['true']:.4f} / other "
            f"classes {other['wrong']:.4f} (true lower in {100 * other['true_lower']:.0f} % of windows) / swapped "
            f"within the window {swapped.get('wrong', math.nan):.4f} (true lower in "
            f"{100 * swapped.get('true_lower', math.nan):.0f} %); DUSA loss vs source error: Spearman "
            f"{_fmt(row['dusa_loss_vs_source_pixel_error']['spearman'])}; candidate recall "
            f"{_fmt(row['candidate_recall'])}")
    within = [r["dusa_loss_vs_source_pixel_error"]["spearman"] for r in report["tasks"].values()]
    within = [v for v in within if v is not None]
    report["summary"] = {
        "true_vs_other_classes": paired(all_errors["true"], all_errors["other_classes"]),
        "true_vs_swapped": paired(all_errors["true_of_swapped"], all_errors["swapped"]),
        "true_vs_source_top1": paired(all_errors["true"], all_errors["source_top1"]),
        "dusa_loss_vs_source_pixel_error_pooled": rank_correlation(pooled_loss, pooled_error),
        "dusa_loss_vs_source_pixel_error_mean_within_tasks": float(np.mean(within)) if within else None,
        "clean_test_mIoU": wd.records().get("segmenter", {}).get("clean_test_mIoU"), "device": device_name(device)}
    write_json(wd.sanity, report)
    log(f"sanity: {wd.sanity}")


# ------------------------------------------------------------------------------------------------ adaptation
def grid(tiny: bool) -> list[dict]:
    """Every run of the declared grid, in launch order: what a cut-short sweep must have comes first (source,
    then the default learning rate, then the sweep's other values; the bf16 preset last)."""
    if tiny:
        runs = [dict(method="source", preset="autocast", lr=None, seed=0),
                dict(method="tent", preset="autocast", lr=1e-4, seed=0),
                dict(method="dusa", preset="autocast", lr=1e-4, seed=0)]
        # held-out rates: these wait for bench/select_lr.py (a smoke run of it, with --tiny)
        runs += [dict(method=method, preset="autocast", lr=SELECTED, seed=0) for method in CANDIDATE_RATES]
    else:
        runs = [dict(method="source", preset=preset, lr=None, seed=0) for preset in PRESETS]
        for lr in LEARNING_RATES:
            for method in ("dusa", "tent"):
                runs += [dict(method=method, preset="autocast", lr=lr, seed=seed) for seed in SEEDS]
        runs += [dict(method="dusa", preset="bf16", lr=lr, seed=seed) for lr in LEARNING_RATES for seed in SEEDS]
        runs += [dict(method="bn_adapt", preset="autocast", lr=None, seed=seed) for seed in SEEDS]
        runs += [dict(method=method, preset="autocast", lr=SELECTED, seed=seed) for method in CANDIDATE_RATES
                 for seed in SEEDS]
        runs += [dict(method="dusa", preset="autocast", lr=SELECTED, seed=seed, ablation=name)
                 for name in DUSA_ABLATIONS for seed in SEEDS]
    runs += continual_runs(tiny)
    for run in runs:
        run.setdefault("rounds", 1)
        run["name"] = run_name(run)
    return runs


def continual_runs(tiny: bool) -> list[dict]:
    """The continual row of the grid: every corruption in turn, CONTINUAL_ROUNDS times, never reset."""
    rounds = {"seed": 0, "preset": "autocast", "rounds": CONTINUAL_ROUNDS}
    if tiny:
        return [dict(method="dusa", lr=1e-4, **rounds)]
    return [dict(method="source", lr=None, **rounds),
            *(dict(method=method, lr=lr, **rounds) for method in ("tent", "dusa") for lr in LEARNING_RATES)]


def lr_text(lr: float) -> str:
    """A rate in a run's name: one significant digit where that is exact (1e-05), else all of them (7.5e-06)."""
    return f"{lr:.0e}" if float(f"{lr:.0e}") == lr else f"{lr:g}"


def run_name(run: dict) -> str:
    lr = "" if run["lr"] is None else "-lrsel" if run["lr"] == SELECTED else f"-lr{lr_text(run['lr'])}"
    ablation = f"-{run['ablation'].replace(' ', '_')}" if run.get("ablation") else ""
    prefix = "select-" if run.get("corruptions") else ""  # a held-out selection run
    rounds = f"-continual{run['rounds']}" if run.get("rounds", 1) > 1 else ""
    return f"{prefix}{run['method']}{ablation}-{run['preset']}{lr}-s{run['seed']}{rounds}"


def expected_tasks(wd: Workdir, run: dict) -> list[str]:
    """The task keys a finished run's results.json holds (the launcher's own sequence)."""
    from pipeline.run.config import DataConfig
    from pipeline.run.protocol import task_sequence
    data = DataConfig(corruptions=list(wd.corruptions), rounds=run.get("rounds", 1))
    return [task.key for task in task_sequence(data)]


def selected_rates(wd: Workdir) -> dict[str, float] | None:
    """method -> its held-out learning rate (bench/select_lr.py), or None before the selection."""
    path = wd.root / "selected_lr.json"
    if not path.is_file():
        return None
    return {method: record["selected"] for method, record in json.loads(path.read_text())["methods"].items()}


def resolve(run: dict, rates: dict[str, float] | None) -> dict | None:
    """The run with its held-out rate in place (and its name from it), or None while that rate is not chosen."""
    if run["lr"] != SELECTED:
        return run
    if not rates or run["method"] not in rates:
        return None
    run = dict(run, lr=rates[run["method"]])
    return dict(run, name=run_name(run))


def lr_option(method: str) -> str:
    """The option that sets a method's learning rate: its own section's `lr` (cotta, sar), else `--tta.lr`."""
    from dataclasses import fields

    from pipeline.methods import METHODS
    options = METHODS[method].options
    return f"--{method}.lr" if options is not None and "lr" in {f.name for f in fields(options)} else "--tta.lr"


def launch_command(wd: Workdir, run: dict, gpus: int) -> list[str]:
    """The launcher command of one run: with GPUs, `deepspeed --num_gpus G` (dusa: G / 2 replicas of a 2-stage
    pipeline; source and tent: G one-process replicas; replicas take the corruptions from a shared queue);
    without (the CPU smoke run), one process and one pipeline stage."""
    s = wd.sizes
    args = ["launch/tta.py", "--config", CONFIG, "--tta.method", run["method"], "--seed", str(run["seed"]),
            "--deepspeed", PRESETS[run["preset"]], "--output_dir", str(wd.runs / run["name"]),
            "--model.segmenter", str(wd.segmenter), "--model.generator", str(wd.generator),
            "--model.class_embeddings", str(wd.cache), "--data.root", str(wd.corrupted),
            "--data.classes", str(wd.classes),
            "--data.corruptions", json.dumps(list(run.get("corruptions") or wd.corruptions)),
            "--data.severity", str(SEVERITY), "--data.window_size", str(s.window),
            "--data.window_stride", str(s.window // 2), "--logging.progress", "false",
            "--pipeline.num_stages", str(2 if gpus >= 2 else 1)]
    if run["lr"] == SELECTED:
        raise MiniatureError(f"{run['name']}: resolve its held-out learning rate first (bench/select_lr.py)")
    if run["lr"] is not None:
        args += [lr_option(run["method"]), repr(run["lr"])]
    args += DUSA_ABLATIONS[run["ablation"]] if run.get("ablation") else []
    if run.get("rounds", 1) > 1:  # one sequence: one replica of the method (source adapts nothing: any)
        args += ["--tta.continual", "true", "--data.rounds", str(run["rounds"])]
        if run["method"] != "source":
            gpus = min(gpus, 2 if run["method"] == "dusa" else 1)
    if gpus == 0:
        return [sys.executable, *args, "--data.num_workers", "0"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_local_port()), "--num_gpus",
            str(gpus), *args]


def finished(wd: Workdir, run: dict) -> bool:
    path = wd.runs / run["name"] / "results.json"
    if not path.is_file():
        return False
    tasks = list(run["corruptions"]) if run.get("corruptions") else expected_tasks(wd, run)
    return set(json.loads(path.read_text()).get("tasks", {})) >= set(tasks)


def cmd_adapt(wd: Workdir, args) -> None:
    """Runs the grid through the launcher, `--parallel` runs at a time (tiny models leave a GPU mostly idle:
    several runs share it), skipping finished runs; a failed run is reported and the others go on. After
    `--deadline` minutes no run starts and the running ones are stopped (SIGTERM: the launcher keeps their
    finished corruptions, and the same command resumes them)."""
    need_models(wd)
    make_test_data(wd, args.workers)
    rates = selected_rates(wd)
    runs = [resolve(run, rates) for run in grid(wd.tiny)]
    if None in runs:
        log(f"adapt: {runs.count(None)} runs at held-out learning rates wait for bench/select_lr.py")
    run_launches(wd, list({run["name"]: run for run in runs if run is not None}.values()), args)


def run_launches(wd: Workdir, runs: list[dict], args) -> None:
    """Runs these runs through the launcher (what `adapt` does with the grid)."""
    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    todo = [run for run in runs if not finished(wd, run)]
    wd.logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE="disabled")
    if gpus == 0:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    parallel = args.parallel or (1 if gpus == 0 else 6)
    deadline = time.perf_counter() + 60 * args.deadline if args.deadline else math.inf
    running: list[tuple[dict, subprocess.Popen, float]] = []
    failed, stopped, start = [], [], time.perf_counter()
    log(f"adapt: {len(todo)} runs to do ({parallel} at a time, {gpus} GPUs)")
    while todo or running:
        if time.perf_counter() > deadline:
            stopped += [run["name"] for run in todo]
            todo = []
            for run, proc, _ in running:
                if proc.poll() is None:
                    proc.terminate()
        while todo and len(running) < parallel:
            run = todo.pop(0)
            cmd = launch_command(wd, run, gpus)
            if args.limit:
                cmd += ["--data.limit", str(args.limit)]
            with open(wd.logs / f"{run['name']}.log", "w") as out:
                out.write(" ".join(cmd) + "\n")
                out.flush()
                running.append((run, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT),
                                time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            run, proc, began = item
            if proc.poll() is None:
                continue
            running.remove(item)
            seconds = time.perf_counter() - began
            if proc.returncode == 0 and finished(wd, run):
                log(f"{run['name']}: done in {seconds:.0f} s")
                write_json(wd.logs / f"{run['name']}.wall.json", {"seconds": round(seconds, 1)})
            elif time.perf_counter() > deadline:
                stopped.append(run["name"])
                log(f"{run['name']}: stopped at the deadline after {seconds:.0f} s")
            else:
                failed.append(run["name"])
                tail = (wd.logs / f"{run['name']}.log").read_text().splitlines()[-5:]
                log(f"{run['name']}: FAILED (exit {proc.returncode}) after {seconds:.0f} s:\n  " + "\n  ".join(tail))
    log(f"adapt: {time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; not finished by the deadline (rerun to resume): {', '.join(stopped)}" if stopped else ""))
    if failed:
        raise SystemExit(1)


# ------------------------------------------------------------------------------------------------ report
def row_label(run: dict, held_out: bool = False) -> str:
    method = f"{run['method']} {run['ablation']}" if run.get("ablation") else run["method"]
    label = method if run["lr"] is None else f"{method} lr {lr_text(run['lr'])}"
    label += " (held-out lr)" if held_out else ""
    return label if run["preset"] == "autocast" else f"{label} (bf16 weights)"


def collect(wd: Workdir) -> list[dict]:
    """One row per (method, preset, lr): per corruption and mean, the mean over seeds and their range."""
    from pipeline.run.reporting import read_results
    rows: dict[str, dict] = {}
    rates = selected_rates(wd)
    for declared in grid(wd.tiny):
        run = resolve(declared, rates)
        if run is None:
            continue
        path = wd.runs / run["name"] / "results.json"
        if not path.is_file() or run["rounds"] > 1:  # the continual row: `collect_continual`
            continue
        results = read_results(path)
        label = row_label(run, held_out=declared["lr"] == SELECTED)
        row = rows.setdefault(label, {"label": label, "method": run["method"], "preset": run["preset"],
                                      "lr": run["lr"], "ablation": run.get("ablation"),
                                      "held_out": declared["lr"] == SELECTED, "seeds": {}})
        tasks = results["tasks"]
        row["seeds"][run["seed"]] = {
            "IoU": {task: tasks[task]["IoU"] for task in wd.corruptions if task in tasks},
            "mIoU": {task: tasks[task]["mIoU"] for task in wd.corruptions if task in tasks},
            "seconds": sum(t["seconds"] for t in tasks.values()), "images": sum(t["images"] for t in tasks.values())}
    for row in rows.values():
        seeds = list(row["seeds"].values())
        row["per_corruption"] = {}
        for task in [*wd.corruptions, "mean"]:
            values = [float(np.mean([s["mIoU"][c] for c in wd.corruptions])) if task == "mean" else s["mIoU"][task]
                      for s in seeds if all(c in s["mIoU"] for c in wd.corruptions)]
            row["per_corruption"][task] = {"mean": float(np.mean(values)) if values else None,
                                           "range": float(np.ptp(values)) if values else None, "values": values}
        row["seconds_per_image"] = float(np.mean([s["seconds"] / s["images"] for s in seeds]))
        # Per class and corruption, the mean IoU over the seeds that scored the class (None: no seed did).
        row["class_iou"] = {task: {c: _mean_or_none([s["IoU"][task].get(c) for s in seeds if task in s["IoU"]])
                                   for c in CLASSES} for task in wd.corruptions}
    order = {"source": 0, "bn_adapt": 1, "tent": 2, "cotta": 3, "sar": 4, "dusa": 5}
    return sorted(rows.values(), key=lambda r: (order[r["method"]], r["preset"] != "autocast", r["held_out"],
                                                r.get("ablation") or "", r["lr"] or 0))


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def class_iou_deltas(rows: list[dict], top: int = 3) -> dict[str, dict[str, list]]:
    """Per held-out row (and bn_adapt) and corruption: the `top` largest per-class IoU gains and losses against
    the source (autocast), as (class, change) pairs, largest first."""
    source = next((r for r in rows if r["method"] == "source" and r["preset"] == "autocast"), None)
    if source is None:
        return {}
    out = {}
    for row in rows:
        if not (row["held_out"] or row["method"] == "bn_adapt"):
            continue
        out[row["label"]] = {}
        for task, classes in row["class_iou"].items():
            changes = sorted(((c, v - source["class_iou"][task][c]) for c, v in classes.items()
                              if v is not None and source["class_iou"][task][c] is not None), key=lambda cv: cv[1])
            out[row["label"]][task] = {"gains": [[c, round(d, 2)] for c, d in changes[::-1][:top] if d > 0],
                                       "losses": [[c, round(d, 2)] for c, d in changes[:top] if d < 0]}
    return out


def class_delta_lines(deltas: dict[str, dict[str, dict]]) -> str:
    """The per-class changes as Markdown lines, one per row and corruption."""
    lines = [f"- {label}, {task}: " + "; ".join(
        [", ".join(f"{c} {d:+.1f}" for c, d in change[kind]) or "none" for kind in ("gains", "losses")])
        for label, tasks in deltas.items() for task, change in tasks.items()]
    return ("Per-class IoU against the source (gains; losses, at most 3 each):\n" + "\n".join(lines)) if lines else ""


def analysis_pair(tiny: bool) -> tuple[dict, list[dict]]:
    """The declared runs of the analysis: the source (autocast) and dusa at its lr, one run per seed."""
    lr = TINY_ANALYSIS_LR if tiny else ANALYSIS_LR
    runs = [r for r in grid(tiny) if r["rounds"] == 1 and r["preset"] == "autocast" and not r.get("ablation")]
    return (next(r for r in runs if r["method"] == "source"),
            [r for r in runs if r["method"] == "dusa" and r["lr"] == lr])


def training_label(wd: Workdir) -> str:
    """A training of the benchmark in a run's label: its `train --seed` (recorded since the analysis), else its
    workdir's name."""
    seed = wd.records().get("segmenter", {}).get("seed")
    return f"training seed {seed}" if seed is not None else f"training {wd.root.name}"


def analysis_section(wd: Workdir, retrained: list[Workdir] = ()) -> dict | None:
    """The analysis of the finished runs of the declared pair in `wd` and in the workdirs of its retrainings
    (`report --retrained`): each dusa run against its own training's source. None: no pair finished."""
    from bench.miniature_analysis import analyse, read_image_figures
    from pipeline.run.image_figures import IMAGES_FILE
    from pipeline.run.reporting import read_results

    def finished_tasks(w: Workdir, run: dict) -> dict | None:
        path = w.runs / run["name"] / "results.json"
        tasks = read_results(path)["tasks"] if path.is_file() else {}
        return tasks if all(task in tasks for task in w.corruptions) else None

    source_run, dusa_runs = analysis_pair(wd.tiny)
    pairs, used, unfinished = {}, [], []
    for w in [wd, *retrained]:
        source = finished_tasks(w, source_run)
        for run in dusa_runs:
            tasks = finished_tasks(w, run)
            name = str(w.runs / run["name"])
            if source is None or tasks is None:
                unfinished.append(name)
                continue
            images = w.runs / run["name"] / IMAGES_FILE
            label = f"{training_label(w)}, seed {run['seed']}" if retrained else f"seed {run['seed']}"
            pairs[label] = (source, tasks, read_image_figures(images) if images.is_file() else None)
            used.append(name)
    if not pairs:
        return None
    document = analyse(pairs, wd.corruptions, CLASSES, LOSS_QUANTILES, EXPLAINED_SPEARMAN, GAIN_POINTS)
    lr = TINY_ANALYSIS_LR if wd.tiny else ANALYSIS_LR
    document.update(label=f"dusa lr {lr_text(lr)} against source (autocast preset)", source_run=source_run["name"],
                    dusa_runs=used, unfinished=unfinished)
    return document


def collect_continual(wd: Workdir) -> list[dict]:
    """The continual row: per run, each round's mean mIoU over the corruptions (None until the round is whole)."""
    from pipeline.run.reporting import read_results
    rows = []
    for run in grid(wd.tiny):
        path = wd.runs / run["name"] / "results.json"
        if run["rounds"] == 1 or not path.is_file():
            continue
        tasks = read_results(path)["tasks"]
        keys = expected_tasks(wd, run)
        per_round = len(keys) // run["rounds"]
        means = []
        for r in range(run["rounds"]):
            values = [tasks[k]["mIoU"] for k in keys[r * per_round:(r + 1) * per_round] if k in tasks]
            whole = len(values) == per_round and all(v is not None for v in values)
            means.append(float(np.mean(values)) if whole else None)
        rows.append({"label": row_label(run), "method": run["method"], "lr": run["lr"], "rounds": run["rounds"],
                     "round_mIoU": means, "seconds": sum(t["seconds"] for t in tasks.values())})
    return rows


def continual_table(rows: list[dict]) -> str:
    """Mean mIoU over the corruptions per round, and the last round's change from the first."""
    rounds = max(row["rounds"] for row in rows)
    head = ["continual (no reset)", *(f"round {r + 1}" for r in range(rounds)), "last - first"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for row in rows:
        means = row["round_mIoU"]
        change = means[-1] - means[0] if None not in (means[0], means[-1]) else None
        cells = ["–" if m is None else f"{m:.1f}" for m in means] + ["–" if change is None else f"{change:+.1f}"]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict], corruptions, clean: float | None) -> str:
    head = ["method", *corruptions, "mean", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for row in rows:
        cells = []
        for task in [*corruptions, "mean"]:
            cell = row["per_corruption"][task]
            n = len(cell["values"])
            cells.append("–" if cell["mean"] is None else f"{cell['mean']:.1f}" if n < 2
                         else f"{cell['mean']:.1f} ± {cell['range'] / 2:.1f}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {row['seconds_per_image']:.3f} |")
    if clean is not None:
        lines.append(f"\nClean test mIoU of the source segmenter: {clean:.1f}.")
    return "\n".join(lines)


def summary_lines(records: dict, sanity: dict | None) -> str:
    """Training and the sanity check in a few lines, for the README under the table."""
    lines = []
    parts = [f"{part} {records[part]['steps']} steps in {records[part]['seconds']:.0f} s (stopped by "
             f"{records[part]['stopped_by']})" for part in PARTS if part in records]
    if parts:
        device = next(records[part]["device"] for part in PARTS if part in records)
        vae = records.get("vae", {})
        lines.append(f"- Training ({device}): {'; '.join(parts)}"
                     + (f"; VAE reconstruction {vae['reconstruction_psnr_db']:.1f} dB PSNR" if vae else "") + ".")
    if sanity:
        s = sanity["summary"]
        other, swapped, top1 = s["true_vs_other_classes"], s["true_vs_swapped"], s["true_vs_source_top1"]
        pooled = s["dusa_loss_vs_source_pixel_error_pooled"]

        def compare(c: dict) -> str:
            return (f"{c['wrong']:.4f} ({100 * c['relative_gap']:+.1f} % per window against the true labels; true "
                    f"lower in {100 * c['true_lower']:.0f} % of {c['windows']} windows, Wilcoxon p "
                    f"{_fmt_p(c['wilcoxon_p'])})")
        lines.append(f"- Before adaptation (t = {sanity['t']}, every corrupted test window): class-weighted velocity "
                     f"error {other['true']:.4f} with the true labels' one-hot weights; with every class moved to "
                     f"another, {compare(other)}; with the window's own classes swapped among themselves, "
                     f"{compare(swapped)}; with the source's top-1, {compare(top1)}.")
        lines.append(f"- DUSA loss of the source predictions against their pixel error, per image: Spearman "
                     f"{_fmt(pooled['spearman'])} pooled over {pooled['n']} images, "
                     f"{_fmt(s['dusa_loss_vs_source_pixel_error_mean_within_tasks'])} within a corruption (mean).")
        lines.append("- Source mIoU per corruption: " + ", ".join(
            f"{task} {row['source_mIoU']:.1f}" for task, row in sanity["tasks"].items()) + ".")
        if all(row.get("candidate_recall") is not None for row in sanity["tasks"].values()):
            lines.append("- Candidate-class recall of the source (share of a window's true classes among its "
                         "candidates; windows holding all of them): " + ", ".join(
                             f"{task} {row['candidate_recall']:.2f} ({100 * row['windows_with_every_true_class']:.0f} %)"
                             for task, row in sanity["tasks"].items()) + ".")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_p(value) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def plot(rows: list[dict], corruptions, path: Path, clean: float | None = None, title: str = "") -> None:
    """mIoU per corruption (and the mean) per method: grouped bars, the seeds' range as a whisker, the clean
    mIoU as a dashed line. PIL only."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=15)
    groups = [*corruptions, "mean"]
    width, height, left, bottom, top = 1400, 640, 70, 90, 50
    legend_h = 24 * ((len(rows) + 2) // 3)
    image = Image.new("RGB", (width, height + legend_h), "white")
    draw = ImageDraw.Draw(image)
    values = [v for r in rows for c in r["per_corruption"].values() for v in c["values"]] + [clean or 0]
    ymax = max(10.0, math.ceil(max(values) / 10) * 10)
    plot_h = height - bottom - top

    def y(v: float) -> float:
        return height - bottom - plot_h * v / ymax

    for tick in np.arange(0, ymax + 1e-9, 10):
        draw.line([(left, y(tick)), (width - 20, y(tick))], fill=(225, 225, 225))
        draw.text((left - 34, y(tick) - 8), f"{tick:.0f}", fill="black", font=font)
    draw.text((8, 10), f"mIoU (%)   {title}", fill="black", font=font)
    # One hue per method and preset, lighter to darker with the learning rate.
    families = {("source", "autocast"): [(80, 80, 80)], ("source", "bf16"): [(160, 160, 160)],
                ("tent", "autocast"): [(161, 217, 155), (65, 171, 93), (0, 109, 44)],
                ("dusa", "autocast"): [(158, 202, 225), (66, 146, 198), (8, 69, 148)],
                ("dusa", "bf16"): [(253, 174, 107), (241, 105, 19), (166, 54, 3)],
                ("bn_adapt", "autocast"): [(120, 120, 120)], ("cotta", "autocast"): [(188, 128, 189)] * 3,
                ("sar", "autocast"): [(215, 48, 39)] * 3}
    lrs_of = {m: sorted({r["lr"] for r in rows if r["method"] == m and r["lr"] is not None}) for m, _ in families}
    colours = [(60, 60, 160) if r.get("ablation") else families[(r["method"], r["preset"])][
        min(lrs_of[r["method"]].index(r["lr"]), len(families[(r["method"], r["preset"])]) - 1)
        if r["lr"] is not None else 0] for r in rows]
    group_w = (width - left - 20) / len(groups)
    bar_w = group_w * 0.8 / max(len(rows), 1)
    for g, task in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        draw.text((x0, height - bottom + 8), task, fill="black", font=font)
        for r, row in enumerate(rows):
            cell = row["per_corruption"][task]
            if cell["mean"] is None:
                continue
            xa, xb = x0 + r * bar_w, x0 + (r + 1) * bar_w - 2
            draw.rectangle([xa, y(cell["mean"]), xb, y(0)], fill=colours[r])
            if len(cell["values"]) > 1:
                xm = (xa + xb) / 2
                draw.line([(xm, y(min(cell["values"]))), (xm, y(max(cell["values"])))], fill="black", width=2)
    if clean is not None:
        for x in range(left, width - 20, 16):
            draw.line([(x, y(clean)), (x + 8, y(clean))], fill=(200, 0, 0), width=2)
        draw.text((width - 330, 10), f"dashed: clean test mIoU {clean:.1f}", fill=(200, 0, 0), font=font)
    for r, row in enumerate(rows):
        lx, ly = left + (r % 3) * 440, height - 40 + 24 * (r // 3)
        draw.rectangle([lx, ly, lx + 14, ly + 14], fill=colours[r])
        draw.text((lx + 20, ly - 1), row["label"], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def cmd_report(wd: Workdir, args) -> dict:
    rows, continual = collect(wd), collect_continual(wd)
    if not rows and not continual:  # nothing measured: no report (an empty one would read as a result)
        raise MiniatureError(f"nothing to report: no adaptation run finished in {wd.runs} (run `adapt` first)")
    records = wd.records()
    sanity = json.loads(wd.sanity.read_text()) if wd.sanity.is_file() else None
    clean = records.get("segmenter", {}).get("clean_test_mIoU")
    date = datetime.date.today().isoformat()
    stem = f"{date}-miniature{'-tiny' if wd.tiny else ''}"
    out = Path(args.out) if args.out else wd.root / "report"
    table = (markdown_table(rows, wd.corruptions, clean) if rows else "") + "\n\n" + summary_lines(records, sanity)
    if continual:
        table += "\n\n" + continual_table(continual)
    title = (f"miniature benchmark{' --tiny (a CPU smoke run: no quality claim)' if wd.tiny else ''}, severity "
             f"{SEVERITY}; bars: mean over seeds, whiskers: their range")
    deltas = class_iou_deltas(rows)
    if deltas:
        table += "\n\n" + class_delta_lines(deltas)
    retrained = []
    for root in getattr(args, "retrained", None) or []:
        if not Path(root).is_dir():
            raise MiniatureError(f"--retrained {root} is not a folder (a workdir of this benchmark, trained again)")
        retrained.append(Workdir(root, wd.tiny))
    analysis = analysis_section(wd, retrained)
    if analysis is not None:
        from bench.miniature_analysis import analysis_markdown, plot_analysis
        table = table.rstrip() + "\n\n" + analysis_markdown(analysis, analysis["label"])
        scale = " --tiny (a CPU smoke run: no quality claim)" if wd.tiny else ""
        plot_analysis(analysis, out / f"{stem}-analysis.png",
                      f"miniature benchmark{scale}, severity {SEVERITY}: analysis of {analysis['label']}")
    walls = {run["name"]: json.loads((wd.logs / f"{run['name']}.wall.json").read_text())["seconds"]
             for run in grid(wd.tiny) if (wd.logs / f"{run['name']}.wall.json").is_file()}
    document = {
        "title": title, "date": date, "tiny": wd.tiny, "classes": list(CLASSES), "corruptions": list(wd.corruptions),
        "severity": SEVERITY, "seeds": list(SEEDS), "learning_rates": list(LEARNING_RATES), "presets": PRESETS,
        "config": CONFIG, "sizes": sizes_record(wd.sizes), "training": records, "sanity": sanity, "rows": rows,
        "validation_corruptions": list(VALIDATION_CORRUPTIONS), "candidate_rates": CANDIDATE_RATES,
        "selected_lr": selected_rates(wd), "dusa_ablations": DUSA_ABLATIONS,
        "class_iou_deltas_vs_source": deltas, "analysis": analysis,
        "run_wall_seconds": walls, "markdown": table,
        "continual_rounds": CONTINUAL_ROUNDS, "continual_rows": continual,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    write_json(out / f"{stem}.json", document)
    if rows:
        plot(rows, wd.corruptions, out / f"{stem}.png", clean, title)
    print(table)
    log(f"report: {out / (stem + '.json')}, {out / (stem + '.png')}"
        + (f", {out / (stem + '-analysis.png')}" if analysis is not None else ""))
    return document


# ------------------------------------------------------------------------------------------------ CLI
STEPS = ("data", "train", "sanity", "adapt", "report")


def cmd_all(wd: Workdir, args) -> None:
    """Every step in order, in this process, up to `--until`."""
    for step in STEPS[:STEPS.index(args.until) + 1]:
        COMMANDS[step](wd, args)


COMMANDS = {"data": cmd_data, "train": cmd_train, "sanity": cmd_sanity, "adapt": cmd_adapt, "report": cmd_report,
            "all": cmd_all}


def help_epilog() -> str:
    """The docstring after its first paragraph (the description), with the grid's constants as their values."""
    values = {"CORRUPTIONS": ", ".join(CORRUPTIONS), "SEVERITY": str(SEVERITY), "SEEDS": " and ".join(map(str, SEEDS)),
              "ANALYSIS_LR": f"lr {lr_text(ANALYSIS_LR)}",
              "LEARNING_RATES": ", ".join(f"{lr:.0e}".replace("e-0", "e-") for lr in LEARNING_RATES),
              "PRESETS": ", ".join(f"{name}: {path}" for name, path in PRESETS.items())}
    return re.sub(r"\b(" + "|".join(values) + r")\b", lambda m: values[m[1]], __doc__.split("\n\n", 1)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog())
    parser.add_argument("command", choices=list(COMMANDS), metavar="STEP",
                        help="the step to run: data, train, sanity, adapt, report; or all (every step in order)")
    parser.add_argument("--workdir", default="runs/miniature", help="where data, models and runs go")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a handful of images and steps")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that render scenes and corrupt images")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all", help="train: which model")
    parser.add_argument("--minutes", type=float, default=None,
                        help="train: time cap of each part (default " + ", ".join(f"{k} {v}" for k, v in MINUTES.items())
                        + f"; --tiny {TINY_MINUTES})")
    parser.add_argument("--device", default=None, help="train / sanity: torch device (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=0, help="train: seed of every model and batch")
    parser.add_argument("--sanity_limit", type=int, default=None, help="sanity: images per corruption (default all)")
    parser.add_argument("--gpus", type=int, default=None, help="adapt: GPUs (default: all visible; 0: CPU)")
    parser.add_argument("--parallel", type=int, default=None, help="adapt: runs at a time (default 6; CPU 1)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="adapt: minutes after which no run starts and running ones are stopped (resumable)")
    parser.add_argument("--limit", type=int, default=None, help="adapt: images per corruption (default all)")
    parser.add_argument("--out", default=None,
                        help="report: folder of the JSON and the PNG (default: <workdir>/report; the published "
                             "results go to bench/results only when named here)")
    parser.add_argument("--retrained", nargs="+", default=None, metavar="WORKDIR",
                        help="report: workdirs of this benchmark trained again (`train --seed S`, the same grid run "
                             "there): the analysis takes their runs too, each against its own training's source")
    parser.add_argument("--until", choices=STEPS, default="report", help="all: the last step to run")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.gpus = 0 if args.gpus is None else args.gpus
    try:
        wd = Workdir(args.workdir, args.tiny)
        import diffusers
        import transformers
        for library in (transformers, diffusers):  # their weight-writing bars would fill the logs
            library.utils.logging.disable_progress_bar()
        COMMANDS[args.command](wd, args)
    except (ValueError, OSError) as exc:  # MiniatureError, a damaged results file, an unwritable folder
        if os.environ.get("DUSA_TRACEBACK"):
            raise
        LOG.error(f"error: {' '.join(str(exc).split())}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
