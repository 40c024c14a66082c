"""What the benchmarks share: random checkpoints of the published architectures, the synthetic image, timing
spans per instruction, the stop of every stage when one runs out of memory, launching workers, the memory model."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.dusa.calibration import IMAGE_SIZE, smooth_random_image, sync  # noqa: F401 (the benchmarks' too)
from pipeline.run.log import LOG

ROOT = Path(__file__).resolve().parents[1]




# ----------------------------------------------------------------------------- shared pieces
def checkpoints(workdir: Path, tiny: bool, generator: str = "sd3-medium") -> dict[str, str]:
    """Random checkpoints of the published architectures (`generator`: SD3-medium or SD3.5-large), or tiny
    ones of the same kinds (--tiny: SD3.5-large's tiny stand-in has its RMS q/k norm)."""
    from data.classes import ADE20K_CLASSES
    if tiny:
        from models.tiny import ensure_demo_models, make_tiny_class_embeddings, make_tiny_sd3
        name = "sd3" if generator == "sd3-medium" else f"{generator}-tiny"
        paths = {"segmenter": str(workdir / "segformer"), "generator": str(workdir / name),
                 "class_embeddings": str(workdir / ("classes.safetensors" if name == "sd3" else f"{name}.safetensors"))}
        if generator != "sd3-medium" and not (workdir / name / "transformer" / "config.json").is_file():
            make_tiny_sd3(paths["generator"], num_layers=6, qk_norm="rms_norm")
            make_tiny_class_embeddings(paths["class_embeddings"], ADE20K_CLASSES, paths["generator"])
        ensure_demo_models(paths["segmenter"], paths["generator"], paths["class_embeddings"], ADE20K_CLASSES)
        return paths
    from models.architectures import make_random_checkpoints
    return make_random_checkpoints(workdir / "checkpoints", ADE20K_CLASSES,
                                   device="cuda" if torch.cuda.is_available() else "cpu", generator=generator)


def default_ds_config(tiny: bool) -> Path:
    return ROOT / "ds_configs" / ("ds_demo.json" if tiny else "ds_tta.json")


def window_size(tiny: bool) -> tuple[int, int]:
    return (128, 64) if tiny else (512, 256)


def synthetic_image(tiny: bool, size: tuple[int, int] | None = None, seed: int = 0) -> torch.Tensor:
    """A smooth random image [1, 3, H, W] in [0, 1] (fixed seed), already at the segmenter's size."""
    return smooth_random_image(*(size or ((128, 171) if tiny else IMAGE_SIZE)), seed=seed)


def say(message: str) -> None:
    """A progress line, timed, through the run's rank-0 logger."""
    LOG.info(f"[{time.strftime('%H:%M:%S')}] {message}")


def peak_memory_gib(device: int | None = None) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if torch.cuda.is_available() else None


def peak_reserved_gib(device: int | None = None) -> float | None:
    """What the caching allocator held at most: also the blocks of CUDA-graph pools that replays reuse."""
    return torch.cuda.max_memory_reserved(device) / 2**30 if torch.cuda.is_available() else None


class StageStop:
    """Ends every stage of a pipeline launch promptly when one runs out of memory. The other stages then wait
    inside the step (a receive or the optimizer's all-reduce) and would wait until the variant's timeout: the
    failing rank records its failure in its result file and writes a flag file; a thread of every other rank
    watches for it, records the class count it was at (peak memory so far) and ends its process; the failing
    rank ends with exit code 3 a few seconds later (and DeepSpeed's launcher ends whatever is left)."""

    def __init__(self, workdir: Path, name: str, rank: int, out: dict, path: Path, poll_s: float = 0.2):
        self.flag, self.rank, self.out, self.path = workdir / f"stop-{name}.json", rank, out, path
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None  # threads have their own
        self.current: int | None = None  # the class count being measured
        self.poll_s = poll_s
        import threading
        threading.Thread(target=self._watch, daemon=True).start()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.out, indent=2))
        os.replace(tmp, self.path)

    def _memory(self) -> dict:
        return {"peak_mem_gib": peak_memory_gib(self.device), "peak_reserved_gib": peak_reserved_gib(self.device)}

    def fail(self, classes: int | None, exc: BaseException, where: str) -> None:
        error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        info = {"rank": self.rank, "stage": self.out.get("stage"), "classes": classes, "where": where, "error": error}
        say(f"rank {self.rank}: out of memory at {where} ({classes} classes): {error}")
        self.out["stopped"] = info
        if classes is not None:
            self.out["results"][str(classes)] = {"oom": True, "s_per_image": None, "busy_s": None, "optimizer_s": None,
                                                 "loss": None, "error": error, **self._memory()}
        self.save()
        tmp = self.flag.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.flag)
        time.sleep(10 * self.poll_s + 2)  # the others record their part
        os._exit(3)

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                info = json.loads(self.flag.read_text())
            except (OSError, ValueError):
                continue
            if info.get("rank") == self.rank:
                continue
            self.out["stopped"] = info
            if self.current is not None and str(self.current) not in self.out["results"]:
                self.out["results"][str(self.current)] = {
                    "oom": False, "stopped_by_stage": info.get("stage"), "s_per_image": None, "busy_s": None,
                    "optimizer_s": None, "loss": None, **self._memory()}
            self.save()
            say(f"rank {self.rank}: stage {info.get('stage')} ran out of memory: this stage stops too")
            os._exit(0)


