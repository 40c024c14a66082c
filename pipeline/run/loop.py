"""The TTA loop: tasks (corruptions), one step per image of the chosen method, scoring and results.

Every method (pipeline/methods/: one file each, named by its registry) goes through the same data, metric, reset,
continual state, pictures and logging code; only the method's step, which turns an image into scored
logits, differs.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Subset

from data.ade20k_c import ADE20KC
from data.datasets import dataset_info
from data.metrics import SegmentationMetric
from pipeline.run.config import DataConfig, RunConfig
from pipeline.run.images import PreparedImages, predict, task_order
from pipeline.run.image_figures import candidate_recall, image_counts, image_rows, read_images, write_images
from pipeline.methods import Method
from pipeline.run import timing
from pipeline.run.pictures import make_picture, save_picture
from pipeline.run.progress import TaskProgress
from pipeline.run.replicas import Replicas, task_result
from pipeline.run.reporting import RunLogger, format_results_table, summarize, write_results
from pipeline.run.resume import check_saved_state, finished_tasks, saved_results, state_path
from pipeline.run.folder import PeerError, file_digests, own_folder, remove_path
from pipeline.run.log import LOG
from pipeline.run.protocol import task_sequence
from pipeline.dusa.memory import prediction_line


def open_tasks(data: DataConfig, num_classes: int) -> dict[str, ADE20KC]:
    """Every task's dataset by its key, in run order (pipeline/run/protocol.py; listing checks folders and
    annotations). A task that recurs (rounds) shares one dataset."""
    info, opened = dataset_info(data.dataset), {}
    for task in task_sequence(data):
        if (task.domain, task.severity) not in opened:
            opened[task.domain, task.severity] = info.open(data.root, task.domain, task.severity, data.limit,
                                                           num_classes)
    return {task.key: opened[task.domain, task.severity] for task in task_sequence(data)}


class TTARunner:
    """Runs every task on this rank with `method` (pipeline/methods/, built by its `build`): the scoring
    process reads the data, steps and scores; with a pipeline, the other stages `follow` each step.

    `logger`: W&B and results on rank 0 (a `ReplicaFeed` on other replicas' scoring processes); `config_record`:
    the run's config as written to config.json (default: `cfg` itself); `datasets`: the tasks, listed by the
    launcher's checks (default: listed here); `replicas`: where this process sits (default: one replica).
    """

    def __init__(self, cfg: RunConfig, class_names: Sequence[str], device: torch.device, method: Method,
                 logger: RunLogger | None = None, config_record: dict[str, Any] | None = None,
                 datasets: dict[str, ADE20KC] | None = None, replicas: Replicas | None = None):
        if method.name != cfg.tta.method:
            raise ValueError(f"tta.method={cfg.tta.method} but the runner was given {method.name}")
        self.cfg, self.class_names, self.device = cfg, list(class_names), device
        self.method = method
        self.replicas = replicas or Replicas()  # default: one process, or one pipeline replica of them
        self.logger = logger
        self.config_record = config_record if config_record is not None else asdict(cfg)
        self.results: dict[str, dict] = {}
        self.image_rows: dict[str, list[dict[str, str]]] = {}  # images.csv's rows by task (rank 0)
        data = cfg.data
        # Every task is listed up front: a missing folder fails now, not hours in, and the sweep's size is known.
        self.datasets = datasets if datasets is not None else open_tasks(data, len(self.class_names))
        self.total_images = sum(len(d) for d in self.datasets.values())
        self.sequence = {task.key: task for task in task_sequence(data)}  # round, domain, severity of each key
        self._done = 0  # images scored so far in the sweep (for its ETA)
        self._nonfinite_run = self._nonfinite_task = 0  # steps with a NaN/inf loss: in a row, in this task
        self._reset_s = 0.0  # the reset before the current task (for --logging.timing)

    @property
    def scoring(self) -> bool:
        return self.method.scoring

    def reset(self) -> None:
        """Initial weights and fresh optimizer state of the adapted model (source has none)."""
        self.method.reset()

    def run(self) -> dict | None:
        # The state is checked where it is loaded (`_load_state`), by its digests in results.json, which
        # go on into every results.json written here.
        reps = self.replicas
        finished = {}
        if reps.root:
            finished = finished_tasks(self.cfg, self.config_record, self.class_names, check_state=False)
        names = list(finished)
        if reps.world > 1 and dist.is_initialized():  # rank 0's reading, for every process (one sweep)
            box = [names]
            dist.broadcast_object_list(box, src=0)
            names = box[0]
        self._state_record = (saved_results(self.cfg.output_dir) or {}).get("state") if reps.root else None
        order = list(self.datasets)
        if reps.root:  # the finished tasks' rows; an interrupted task's are written again
            self.image_rows = read_images(self.cfg.output_dir, names)
        for task in names:
            self._done += len(self.datasets[task])
            if reps.root:
                self.results[task] = finished[task]
                LOG.info(f"{task}: already done in {self.cfg.output_dir} (mIoU {finished[task]['mIoU']:.2f}), "
                         f"skipped")
        pending = [task for task in order if task not in names]
        if self.cfg.tta.continual and names and pending:
            self._load_state(names[-1])  # the models and optimizer as they were after that task (one replica)
        ran = False
        for task in reps.tasks(pending):
            index = order.index(task)
            self._reset_s = 0.0
            if ran and not self.cfg.tta.continual:
                start = time.perf_counter()
                self.reset()  # every task from the initial weights, whichever ran before on this replica
                self._reset_s = time.perf_counter() - start
            result = self.run_task(task, self.datasets[task], f"[{index + 1}/{len(order)}] {task}")
            ran = True
            saved = self.cfg.tta.continual and index + 1 < len(order) and self.method.adapts
            if saved:
                self._save_state(task)  # before results.json names the task finished
            if self.scoring:
                self._task_done(task, result)
                if saved:
                    self._drop_old_states()  # after results.json names the new state: a crash keeps one
        if reps.count > 1:
            reps.barrier()  # this replica's stages are done; the others may be hours from it
            if not reps.root:
                return None
            while len(self.results) < len(order):  # the other replicas' last tasks
                self._collect()
                time.sleep(0.2)
        if not self.scoring:
            return None
        results = self._write_results()
        print(format_results_table(results), flush=True)
        if self.logger:
            self.logger.finish(results)
        return results

    def _task_done(self, task: str, result: dict, replica: int = 0) -> None:
        """A finished task's result: rank 0 records it (saved after every task, so a crash keeps what
        finished and claims nothing else) and logs it; another replica posts it to rank 0."""
        if self.replicas.root:
            rows = result.pop("image_rows", None)
            if rows is not None:  # before results.json names the task finished: a crash between reruns it
                self.image_rows[task] = rows
                ordered = {t: self.image_rows[t] for t in self.datasets if t in self.image_rows}  # the run's order
                write_images(self.cfg.output_dir, ordered)
            self.results[task] = result
            self._write_results()
            if replica:
                LOG.info(f"{task}: mIoU {result['mIoU']:.2f}  aAcc {result['aAcc']:.2f}  ({result['images']} images, "
                         f"{result['seconds']:.1f} s, replica {replica})"
                         + (f"; {result['nonfinite_steps']} steps had a NaN/inf loss, their updates were skipped"
                            if result.get("nonfinite_steps") else ""))
        if self.logger:
            self.logger.log_task(task, result)

    def _collect(self, progress: TaskProgress | None = None) -> None:
        """Rank 0: what the other replicas posted since the last call, into W&B and the results."""
        for replica, event, blob in self.replicas.collect():
            kind, task = event["kind"], event["task"]
            if kind == "result":
                self._task_done(task, task_result(event), replica)
            elif kind == "step":
                self._done += 1
                if progress is not None:
                    progress.sweep_done += 1
                if self.logger:
                    self.logger.log_step(task, event["step"], event["loss"], event["running_miou"], event["extra"])
            elif kind == "picture" and self.logger:
                self.logger.log_picture(task, Image.open(io.BytesIO(blob)), event["caption"])

    # ------------------------------------------------------------------ resuming an interrupted sweep
    def _write_results(self) -> dict:
        """results.json / .csv of the tasks so far, with the record of the saved state (its files' SHA-256),
        which a resume checks before loading it."""
        ordered = {task: self.results[task] for task in self.datasets if task in self.results}  # the run's order
        results = summarize(ordered, self.config_record, self.class_names)
        if getattr(self, "_state_record", None):
            results["state"] = self._state_record
        write_results(results, self.cfg.output_dir)
        return results

    def _state_path(self, task: str) -> Path:
        return state_path(self.cfg.output_dir, task)

    def _save_state(self, task: str) -> None:
        """Continual runs keep the adapted state after each task (only the latest), to resume from.

        It is written into a fresh folder (no file or link of anyone else in it), its digests are taken,
        and it is renamed into place: an interrupted save leaves the previous state as it was.
        """
        if not self.method.adapts:
            return
        output, path = Path(self.cfg.output_dir), self._state_path(task)
        incoming = path.parent / ".incoming"
        pipeline = self.method.pipeline and dist.is_initialized()
        if self.scoring:
            own_folder(output, "state")
            if incoming.exists() or incoming.is_symlink():
                remove_path(incoming)  # left by an interrupted save
            incoming.mkdir()
        if pipeline:
            dist.barrier()
        self.method.save(incoming, task)  # with a pipeline, every stage writes its part
        if pipeline:
            dist.barrier()
        if self.scoring:
            self._state_record = {"task": task, "files": file_digests(incoming, [task])}
            if path.exists() or path.is_symlink():
                remove_path(path)
            os.replace(incoming / task, path)
            remove_path(incoming)  # emptied by the rename (its exact name, inside state/)

    def _drop_old_states(self) -> None:
        """Once results.json names the latest state, the states of the run's other tasks go: by their exact
        names, inside `<output_dir>/state/` only (anything else there is left alone)."""
        keep = (self._state_record or {}).get("task")
        for task in self.datasets:
            if task != keep:
                path = self._state_path(task)
                if path.exists() or path.is_symlink():
                    remove_path(path)

    def _load_state(self, task: str) -> None:
        """Loads the state after `task`, once rank 0 found every file as the run recorded it (DeepSpeed
        and torch read pickles: nothing else may be loaded)."""
        path, error = self._state_path(task), None
        if self.scoring:
            try:
                check_saved_state(self.cfg.output_dir, saved_results(self.cfg.output_dir) or {}, task)
            except ValueError as exc:
                error = str(exc)
        if self.method.pipeline and dist.is_initialized() and dist.get_world_size() > 1:
            verdict = [error]
            dist.broadcast_object_list(verdict, src=0)
            if verdict[0] is not None and not self.scoring:
                raise PeerError(verdict[0])
        if error is not None:
            raise ValueError(error)
        self.method.load(path.parent, task)

    # ------------------------------------------------------------------ one image
    def _count_nonfinite(self, skipped: bool) -> None:
        """Counts steps whose update was skipped for a NaN/inf loss; too many in a row stop the run."""
        self._nonfinite_run = self._nonfinite_run + 1 if skipped else 0
        self._nonfinite_task += int(skipped)
        if self._nonfinite_run >= self.cfg.tta.max_nonfinite:
            raise FloatingPointError(
                f"{self._nonfinite_run} steps in a row had a NaN/inf loss (their updates were skipped): "
                f"the adapted weights or the inputs are broken; lower --tta.lr or check the images "
                f"(limit: --tta.max_nonfinite)")

    def run_task(self, task: str, dataset: ADE20KC, description: str) -> dict | None:
        data = self.cfg.data
        self._nonfinite_task = 0
        order = task_order(data, self.cfg.seed, task, len(dataset))
        timer = timing.RECORDER
        if not self.scoring:  # later pipeline stages: their part of the same steps
            start = time.perf_counter()
            for i in order:
                timer.begin_image(task)
                self._count_nonfinite(self.method.follow(task, dataset, i))
                timer.end_image()
            self.method.end_task()
            self._timing_task_done(task, len(order), time.perf_counter() - start)
            return None

        metric = SegmentationMetric(len(self.class_names))
        loader = DataLoader(Subset(PreparedImages(dataset, data.window_size, data.window_stride, data.short_edge), order),
                            batch_size=None, num_workers=data.num_workers, pin_memory=self.device.type == "cuda")
        every = self.cfg.logging.image_every
        start = time.perf_counter()
        root, others = self.replicas.root, self.replicas.count > 1
        progress = TaskProgress(task, description, len(dataset), self.total_images, self._done,
                                self.cfg.logging.log_every, self.cfg.logging.progress and root, self.logger,
                                self.method.adapts, self.replicas.count)
        items = iter(loader)
        windows = 0
        # Per image (images.csv): the counts stay on the device until the task ends; the rest is on the host.
        counts = torch.zeros(len(order), 2, dtype=torch.long, device=self.device)
        names, window_counts, recalls = [], [], []
        for step in range(len(order)):
            timer.begin_image(task)
            with timer.phase("data wait"):
                item = next(items)
            label = item["label"].to(self.device, non_blocking=True)
            with timer.phase("step other (engine, method)"):
                result = self.method.step(task, item)
            timer.note("windows", result.windows)
            windows += result.windows
            if self.method.adapts:
                self._count_nonfinite(result.skipped)
            with timer.phase("scoring and metric"):
                prediction = predict(result.logits, label.shape)
                metric.update(prediction, label)
                counts[step] = image_counts(prediction.to(label.device), label, len(self.class_names))
                names.append(item["name"])
                window_counts.append(result.windows)
                recalls.append(None if result.candidates is None else
                               candidate_recall(item["label"], result.candidates, len(self.class_names)))
            with timer.phase("pictures"):
                picture = self._picture(task, item, prediction, label, result.notes) \
                    if every and step % every == 0 else None
            with timer.phase("progress and logging"):
                progress.add(step, result.loss, picture, metric)
                if root and others:
                    self._collect(progress)
            timer.end_image()
        progress.close()
        self._done = progress.sweep_done
        self.method.end_task()
        result = metric.compute()
        result.update(images=len(dataset), seconds=time.perf_counter() - start, nonfinite_steps=self._nonfinite_task,
                      loss=progress.mean_loss,
                      image_rows=image_rows(task, names, progress.losses, counts.tolist(), window_counts, recalls))
        if task in self.sequence:
            result.update(self.sequence[task].record())
        self._timing_task_done(task, len(dataset), result["seconds"])
        if not root:  # rank 0 says it when the result reaches it
            return result
        if self._nonfinite_task:
            LOG.info(f"{task}: {self._nonfinite_task} steps had a NaN/inf loss; their updates were skipped")
        LOG.info(f"{task}: mIoU {result['mIoU']:.2f}  aAcc {result['aAcc']:.2f}  "
                 f"({result['images']} images, {result['seconds']:.1f} s)")
        if self.method.prediction:  # once, after the first task: the start-up prediction beside the measured rate
            LOG.info(prediction_line(self.method.prediction, len(dataset), result["seconds"], windows))
            self.method.prediction = None
        return result

    def _timing_task_done(self, task: str, images: int, seconds: float) -> None:
        """`--logging.timing`: the task's images into this process's timing file (rewritten after each task)."""
        timer = timing.RECORDER
        if timer.enabled:
            timer.end_task(task, images, seconds, self._reset_s)
            timer.write(self.cfg.output_dir, self.replicas.rank)

    def _picture(self, task: str, item: dict, prediction: torch.Tensor, label: torch.Tensor,
                 method_notes: list[str]) -> tuple[Image.Image, str]:
        """Input | prediction | ground truth, saved as PNG now and logged to W&B with the step."""
        notes = [f"{self.method.name}, {task}, {item['name']}", *method_notes]
        picture = make_picture(item["image"], prediction, label, self.class_names, notes)
        save_picture(picture, self.cfg.output_dir, task, item["name"])
        return picture, "\n".join(notes)
