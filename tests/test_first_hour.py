"""A new user's first hour (issue 21): the layout one process can run, the printed config, the console in a
log file, error lines that name their fix, files a colleague can read, and a tree that the documented
commands leave clean."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from data.ade20k_c import ADE20KC
from data.classes import ADE20K_CLASSES
from data.demo import make_demo_dataset
from data.metrics import SegmentationMetric
from models.checkpoints import umask_file_mode
from pipeline.run.config import PipelineConfig
from pipeline.run.progress import TaskProgress, end_bars

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ one process
def test_one_process_without_the_launcher_runs_one_stage_planned(launcher_main):
    pipe = PipelineConfig(num_stages=2, partition=[0, 4, 7])
    assert launcher_main.fit_layout(pipe, launched=False) == [
        "one process (no deepspeed launcher): 1 stage instead of pipeline.num_stages 2 "
        "(`deepspeed --num_gpus 2 launch/tta.py ...` runs them)",
        "pipeline.partition [0, 4, 7] is a split into 2 stages, not 1: the split is planned instead"]
    assert pipe.num_stages == 1 and pipe.partition is None


def test_a_partition_for_another_stage_count_gives_way_to_the_planner(launcher_main):
    pipe = PipelineConfig(num_stages=1, partition=[0, 4, 7])  # deepspeed --num_gpus 2 ... --pipeline.num_stages 1
    assert launcher_main.fit_layout(pipe, launched=True) == [
        "pipeline.partition [0, 4, 7] is a split into 2 stages, not 1: the split is planned instead"]
    assert pipe.num_stages == 1 and pipe.partition is None
    kept = PipelineConfig(num_stages=2, partition=[0, 4, 7])
    assert launcher_main.fit_layout(kept, launched=True) == [] and kept.partition == [0, 4, 7]


# ------------------------------------------------------------------------------------------------ --print_config
def printed_config(launcher_main, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        launcher_main.parse(list(argv))
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_print_config_is_json_for_a_json_config_without_local_rank(launcher_main, capsys, tmp_path):
    text = printed_config(launcher_main, capsys, "--config", "ds_configs/demo.json", "--print_config",
                          "--tta.lr", "5e-6", "--local_rank", "0")
    config = json.loads(text)
    assert "local_rank" not in config and "config" not in config and text.endswith("}\n")
    assert config["tta"]["lr"] == 5e-6 and config["pipeline"]["partition"] == [0, 4, 7]
    assert config["data"]["limit"] is None  # every option, unset ones too
    # The printed config is a config file: read back, it prints the same.
    (tmp_path / "printed.json").write_text(text)
    assert printed_config(launcher_main, capsys, "--config", str(tmp_path / "printed.json"), "--print_config") == text


def test_print_config_is_yaml_for_a_yaml_config(launcher_main, capsys, tmp_path):
    import yaml
    (tmp_path / "run.yaml").write_text("tta:\n  lr: 2.0e-05\n")
    text = printed_config(launcher_main, capsys, "--config", str(tmp_path / "run.yaml"), "--print_config")
    assert text.startswith("model:\n") and yaml.safe_load(text)["tta"]["lr"] == 2e-5


# ------------------------------------------------------------------------------------------------ the console
def test_outside_a_terminal_progress_is_one_line_per_log_every_images(capsys):
    import torch
    progress = TaskProgress("fog", "[1/2] fog", images=5, sweep_images=10, sweep_done=0, log_every=2, show=True,
                            logger=None, with_loss=True)
    metric = SegmentationMetric(3)
    metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    for step in range(5):
        progress.add(step, torch.tensor(0.5 + step), None, metric)
    progress.close()
    captured = capsys.readouterr()
    assert captured.err == ""  # no bar: its carriage-return updates would fill a log file
    lines = captured.out.splitlines()
    assert len(lines) == 3  # after images 2, 4 and the task's last
    pattern = r"\[1/2\] fog: (\d)/5 images, [\d.]+ img/s, mIoU 100\.0, loss (\d\.\d{4}), sweep ETA \d\d:\d\d"
    assert [re.fullmatch(pattern, line).groups() for line in lines] == [("2", "1.5000"), ("4", "3.5000"),
                                                                       ("5", "4.5000")]
    assert progress.mean_loss == pytest.approx(2.5)


def test_a_last_message_clears_an_open_bar():
    from tqdm import tqdm
    bar = tqdm(total=3, disable=False)
    end_bars()
    assert bar.disable and bar not in getattr(tqdm, "_instances", ())  # closed


# ------------------------------------------------------------------------------------------------ errors with their fix
def test_a_corruption_typo_gets_a_did_you_mean_and_a_missing_root_names_the_builder(tmp_path):
    data = make_demo_dataset(tmp_path / "data", num_images=1, create=True)
    with pytest.raises(FileNotFoundError) as err:
        ADE20KC(data, "gausian_noise")
    assert str(err.value) == (f"no folder {data}/images/validation/gausian_noise_5; corruptions under "
                              f"{data}/images/validation: defocus_blur_5, gaussian_noise_5 (did you mean gaussian_noise?)")
    with pytest.raises(FileNotFoundError) as err:
        ADE20KC(data, "fog")  # nothing close: no guess
    assert str(err.value).endswith(": defocus_blur_5, gaussian_noise_5")
    nested = tmp_path / "nested"
    (nested / "snow" / "5").mkdir(parents=True)
    (nested / "frost" / "3").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        ADE20KC(nested, "snwo")
    assert str(err.value) == (f"no folder {nested}/snwo/5 (nor {nested}/images/validation); corruptions under "
                              f"{nested}: frost/3, snow/5 (did you mean snow?)")
    with pytest.raises(FileNotFoundError) as err:
        ADE20KC(tmp_path / "absent", "fog")
    assert str(err.value) == (f"ADE20K-C root {tmp_path}/absent does not exist (`python data/make_ade20k_c.py "
                              f"--ade_root PATH/ADEChallengeData2016 --out {tmp_path}/absent` makes it)")


# ------------------------------------------------------------------------------------------------ files and the tree
def test_weights_and_caches_are_written_with_the_users_umask(tmp_path):
    from models.tiny import build_demo_models
    old = os.umask(0o027)
    try:
        assert umask_file_mode() == 0o640
        build_demo_models(str(tmp_path / "segformer"), str(tmp_path / "sd3"), str(tmp_path / "classes.safetensors"),
                          ADE20K_CLASSES)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 7  # 2 models, 3 text encoders, VAE, the cache
    assert {p.stat().st_mode & 0o777 for p in files} == {0o640}  # as every other file: readable by the group


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_the_documented_commands_write_is_ignored_by_git():
    written = ["runs/demo/results.json", "demo_assets/sd3-tiny/vae/config.json", ".venv/torch_extensions/x.so",
               "class_embeddings/sd3-medium-ade20k.safetensors", "data/ade20k_c/images/validation/fog_5/a.jpg",
               "runs/miniature/report/x.png", "wandb/offline-run-x/run.wandb", ".pytest_cache/v/cache/lastfailed",
               "pipeline/__pycache__/x.pyc", "x.egg-info/PKG-INFO"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == written


# ------------------------------------------------------------------------------------------------ the README
def heading_anchor(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (lowercase, punctuation dropped, spaces as hyphens)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short_opens_with_its_contents_and_every_link_resolves():
    readme = ROOT / "README.md"
    lines = readme.read_text().splitlines()
    assert len(lines) < 300
    sections = [line for line in lines if line.startswith("## ")]
    assert lines.index("**Contents**") < lines.index(sections[0])
    docs = sorted((ROOT / "docs").glob("*.md"))
    linked = set()
    for page in [readme, *docs]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        assert "shared/" not in text
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file, _, fragment = target.partition("#")
            destination = (page.parent / file).resolve() if file else page
            assert destination.exists(), (page.name, target)
            linked.add(destination)
            if fragment and destination.suffix == ".md":
                headings = [line.lstrip("#") for line in destination.read_text().splitlines() if line.startswith("#")]
                assert fragment in {heading_anchor(h) for h in headings}, (page.name, target)
    assert set(docs) <= linked  # every reference page is reachable