class Spans:
    """Device time inside wrapped calls, by name: CUDA events on a GPU, a host clock on a CPU.
    Ranges on the compute stream: a receive's range is mostly waiting for the other stage."""

    def __init__(self):
        self.spans: dict[str, list] = defaultdict(list)
        self.origin = None  # an event at the start of the step whose timeline is wanted

    def mark(self) -> None:
        if torch.cuda.is_available():
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()

    def timeline(self) -> list[tuple[str, float, float]]:
        """(name, start, end) in ms since `mark()`, of the instruction-level ranges (device clock)."""
        sync()
        if self.origin is None:
            return []
        rows = [(name, self.origin.elapsed_time(a), self.origin.elapsed_time(b)) for name, spans in self.spans.items()
                if not name.startswith("fwd: ") for a, b in spans if not isinstance(a, float)]
        return sorted(rows, key=lambda r: r[1])

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with torch.profiler.record_function(name):
                if torch.cuda.is_available():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = fn(*args, **kwargs)
                    end.record()
                    self.spans[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    out = fn(*args, **kwargs)
                    self.spans[name].append(time.perf_counter() - t0)
            return out
        return timed

    def hook(self, module, name: str) -> None:
        """Times a module's forward with a pre- and a post-forward hook."""
        pending = []

        def pre(*_):
            if torch.cuda.is_available():
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                pending.append(event)
            else:
                pending.append(time.perf_counter())

        def post(*_):
            start = pending.pop()
            if torch.cuda.is_available():
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.spans[name].append((start, end))
            else:
                self.spans[name].append(time.perf_counter() - start)
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def take(self) -> dict[str, float]:
        """Seconds per name since the last take."""
        sync()
        out = {name: sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1000 for s in spans)
               for name, spans in self.spans.items()}
        self.spans = defaultdict(list)
        return out


# What counts as the stage's own work (device busy); the rest of a step is p2p waiting and idle.
WORK = ("begin image (SegFormer fwd, candidates)", "ForwardPass", "BackwardPass", "segmenter backward",
        "ReduceTiedGrads", "ReduceGrads", "OptimizerStep")


P2P = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")


