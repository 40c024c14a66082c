"""Reliability, round 3 (issue 20), class by class: names never become paths outside the output folder and a
run deletes only its own state by exact name; the demo never builds a random model under a real one's name;
a resume refuses inputs that changed; data, types and the other tools are checked up front. In-process: the
launcher cases of these classes are in test_hardening.py."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data.ade20k_c import ADE20KC
from data.classes import ADE20K_CLASSES, read_class_names
from pipeline.run import checks
from pipeline.run.config import RunConfig, cap_class_budget, validate
from pipeline.run.identity import changed_inputs, input_identity
from pipeline.run.pictures import save_picture
from pipeline.run.resume import finished_tasks, saved_results, state_path
from pipeline.run.folder import Stopped

ROOT = Path(__file__).resolve().parents[1]
C = len(ADE20K_CLASSES)
HOSTILE = ["..", "../runs", "a/b", "/tmp/x", ".hidden", "...", "fog\n", "a\\b", "", "x" * 200, "fo g", "~"]


def listing(root: Path) -> dict[str, str]:
    """Every file and folder under root with its content digest (files) or kind: a before/after snapshot."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        found[key] = "link" if path.is_symlink() else "dir" if path.is_dir() else \
            hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def config(**changes) -> RunConfig:
    cfg = RunConfig()
    for key, value in changes.items():
        group, name = key.split("__") if "__" in key else (None, key)
        setattr(getattr(cfg, group) if group else cfg, name, value)
    return cfg


# ------------------------------------------------------------------ 1. names and deletions
@pytest.mark.parametrize("name", HOSTILE)
def test_a_task_name_that_is_not_one_safe_path_component_is_refused(name):
    with pytest.raises(ValueError) as err:
        validate(config(data__corruptions=["fog", name]), C)
    assert str(err.value).startswith("--data.corruptions") and "task names" in str(err.value)
    assert "\n" not in str(err.value)


def test_hostile_names_through_every_writer_change_nothing_outside_the_output_folder(tmp_path):
    """A folder of runs (a sibling run with its results, the data beside it); the writers of one run, given
    every hostile name, refuse it; its continual state cleanup removes only the run's own states by name."""
    from pipeline.methods.tent import TentMethod
    from pipeline.run.reporting import summarize, write_results
    from pipeline.methods.tent import Tent
    from pipeline.run.loop import TTARunner
    runs = tmp_path / "runs"
    sibling, out = runs / "sibling", runs / "mine"
    write_results(summarize({}, {"tta": {"method": "source"}}, ["wall"]), sibling)
    (runs / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (runs / "notes.txt").write_text("keep")
    data = tmp_path / "data" / "images" / "validation" / "fog_5"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "ADE_val_1.jpg")
    out.mkdir()
    (out / "state").mkdir()
    (out / "state" / "user-notes").write_text("not the run's")  # anything else in state/ stays
    before = listing(tmp_path)

    picture = Image.new("RGB", (4, 4))
    segmenter = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.GroupNorm(2, 4))
    for name in HOSTILE:
        with pytest.raises(ValueError):
            validate(config(data__corruptions=[name]), C)
        with pytest.raises((ValueError, FileNotFoundError)):
            ADE20KC(tmp_path / "data", name)
        with pytest.raises(ValueError):
            save_picture(picture, out, name, "ADE_val_1")
        with pytest.raises(ValueError):
            state_path(str(out), name)
        runner = object.__new__(TTARunner)
        runner.cfg = RunConfig(output_dir=str(out))
        runner.method = TentMethod(Tent(segmenter, 1e-3), torch.device("cpu"))
        with pytest.raises(ValueError):
            runner._save_state(name)
    for name in ("..", "a/b", ".."):  # an image name (a file's stem) that would leave pictures/<task>/
        with pytest.raises(ValueError):
            save_picture(picture, out, "fog", name)
    assert listing(tmp_path) == before

    # The continual cleanup with safe names: only state/<task> of the run's own tasks, by exact name.
    runner = object.__new__(TTARunner)
    runner.cfg = RunConfig(output_dir=str(out))
    runner.method = TentMethod(Tent(segmenter, 1e-3), torch.device("cpu"))
    runner.datasets = {"fog": None, "snow": None, "frost": None}
    runner._state_record = None
    for task in ("fog", "snow"):
        runner._save_state(task)
        runner._drop_old_states()
    assert sorted(p.name for p in (out / "state").iterdir()) == ["snow", "user-notes"]
    after = listing(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k.startswith("runs/mine/state/") for k in changed), changed


