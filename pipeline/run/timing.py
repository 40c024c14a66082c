"""Where a run's time goes (`--logging.timing`): start-up, then every image, on every process.

Each process writes `<output_dir>/timing-rank<r>.json`: the start-up marks (seconds since the process began:
imports, checks, loading, engine, the first image), and per image the host seconds of each phase (the host's
wall clock from entering to leaving it: a wait for the device inside a phase counts there, so the phases named
`wait: ...` are the host's waits) and, on a GPU, the device seconds between the phase's start and end (CUDA
events on the compute stream, read at the end of each task). `bench/record.py` reads these files.

Off (the default) every call here is a no-op.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

PROCESS_START = time.time()  # launch/tta.py imports this module first thing: close to the process's start

# The engine's instructions and the front's calls, as phases of the per-image breakdown.
INSTRUCTIONS = {"ForwardPass": "window forwards", "BackwardPass": "window backwards",
                "ReduceTiedGrads": "segmenter backward", "ReduceGrads": "gradient reduction",
                "OptimizerStep": "optimizer", "SendActivation": "p2p", "RecvActivation": "p2p",
                "SendGrad": "p2p", "RecvGrad": "p2p", "LoadMicroBatch": "engine other"}


class Timing:
    """Phases per image, start-up marks, and what the CUDA-graph caches did."""

    def __init__(self, enabled: bool = False, device: "torch.device | None" = None):
        self.enabled = enabled
        self.cuda = enabled and device is not None and device.type == "cuda"
        self.marks: dict[str, float] = {}
        self.images: list[dict[str, Any]] = []  # finished images: task, wall, host and device seconds per phase
        self.tasks: list[dict[str, Any]] = []  # per task: reset seconds, images, seconds
        self._image: dict[str, Any] | None = None
        self._open: list[dict[str, Any]] = []  # images whose device events are not read yet
        self.graphs: dict[str, Callable[[], dict]] = {}  # name -> current statistics of a graph cache

    def mark(self, name: str) -> None:
        """A start-up milestone, in seconds since the process began (the first mark of a name is kept; kept
        even while off, so that the marks before the recorder is configured count)."""
        self.marks.setdefault(name, time.time() - PROCESS_START)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Host (and device) time of the enclosed work, added to the current image's phase `name`. Nested
        phases count in their own name only: the enclosing one is charged its time minus theirs."""
        if not self.enabled or self._image is None:
            yield
            return
        image = self._image
        start = time.perf_counter()
        events = None
        if self.cuda:
            import torch
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        inner_before = image["_inner"]
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            inner = image["_inner"] - inner_before  # what nested phases took inside this one
            image["host"][name] = image["host"].get(name, 0.0) + spent - inner
            image["_inner"] = inner_before + spent
            if events is not None:
                events[1].record()
                image["_events"].append((name, *events))

    def begin_image(self, task: str) -> None:
        if not self.enabled:
            return
        self._image = {"task": task, "host": {}, "_inner": 0.0, "_events": [], "_start": time.perf_counter(),
                       "captures": self._captures()}

    def note(self, key: str, value: Any) -> None:
        """A fact about the current image (e.g. its number of windows), kept in its record."""
        if self._image is not None:
            self._image[key] = value

    def end_image(self) -> None:
        image, self._image = self._image, None
        if image is None:
            return
        image["wall_s"] = time.perf_counter() - image.pop("_start")
        image["host"]["other"] = max(image["wall_s"] - image.pop("_inner"), 0.0)
        captures = self._captures()
        image["captures"] = {k: [captures[k][0] - v[0], captures[k][1] - v[1]] for k, v in image["captures"].items()}
        self.images.append(image)
        self._open.append(image)
        if len(self.images) == 1:
            self.mark("first image done")

    def end_task(self, task: str, images: int, seconds: float, reset_s: float) -> None:
        """Reads the device events of the task's images (one wait for the device) and notes the task."""
        if not self.enabled:
            return
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        for image in self._open:
            device: dict[str, float] = {}
            for name, start, end in image.pop("_events"):
                device[name] = device.get(name, 0.0) + start.elapsed_time(end) / 1000
            image["device"] = device
        self._open.clear()
        self.tasks.append({"task": task, "images": images, "seconds": seconds, "reset_s": reset_s})

    def _captures(self) -> dict[str, tuple[int, float]]:
        out = {}
        for name, stats in self.graphs.items():
            s = stats()
            out[name] = (s["captures"], s["capture_s"])
        return out

    def summary(self) -> dict[str, Any]:
        """The file's content: marks, tasks, the per-image records, and per-phase means over the steady images
        (every image but each task's first)."""
        images = [{k: v for k, v in image.items() if not k.startswith("_")} for image in self.images]
        steady = [im for i, im in enumerate(images) if i and images[i - 1]["task"] == im["task"]] or images
        return {"process_start": PROCESS_START, "marks": self.marks, "tasks": self.tasks, "graphs": {k: v() for k, v in self.graphs.items()},
                "steady_images": len(steady),
                "steady_wall_s": statistics.mean(im["wall_s"] for im in steady) if steady else None,
                "steady_host_s": phase_means(steady, "host"), "steady_device_s": phase_means(steady, "device"),
                "images": images}

    def write(self, folder: str | Path, rank: int) -> None:
        if not self.enabled:
            return
        from pipeline.run.folder import write_text_atomic
        folder = Path(folder)
        write_text_atomic(folder / f"timing-rank{rank}.json", json.dumps(self.summary()), folder)


