"""A user's mistake gives one line and exit code 2 (no traceback), a refused run writes nothing, files are
never lost or written through a link, state files are loaded only when they are what the run wrote, and a
run stops cleanly. In-process where the behaviour is logic; through the launcher where it is processes."""
from __future__ import annotations

import json
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from data.classes import ADE20K_CLASSES
from data.demo import make_demo_dataset
from models.class_embeddings import save_class_embeddings
from pipeline.run import checks
from pipeline.run.config import RunConfig, validate
from pipeline.run.folder import (LOCK_NAME, PeerError, RunFolder, Stopped, file_digests, orphaned_shared_memory,
                             verify_files, write_text_atomic)
from tests.helpers import RunsCode, demo_models_and_data, free_port, refused_runs

ROOT = Path(__file__).resolve().parents[1]
C = len(ADE20K_CLASSES)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_models) -> Path:
    return demo_models_and_data(tmp_path_factory.mktemp("hardening"), demo_models)


ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
ENV.pop("DUSA_TRACEBACK", None)


def model_args(demo: Path) -> list[str]:
    return ["--config", "ds_configs/demo.json", "--model.build_demo_models", "false", "--data.build_demo_data",
            "false", "--model.segmenter", str(demo / "segformer"), "--model.generator", str(demo / "sd3"),
            "--model.class_embeddings", str(demo / "classes.safetensors"), "--data.root", str(demo / "data"),
            "--logging.wandb.enabled", "false", "--logging.image_every", "0"]


def one_process_arguments(demo: Path, out: str | Path) -> list[str]:
    return [*model_args(demo), "--output_dir", str(out), "--pipeline.num_stages", "1", "--pipeline.partition", "null"]


def launch(demo: Path, out: str | Path, *overrides: str) -> subprocess.CompletedProcess:
    """One process, no launcher, on the demo's models and data."""
    return subprocess.run([sys.executable, "launch/tta.py", *one_process_arguments(demo, out), *overrides], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)