# ------------------------------------------------------------------ 2. the demo's random models
def test_the_demo_never_builds_at_a_typed_or_hub_shaped_path(tmp_path, monkeypatch):
    from models.tiny import ASSETS_MARKER, build_demo_models, check_demo_model_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "org" / "model").mkdir(parents=True)  # empty, but a hub id's folder
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old").write_text("x")
    before = listing(tmp_path)
    for path, expected in [("nvidia/segformer-b0-finetuned-ade-512-512", "looks like a hub id"),
                           ("typo/deeper/segformer", "builds its random models only under"),
                           ("runs", "exists but holds no model"), ("segformer", "builds its random models only"),
                           ("./org/model", "looks like a hub id"), (str(tmp_path / "org/model"), "looks like a hub id")]:
        with pytest.raises(ValueError, match=expected):
            build_demo_models(path, None, None, ADE20K_CLASSES)
    with pytest.raises(ValueError, match="hub id"):  # the generator too, before anything is built
        build_demo_models(str(tmp_path / "empty" / "seg"), "stabilityai/sd3", "x.safetensors", ADE20K_CLASSES)
    assert listing(tmp_path) == before
    check_demo_model_path("demo_assets/segformer-tiny", "--model.segmenter")  # the demo's own folder
    check_demo_model_path("demo_assets/class_embeddings.safetensors", "--model.class_embeddings", folder=False)
    assets = tmp_path / "my" / "assets"  # an empty folder the user made: built in, and marked as the demo's
    assets.mkdir(parents=True)
    build_demo_models(str(assets / "seg"), None, None, ADE20K_CLASSES[:3])
    assert (assets / ASSETS_MARKER).is_file() and (assets / "seg" / "config.json").is_file()
    check_demo_model_path(str(assets / "sd3"), "--model.generator")  # beside it: allowed
    with pytest.raises(ValueError, match="looks like a hub id"):  # my/assets is fine, my/sd3 reads as a hub id
        check_demo_model_path(str(tmp_path / "my" / "sd3"), "--model.generator")


# ------------------------------------------------------------------ 3. resume identity
class _Task:
    def __init__(self, folder: Path):
        self._images = sorted(folder.glob("*.jpg"))
        self._labels = [p.with_suffix(".png") for p in self._images]


def _inputs(root: Path, classes=("wall", "sky")) -> dict:
    model = type("Model", (), {"segmenter": str(root / "seg"), "generator": str(root / "sd3"),
                               "class_embeddings": str(root / "cache.safetensors")})()
    return input_identity(model, list(classes), {"fog": _Task(root / "fog")}, generator=True)


