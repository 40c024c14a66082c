"""Bad input through the launcher: a one-line error naming the file or key, exit code 2, no
traceback as the message, and no results file claiming a finished task."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.classes import ADE20K_CLASSES
from models.class_embeddings import save_class_embeddings
from tests.helpers import demo_models_and_data, refused_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_models) -> Path:
    return demo_models_and_data(tmp_path_factory.mktemp("bad"), demo_models)


ONE_STAGE = ("--pipeline.num_stages", "1", "--pipeline.partition", "null")


ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
ENV.pop("DUSA_TRACEBACK", None)


def arguments(demo: Path, out: str, *overrides: str, layout: tuple[str, ...] = ONE_STAGE) -> list[str]:
    """launch/tta.py's arguments for the demo's models and data (`layout`: the stage options; without them,
    the demo's 2-stage split, which one process runs as 1 stage)."""
    return ["--config", "ds_configs/demo.json", "--output_dir", str(demo / out),
            "--model.build_demo_models", "false", "--data.build_demo_data", "false",
            "--model.segmenter", str(demo / "segformer"), "--model.generator", str(demo / "sd3"),
            "--model.class_embeddings", str(demo / "classes.safetensors"), "--data.root", str(demo / "data"),
            *layout, "--logging.wandb.enabled", "false", *overrides]


def launch(demo: Path, out: str, *overrides: str, layout: tuple[str, ...] = ONE_STAGE) -> subprocess.CompletedProcess:
    """One process, no launcher (`python launch/tta.py`), on the demo's models and data."""
    return subprocess.run([sys.executable, "launch/tta.py", *arguments(demo, out, *overrides, layout=layout)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


CASES = {
    "missing data root": (["--data.root", "/nonexistent/ade20k_c"], "ADE20K-C root /nonexistent/ade20k_c does not exist"),
    # The demo's builder makes no dataset at a mistyped path.
    "missing demo data root": (["--data.build_demo_data", "true", "--data.root", "/nonexistent/ade20k_c"],
                               "data.root /nonexistent/ade20k_c does not exist: the demo builds its data only in"),
    "unknown corruption": (["--data.corruptions", "[fog]"], "corruptions under"),
    "unknown config key": (["--tta.learning_rate", "1e-5"], "unrecognized arguments: --tta.learning_rate"),
    "wrong type": (["--tta.lr", "fast"], 'Parser key "tta.lr"'),
    "stages vs blocks": (["--pipeline.partition", "[0,40]"], "pipeline.partition [0, 40] must be 2 increasing"),
    "missing checkpoint": (["--model.segmenter", "/nonexistent/segformer"], "/nonexistent/segformer"),
    "fp16 engine": (["--deepspeed", '{"fp16": {"enabled": true}}'], "fp16 is not supported"),
    "lr in the engine JSON": (["--deepspeed", '{"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}'],
                              "set tta.lr instead"),
}


def refused_inputs(demo: Path, folder: Path) -> dict[str, list[str]]:
    """The refusals of files made here: class caches for other classes and another model; a data folder with
    an image without annotation, and one with an unreadable image (the arguments of each case)."""
    import shutil
    other = folder / "other-classes.safetensors"
    save_class_embeddings(other, torch.zeros(2, 85, 32), torch.zeros(2, 32), ["cat", "dog"], str(demo / "sd3"), "{}")
    model = folder / "other-model.safetensors"
    save_class_embeddings(model, torch.zeros(150, 85, 32), torch.zeros(150, 32), ADE20K_CLASSES, "sd3.5-large", "{}")
    noann, unreadable = folder / "noann-data", folder / "unreadable-data"
    shutil.copytree(demo / "data", noann)
    (noann / "annotations/validation/ADE_val_00000002.png").unlink()
    shutil.copytree(demo / "data", unreadable)
    (unreadable / "images/validation/gaussian_noise_5/ADE_val_00000002.jpg").write_bytes(b"not a jpeg")
    return {"other": arguments(demo, "other", "--model.class_embeddings", str(other)),
            "model": arguments(demo, "model", "--model.class_embeddings", str(model)),
            "noann": arguments(demo, "noann", "--data.root", str(noann)),
            "unreadable": arguments(demo, "unreadable", "--data.root", str(unreadable), "--tta.method", "source")}


@pytest.fixture(scope="module")
def refused(demo, tmp_path_factory) -> dict:
    """Every case of CASES, and those of `refused_inputs`, as `python launch/tta.py` runs it, all in one process
    (tests/refusals_worker.py)."""
    cases = {case: arguments(demo, case.replace(" ", "_"), *overrides) for case, (overrides, _) in CASES.items()}
    return refused_runs({**cases, **refused_inputs(demo, tmp_path_factory.mktemp("refused-inputs"))}, ENV)


@pytest.mark.slow  # a launch/tta.py process
@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line(demo, refused, case):
    overrides, expected = CASES[case]
    line = error_line(refused[case])
    assert expected in line
    assert not (demo / case.replace(" ", "_") / "results.json").exists()


@pytest.mark.slow  # a launch/tta.py process
def test_a_cache_for_other_classes_or_another_model_is_refused(refused):
    assert "was made for 2 other classes" in error_line(refused["other"])
    assert "not the run's generator" in error_line(refused["model"])


@pytest.mark.slow  # a launch/tta.py process
def test_an_image_without_annotation_and_an_unreadable_image(demo, refused):
    line = error_line(refused["noann"])
    assert "has no annotation" in line and "ADE_val_00000002" in line
    line = error_line(refused["unreadable"])
    assert "cannot read image" in line and "ADE_val_00000002.jpg" in line
    # The first task did not finish: no results file may claim it.
    assert not (demo / "unreadable" / "results.json").exists()


@pytest.mark.slow  # a launch/tta.py process
def test_a_very_wide_image_runs_with_many_windows(demo, tmp_path):
    """A 128 x 1100 panorama: 24 windows, so 24 micro-batches in one DUSA step."""
    import numpy as np
    from PIL import Image
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo / "data", data)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 1100, 3), dtype=np.uint8)).save(
        data / "images/validation/gaussian_noise_5/ADE_val_00000001.jpg")
    Image.fromarray(rng.integers(0, 151, (128, 1100), dtype=np.uint8)).save(
        data / "annotations/validation/ADE_val_00000001.png")
    proc = launch(demo, "wide", "--data.root", str(data), "--data.corruptions", "[gaussian_noise]",
                  "--data.limit", "1", layout=())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The demo config's 2 stages, in one process started without the launcher: 1 stage, the split planned.
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("removed ")]  # other runs' buffers
    assert lines[:3] == [
        "one process (no deepspeed launcher): 1 stage instead of pipeline.num_stages 2 "
        "(`deepspeed --num_gpus 2 launch/tta.py ...` runs them)",
        "pipeline.partition [0, 4, 7] is a split into 2 stages, not 1: the split is planned instead",
        "partition [0, 7] (planned)"]
    import json
    assert json.loads((demo / "wide" / "results.json").read_text())["tasks"]["gaussian_noise"]["images"] == 1


