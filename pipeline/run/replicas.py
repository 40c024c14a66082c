"""Replicas x stages: G processes run R = G / S independent copies of an S-stage pipeline (S = 1 for the
methods without one), each adapting whole corruption tasks on its own.

- Ranks r*S .. r*S + S - 1 form replica r (its stages on neighbouring GPUs, so on one node when S divides
  the GPUs per node); rank 0, stage 0 of replica 0, is the root: it writes the results and logs to W&B.
- Tasks come from a shared queue (an atomic counter in a TCP store hosted by the root): a replica takes
  the next task when it finishes one. The tasks have the same image count but not the same cost (the
  candidate classes per window, hence the transformer batch, vary with the corruption), and nodes may
  differ in speed: a queue keeps every replica busy where a static split would leave the fast ones idle.
  With one replica the tasks run in their order, with no store (continual runs need that order).
- Replicas never share gradients: DeepSpeed would make the replica axis its data-parallel axis and
  all-reduce gradients (and shard ZeRO state) across it, mixing tasks; each process is made its own
  data-parallel group instead (pipeline/dusa/deepspeed_seam.py: `isolate_data_parallel`), so a task's adaptation is what a 1-replica run
  computes for it, and replicas never wait for one another.
- The scoring process of every other replica feeds the root through the store (`ReplicaFeed`: steps,
  pictures as PNG, task results as JSON); the root replays them into its W&B run and results files.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Iterator, Sequence

import torch.distributed as dist

QUEUE_KEY = "dusa/next_task"


def layout_error(world: int, stages: int, continual: bool, sequence: str = "tta.continual") -> str | None:
    """Why G processes cannot run S-stage replicas (one line), or None. `sequence`: the option that makes the
    run one sequence of tasks (`tta.continual`, or `data.gradual`)."""
    if world % stages:
        near = max(stages, world - world % stages)
        return (f"{world} process{'es' if world > 1 else ''} cannot form pipelines of pipeline.num_stages={stages}: start a multiple of "
                f"{stages} (`deepspeed --num_gpus {near} launch/tta.py ...`) or set --pipeline.num_stages to a "
                f"divisor of {world}")
    if continual and world // stages > 1:
        return (f"{sequence} is one sequence of tasks and cannot be spread over {world // stages} replicas: "
                f"run it with {stages} process{'es' if stages > 1 else ''} "
                f"(`deepspeed --num_gpus {stages} ...`), or set --pipeline.num_stages {world}")
    return None


class Replicas:
    """This process's place in the run: replica `index` of `count`, stage `stage` of `stages`."""

    def __init__(self, rank: int = 0, world: int = 1, stages: int = 1, group: Any = None, store: Any = None):
        self.rank, self.world, self.stages = rank, world, stages
        self.count, self.index, self.stage = world // stages, rank // stages, rank % stages
        self.leader = self.index * stages  # the replica's stage 0: it scores and takes the tasks
        self.group = group  # the replica's processes (None: one process, or the whole world is the replica)
        self.store = store  # the shared queue and the feed (None with one replica)
        self._seen: dict[int, int] = {}

    @property
    def root(self) -> bool:
        return self.rank == 0

    @property
    def members(self) -> list[int]:
        return list(range(self.leader, self.leader + self.stages))

    @classmethod
    def form(cls, stages: int) -> "Replicas":
        """Called by every process of the run at once (it makes process groups and the store)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        count, group, store = world // stages, None, None
        if count > 1 and stages > 1:
            for r in range(count):  # every process makes every group, in the same order
                made = dist.new_group(ranks=list(range(r * stages, (r + 1) * stages)))
                if r == rank // stages:
                    group = made
        if count > 1:
            address = [None]
            if rank == 0:  # a free port, told to the others
                store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), 0, is_master=True,
                                      wait_for_workers=False)
                address = [(os.environ.get("MASTER_ADDR", "127.0.0.1"), store.port)]
            dist.broadcast_object_list(address, src=0)
            if rank != 0 and rank % stages == 0:
                store = dist.TCPStore(*address[0], is_master=False, wait_for_workers=False)
        return cls(rank, world, stages, group, store)

    def describe(self) -> str:
        noun = "replica" if self.count == 1 else "replicas"
        return f"{self.count} {noun} x {self.stages} stage{'s' if self.stages > 1 else ''}"

    # ------------------------------------------------------------------ the tasks
    def tasks(self, pending: Sequence[str]) -> Iterator[str]:
        """The tasks this replica runs, of `pending` (every process of the replica gets the same ones)."""
        if self.count == 1:
            yield from pending
            return
        while True:
            box = [self.store.add(QUEUE_KEY, 1) - 1 if self.rank == self.leader else None]
            if self.group is not None:
                dist.broadcast_object_list(box, src=self.leader, group=self.group)
            if box[0] >= len(pending):
                return
            yield pending[box[0]]

    def barrier(self) -> None:
        """Every process of this replica (not the others, which may be hours from done)."""
        if self.stages > 1:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------ the root's side of the feed
    def collect(self) -> Iterator[tuple[int, dict, bytes]]:
        """(replica, event, attachment) of every event the other replicas posted since the last call, in the
        order each posted them."""
        for replica in range(1, self.count):
            key = f"dusa/feed/{replica}"
            posted = self.store.add(f"{key}/count", 0)
            while self._seen.get(replica, 0) < posted:
                n = self._seen.get(replica, 0)
                event = json.loads(self.store.get(f"{key}/{n}"))
                blob = self.store.get(f"{key}/{n}/blob") if event.get("blob") else b""
                for name in (f"{key}/{n}", f"{key}/{n}/blob"):
                    self.store.delete_key(name)
                self._seen[replica] = n + 1
                yield replica, event, blob


class ReplicaFeed:
    """The logger of another replica's scoring process: what the root's RunLogger would log, posted to the
    root through the store (JSON events; a picture as PNG bytes beside its event)."""

    enabled = True

    def __init__(self, replicas: Replicas):
        self.store, self.key, self.posted = replicas.store, f"dusa/feed/{replicas.index}", 0

    def _post(self, event: dict, blob: bytes = b"") -> None:
        key = f"{self.key}/{self.posted}"
        if blob:
            self.store.set(f"{key}/blob", blob)
        self.store.set(key, json.dumps({**event, "blob": bool(blob)}))
        self.posted += 1
        self.store.add(f"{self.key}/count", 1)  # last: the root reads only what is complete

    def log_step(self, task: str, step: int, loss: float | None, running_miou: float | None = None,
                 extra: dict | None = None) -> None:
        self._post({"kind": "step", "task": task, "step": step, "loss": loss, "running_miou": running_miou,
                    "extra": extra})

    def log_picture(self, task: str, picture: Any, caption: str) -> None:
        png = io.BytesIO()
        picture.save(png, format="PNG")
        self._post({"kind": "picture", "task": task, "caption": caption}, png.getvalue())

    def log_task(self, task: str, result: dict) -> None:
        def plain(value):  # JSON has no NaN: None, restored by `task_result`
            return None if isinstance(value, float) and not math.isfinite(value) else value
        self._post({"kind": "result", "task": task, "result": {
            **{k: plain(v) for k, v in result.items() if k != "IoU"}, "IoU": [plain(float(v)) for v in result["IoU"]]}})

    def finish(self, results: dict) -> None:
        pass


def task_result(event: dict) -> dict:
    """A result event's metrics as the runner keeps them (undefined values NaN again)."""
    def restore(value):
        return math.nan if value is None else value
    result = dict(event["result"])
    result.update(IoU=[restore(v) for v in result["IoU"]], mIoU=restore(result["mIoU"]), aAcc=restore(result["aAcc"]))
    return result