def test_a_resume_names_the_input_that_changed(tmp_path):
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "config.json").write_text('{"num_labels": 2}')
    save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "seg" / "model.safetensors"))
    for part in ("vae", "transformer"):
        (tmp_path / "sd3" / part).mkdir(parents=True)
        (tmp_path / "sd3" / part / "config.json").write_text("{}")
        save_file({"w": torch.zeros(4)}, str(tmp_path / "sd3" / part / "diffusion_pytorch_model.safetensors"))
    save_file({"prompt_embeds": torch.zeros(2, 3, 4)}, str(tmp_path / "cache.safetensors"), {"classes": "[]"})
    (tmp_path / "fog").mkdir()
    for i in range(2):
        (tmp_path / "fog" / f"{i}.jpg").write_bytes(b"jpg" * (i + 1))
        (tmp_path / "fog" / f"{i}.png").write_bytes(b"png")
    first = json.loads(json.dumps(_inputs(tmp_path)))
    assert first["segmenter"]["source"] == "local" and first["segmenter"]["digest"]
    assert changed_inputs(first, _inputs(tmp_path), ["fog"]) is None

    assert "the class list (data.classes) changed" in changed_inputs(first, _inputs(tmp_path, ("sky", "wall")), [])
    save_file({"w": torch.zeros(3, 3)}, str(tmp_path / "seg" / "model.safetensors"))  # replaced in place
    assert "the segmenter (model.segmenter) changed: model.safetensors was replaced" in \
        changed_inputs(first, _inputs(tmp_path), [])
    second = _inputs(tmp_path)
    weights = tmp_path / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # same bytes, new copy
    assert "the generator (model.generator) changed" in changed_inputs(second, _inputs(tmp_path), [])
    second = _inputs(tmp_path)
    save_file({"prompt_embeds": torch.zeros(2, 3, 4)}, str(tmp_path / "cache.safetensors"), {"classes": "[1]"})
    assert "class-embedding cache" in changed_inputs(second, _inputs(tmp_path), [])
    second = _inputs(tmp_path)
    (tmp_path / "fog" / "2.jpg").write_bytes(b"new")
    (tmp_path / "fog" / "2.png").write_bytes(b"png")
    assert changed_inputs(second, _inputs(tmp_path), []) is None  # fog not finished: its list may change
    assert "the images of task fog changed" in changed_inputs(second, _inputs(tmp_path), ["fog"])
    assert "no digests of its inputs" in changed_inputs(None, second, [])
    # A hub model not downloaded yet is known by its id.
    hub = {"source": "hub", "id": "org/model", "revision": None, "digest": None, "files": None}
    assert changed_inputs({**second, "segmenter": hub}, {**second, "segmenter": hub}, []) is None
    assert "another one" in changed_inputs({**second, "segmenter": hub},
                                           {**second, "segmenter": {**hub, "id": "org/other"}}, [])


def test_finished_tasks_refuses_results_of_other_inputs_before_anything_loads(tmp_path):
    from pipeline.run.reporting import summarize, write_results
    cfg = RunConfig(output_dir=str(tmp_path))
    cfg.data.corruptions = ["fog", "snow"]
    record = json.loads(json.dumps({"model": vars(cfg.model), "data": vars(cfg.data), "tta": vars(cfg.tta),
                                    "seed": 0, "deepspeed": {}}))
    inputs = {"classes": "a", "images": {"fog": "x", "snow": "y"}}
    task = {"mIoU": 1.0, "aAcc": 2.0, "IoU": [1.0, 1.0], "images": 1, "seconds": 1.0}
    write_results(summarize({"fog": task}, {**record, "inputs": inputs}, ["wall", "sky"]), tmp_path)
    assert list(finished_tasks(cfg, {**record, "inputs": inputs}, ["wall", "sky"])) == ["fog"]
    for changed, message in [({"classes": "b"}, "the class list"), ({"images": {"fog": "z", "snow": "y"}},
                                                                     "the images of task fog changed")]:
        with pytest.raises(ValueError, match=f"holds results made from other inputs: {message}") as err:
            finished_tasks(cfg, {**record, "inputs": {**inputs, **changed}}, ["wall", "sky"])
        assert "\n" not in str(err.value)
    assert finished_tasks(cfg, {**record, "inputs": {**inputs, "images": {"fog": "x", "snow": "w"}}}, ["wall", "sky"])


@pytest.mark.parametrize("task, message", [
    ({"mIoU": "52.1", "aAcc": 1.0, "IoU": {}, "images": 1, "seconds": 1.0}, "mIoU '52.1' is not a number"),
    ({"mIoU": 1.0, "aAcc": 1.0, "IoU": {"wall": "x"}, "images": 1, "seconds": 1.0}, "IoU is not an object"),
    ({"mIoU": 1.0, "aAcc": 1.0, "IoU": {}, "images": -1, "seconds": 1.0}, "images -1 is not a count"),
    ([1, 2], "not an object")])