def phase_means(images: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Seconds per image of each phase over `images` (`key`: "host" or "device"; a phase an image lacks counts 0)."""
    names = sorted({n for im in images for n in im.get(key, {})})
    return {n: sum(im.get(key, {}).get(n, 0.0) for im in images) / len(images) for n in names}


RECORDER = Timing()


def configure(enabled: bool, device: "torch.device | None") -> Timing:
    """The process's recorder (the start-up marks made so far are kept)."""
    global RECORDER
    marks = RECORDER.marks
    RECORDER = Timing(enabled, device)
    RECORDER.marks.update(marks)
    return RECORDER


def phase(name: str):
    return RECORDER.phase(name)


def mark(name: str) -> None:
    RECORDER.mark(name)


def instrument(engine, recorder: Timing | None = None) -> None:
    """Times the engine's instructions (its own table, the TTAEngine's wrappers included) and the front's
    per-image calls as phases of the recorder (default: the process's)."""
    recorder = recorder or RECORDER
    if not recorder.enabled:
        return
    from pipeline.dusa.deepspeed_seam import wrap_instructions

    def timed(name: str):
        def wrap(fn):
            def instruction(*args, **kwargs):
                with recorder.phase(name):
                    return fn(*args, **kwargs)
            return instruction
        return wrap
    wrap_instructions(engine.engine, {kind: timed(name) for kind, name in INSTRUCTIONS.items()})
    front = engine.module.front
    if front is not None:
        begin, backward = front.begin_image, front.backward_segmenter

        def begin_image(*args, **kwargs):
            with recorder.phase("segmenter forward and candidates"):
                return begin(*args, **kwargs)

        def backward_segmenter(*args, **kwargs):
            with recorder.phase("segmenter backward"):
                return backward(*args, **kwargs)
        front.begin_image, front.backward_segmenter = begin_image, backward_segmenter
        recorder.graphs["segmenter"] = lambda: _graph_stats(front.graphed)


def _graph_stats(graphed) -> dict:
    if graphed is None:
        return {"captures": 0, "capture_s": 0.0, "hits": 0, "calls": 0}
    s = graphed.stats
    return {"captures": s.captures, "capture_s": sum(s.capture_seconds), "hits": s.hits, "calls": s.calls,
            "eager": s.eager, "evictions": s.evictions}