def test_out_of_memory_names_the_knobs(monkeypatch, capsys):
    """The launcher's handler turns a CUDA OOM anywhere in the run into one line with the fixes."""
    import launch.tta as launcher

    def oom(argv=None, claim=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(launcher, "run", oom)
    monkeypatch.setattr(launcher.os, "_exit", exit_)
    monkeypatch.delenv("DUSA_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        launcher.main([])
    assert exc.value.code == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "--dusa.max_classes" in line[0] and "activation_checkpoint_interval" in line[0]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_mistyped_option_gives_one_line_with_a_guess_on_rank_0_alone(monkeypatch, capsys, tmp_path, rank):
    """No usage block per rank: rank 0 prints the error with the nearest option and where the options are
    listed; the other ranks, which refuse the same arguments, print nothing."""
    import launch.tta as launcher

    def exit_(code):
        raise SystemExit(code)
    # the real parser, without the run's signal handlers
    monkeypatch.setattr(launcher, "run", lambda argv, claim=None: launcher.parse(argv))
    monkeypatch.setattr(launcher.os, "_exit", exit_)
    monkeypatch.setattr(launcher.time, "sleep", lambda seconds: None)
    monkeypatch.delenv("DUSA_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", str(rank))
    with pytest.raises(SystemExit) as exc:
        launcher.main(["--tta.methd", "tent"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ([
        "error: unrecognized arguments: --tta.methd tent (did you mean --tta.method?)",
        "`python launch/tta.py --help` lists every option"] if rank == 0 else [])
    config = tmp_path / "config.json"
    config.write_text('{"tta": {"learning_rate": 1e-5}}')  # a config file's key gets a guess too
    with pytest.raises(launcher.BadArguments, match=r"'learning_rate' \(did you mean --tta\.lr\?\)$"):
        launcher.parse(["--config", str(config)])


def test_an_option_that_moved_to_its_method_section_is_refused_with_its_new_name(monkeypatch, capsys, tmp_path):
    """DUSA's own options left `tta` for `dusa`: an old command line or config file gets one line naming the new
    spelling (not the parser's dump, nor a guess). The old names come from the move's own table."""
    import launch.tta as launcher
    from pipeline.run.config import MOVED_OPTIONS
    assert len(MOVED_OPTIONS) == 18 and all(new.startswith("dusa.") for new in MOVED_OPTIONS.values())
    for old, new in MOVED_OPTIONS.items():
        for argv in ([f"--{old}", "1"], [f"--{old}=1"]):
            with pytest.raises(launcher.BadArguments) as err:
                launcher.parse(["--tta.lr", "1e-4", *argv])
            assert str(err.value) == (f"{old} is now {new}: DUSA's own options have their section (--{new} on the "
                                      f'command line, "dusa": {{...}} in a config file)')
    old, new = next((o, n) for o, n in MOVED_OPTIONS.items() if n == "dusa.max_classes")
    section, _, key = old.partition(".")
    config = tmp_path / "old.json"  # a config file written before the move
    config.write_text(json.dumps({section: {"method": "dusa", "lr": 1e-4, key: 8}}))
    with pytest.raises(launcher.BadArguments, match=rf"^{re.escape(old)} is now {re.escape(new)}: "):
        launcher.parse(["--config", str(config)])

    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(launcher, "run", lambda argv, claim=None: launcher.parse(argv))
    monkeypatch.setattr(launcher.os, "_exit", exit_)
    monkeypatch.delenv("DUSA_TRACEBACK", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        launcher.main(["--config", str(config)])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0].startswith(f"error: {old} is now {new}: ") and len(err.splitlines()) == 2
    # the new spelling is the option itself
    cfg, record, _ = launcher.parse([f"--{new}", "8"])
    assert cfg.dusa.max_classes == 8 and record["dusa"]["max_classes"] == 8 and key not in record[section]


@pytest.mark.parametrize("typed,guess", [("--tta.learning_rate", "--tta.lr"), ("--data.windowsize", "--data.window_size"),
                                         ("--tt.lr", "--tta.lr"), ("--tta.verbose", "--logging.verbose"),
                                         ("--output-dir", "--output_dir"), ("--zzzzqq", None)])
def test_the_guess_for_a_mistyped_option(typed, guess):
    import launch.tta as launcher
    known = [s for a in launcher.make_parser()._actions for s in a.option_strings if s.startswith("--")]
    assert launcher.close_option(f"unrecognized arguments: {typed} 1", known) == guess


def test_too_many_nonfinite_steps_in_a_row_stop_the_run():
    from types import SimpleNamespace

    from pipeline.run.loop import TTARunner
    runner = SimpleNamespace(cfg=SimpleNamespace(tta=SimpleNamespace(max_nonfinite=3)), _nonfinite_run=0,
                             _nonfinite_task=0)
    for skipped in (True, True, False, True, True):  # a finite step resets the count
        TTARunner._count_nonfinite(runner, skipped)
    assert runner._nonfinite_task == 4 and runner._nonfinite_run == 2
    with pytest.raises(FloatingPointError, match="3 steps in a row had a NaN/inf loss"):
        TTARunner._count_nonfinite(runner, True)
