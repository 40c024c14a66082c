"""Protocols (pipeline/run/protocol.py): each one's task order, where the runner resets, saves and loads, the
per-round summary, and a continual resume in the middle of a round; in-process, on the synthetic ACDC and
Cityscapes-C layouts, with a recording stand-in for the method (the launcher runs are in test_datasets_launch.py)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data.cityscapes import CITYSCAPES_CLASSES
from data.demo import make_demo_street
from pipeline.run.config import MOVED_OPTIONS, RunConfig, validate
from pipeline.methods import Method, StepResult
from pipeline.run.protocol import task_sequence
from pipeline.run.reporting import format_results_table, summarize, write_results
from pipeline.run.resume import finished_tasks, resume_signature
from pipeline.run.loop import TTARunner

C = len(CITYSCAPES_CLASSES)
CONDITIONS = ["fog", "night", "rain", "snow"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    make_demo_street(root / "acdc", "acdc", CONDITIONS, num_images=2, size=(48, 96), create=True)
    make_demo_street(root / "cityscapes", "cityscapes", ["fog"], (1, 2, 3, 4, 5), num_images=2, size=(48, 96),
                     create=True)
    return root


def config(root: Path, out: Path, dataset: str = "acdc", **data) -> RunConfig:
    cfg = RunConfig(output_dir=str(out))
    cfg.data.dataset, cfg.data.root, cfg.data.classes = dataset, str(root / dataset), "cityscapes"
    cfg.data.corruptions = CONDITIONS if dataset == "acdc" else ["fog"]
    cfg.data.window_size = cfg.data.short_edge = 48
    cfg.data.window_stride, cfg.data.num_workers = 48, 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.tta.method = "tent"
    cfg.logging.progress, cfg.logging.image_every = False, 0
    return cfg


class Recorder(Method):
    """Adapts nothing, records what the runner asks: each task's images, resets, saves and loads. Its 'state'
    is the number of images seen since the last reset, saved and loaded as a file."""

    name = "tent"

    def __init__(self, fail_at: str | None = None):
        self.events: list[tuple[str, str]] = []
        self.seen, self.fail_at = 0, fail_at

    def step(self, task: str, item: dict) -> StepResult:
        if task == self.fail_at:
            raise RuntimeError(f"stopped in {task}")
        self.seen += 1
        self.events.append(("step", task))
        logits = torch.zeros(1, C, *item["image"].shape[-2:])
        logits[:, 0] = self.seen  # road everywhere: a metric that the seen count cannot change
        return StepResult(logits, torch.tensor(float(self.seen)), False, [])

    def reset(self) -> None:
        self.seen = 0
        self.events.append(("reset", ""))

    def save(self, folder: Path, task: str) -> None:
        (folder / task).write_text(str(self.seen))
        self.events.append(("save", task))

    def load(self, folder: Path, task: str) -> None:
        self.seen = int((folder / task).read_text())
        self.events.append(("load", task))


def run(cfg: RunConfig, method: Recorder) -> dict:
    record = {**asdict(cfg), "deepspeed": {}}  # as the launcher records it: the engine's JSON
    return TTARunner(cfg, CITYSCAPES_CLASSES, torch.device("cpu"), method, config_record=record).run()


def test_episodic_and_continual_task_orders_and_reset_points(layouts, tmp_path):
    keys = [f"r{r}.{c}" for r in (1, 2) for c in CONDITIONS]
    episodic = Recorder()
    results = run(config(layouts, tmp_path / "episodic", rounds=2), episodic)
    assert list(results["tasks"]) == keys
    resets = [i for i, (kind, _) in enumerate(episodic.events) if kind == "reset"]
    assert len(resets) == len(keys) - 1 and not any(kind == "save" for kind, _ in episodic.events)
    assert [t for kind, t in episodic.events if kind == "step"] == [k for k in keys for _ in range(2)]

    continual_cfg = config(layouts, tmp_path / "continual", rounds=2)
    continual_cfg.tta.continual = True
    continual = Recorder()
    results = run(continual_cfg, continual)
    assert list(results["tasks"]) == keys
    assert not any(kind == "reset" for kind, _ in continual.events) and continual.seen == 2 * len(keys)
    assert [t for kind, t in continual.events if kind == "save"] == keys[:-1]  # the state after every task but the last
    # Each task's entry says where it sits; the summary has each round's mean and the overall one.
    assert results["tasks"]["r2.night"] | {"IoU": None} == results["tasks"]["r2.night"] | {
        "round": 2, "domain": "night", "severity": None, "IoU": None}
    assert [r["round"] for r in results["rounds"]] == [1, 2] and all(r["tasks"] == 4 for r in results["rounds"])
    table = format_results_table(results)
    assert "round 1" in table and "round 2" in table and table.splitlines()[-1].startswith("average")


def test_gradual_runs_each_corruption_up_and_down_the_severities_without_resets(layouts, tmp_path):
    cfg = config(layouts, tmp_path / "gradual", dataset="cityscapes", gradual=True)
    cfg.tta.continual = True
    sequence = task_sequence(cfg.data)
    assert [t.severity for t in sequence] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert [t.key for t in sequence] == ["fog_1", "fog_2", "fog_3", "fog_4", "fog_5",
                                         "fog_4_down", "fog_3_down", "fog_2_down", "fog_1_down"]
    method = Recorder()
    results = run(cfg, method)
    assert list(results["tasks"]) == [t.key for t in sequence] and "rounds" not in results
    assert not any(kind == "reset" for kind, _ in method.events)
    assert results["tasks"]["fog_3_down"]["severity"] == 3 and results["tasks"]["fog_3_down"]["domain"] == "fog"


def test_one_round_of_fixed_severity_keeps_the_task_names_as_keys():
    cfg = RunConfig()
    assert [t.key for t in task_sequence(cfg.data)] == cfg.data.corruptions  # ADE20K-C as before
    cfg.data.dataset, cfg.data.corruptions, cfg.data.rounds = "acdc", CONDITIONS, 10
    keys = [t.key for t in task_sequence(cfg.data)]
    assert len(keys) == 40 and keys[:2] == ["r01.fog", "r01.night"] and keys[-1] == "r10.snow"


def test_a_continual_run_resumes_in_the_middle_of_a_round(layouts, tmp_path):
    def continual() -> RunConfig:
        cfg = config(layouts, tmp_path / "cut", rounds=2)
        cfg.tta.continual = True
        return cfg
    whole = config(layouts, tmp_path / "whole", rounds=2)
    whole.tta.continual = True
    reference = run(whole, Recorder())

    with pytest.raises(RuntimeError, match="stopped in r2.rain"):
        run(continual(), Recorder(fail_at="r2.rain"))
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert list(saved["tasks"]) == ["r1.fog", "r1.night", "r1.rain", "r1.snow", "r2.fog", "r2.night"]
    assert saved["state"]["task"] == "r2.night" and [r["tasks"] for r in saved["rounds"]] == [4, 2]

    resumed = Recorder()
    results = run(continual(), resumed)
    # The state after r2.night is loaded, and only the round's last two tasks run, from it.
    assert resumed.events[0] == ("load", "r2.night")
    assert [t for kind, t in resumed.events if kind == "step"] == ["r2.rain"] * 2 + ["r2.snow"] * 2
    assert resumed.seen == 16  # every image of the run counted, as without the cut (each task's loss shows it)
    assert list(results["tasks"]) == list(reference["tasks"])
    for task, entry in results["tasks"].items():
        assert {k: v for k, v in entry.items() if k != "seconds"} == \
            {k: v for k, v in reference["tasks"][task].items() if k != "seconds"}


def test_protocol_options_out_of_their_domain_are_refused_in_one_line():
    cases = [({"rounds": 0}, {}, "--data.rounds 0 is outside its domain"),
             ({"gradual": True}, {}, "--data.gradual true needs --tta.continual true"),
             ({"gradual": True, "dataset": "acdc", "corruptions": CONDITIONS}, {"continual": True},
              "ACDC has none"),
             ({"short_edge": 100}, {}, "--data.short_edge 100 is outside its domain: an integer >= 512")]
    for data, tta, message in cases:
        cfg = RunConfig()
        for key, value in data.items():
            setattr(cfg.data, key, value)
        for key, value in tta.items():
            setattr(cfg.tta, key, value)
        with pytest.raises(ValueError) as err:
            validate(cfg, 150)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_results_written_before_datasets_and_protocols_existed_still_resume():
    record = json.loads(json.dumps({"model": vars(RunConfig().model), "data": vars(RunConfig().data),
                                    "tta": vars(RunConfig().tta), "seed": 0, "deepspeed": {}}))
    legacy = json.loads(json.dumps(record))
    for key in ("dataset", "short_edge", "gradual", "rounds"):
        legacy["data"].pop(key)
    assert resume_signature(legacy) == resume_signature(record)
    record["data"]["short_edge"] = 1024
    assert resume_signature(legacy) != resume_signature(record)


def test_summary_means_per_round_wait_for_undefined_values():
    config_record = {"data": {"rounds": 2}}
    task = {"aAcc": 50.0, "IoU": [1.0] * C, "images": 1, "seconds": 1.0}
    results = summarize({"r1.fog": {**task, "mIoU": 10.0, "round": 1}, "r1.night": {**task, "mIoU": 20.0, "round": 1},
                         "r2.fog": {**task, "mIoU": float("nan"), "round": 2}}, config_record, CITYSCAPES_CLASSES)
    assert results["rounds"] == [{"round": 1, "tasks": 2, "mIoU": 15.0, "aAcc": 50.0},
                                 {"round": 2, "tasks": 1, "mIoU": None, "aAcc": 50.0}]
    assert "rounds" not in summarize({"fog": {**task, "mIoU": 1.0}}, {"data": {"rounds": 1}}, CITYSCAPES_CLASSES)


def test_a_rerun_is_done_only_when_every_task_of_every_round_is(layouts, tmp_path):
    """launch/tta.py leaves before loading any model when results.json holds every task: with rounds a
    condition is several tasks, so round 1 alone is not the whole run."""
    from launch.tta import all_tasks_done
    cfg = config(layouts, tmp_path, rounds=2)
    cfg.tta.continual = True
    keys = [t.key for t in task_sequence(cfg.data)]
    first = {k: {} for k in keys if k.startswith("r1.")}
    assert len(keys) == 8 and len(first) == 4
    assert not all_tasks_done(first, keys, 1, None)
    assert all_tasks_done({k: {} for k in keys}, keys, 1, None)
    assert not all_tasks_done({}, keys, 1, None)


def test_results_written_before_the_newer_options_resume_as_what_they_ran(layouts, tmp_path):
    """A results.json from before data.dataset / short_edge / gradual and dusa.candidate_weights existed has
    the signature of a run with their defaults (what it ran), not another run's."""
    record = json.loads(json.dumps(asdict(config(layouts, tmp_path, dataset="cityscapes"))))
    record["data"].update(dataset="ade20k", short_edge=None, gradual=False)
    record["deepspeed"] = {}  # the launcher puts the effective DeepSpeed JSON here
    record["tta"]["method"] = "dusa"  # its section counts
    before = json.loads(json.dumps(record))
    for key in ("dataset", "short_edge", "gradual"):
        del before["data"][key]
    before["tta"].update(before.pop("dusa"))  # then DUSA's options were in `tta`
    before["tta"].pop("candidate_weights")  # which came later still
    assert resume_signature(before) == resume_signature(record)
    record["dusa"]["candidate_weights"] = "uniform"
    assert resume_signature(before) != resume_signature(record)