def test_a_results_file_of_the_wrong_schema_is_refused_before_models_load(tmp_path, task, message):
    (tmp_path / "results.json").write_text(json.dumps({"metric_unit": "percent", "config": {}, "tasks": {"fog": task}}))
    with pytest.raises(ValueError, match=f"results.json is damaged \\(task fog: {message}"):
        saved_results(str(tmp_path))


# ------------------------------------------------------------------ 4. data
def test_two_images_of_one_stem_are_refused(tmp_path):
    folder = tmp_path / "images" / "validation" / "fog_5"
    folder.mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    for name in ("X.jpg", "X.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    Image.new("L", (8, 8)).save(tmp_path / "annotations" / "validation" / "X.png")
    with pytest.raises(ValueError, match="holds X.jpg and X.png: two images of one annotation"):
        ADE20KC(tmp_path, "fog")
    (folder / "X.png").unlink()
    assert len(ADE20KC(tmp_path, "fog")) == 1


def test_a_byte_order_mark_is_dropped_and_a_separator_in_a_class_name_refused(tmp_path):
    from models.class_embeddings import EmbedError, read_custom_prompts
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffwall\nsky\n".encode())
    assert read_class_names(path) == ["wall", "sky"]
    path.write_text("wall\nsky/cloud\n")
    with pytest.raises(ValueError, match="not printable text without / or"):
        read_class_names(path)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_bytes("\ufeffwall: a wall\n".encode())
    assert read_custom_prompts(prompts) == {"wall": "a wall"}
    prompts.write_text("wall: a\nwall: b\n")
    with pytest.raises(EmbedError, match="sets 'wall' twice"):
        read_custom_prompts(prompts)
    prompts.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(EmbedError, match="not UTF-8 text"):
        read_custom_prompts(prompts)


def _ade(root: Path) -> Path:
    (root / "images/validation").mkdir(parents=True)
    (root / "annotations/validation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            root / "images/validation" / f"ADE_val_{i}.jpg")
        Image.fromarray(rng.integers(0, 151, (40, 48), dtype=np.uint8)).save(
            root / "annotations/validation" / f"ADE_val_{i}.png")
    return root


def test_the_builder_records_seed_and_format_and_rebuilds_only_when_asked(tmp_path, capsys):
    from data.make_ade20k_c import BuildError, build, main
    ade, out = _ade(tmp_path / "ade"), tmp_path / "c"
    with pytest.raises(BuildError, match="each corruption and severity once"):
        build(ade, out, ["contrast", "contrast"], [3], progress=False)
    assert build(ade, out, ["contrast"], [3], progress=False) == (2, 0)
    jpg = out / "images/validation/contrast_3/ADE_val_0.jpg"
    before = listing(out)
    for kwargs, message in [({"seed": 1}, "built with --seed 0 --format jpg, not --seed 1 --format jpg"),
                            ({"fmt": "png"}, "not --seed 0 --format png")]:
        with pytest.raises(BuildError, match=message):
            build(ade, out, ["contrast"], [3], progress=False, **kwargs)
    assert listing(out) == before
    assert build(ade, out, ["contrast"], [3], fmt="png", progress=False, rebuild=True) == (2, 0)
    assert not jpg.exists() and len(ADE20KC(out, "contrast", 3)) == 2  # one image per annotation
    assert json.loads((out / ".make_ade20k_c.json").read_text()) == {"seed": 0, "format": "png"}
    # A source image of zero bytes: one line, exit 2, before any work.
    (ade / "images/validation/ADE_val_1.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["--ade_root", str(ade), "--out", str(tmp_path / "d"), "--workers", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "ADE_val_1.jpg" in err
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ 5. types
@pytest.mark.parametrize("ds, message", [
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": "no"}}}, "optimizer.params.amsgrad 'no' must be true or false"),
    ({"bf16": {"enabled": True, "immediate_grad_update": 1}}, "bf16.immediate_grad_update 1 must be true or false"),
    ({"torch_autocast": {"enabled": "true"}}, "torch_autocast.enabled"),
    ({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, "fp16 overflows in SD3"),
    ({"torch_autocast": {"enabled": True, "dtype": "fp32"}}, "autocast here is to bfloat16"),
    ({"torch_autocast": [1]}, "torch_autocast must be an object"),
    ({"optimizer": {"type": 3, "params": {}}}, "optimizer.type 3 must be a name"),
    ({"optimizer": {"type": "SGD", "params": {"momentum": -1}}}, "momentum -1"),
])
def test_deepspeed_json_types_are_checked(ds, message):
    with pytest.raises(ValueError, match=message):
        checks.check_deepspeed_config(ds, "x.json")


def test_deepspeed_json_presets_and_bfloat16_spellings_pass():
    for path in sorted((ROOT / "ds_configs").glob("ds_*.json")):
        checks.check_deepspeed_config(json.loads(path.read_text()), str(path))
    for dtype in ("bfloat16", "bf16", "torch.bfloat16"):
        checks.check_deepspeed_config({"torch_autocast": {"enabled": True, "dtype": dtype}}, "x.json")


@pytest.mark.parametrize("loaded, message", [
    ({"tta": [1, 2]}, "section tta must be a mapping"), ({"logging": {"wandb": 5}}, "section logging.wandb"),
    ([1, 2], "must be a mapping of option groups"), ({"deepspeed": 5}, "deepspeed must be a path or a mapping")])
def test_config_sections_of_the_wrong_type_are_refused(tmp_path, loaded, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(loaded))
    with pytest.raises(ValueError, match=message):
        checks.check_argument_files(["--config", str(path)])


def test_cost_tables_are_checked_against_their_schema(tmp_path):
    for path in sorted((ROOT / "pipeline" / "dusa" / "costs").glob("*.json")):
        checks.read_cost_table(path, "cost table")
    table = json.loads(next((ROOT / "pipeline" / "dusa" / "costs").glob("*.json")).read_text())
    cases = [("[1, 2]", "not a JSON object"), (json.dumps(table)[:500], "is not valid JSON"),
             (json.dumps({**table, "optimizer_ms": [1.0]}), "has 27 entries, not one per layer \\(1\\)"),
             (json.dumps({**table, "segmenter_ms": ["a", 1]}), "segmenter_ms must be a list of numbers")]
    for text, message in cases:
        path = tmp_path / "table.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=f"--pipeline.cost_table {path} .*{message}"):
            checks.read_cost_table(path, "--pipeline.cost_table")


def test_a_damaged_wandb_id_gives_a_warning_and_a_new_id(tmp_path, capsys):
    from pipeline.run.reporting import _read_run_id
    path = tmp_path / "wandb_run_id"
    path.write_bytes(b"\xff\xfe\x00\x01")
    assert _read_run_id(path) is None
    assert "is not text (damaged): starting a new W&B run" in capsys.readouterr().out


def test_silent_no_ops_warn_or_are_refused():
    note = checks.check_accumulation(4, {"fog": 10, "snow": 3})
    assert note.startswith("warning: --tta.accumulation_steps 4 is larger than 1 task(s) (snow)")
    assert checks.check_accumulation(1, {"fog": 1}) is None and checks.check_accumulation(3, {"fog": 3}) is None
    with pytest.raises(ValueError, match="larger than every task \\(at most 3 images\\): no update would ever happen"):
        checks.check_accumulation(4, {"fog": 3, "snow": 2})
    cfg = config(dusa__max_classes=1_000_000, dusa__min_classes=500)
    validate(cfg, C)
    notes = cap_class_budget(cfg, C)
    assert cfg.dusa.max_classes == C and cfg.dusa.min_classes == C and len(notes) == 2
    assert notes[0] == f"warning: --dusa.max_classes 1000000 is more than the {C} classes of data.classes: capped at {C}"
    assert cap_class_budget(config(), C) == []


@pytest.mark.parametrize("key, value", [("logging__wandb", {"project": "a/b"}), ("logging__wandb", {"name": "x\n"}),
                                        ("logging__wandb", {"tags": ["t" * 65]})])
def test_wandb_names_are_checked(key, value):
    cfg = RunConfig()
    for name, v in value.items():
        setattr(cfg.logging.wandb, name, v)
    with pytest.raises(ValueError, match="--logging.wandb"):
        validate(cfg, C)


# ------------------------------------------------------------------ 6. a stopped rank
@pytest.mark.parametrize("rank, alone, line", [(1, True, "stopped by SIGTERM (rank 1): the run stops"),
                                               (1, False, None), (0, False, "stopped by SIGTERM (rank 0): nothing")])
def test_a_rank_stopped_by_a_signal_says_which_in_one_line(launcher_main, monkeypatch, capsys, rank, alone, line):
    def stop(argv=None, claim=None):
        raise Stopped("stopped by SIGTERM", 128 + signal.SIGTERM)
    monkeypatch.setattr(launcher_main, "run", stop)
    monkeypatch.setattr(launcher_main, "stopped_alone", lambda: alone)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        launcher_main.main([])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 143
    assert (err.startswith(line) and len(err.splitlines()) == 1) if line else err == ""


# ------------------------------------------------------------------ 7. the other tools
def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr[-2000:]
    return lines[0]


def test_compare_refuses_a_results_file_of_the_wrong_schema_before_printing(tmp_path):
    from launch.compare import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"metric_unit": "percent", "config": {}, "average": {"mIoU": 1.0},
                                                  "tasks": {"fog": {"mIoU": "bad", "aAcc": 1.0, "IoU": {}}}}))
    proc = _run("launch/compare.py", str(run))
    assert "task fog: mIoU 'bad' is not a number" in one_error_line(proc) and proc.stdout == ""
    assert main([str(run)]) == 2


def test_embed_classes_refuses_a_folder_as_out_and_a_binary_prompts_file_before_any_encoder(tmp_path, capsys):
    from launch.embed_classes import main
    assert main(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err
    prompts = tmp_path / "prompts.json"
    prompts.write_bytes(b"\x00\xff\xfe")
    assert main(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "c.safetensors"), "--device", "cpu",
                 "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8 text" in err


def test_miniature_refuses_a_file_as_workdir_and_reports_nothing_from_nothing(tmp_path, capsys):
    import bench.miniature as mini
    file = tmp_path / "file"
    file.write_text("x")
    assert mini.main(["report", "--tiny", "--workdir", str(file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    work = tmp_path / "work"
    assert mini.main(["report", "--tiny", "--workdir", str(work)]) == 2
    assert "nothing to report" in capsys.readouterr().err and not (work / "report").exists()


@pytest.mark.parametrize("args, message", [
    (["--partition", "[0, 13"], "--partition / --pipeline_variants is not JSON"),
    (["--partition", "[0, 20, 13]"], "--partition [0, 20, 13] must be 3 increasing layer indices"),
    (["--variants", "pipline"], "--variants 'pipline' is not one of single, pipeline, naive"),
    (["--classes", "0"], "--classes [0] must be >= 1"),
    (["--tag", "../x"], "--tag '../x' must be letters")])
def test_bench_refuses_bad_arguments_before_any_work_and_writes_nothing(tmp_path, args, message):
    proc = _run("bench/bench.py", "--tiny", "--workdir", str(tmp_path / "work"), *args)
    assert message in one_error_line(proc)
    assert not (tmp_path / "work").exists()


def test_bench_never_clears_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "keep.json").write_text("{}")
    proc = _run("bench/bench.py", "--tiny", "--workdir", str(tmp_path / "configs"))
    assert "is not a folder this tool made" in one_error_line(proc)
    assert (tmp_path / "configs" / "keep.json").read_text() == "{}"
