"""The miniature benchmark (bench/miniature.py): the pieces that carry its meaning (flow matching as SD3 trains,
the class-restricted loss, the scenes' annotation convention, the report's seed statistics) and its --tiny
chain on the CPU, whose models must load through the launcher's own checks and loaders. No quality claim."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.miniature as mini
from bench.miniature_make import (CLASSES, K, class_masked_mse, flow_matching_pair, latent_labels, logit_normal,
                                  pick_present_classes, render_scene, render_split)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ flow matching
def test_flow_matching_pair_is_sd3s_rectified_flow():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t, target = flow_matching_pair(z0, eps, t)
    assert torch.equal(x_t[0], z0[0]) and torch.equal(x_t[2], eps[2])  # the path's two ends
    assert torch.allclose(x_t[1], 0.7 * z0[1] + 0.3 * eps[1])
    assert torch.equal(target, eps - z0)
    # The target is the path's velocity d x_t / dt, whatever t.
    step = 1e-3
    now, _ = flow_matching_pair(z0.double(), eps.double(), t.double())
    later, _ = flow_matching_pair(z0.double(), eps.double(), t.double() + step)
    assert torch.allclose((later - now) / step, target.double(), atol=1e-9)


def test_logit_normal_times():
    g = torch.Generator().manual_seed(0)
    t = logit_normal(200_000, g)
    assert 0 < float(t.min()) and float(t.max()) < 1
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(float(logit.mean())) < 0.01 and abs(float(logit.std()) - 1) < 0.01  # SD3: m = 0, s = 1
    assert abs(float(t.median()) - 0.5) < 0.005
    assert torch.equal(t, logit_normal(200_000, torch.Generator().manual_seed(0)))  # seeded
    shifted = logit_normal(200_000, torch.Generator().manual_seed(1), mean=1.0)
    assert abs(float(shifted.median()) - 1 / (1 + math.exp(-1))) < 0.005


# ---------------------------------------------------------------------------------------- the class-restricted loss
def test_class_masked_mse_counts_only_the_conditioning_class():
    ids = torch.tensor([[[0, 0], [1, 255]], [[2, 1], [1, 1]]])  # [B=2, 2, 2]
    classes = torch.tensor([0, 1])
    target = torch.zeros(2, 3, 2, 2)
    prediction = torch.zeros(2, 3, 2, 2, requires_grad=True)
    with torch.no_grad():  # errors everywhere except on each sample's class pixels
        prediction += 5.0
        prediction[0, :, 0, :] = 0.0
        prediction[1][:, ids[1] == 1] = 0.0
    assert float(class_masked_mse(prediction, target, ids, classes).detach()) == 0.0
    with torch.no_grad():  # now an error of 2 on sample 0's class-0 pixels (2 pixels x 3 channels)
        prediction[0, :, 0, :] = 2.0
    loss = class_masked_mse(prediction, target, ids, classes)
    # mean over the 5 counted pixels (2 + 3) and their 3 channels: (2 * 3 * 4) / (5 * 3)
    assert math.isclose(float(loss.detach()), 24 / 15, rel_tol=1e-6)
    loss.backward()
    grad_pixels = prediction.grad.abs().sum(1) > 0
    assert torch.equal(grad_pixels[0], ids[0] == 0) and not grad_pixels[1].any()


def test_one_present_class_is_picked_per_sample():
    ids = torch.full((3, 4, 4), 255)
    ids[0, :2] = 3
    ids[0, 2:] = 7
    ids[1] = 11
    ids[2, 0, 0] = 0
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([pick_present_classes(ids, g) for _ in range(200)])
    assert set(picks[:, 0].tolist()) == {3, 7}
    assert set(picks[:, 1].tolist()) == {11} and set(picks[:, 2].tolist()) == {0}


def test_latent_labels_are_the_block_majority_of_labelled_pixels():
    annotation = torch.zeros(1, 16, 16, dtype=torch.uint8)  # ADE values: 0 ignored
    annotation[0, :8, :8] = 3  # block (0, 0): class 2 everywhere
    annotation[0, :8, 8:] = 5  # block (0, 1): 5 x 8 pixels of class 4 and 3 x 8 of class 1 ...
    annotation[0, :3, 8:] = 2
    annotation[0, 8:, 8:11] = 7  # block (1, 1): 24 pixels of class 6, the other 40 ignored
    ids = latent_labels(annotation, 8)
    assert ids.tolist() == [[[2, 4], [255, 6]]]


# ------------------------------------------------------------------------------------------------ scenes
def test_scenes_follow_the_ade_annotation_convention():
    counts = np.zeros(K + 1, np.int64)
    for seed in range(40):
        image, label = render_scene(seed, 64, 86)
        assert image.shape == (64, 86, 3) and image.dtype == np.uint8
        assert label.shape == (64, 86) and label.dtype == np.uint8 and int(label.max()) <= K
        counts += np.bincount(label.ravel(), minlength=K + 1)
        sky_rows = np.nonzero((label == CLASSES.index("sky") + 1).any(1))[0]
        assert len(sky_rows) and sky_rows.max() < 0.6 * 64, "sky lies above a horizon in the upper part"
    assert (counts[1:] > 0).all(), "every class 1..K occurs"
    assert counts[0] > 0, "unlabelled clutter is annotated 0"
    again, label_again = render_scene(7, 64, 86)
    assert np.array_equal(again, render_scene(7, 64, 86)[0]) and np.array_equal(label_again, render_scene(7, 64, 86)[1])


def test_a_split_does_not_depend_on_the_worker_count():
    one = render_split("test", 12, 64, 86, workers=1)
    two = render_split("test", 12, 64, 86, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert not np.array_equal(one[0], render_split("train", 12, 64, 86, workers=1)[0])  # splits differ


# ------------------------------------------------------------------------------------------------ grid, config, report
def test_the_declared_grid_and_launch_commands(tmp_path):
    runs = mini.grid(tiny=False)
    assert len({r["name"] for r in runs}) == len(runs)
    episodic = [r for r in runs if r["rounds"] == 1]
    dusa = [r for r in episodic if r["method"] == "dusa" and r["lr"] != mini.SELECTED]
    assert len(dusa) == len(mini.PRESETS) * len(mini.LEARNING_RATES) * len(mini.SEEDS)
    assert len([r for r in episodic if r["method"] == "tent" and r["lr"] != mini.SELECTED]) \
        == len(mini.LEARNING_RATES) * len(mini.SEEDS)
    assert [r["preset"] for r in episodic if r["method"] == "source"] == list(mini.PRESETS)
    wd = mini.Workdir(tmp_path / "full", tiny=False)
    cmd = mini.launch_command(wd, dusa[0], gpus=2)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[cmd.index("--pipeline.num_stages") + 1] == "2"  # dusa: one 2-stage pipeline
    assert cmd[cmd.index("--data.window_size") + 1] == "256" and cmd[cmd.index("--data.window_stride") + 1] == "128"
    assert cmd[cmd.index("--data.classes") + 1] == str(wd.classes)
    tent = next(r for r in episodic if r["method"] == "tent")
    cmd = mini.launch_command(wd, tent, gpus=2)  # tent: two one-process replicas
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[cmd.index("--tta.lr") + 1] == repr(tent["lr"])
    cmd = mini.launch_command(wd, dusa[0], gpus=0)
    assert cmd[1] == "launch/tta.py" and cmd[cmd.index("--pipeline.num_stages") + 1] == "1"
    # The continual row: source, tent and dusa, 3 rounds without reset, on one replica of the adapting methods.
    continual = [r for r in runs if r["rounds"] > 1]
    assert [r["method"] for r in continual] == ["source"] + ["tent"] * 3 + ["dusa"] * 3
    assert all(r["rounds"] == mini.CONTINUAL_ROUNDS == 3 and r["name"].endswith("-continual3") for r in continual)
    cmd = mini.launch_command(wd, continual[1], gpus=4)
    assert cmd[cmd.index("--num_gpus") + 1] == "1" and cmd[cmd.index("--data.rounds") + 1] == "3"
    assert cmd[cmd.index("--tta.continual") + 1] == "true"
    cmd = mini.launch_command(wd, continual[-1], gpus=4)
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[cmd.index("--pipeline.num_stages") + 1] == "2"
    assert mini.expected_tasks(wd, continual[0])[:2] == ["r1.snow", "r1.frost"]


def test_the_run_config_matches_the_benchmark():
    config = json.loads((ROOT / mini.CONFIG).read_text())
    wd = mini.Workdir.__new__(mini.Workdir)  # the default workdir's paths, without making it
    wd.root = Path("runs/miniature")
    assert config["model"] == {"segmenter": str(wd.segmenter), "generator": str(wd.generator),
                               "class_embeddings": str(wd.cache)}
    data = config["data"]
    assert data["root"] == str(wd.corrupted) and data["classes"] == str(wd.classes)
    assert tuple(data["corruptions"]) == mini.CORRUPTIONS and data["severity"] == mini.SEVERITY
    assert data["window_size"] == mini.FULL.window == mini.FULL.height and data["window_stride"] == 128
    assert config["deepspeed"] == mini.PRESETS["autocast"]


def test_paired_window_statistics():
    stats = mini.paired([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 3.3, 4.8])
    assert stats["windows"] == 4 and stats["true"] == 2.5 and math.isclose(stats["wrong"], 2.9)
    assert math.isclose(stats["relative_gap"], (0.5 + 0 + 0.1 + 0.2) / 4) and stats["true_lower"] == 0.75
    assert 0 < stats["wilcoxon_p"] < 1
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 12):
        perm = mini.derangement(n, g)
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()


def test_the_report_gives_mean_and_range_over_seeds(tmp_path):
    wd = mini.Workdir(tmp_path / "full", tiny=False)
    corruptions = list(wd.corruptions)

    def fake(run: dict, miou: float) -> None:
        folder = wd.runs / run["name"]
        folder.mkdir(parents=True)
        tasks = {c: {"mIoU": miou + i, "aAcc": 90.0, "IoU": {}, "images": 10, "seconds": 2.0}
                 for i, c in enumerate(corruptions)}
        (folder / "results.json").write_text(json.dumps({"metric_unit": "percent", "tasks": tasks}))

    runs = {(r["method"], r["preset"], r["lr"], r["seed"]): r for r in mini.grid(tiny=False) if r["rounds"] == 1}
    fake(runs[("source", "autocast", None, 0)], 40.0)
    fake(runs[("dusa", "autocast", 1e-4, 0)], 44.0)
    fake(runs[("dusa", "autocast", 1e-4, 1)], 46.0)
    continual = next(r for r in mini.grid(tiny=False) if r["rounds"] > 1 and r["method"] == "dusa")
    folder = wd.runs / continual["name"]
    folder.mkdir(parents=True)
    keys = mini.expected_tasks(wd, continual)
    tasks = {k: {"mIoU": 50.0 - 5 * (i // len(corruptions)), "aAcc": 90.0, "IoU": {}, "images": 10, "seconds": 2.0}
             for i, k in enumerate(keys[:-1])}  # the last round lacks its last corruption: no mean yet
    (folder / "results.json").write_text(json.dumps({"metric_unit": "percent", "tasks": tasks}))
    args = type("Args", (), {"out": str(tmp_path / "out")})
    document = mini.cmd_report(wd, args)
    rows = {row["label"]: row for row in document["rows"]}
    assert set(rows) == {"source", "dusa lr 1e-04"}
    dusa = rows["dusa lr 1e-04"]["per_corruption"]
    assert dusa[corruptions[1]] == {"mean": 46.0, "range": 2.0, "values": [45.0, 47.0]}
    assert math.isclose(dusa["mean"]["mean"], 45.0 + (len(corruptions) - 1) / 2)
    assert rows["source"]["per_corruption"]["mean"]["range"] == 0.0
    assert math.isclose(rows["source"]["seconds_per_image"], 0.2)
    assert "| dusa lr 1e-05 | 50.0 | 45.0 | – | – |" in document["markdown"]
    assert document["continual_rows"][0]["round_mIoU"] == [50.0, 45.0, None]
    assert "| dusa lr 1e-04 | 45.0 ± 1.0 | 46.0 ± 1.0 |" in document["markdown"]
    png = next((tmp_path / "out").glob("*-miniature.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_rows_wait_for_the_selection_then_report_per_class_changes(tmp_path):
    wd = mini.Workdir(tmp_path / "full", tiny=False)
    corruptions = list(wd.corruptions)
    declared = mini.grid(tiny=False)
    held_out = [r for r in declared if r["lr"] == mini.SELECTED]
    assert {r["method"] for r in held_out} == set(mini.CANDIDATE_RATES)
    assert {r.get("ablation") for r in held_out} == {None, *mini.DUSA_ABLATIONS}
    assert [r["seed"] for r in declared if r["method"] == "bn_adapt"] == list(mini.SEEDS)
    assert not set(mini.VALIDATION_CORRUPTIONS) & set(mini.CORRUPTIONS)
    assert mini.selected_rates(wd) is None and mini.resolve(held_out[0], None) is None
    with pytest.raises(mini.MiniatureError, match="resolve its held-out learning rate first"):
        mini.launch_command(wd, held_out[0], gpus=2)
    mini.write_json(wd.root / "selected_lr.json", {"methods": {"tent": {"selected": 1e-4}, "sar": {"selected": 3.125e-6},
                                                              "dusa": {"selected": 1e-5}}})
    rates = mini.selected_rates(wd)
    tent = mini.resolve(next(r for r in held_out if r["method"] == "tent"), rates)
    assert tent["name"] == "tent-autocast-lr1e-04-s0"  # the grid's own tent run at that rate: run once
    sar = mini.resolve(next(r for r in held_out if r["method"] == "sar"), rates)
    cmd = mini.launch_command(wd, sar, gpus=2)
    assert sar["name"] == "sar-autocast-lr3.125e-06-s0" and cmd[cmd.index("--sar.lr") + 1] == "3.125e-06"
    ablation = mini.resolve(next(r for r in held_out if r.get("ablation") == "uniform p"), rates)
    cmd = mini.launch_command(wd, ablation, gpus=2)
    assert ablation["name"] == "dusa-uniform_p-autocast-lr1e-05-s0"
    assert cmd[cmd.index("--dusa.candidate_weights") + 1] == "uniform" and "--tta.lr" in cmd

    def fake(run: dict, wall: float) -> None:
        folder = wd.runs / run["name"]
        folder.mkdir(parents=True)
        tasks = {c: {"mIoU": 40.0, "aAcc": 90.0, "IoU": {"sky": wall, "tree": 30.0}, "images": 10, "seconds": 2.0}
                 for c in corruptions}
        (folder / "results.json").write_text(json.dumps({"metric_unit": "percent", "tasks": tasks}))

    fake(next(r for r in declared if r["method"] == "source"), 50.0)
    fake(tent, 55.0)
    document = mini.cmd_report(wd, type("Args", (), {"out": str(tmp_path / "out")}))
    labels = [row["label"] for row in document["rows"]]
    assert labels == ["source", "tent lr 1e-04", "tent lr 1e-04 (held-out lr)"]
    deltas = document["class_iou_deltas_vs_source"]["tent lr 1e-04 (held-out lr)"][corruptions[0]]
    assert deltas == {"gains": [["sky", 5.0]], "losses": []}
    assert document["selected_lr"] == rates
    assert f"- tent lr 1e-04 (held-out lr), {corruptions[0]}: sky +5.0; none" in document["markdown"]


# ------------------------------------------------------------------------------------------------ the --tiny chain
@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """data, train and sanity of --tiny, in this process (seconds on a CPU)."""
    work = tmp_path_factory.mktemp("miniature")
    for command in ("data", "train", "sanity"):
        assert mini.main([command, "--tiny", "--workdir", str(work), "--workers", "1"]) == 0
    return work


def test_tiny_data_is_an_ade20k_c_the_reader_takes(chain):
    from data.ade20k_c import ADE20KC
    from models.class_embeddings import read_class_list
    assert read_class_list(chain / "classes.txt") == list(CLASSES)
    for corruption in mini.TINY_CORRUPTIONS:
        dataset = ADE20KC(chain / "ade20k_c", corruption, mini.SEVERITY)
        assert len(dataset) == mini.TINY.test_images
        label = dataset[0]["label"]  # train ids: annotation 0 -> 255, value i + 1 -> i
        assert set(label.unique().tolist()) <= set(range(K)) | {255}
    train = np.load(chain / "train" / "labels.npy")
    assert train.shape == (mini.TINY.train_images, mini.TINY.height, mini.TINY.width) and train.max() <= K


def test_tiny_models_load_through_the_launchers_checks_and_loaders(chain):
    from models.class_embeddings import load_class_embeddings
    from models.sd3 import LatentEncoder, TransformerParts
    from models.segformer import Segmenter
    from pipeline.run.checks import (check_class_embedding_file, check_generator_files, check_segmenter_files,
                                 check_window_size)
    models = chain / "models"
    segmenter, generator, cache = models / mini.SEGMENTER, models / mini.GENERATOR, models / mini.CACHE
    check_segmenter_files(str(segmenter), K)
    transformer_config = check_generator_files(str(generator))
    check_class_embedding_file(str(cache), CLASSES, str(generator), transformer_config)
    check_window_size(mini.TINY.window, str(generator))
    loaded = Segmenter.from_pretrained(str(segmenter))
    assert loaded.num_classes == K and loaded.model.config.id2label[0] == CLASSES[0]
    encoder = LatentEncoder.from_pretrained(str(generator))
    record = json.loads((models / "training.json").read_text())["vae"]
    assert encoder.downsample == 8 and encoder.vae.config.latent_channels == 16
    assert math.isclose(encoder.shift, record["shift_factor"]) and math.isclose(encoder.scale, record["scaling_factor"])
    z = encoder(torch.rand(1, 3, mini.TINY.window, mini.TINY.window))
    assert z.shape == (1, 16, mini.TINY.window // 8, mini.TINY.window // 8)
    parts = TransformerParts(str(generator))
    assert parts.num_blocks == mini.TINY.transformer["num_layers"]
    parts.load("transformer_blocks.0")
    prompt, pooled = load_class_embeddings(cache, CLASSES, str(generator))
    assert prompt.shape == (K, mini.TINY.text_tokens, mini.TINY.transformer["joint_attention_dim"])
    assert pooled.shape == (K, mini.TINY.transformer["pooled_projection_dim"])
    with pytest.raises(ValueError, match="other classes"):
        load_class_embeddings(cache, list(CLASSES[::-1]), str(generator))


def test_tiny_training_and_sanity_records(chain):
    records = json.loads((chain / "models" / "training.json").read_text())
    for part in mini.PARTS:
        assert records[part]["steps"] >= 1 and math.isfinite(records[part]["final_loss"])
    assert 0 <= records["segmenter"]["clean_test_mIoU"] <= 100
    sanity = json.loads((chain / "sanity.json").read_text())
    assert set(sanity["tasks"]) == set(mini.TINY_CORRUPTIONS) and sanity["t"] == 0.25
    for row in sanity["tasks"].values():
        other = row["true_vs_other_classes"]
        assert other["windows"] == 2 * mini.TINY.test_images  # a 64 x 86 image gets 2 windows of 64
        assert other["true"] > 0 and other["wrong"] > 0 and 0 <= other["true_lower"] <= 1
        assert math.isclose(other["true"], row["true_vs_source_top1"]["true"])  # the same windows
        assert row["true_vs_swapped"]["windows"] <= other["windows"]  # only windows with two classes or more
        assert row["dusa_loss_vs_source_pixel_error"]["n"] == mini.TINY.test_images
        # Per window, "every true class found" (0 or 1) is at most the share found: so are their means.
        assert 0 <= row["windows_with_every_true_class"] <= row["candidate_recall"] <= 1
    # A second run finds everything made and skips it.
    before = (chain / "models" / mini.SEGMENTER / "model.safetensors").stat().st_mtime_ns
    assert mini.main(["train", "--tiny", "--workdir", str(chain), "--workers", "1"]) == 0
    assert (chain / "models" / mini.SEGMENTER / "model.safetensors").stat().st_mtime_ns == before


def test_a_workdir_keeps_its_scale(chain):
    with pytest.raises(mini.MiniatureError, match="tiny benchmark"):
        mini.Workdir(chain, tiny=False)


@pytest.mark.slow
def test_tiny_chain_through_the_launcher(chain, tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "bench/miniature.py", "all", "--tiny", "--workdir", str(chain), "--workers", "1"]
    published = sorted((ROOT / "bench" / "results").iterdir())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "runs at held-out learning rates wait for bench/select_lr.py" in proc.stdout  # no selection made here
    wd = mini.Workdir(chain, tiny=True)
    for run in [r for r in mini.grid(tiny=True) if r["lr"] != mini.SELECTED]:
        results = json.loads((chain / "runs" / run["name"] / "results.json").read_text())
        assert list(results["tasks"]) == mini.expected_tasks(wd, run)
        assert all(0 <= task["mIoU"] <= 100 and set(task["IoU"]) == set(CLASSES) for task in results["tasks"].values())
    # The report goes under the workdir (bench/results, tracked, only with --out), titled as tiny.
    assert sorted((ROOT / "bench" / "results").iterdir()) == published
    document = json.loads(next((chain / "report").glob("*-miniature-tiny.json")).read_text())
    assert [row["label"] for row in document["rows"]] == ["source", "tent lr 1e-04", "dusa lr 1e-04"]
    assert "| source |" in document["markdown"] and next((chain / "report").glob("*-miniature-tiny.png"))
    assert document["title"].startswith("miniature benchmark --tiny (a CPU smoke run: no quality claim), severity 3")
    assert [row["label"] for row in document["continual_rows"]] == ["dusa lr 1e-04"]
    assert None not in document["continual_rows"][0]["round_mIoU"]
    # The analysis section (dusa against source, from their results.json and images.csv) in every output.
    analysis = document["analysis"]
    assert analysis["dusa_runs"] == [str(wd.runs / "dusa-autocast-lr1e-04-s0")] and analysis["runs"] == ["seed 0"]
    assert set(analysis["tasks"]) == set(wd.corruptions)
    assert analysis["pooled"]["spearman"]["values"][0] is not None and analysis["verdict"]["verdict"] in (
        "explained", "partly explained", "unexplained", "nothing to explain")
    assert "Analysis (declared before its results): dusa lr 1e-04 against source" in document["markdown"]
    assert "**Verdict: " in document["markdown"] and next((chain / "report").glob("*-miniature-tiny-analysis.png"))


def test_help_describes_once_with_the_grids_values_and_every_argument(capsys):
    with pytest.raises(SystemExit):
        mini.main(["--help"])
    text = capsys.readouterr().out
    assert text.count("A miniature benchmark in which every weight is trained here") == 1
    assert "corruptions snow, frost, fog, brightness, contrast at severity 3; seeds 0 and 1;" in text
    assert "tent at 1e-5, 1e-4, 1e-3" in text
    assert not re.search(r"\b(CORRUPTIONS|SEEDS|SEVERITY|LEARNING_RATES|PRESETS)\b", text)
    assert "STEP the step to run: data, train, sanity, adapt, report; or all (every step in order)" in " ".join(
        text.split())  # argparse wraps the help to the terminal's width