@pytest.mark.parametrize("method", ["dusa", "tent"])
def test_run_folders_written_before_dusa_had_its_own_section_resume_as_what_they_ran(layouts, tmp_path, method):
    """A results.json whose config holds DUSA's options in `tta` (before `--dusa.*`) resumes the same run, and
    only that: a changed DUSA option is another dusa run (tent does not read them, so it still resumes)."""
    cfg = config(layouts, tmp_path)
    cfg.tta.method = method
    cfg.dusa.topk, cfg.dusa.max_classes, cfg.dusa.timestep_range = 2, 7, (0.3, 0.3)
    record = json.loads(json.dumps(asdict(cfg)))
    record["deepspeed"] = {}
    before = json.loads(json.dumps(record))
    before["tta"].update(before.pop("dusa"))
    assert {old.partition(".")[2] for old in MOVED_OPTIONS} <= set(before["tta"])
    task = {"mIoU": 10.0, "aAcc": 50.0, "IoU": [1.0] * C, "images": 2, "seconds": 1.0}
    write_results(summarize({"fog": task}, before, CITYSCAPES_CLASSES), tmp_path)
    assert list(finished_tasks(cfg, record, CITYSCAPES_CLASSES)) == ["fog"]
    cfg.dusa.max_classes = record["dusa"]["max_classes"] = 8
    if method == "tent":
        assert list(finished_tasks(cfg, record, CITYSCAPES_CLASSES)) == ["fog"]
    else:
        with pytest.raises(ValueError, match=r"holds results of another configuration \(differs in: dusa\)"):
            finished_tasks(cfg, record, CITYSCAPES_CLASSES)