def instrument(engine, spans: Spans) -> None:
    """Times every instruction of the engine's own table (the wrappers TTAEngine installed included),
    the front's two per-image calls, and each layer's forward; names show in profiler traces too."""
    from pipeline.dusa.deepspeed_seam import INSTRUCTION_NAMES, wrap_instructions
    wrap_instructions(engine.engine, {name: functools.partial(spans.wrap, name) for name in INSTRUCTION_NAMES})
    front = engine.module.front
    if front is not None:
        front.begin_image = spans.wrap(WORK[0], front.begin_image)
        front.backward_segmenter = spans.wrap("segmenter backward", front.backward_segmenter)
    kinds = {"SegmenterFront": "fwd: front (window crop, VAE, noising)", "SD3Embed": "fwd: embed",
             "JointBlock": "fwd: joint blocks", "SD3Head": "fwd: head"}
    for layer in engine.module.forward_funcs:
        spans.hook(layer, kinds[type(layer).__name__])
    if engine.module.loss_fn is not None and engine.engine.is_last_stage():
        engine.module.loss_fn = spans.wrap("fwd: loss", engine.module.loss_fn)


def breakdown(spans: dict[str, float], wall: float, steps: int) -> dict[str, float]:
    """Seconds per step by category, from the spans of `steps` steps that took `wall` seconds."""
    per = {k: v / steps for k, v in spans.items()}
    out = {"step": wall / steps}
    for name in WORK + P2P + ("LoadMicroBatch",):
        out[name] = per.get(name, 0.0)
    out["ReduceTiedGrads"] -= out["segmenter backward"]  # nested: the segmenter's backward runs inside it
    out.update({k: v for k, v in per.items() if k.startswith("fwd: ")})
    out["fwd: other (engine)"] = out["ForwardPass"] - sum(v for k, v in per.items() if k.startswith("fwd: "))
    out["busy"] = sum(out[k] for k in WORK)
    out["p2p incl. waiting"] = sum(out[k] for k in P2P)
    out["idle (host, launches)"] = out["step"] - out["busy"] - out["p2p incl. waiting"] - out["LoadMicroBatch"]
    return out


def kernel_summary(prof, top_count: int = 25) -> dict:
    """GPU kernel time per category from a torch.profiler run, the busy union over all streams, and the
    `top_count` kernels with the most total time."""
    categories = (("nccl (p2p, all-reduce)", ("nccl",)), ("memcpy / memset", ("memcpy", "memset")),
                  ("optimizer", ("adam", "multi_tensor", "foreach")),
                  ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
                  ("matmul", ("gemm", "cutlass", "sm90", "nvjet", "cublas", "ampere", "xmma")),
                  ("norm", ("norm",)), ("conv", ("conv", "implicit")))
    totals: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for evt in prof.events():
        # (record_function's ranges show on the GPU's timeline too: annotations, not kernels)
        if evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        name = evt.name.lower()
        duration = (evt.time_range.end - evt.time_range.start) / 1e6
        intervals.append((evt.time_range.start, evt.time_range.end))
        by_name[evt.name[:100]][0] += duration
        by_name[evt.name[:100]][1] += 1
        totals[next((c for c, keys in categories if any(k in name for k in keys)), "other kernels")] += duration
    intervals.sort()
    busy: list[list[float]] = []  # the union of the kernels' intervals, in order
    for a, b in intervals:
        if busy and a <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], b)
        else:
            busy.append([a, b])
    union = sum(b - a for a, b in busy) / 1e6
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top_count]
    return {"kernel_s_by_category": dict(totals), "kernel_busy_union_s": union, "kernels": len(intervals),
            "top_kernels": [{"name": name, "s": s, "calls": n} for name, (s, n) in top],
            **idle_by_host_range(prof, busy, top_count)}


