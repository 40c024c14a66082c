"""The run's task sequence, from the data options: which tasks, in which order, in which round.

- episodic (default): each task once, the models reset before every task (`tta.continual` false);
- continual: the same sequence without resets (`tta.continual` true);
- gradual: each corruption at severities 1, 2, 3, 4, 5, 4, 3, 2, 1 without resets (`data.gradual`);
- rounds: the whole sequence repeated `data.rounds` times (CoTTA's ACDC protocol: 4 conditions x 10).

Every entry has a key, unique in the run, under which everything else knows it (results, saved state,
pictures, W&B, the replicas' queue): the task's name alone for a single round of fixed severity, so such
runs read and write what they always did. The loop runs the keys in order and needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


@dataclass(frozen=True)
class Task:
    key: str  # unique in the run: letters, digits and _ - . + (it names folders)
    domain: str  # the dataset's task: a corruption or an ACDC condition
    severity: int | None  # None: the dataset has no severities (ACDC)
    round: int  # 1-based

    def record(self) -> dict:
        """What results.json keeps beside the task's metrics."""
        return {"round": self.round, "domain": self.domain, "severity": self.severity}


def task_sequence(data) -> list[Task]:
    """The tasks of a run in order (`data`: a DataConfig)."""
    from data.datasets import DATASETS
    info = DATASETS[data.dataset]
    severities = info.severities
    one_round: list[tuple[str, str, int | None]] = []  # (key within the round, domain, severity)
    for domain in data.corruptions:
        if data.gradual:
            peak = GRADUAL_SEVERITIES.index(max(GRADUAL_SEVERITIES))
            one_round += [(f"{domain}_{s}" + ("_down" if i > peak else ""), domain, s)
                          for i, s in enumerate(GRADUAL_SEVERITIES)]
        else:
            one_round.append((domain, domain, data.severity if severities else None))
    width = len(str(data.rounds))
    return [Task(key if data.rounds == 1 else f"r{r:0{width}d}.{key}", domain, severity, r)
            for r in range(1, data.rounds + 1) for key, domain, severity in one_round]


def describe_tasks(data) -> str:
    """The task sequence in a few words, for the start-up summary."""
    from data.datasets import DATASETS
    info = DATASETS[data.dataset]
    if not info.severities:
        words = f"{info.title}, {len(data.corruptions)} conditions"
    elif data.gradual:
        words = f"{len(data.corruptions)} corruptions at severities {'-'.join(map(str, GRADUAL_SEVERITIES))}"
    else:
        words = f"{len(data.corruptions)} corruptions at severity {data.severity}"
    if data.dataset not in ("ade20k", "acdc"):
        words = f"{info.title}, {words}"
    return words + (f", {data.rounds} rounds" if data.rounds > 1 else "")


def round_means(tasks: Mapping[str, Mapping], rounds: int) -> list[dict] | None:
    """Per round (of `rounds`, None when 1): how many of its tasks finished, and their mIoU and aAcc averaged
    (None while a task's is undefined). `tasks`: results.json's task entries, which carry their round."""
    if rounds < 2:
        return None

    def mean(values):
        return None if not values or any(v is None for v in values) else sum(values) / len(values)
    out = []
    for r in range(1, rounds + 1):
        entries = [e for e in tasks.values() if e.get("round") == r]
        out.append({"round": r, "tasks": len(entries), "mIoU": mean([e.get("mIoU") for e in entries]),
                    "aAcc": mean([e.get("aAcc") for e in entries])})
    return out