def launch2(demo: Path, out: Path, *overrides: str, data: Path | None = None, **kwargs):
    """Two ranks through the deepspeed launcher."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/tta.py", *model_args(demo), "--output_dir", str(out), *overrides]
    if data is not None:
        cmd += ["--data.root", str(data)]
    return cmd


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a refused run (exit code 2, no traceback)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


# ------------------------------------------------------------------ 3. values outside their domain
def config(**changes) -> RunConfig:
    cfg = RunConfig()
    for key, value in changes.items():
        group, name = key.split("__") if "__" in key else (None, key)
        setattr(getattr(cfg, group) if group else cfg, name, value)
    return cfg


BAD_VALUES = {
    "dusa__timestep_range": ((0.5, 1.5), "--dusa.timestep_range"),
    "dusa__temperature": (0.0, "--dusa.temperature"),
    "tta__lr": (float("nan"), "--tta.lr"),
    "dusa__lr_generator": (-1e-5, "--dusa.lr_generator"),
    "dusa__max_classes": (0, "--dusa.max_classes"),
    "dusa__min_classes": (30, "--dusa.min_classes"),
    "dusa__topk": (151, "--dusa.topk"),
    "tta__max_nonfinite": (0, "--tta.max_nonfinite"),
    "dusa__ignore_classes": ([150], "--dusa.ignore_classes"),
    "data__window_size": (0, "--data.window_size"),
    "data__window_stride": (600, "--data.window_stride"),
    "data__severity": (6, "--data.severity"),
    "data__max_windows": (0, "--data.max_windows"),
    "data__corruptions": (["fog", "fog"], "--data.corruptions"),
    "logging__log_every": (0, "--logging.log_every"),
    "seed": (-1, "--seed"),
}


@pytest.mark.parametrize("key", BAD_VALUES)
def test_a_value_outside_its_domain_is_refused(key):
    value, option = BAD_VALUES[key]
    with pytest.raises(ValueError) as err:
        validate(config(**{key: value}), C)
    assert str(err.value).startswith(option) and "domain" in str(err.value) and "\n" not in str(err.value)


def test_unusual_but_valid_values_are_accepted():
    for changes in ({"tta__lr": 0.0}, {"dusa__timestep_range": (0.0, 0.0)}, {"dusa__timestep_range": (1.0, 1.0)},
                    {"dusa__max_classes": 500}, {"dusa__min_classes": 20}, {"data__window_stride": 512},
                    {"dusa__ignore_classes": list(range(C - 1))}, {"logging__image_every": 0}):
        validate(config(**changes), C)


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage 2 is not supported"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage 3 is not supported"),
    ({"gradient_clipping": -1.0}, "gradient_clipping -1.0"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.5]}}}, "betas"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 0}}}, "eps"),
    ({"bf16": {"enabled": "yes"}}, "bf16"),
])
def test_deepspeed_values_the_pipeline_cannot_take(ds, message):
    with pytest.raises(ValueError, match=message):
        checks.check_deepspeed_config(ds, "x.json")
    checks.check_deepspeed_config({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}, "x.json")


def test_duplicate_keys_are_refused(tmp_path):
    json_file = tmp_path / "run.json"
    json_file.write_text('{"tta": {"lr": 1e-5, "method": "dusa", "lr": 1e-3}}')
    with pytest.raises(ValueError, match="sets 'lr' twice"):
        checks.check_argument_files(["--config", str(json_file)])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("tta:\n  lr: 1.0e-5\nseed: 1\ntta:\n  lr: 1.0\n")
    with pytest.raises(ValueError, match="sets 'tta' twice"):
        checks.check_argument_files([f"--config={yaml_file}"])
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 0}, "zero_optimization": {"stage": 1}}')
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"deepspeed": str(ds)}))
    with pytest.raises(ValueError, match="zero_optimization"):
        checks.check_argument_files(["--config", str(nested)])
    with pytest.raises(ValueError, match="sets 'bf16' twice"):
        checks.check_argument_files(["--deepspeed", '{"bf16": {}, "bf16": {}}'])
    checks.check_argument_files(["--config", "ds_configs/demo.json", "--deepspeed", "ds_configs/ds_demo.json"])


# ------------------------------------------------------------------ 1. shapes the models cannot take
def test_window_sizes_against_the_generator(demo):
    checks.check_window_size(128, str(demo / "sd3"))
    with pytest.raises(ValueError, match="not a multiple of 16, the generator's latent patch .* use 96 or 112"):
        checks.check_window_size(100, str(demo / "sd3"))
    with pytest.raises(ValueError, match="larger than the generator's position embedding"):
        checks.check_window_size(1024, str(demo / "sd3"))  # the tiny SD3: 32 patches of 2 latents of 8 pixels
    checks.check_window_size(1024, "stabilityai/stable-diffusion-3-medium-diffusers")  # hub id: SD3's 8 x 2


def test_window_count_from_headers_matches_the_placement_and_has_a_cap():
    from pipeline.dusa.windows import resized_size, window_boxes, window_count
    for h, w, size, stride in [(128, 1100, 128, 64), (512, 683, 512, 256), (700, 90, 64, 21), (64, 64, 64, 1)]:
        assert window_count(h, w, size, stride) == len(window_boxes(*resized_size(h, w, size), size, stride))
    # 1 x 100000: counted without listing (hundreds of thousands of windows).
    assert window_count(1, 100_000, 512, 256) > 100_000
    sizes = [(100, 20_000), (128, 171)]  # a panorama: 128 x 25600 after the resize
    fake = type("Images", (), {"__len__": lambda self: 2, "image_size": lambda self, i: sizes[i],
                               "_images": [Path("pano.jpg"), Path("ok.jpg")]})()
    with pytest.raises(ValueError, match=r"pano.jpg \(100x20000\) needs 399 windows .* --data.max_windows 32"):
        checks.check_window_counts({"fog": fake}, 128, 64, 32)
    assert checks.check_window_counts({"fog": fake}, 128, 64, 400) == 399


# ------------------------------------------------------------------ 2. damaged or mismatched model files
def test_a_truncated_or_damaged_safetensors_file_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(path))
    whole = path.read_bytes()
    assert checks.safetensors_header(path, "weights", "fix")["a"] == ("F32", (64, 64))
    for damaged, reason in [(whole[: len(whole) // 2], "cut short"), (whole[:5], "shorter than a safetensors header"),
                            (b"\xff" * 8 + whole[8:], "header alone claims"), (whole + b"x", "describes")]:
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"weights {path} is damaged .*{reason}.*: fix"):
            checks.safetensors_header(path, "weights", "fix")


def test_model_files_against_their_configs(demo, tmp_path):
    import shutil
    checks.check_segmenter_files(str(demo / "segformer"), C)
    transformer = checks.check_generator_files(str(demo / "sd3"))
    checks.check_class_embedding_file(str(demo / "classes.safetensors"), ADE20K_CLASSES, str(demo / "sd3"), transformer)
    # A segmenter whose config.json is not its weights' (another width).
    seg = tmp_path / "segformer"
    shutil.copytree(demo / "segformer", seg)
    cfg = json.loads((seg / "config.json").read_text())
    cfg["decoder_hidden_size"] = 48
    (seg / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="the weights and config.json are of different models"):
        checks.check_segmenter_files(str(seg), C)
    # Class-embedding caches of another width, or with a row missing.
    wide = tmp_path / "wide.safetensors"
    save_class_embeddings(wide, torch.zeros(C, 85, 64), torch.zeros(C, 32), ADE20K_CLASSES, str(demo / "sd3"), "{}")
    with pytest.raises(ValueError, match="has widths 64 / 32 but the generator .* takes 32 / 32"):
        checks.check_class_embedding_file(str(wide), ADE20K_CLASSES, str(demo / "sd3"), transformer)
    short = tmp_path / "short.safetensors"
    save_class_embeddings(short, torch.zeros(C, 85, 32), torch.zeros(C, 32), ADE20K_CLASSES, str(demo / "sd3"), "{}")
    raw = short.read_bytes()
    short.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="class-embedding cache .* is damaged"):
        checks.check_class_embedding_file(str(short), ADE20K_CLASSES, str(demo / "sd3"), transformer)


# ------------------------------------------------------------------ 4. the output folder
def test_one_run_per_folder_and_the_holder_is_named(tmp_path):
    first = RunFolder.claim(str(tmp_path / "out"))
    with pytest.raises(ValueError) as err:
        RunFolder.claim(str(tmp_path / "out"))
    message = str(err.value)
    assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}, started 20" in message
    first.release()
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    RunFolder.claim(str(tmp_path / "out")).release()


def test_a_refused_run_leaves_nothing_and_empty_or_linked_folders_are_refused(tmp_path):
    RunFolder.claim(str(tmp_path / "a" / "b")).release(started=False)
    assert not (tmp_path / "a").exists()  # the folders it made go again
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="--output_dir is empty"):
            RunFolder.claim(empty)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "state").symlink_to(target)
    with pytest.raises(ValueError, match="state is a link"):
        RunFolder.claim(str(tmp_path / "out"))
    (tmp_path / "out" / "state").unlink()
    (tmp_path / "out" / LOCK_NAME).symlink_to(target / "victim")
    with pytest.raises(ValueError, match="is a link"):
        RunFolder.claim(str(tmp_path / "out"))
    assert not (target / "victim").exists()


def test_files_are_renamed_into_place_never_written_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    write_text_atomic(out / "config.json", "{}", out)
    assert victim.read_text() == "keep me" and not (out / "config.json").is_symlink()
    assert (out / "config.json").read_text() == "{}"
    assert [p.name for p in out.iterdir()] == ["config.json"]  # no temporary left


# ------------------------------------------------------------------ 5. untrusted state files
def test_state_digests_refuse_planted_changed_or_missing_files(tmp_path):
    (tmp_path / "fog").mkdir()
    (tmp_path / "fog" / "a.pt").write_bytes(b"a")
    digests = file_digests(tmp_path, ["fog"])
    verify_files(tmp_path, ["fog"], digests, "fix")
    (tmp_path / "fog" / "planted.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="fog/planted.pt was not written by it.*: fix"):
        verify_files(tmp_path, ["fog"], digests, "fix")
    (tmp_path / "fog" / "planted.pt").unlink()
    (tmp_path / "fog" / "a.pt").write_bytes(b"b")
    with pytest.raises(ValueError, match="fog/a.pt was changed"):
        verify_files(tmp_path, ["fog"], digests, "fix")
    (tmp_path / "fog" / "a.pt").unlink()
    with pytest.raises(ValueError, match="fog/a.pt is missing"):
        verify_files(tmp_path, ["fog"], digests, "fix")
    with pytest.raises(ValueError, match="no digests were recorded"):
        verify_files(tmp_path, ["fog"], {}, "fix")


def test_tent_state_is_loaded_only_as_written(tmp_path):
    """Tent's continual state: saved by a rename with its digest in results.json; a planted pickle
    (here one that would create a file) is refused, one line, before anything is loaded."""
    from pipeline.run.reporting import write_results
    from pipeline.methods.tent import TentMethod
    from pipeline.methods.tent import Tent
    from pipeline.run.loop import TTARunner
    segmenter = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4))
    runner = object.__new__(TTARunner)
    cfg = RunConfig(output_dir=str(tmp_path))
    runner.cfg, runner.method = cfg, TentMethod(Tent(segmenter, 1e-3), torch.device("cpu"))
    runner._save_state("fog")
    record = runner._state_record
    assert list(record["files"]) == ["fog"] and [p.name for p in (tmp_path / "state").iterdir()] == ["fog"]
    write_results({"tasks": {}, "average": {}, "config": {}, "state": record}, tmp_path)
    runner._load_state("fog")
    marker = tmp_path / "code-ran"
    (tmp_path / "state" / "fog").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError) as err:
        runner._load_state("fog")
    assert "does not hold the state this run wrote (fog was changed)" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


# ------------------------------------------------------------------ 6. processes
def test_orphaned_shared_memory_is_removed_only_when_proven(tmp_path):
    prefix = "deepspeed_allreduce_buffer_test_"
    old, fresh, mapped = (tmp_path / f"{prefix}{n}" for n in ("old", "fresh", "mapped"))
    for path in (old, fresh, mapped):
        path.write_bytes(b"\0" * 4096)
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(mapped, (long_ago, long_ago))
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        assert orphaned_shared_memory(prefix, shm=tmp_path) == [old]  # in use, or too new to judge: kept
    assert sorted(orphaned_shared_memory(prefix, shm=tmp_path)) == sorted([old, mapped])



@pytest.mark.parametrize("rank, failure", [
    (1, PeerError("bad value")),  # rank 0 found it and prints it
    (0, torch.distributed.DistBackendError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")),
    (1, RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1")),
])
def test_other_ranks_exit_quietly(launcher_main, monkeypatch, capsys, rank, failure):
    def fail(argv=None, claim=None):
        raise failure
    monkeypatch.setattr(launcher_main, "run", fail)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        launcher_main.main([])
    assert exc.value.code == 2 and capsys.readouterr().err == ""


def test_a_stopped_run_says_so_in_one_line(launcher_main, monkeypatch, capsys):
    def stop(argv=None, claim=None):
        raise Stopped("stopped by SIGTERM", 128 + signal.SIGTERM)
    monkeypatch.setattr(launcher_main, "run", stop)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        launcher_main.main([])
    assert exc.value.code == 143
    assert capsys.readouterr().err.strip() == "stopped by SIGTERM: nothing was written"


# ------------------------------------------------------------------ through the launcher
REFUSED = {  # class: (overrides, what the line says)
    "window not a multiple of the latent patch": (["--data.window_size", "100"], "not a multiple of 16"),
    "window of size 0": (["--data.window_size", "0"], "--data.window_size 0 is outside its domain"),
    "too many windows for one image": (["--data.max_windows", "1"], "windows of 128 (stride 64) in one step, more "
                                                                      "than --data.max_windows 1"),
    "flow time outside [0, 1]": (["--dusa.timestep_range", "[0.5, 1.5]"], "--dusa.timestep_range"),
    "ZeRO stage 2": (["--deepspeed", '{"zero_optimization": {"stage": 2}}'], "zero_optimization.stage 2"),
    "duplicate key": (["--deepspeed", '{"bf16": {"enabled": false}, "bf16": {"enabled": true}}'], "twice"),
    "missing checkpoint": (["--model.segmenter", "/nonexistent/segformer"], "/nonexistent/segformer"),
    "empty output folder": (["--output_dir", ""], "--output_dir is empty"),
    # Issue 20: names that would leave a folder, the demo's random model under a hub id, wrong types.
    "task name with ..": (["--data.corruptions", "[../../runs]"], "--data.corruptions ['../../runs'] is outside"),
    "demo model at a hub id": (["--model.build_demo_models", "true", "--tta.method", "source", "--model.segmenter",
                                "nvidia/segformer-b0-finetuned-ade-512-512"], "looks like a hub id"),
    "config section of the wrong type": (["--config", '{"tta": [1, 2]}'], "section tta must be a mapping"),
    "fp16 autocast": (["--deepspeed", '{"torch_autocast": {"enabled": true, "dtype": "torch.float16"}}'],
                      "fp16 overflows in SD3"),
    "not a cost table": (["--pipeline.cost_table", "ds_configs/demo.json"], "no card name or signature"),
    "accumulation longer than every task": (["--tta.accumulation_steps", "3"], "larger than every task"),
}


@pytest.fixture(scope="module")
def refused(demo, tmp_path_factory) -> dict:
    """Every case of REFUSED as `python launch/tta.py` runs it, all in one process (tests/refusals_worker.py),
    each into `<its folder>/runs/out`; and the working folder's listing before and after."""
    folders = {case: tmp_path_factory.mktemp("refused") for case in REFUSED}
    damaged = damaged_model_files(demo, tmp_path_factory.mktemp("damaged"))
    # A folder that this process holds, and one whose results.json is a link (see the test of held folders).
    held, linked = tmp_path_factory.mktemp("held") / "out", tmp_path_factory.mktemp("linked") / "out"
    linked.mkdir()
    (linked / "results.json").symlink_to(tmp_path_factory.mktemp("victim") / "victim.json")
    (linked / "results.json").resolve().write_text("keep me")
    claim = RunFolder.claim(str(held))
    try:
        before = sorted(p.name for p in ROOT.iterdir())
        runs = refused_runs({**{case: [*one_process_arguments(demo, folders[case] / "runs" / "out"), *overrides]
                                for case, (overrides, _) in REFUSED.items()},
                             **{case: [*one_process_arguments(demo, out), *overrides]
                                for case, (out, overrides) in damaged.items()},
                             "held folder": [*one_process_arguments(demo, held), "--tta.method", "source"],
                             "results link": [*one_process_arguments(demo, linked), "--tta.method", "source"]}, ENV)
        held_listing = sorted(p.name for p in held.iterdir())
    finally:
        claim.release()
    return {"runs": runs, "folders": folders, "listing": (before, sorted(p.name for p in ROOT.iterdir())),
            "damaged": damaged, "held listing": held_listing, "linked": linked}