def idle_by_host_range(prof, busy: list[list[float]], top_count: int) -> dict:
    """Where the host was while the GPU had no kernel running: each gap between busy intervals is charged to the
    innermost range (record_function annotation) and to the innermost host operator that a host thread was in
    at the gap's middle (of the threads' innermost operators there, the shortest: the autograd engine's thread
    runs the backward while the main thread waits in it); seconds over the profiled steps, the largest
    `top_count` of each."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    if not events or len(busy) < 2:
        return {}
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    middles = sorted(((a + b) / 2, (b - a) / 1e6) for a, b in gaps)
    out: dict = {"idle_gaps": len(gaps), "idle_s": sum(b - a for a, b in gaps) / 1e6}
    annotation = [e for e in events if getattr(e, "is_user_annotation", False)]
    threads: dict = defaultdict(list)
    for e in events:
        if not getattr(e, "is_user_annotation", False):
            threads[e.thread].append(e)
    for kind, groups in (("annotation", [annotation]), ("operator", list(threads.values()))):
        innermost = [("(none)", float("inf"))] * len(middles)
        for group in groups:
            for k, found in enumerate(_innermost_at(group, [m for m, _ in middles])):
                if found is not None and found[1] < innermost[k][1]:
                    innermost[k] = found
        charged: dict[str, float] = defaultdict(float)
        for (name, _), (_, seconds) in zip(innermost, middles):
            charged[name[:100]] += seconds
        out[f"idle_s_by_host_{kind}"] = dict(sorted(charged.items(), key=lambda kv: -kv[1])[:top_count])
    return out


def _innermost_at(events: list, times: list[float]) -> list[tuple[str, float] | None]:
    """For each of the ascending `times`, (name, duration) of the innermost of `events` (ranges of one thread,
    which nest) that contains it, or None."""
    ranges = sorted(((e.time_range.start, e.time_range.end, e.name) for e in events), key=lambda r: (r[0], -r[1]))
    found: list[tuple[str, float] | None] = []
    open_: list[tuple] = []  # the ranges containing the current time, outermost first: one sweep in time order
    k = 0
    for start, end, name in [*ranges, (float("inf"), float("inf"), "")]:
        while k < len(times) and times[k] < start:
            while open_ and open_[-1][1] < times[k]:
                open_.pop()
            found.append((open_[-1][2], open_[-1][1] - open_[-1][0]) if open_ else None)
            k += 1
        while open_ and open_[-1][1] < start:
            open_.pop()
        open_.append((start, end, name))
    return found


def sample(tensor: torch.Tensor, n: int = 4096) -> torch.Tensor:
    """A fixed strided sample of a tensor's elements, float32 on the host (for cross-run comparisons)."""
    flat = tensor.detach().flatten()
    index = torch.linspace(0, flat.numel() - 1, min(n, flat.numel()), device=flat.device).long()
    return flat[index].float().cpu()


# ----------------------------------------------------------------------------- orchestration
def matmul_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    sync()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def run(cmd: list[str], log: Path, timeout: float, timing: dict | None = None) -> str | None:
    """Runs one variant in its own process group; whatever it leaves running (ranks of a failed launch)
    is killed before the next variant starts, so no variant shares the GPUs with another's leftovers."""
    say("$ " + " ".join(cmd))
    with open(log, "a") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            failed = code != 0 and f"exit {code}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:.0f} s"
        if timing is not None:
            timing["wall_s"] = time.perf_counter() - start
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    time.sleep(2)  # the driver releases the killed processes' GPU memory
    say(f"failed ({failed}); see {log}" if failed else "done")
    return failed or None


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def memory_model(paths: dict, args, card: str, graph_shapes: int = 1):
    """pipeline/dusa/memory.py's model of the benchmark's runs (its activations from the measured cost table of
    these models where there is one), and that table (path, table) or None. `graph_shapes`: image shapes
    whose SegFormer CUDA graphs stay captured (one here; up to pipeline.segmenter_graphs in the launcher)."""
    from pipeline.methods.dusa import DusaOptions
    from pipeline.run.config import ModelConfig
    from pipeline.dusa.engine import load_ds_config, precision_of
    from pipeline.dusa.memory import build_memory_model, read_configs
    from pipeline.dusa.partition import find_cost_table, model_signature
    ds = load_ds_config(args.ds_config or default_ds_config(args.tiny), lr=1e-5)
    generator, vae, segmenter, shape, dtype = read_configs(ModelConfig(**paths))
    size = window_size(args.tiny)[0]
    found = find_cost_table(card, model_signature(generator, segmenter, size, precision_of(ds)))
    if args.cost_table:
        found = Path(args.cost_table), json.loads(Path(args.cost_table).read_text())
    model = build_memory_model(generator, vae, segmenter, DusaOptions(), ds, size, shape, None, dtype,
                               found[1] if found else None,
                               graph_shapes=graph_shapes if torch.cuda.is_available() else 0,  # graphs: GPU only
                               image=tuple(synthetic_image(args.tiny).shape[-2:]))
    return model, found


WORKDIR_MARKER = ".dusa-bench"  # a workdir this tool made: the only kind whose old JSON files it removes


VARIANTS = ("single", "pipeline", "naive")


def argument_error(args) -> str | None:
    """The first argument the benchmark cannot run with, checked before anything is built (None: all fine)."""
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        return f"--variants {unknown[0]!r} is not one of {', '.join(VARIANTS)}"
    for name, low in (("classes", 1), ("steps", 1), ("warmup", 0), ("stages", 1), ("sweep_images", 1)):
        values = getattr(args, name)
        if any(v < low for v in (values if isinstance(values, list) else [values])):
            return f"--{name} {values} must be >= {low}"
    if not (args.timeout > 0):
        return f"--timeout {args.timeout} must be > 0"
    from data.classes import safe_name
    if args.tag is not None and not safe_name(args.tag):  # it becomes part of the results file's name
        return f"--tag {args.tag!r} must be letters, digits and _ - . + (it names the results file)"
    try:
        partition = json.loads(args.partition) if args.partition else None
        variants = json.loads(args.pipeline_variants)
    except json.JSONDecodeError as exc:
        return f"--partition / --pipeline_variants is not JSON ({exc.msg})"
    if partition is not None and not (isinstance(partition, list) and len(partition) == args.stages + 1
                                      and all(isinstance(b, int) and not isinstance(b, bool) for b in partition)
                                      and partition[0] == 0 and all(a < b for a, b in zip(partition, partition[1:]))):
        return (f"--partition {args.partition} must be {args.stages + 1} increasing layer indices from 0 "
                f"(one range per stage of --stages {args.stages})")
    if not (isinstance(variants, dict) and all(isinstance(v, dict) for v in variants.values())):
        return "--pipeline_variants must be a JSON object {name: DeepSpeed JSON override}"
    for option in ("cost_table", "ds_config", "sweep_data"):
        value = getattr(args, option)
        if value and not Path(value).exists():
            return f"--{option} {value} does not exist"
    workdir = Path(args.workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())
                             and not (workdir / WORKDIR_MARKER).is_file()):
        return (f"--workdir {workdir} is not a folder this tool made (its JSON files would be removed): "
                f"name a new or empty folder")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file, not a folder"
    return None


def _flag(v) -> str:
    return str(int(v if isinstance(v, bool) else str(v).lower() in ("1", "true")))


# The pipeline settings bench.py's workers take as options (record.py's --set): name -> how the value is written.
PIPELINE_SWITCHES = {"segmenter_graphs": str, "transformer_graphs": str, "attention_backend": str,
                     "compile_blocks": _flag, "compile_vae": _flag}


def pipeline_switches(**values) -> list[str]:
    """bench.py's worker options for pipeline settings (None: the project's default)."""
    unknown = set(values) - set(PIPELINE_SWITCHES)
    if unknown:
        raise ValueError(f"not a pipeline switch of bench.py: {', '.join(sorted(unknown))}")
    return [a for key, v in values.items() if v is not None for a in (f"--{key}", PIPELINE_SWITCHES[key](v))]