def damaged_model_files(demo: Path, folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """A segmenter whose weights file lost its end, and a class cache of the wrong widths: each case's output
    folder and options."""
    import shutil
    seg = folder / "segformer"
    shutil.copytree(demo / "segformer", seg)
    weights = seg / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    wide = folder / "wide.safetensors"
    save_class_embeddings(wide, torch.zeros(C, 85, 64), torch.zeros(C, 32), ADE20K_CLASSES, str(demo / "sd3"), "{}")
    return {"damaged segmenter": (folder / "out-segmenter", ["--model.segmenter", str(seg)]),
            "wide class cache": (folder / "out-wide", ["--model.class_embeddings", str(wide)])}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_run_prints_one_line_and_writes_nothing(refused, case):
    overrides, expected = REFUSED[case]
    assert expected in error_line(refused["runs"][case])
    assert not (refused["folders"][case] / "runs").exists()  # nothing behind, not even the folder
    before, after = refused["listing"]
    assert after == before  # nor in the working folder (a hub id's folder)


@pytest.mark.slow
def test_a_mistake_that_every_rank_finds_gives_one_line(demo, tmp_path):
    """Both ranks refuse the value; rank 0 prints it, rank 1 (stopped by the launcher) nothing."""
    proc = subprocess.run(launch2(demo, tmp_path / "out", "--dusa.temperature", "0"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert "--dusa.temperature 0.0 is outside its domain" in error_line(proc)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_damaged_model_files_are_named_before_anything_loads(refused):
    """(Run with the refusals above, in one process.)"""
    proc = refused["runs"]["damaged segmenter"]
    out, (_, segmenter) = refused["damaged"]["damaged segmenter"]
    assert f"segmenter weights {Path(segmenter) / 'model.safetensors'} is damaged" in error_line(proc)
    assert "Loading weights" not in proc.stderr and not out.exists()
    out, _ = refused["damaged"]["wide class cache"]
    line = error_line(refused["runs"]["wide class cache"])
    assert "has widths 64 / 32 but the generator" in line and not out.exists()


@pytest.mark.slow
def test_a_second_run_into_a_held_folder_is_refused_and_links_are_not_followed(demo, refused, tmp_path):
    # The two refusals ran with the others in one process (the fixture `refused`, while this process held the
    # folder): a held folder, and a results.json that is a link (read to resume).
    line = error_line(refused["runs"]["held folder"])
    assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}, started" in line
    assert refused["held listing"] == [LOCK_NAME]  # nothing written
    assert "results.json is a link" in error_line(refused["runs"]["results link"])
    linked = refused["linked"] / "results.json"
    assert linked.is_symlink() and linked.resolve().read_text() == "keep me"
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    for name in ("config.json", "results.csv"):  # written: replaced, the link's target kept
        (out / name).symlink_to(victim)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(ADE20K_CLASSES) + "\n")
    proc = launch(demo, out, "--tta.method", "source", "--logging.image_every", "1", "--data.classes", str(classes))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert victim.read_text() == "keep me" and not any(p.is_symlink() for p in out.rglob("*"))
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] and list(out.glob("pictures/*/*.png"))
    assert results["config"]["inputs"]["segmenter"]["source"] == "local"  # where each model came from
    assert not (out / LOCK_NAME).exists()
    # The class list edited in place (two names swapped): the resume is refused, naming it, and nothing changes.
    names = list(ADE20K_CLASSES)
    names[0], names[1] = names[1], names[0]
    classes.write_text("\n".join(names) + "\n")
    results_before = (out / "results.json").read_bytes()
    line = error_line(launch(demo, out, "--tta.method", "source", "--data.classes", str(classes)))
    assert "holds results made from other inputs: the class list (data.classes) changed" in line
    assert (out / "results.json").read_bytes() == results_before


@pytest.mark.slow
def test_a_failure_on_one_rank_gives_one_line(demo, tmp_path):
    """Rank 0 cannot decode an image (its header reads): rank 1, waiting for it in the pipeline, exits
    quietly instead of printing the communication library's traceback."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    image = data / "images/validation/gaussian_noise_5/ADE_val_00000002.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    proc = subprocess.run(launch2(demo, tmp_path / "out", "--data.shuffle", "false", data=data),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert "cannot read image" in error_line(proc)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_to_the_launcher_stops_every_rank(demo, tmp_path, target):
    """The single-node deepspeed launcher ends on SIGTERM without passing it on: the ranks notice, stop
    between steps, unlock the folder and claim no unfinished task. SIGTERM to one rank alone stops the run
    too, with one line naming that rank and the signal, and the launcher's status 143."""
    data = tmp_path / "data"
    make_demo_dataset(data, num_images=30, corruptions=("gaussian_noise",), create=True)
    out, log = tmp_path / "out", tmp_path / "log.txt"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(launch2(demo, out, "--data.corruptions", "[gaussian_noise]", data=data),
                                    cwd=ROOT, env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "config.json").exists():  # written as the run starts, after the models load
            assert launcher.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)  # into the steps
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if any(arg.startswith("--local_rank") for arg in p.cmdline())]
        assert len(ranks) == 2
        if target == "launcher":
            launcher.send_signal(signal.SIGTERM)
        else:
            next(p for p in ranks if "--local_rank=1" in p.cmdline()).send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, "ranks still running after their launcher was stopped"
        text = log.read_text()
        assert "stopped by SIGTERM" in text and "Traceback" not in text, text[-3000:]
        if target == "rank 1":
            assert launcher.wait(timeout=60) == 143, text[-3000:]
            stops = [line for line in text.splitlines() if "stopped by" in line or line.startswith("error")]
            assert len(stops) == 1 and stops[0].startswith("stopped by SIGTERM (rank 1)"), text[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    assert not (out / "results.json").exists()  # the task did not finish: nothing claims it
    assert not (out / LOCK_NAME).exists()
    RunFolder.claim(str(out)).release()  # a rerun may start


@pytest.mark.slow
def test_unusual_values_at_the_ends_of_their_domains_run(demo, tmp_path):
    """Flow time exactly 1 (pure noise), learning rate 0, a stride of 1 pixel, one window per image."""
    out = tmp_path / "out"
    proc = launch(demo, out, "--dusa.timestep_range", "[1.0, 1.0]", "--tta.lr", "0", "--data.window_stride", "1",
                  "--data.max_windows", "64", "--data.corruptions", "[gaussian_noise]", "--data.limit", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["tasks"]["gaussian_noise"]["images"] == 1


@pytest.mark.parametrize("text", [
    "{not json", "[]", '{"config": {}, "tasks": {}}',
    '{"config": {"model": {}, "data": {}, "tta": {}, "seed": 0}, "tasks": {"gaussian_noise": 1}}'])
def test_a_damaged_results_file_is_named_not_a_traceback(tmp_path, text):
    from pipeline.run.resume import finished_tasks
    (tmp_path / "results.json").write_text(text)
    cfg = RunConfig(output_dir=str(tmp_path))
    record = json.loads(json.dumps({"model": {}, "data": {}, "tta": {}, "seed": 0}))
    with pytest.raises(ValueError, match="results.json is damaged .*: delete"):
        finished_tasks(cfg, record, ADE20K_CLASSES)
