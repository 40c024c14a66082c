#!/usr/bin/env python
"""Peak host memory of one pipeline rank loading its stage of a full-size SD3-medium transformer.

    python bench/bench_loading.py --workdir /tmp/loading [--stages 1 2 4] [--dtype bf16]

1. Makes (once) <workdir>/sd3-medium/transformer: the SD3-medium transformer (2.03 B parameters,
   models.architectures.SD3_MEDIUM_TRANSFORMER) with diffusers' default random init, saved in bf16
   as diffusers does with max_shard_size="2GB" (3 shards + diffusion_pytorch_model.safetensors.index.json
   + config.json). It is built one top-level module at a time (meta-device skeleton, each piece
   materialised and initialised on its own, shards written as they fill), so the peak stays near
   one shard (2 GB) instead of the whole model in fp32.
2. For each stage of the balanced partition (pipeline.dusa.module.balanced_partition with the default
   costs over the 27 layers [SegmenterFront, SD3Embed, JointBlock x 24, SD3Head]), a fresh process
   loads exactly that stage's transformer pieces with models.sd3.TransformerParts(...).load(...).
   The SegFormer + VAE of stage 0's SegmenterFront and the class-embedding cache of SD3Embed are
   NOT loaded: this measures the transformer checkpoint only.
3. For comparison, fresh processes load the whole transformer with
   SD3Transformer2DModel.from_pretrained(..., torch_dtype=torch.bfloat16) and with the default fp32
   (skipped, with a note, when the machine has not enough free memory).

Each process reports the peak RSS while loading (ru_maxrss), the RSS after its imports (baseline),
the loaded parameter count and the load time; it samples /proc/self/status while loading to split
the RSS into anonymous memory and file-backed pages, and reports which share of the weight bytes
are views of a safetensors mmap. safetensors (0.8 here) returns zero-copy views of its mmap: the
pages of a view count in RSS (as file-backed, shared, reclaimable page cache) only once read. So
after loading, each process reads every weight page once ("after touch"), as a rank does when it
copies the weights to its GPU: a load that keeps mmap views (from_pretrained when the checkpoint
already has the requested dtype) has a low loading peak but its RSS grows to the model's size then.

Note: a child started by subprocess (vfork + exec) inherits the parent's peak RSS as its own
ru_maxrss, so this parent never imports torch and stays at a few tens of MB; every child also
reports VmHWM (the peak of its own address space), which has no such inheritance.

Writes <out>/<date>-loading-cpu.json (default <workdir>/results; `--out bench/results` publishes) and prints a
table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from pipeline.run.log import LOG

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
INDEX = "diffusion_pytorch_model.safetensors.index.json"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def say(message: str) -> None:
    LOG.info(f"[{time.strftime('%H:%M:%S')}] {message}")


# ----------------------------------------------------------------------------- memory probes (no torch)
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5), so it is the peak of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples /proc/self/status every few ms in a thread: the largest VmRSS seen and its anon/file split."""

    def __init__(self, period_s: float = 0.002):
        import threading
        self.period_s = period_s
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.max_anon = self.max_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = proc_status()
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = {k: s[k] for k in self.peak}
            self.max_anon = max(self.max_anon, s["RssAnon"])
            self.max_file = max(self.max_file, s["RssFile"])
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {"sampled_peak_rss_gib": self.peak["VmRSS"] / GIB,
                "sampled_peak_anon_gib": self.peak["RssAnon"] / GIB,
                "sampled_peak_file_gib": self.peak["RssFile"] / GIB,
                "sampled_max_anon_gib": self.max_anon / GIB,
                "sampled_max_file_gib": self.max_file / GIB}


# ----------------------------------------------------------------------------- workers (fresh processes)
def worker_make(args) -> dict:
    """Random SD3-medium transformer in bf16, written shard by shard like save_pretrained(max_shard_size="2GB")."""
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from models.architectures import SD3_MEDIUM_TRANSFORMER
    from models.checkpoints import readable_weights

    folder = Path(args.folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, DTYPES[args.load_dtype])
    max_shard = int(args.max_shard_gb * 10 ** 9)  # "2GB" in huggingface_hub is 2 * 10^9 bytes
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    with torch.device("meta"):  # shapes only: the full model's key list and the config
        skeleton = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
    all_keys = list(skeleton.state_dict().keys())
    # The non-block modules (and PatchEmbed's sin-cos pos_embed buffer, which is persistent for SD3) are
    # taken from a real, fully initialised model of the same config with a single block: they do not
    # depend on num_layers, so they are exactly what SD3Transformer2DModel(**config) makes.
    small = SD3Transformer2DModel(**{**SD3_MEDIUM_TRANSFORMER, "num_layers": 1})
    names = [n for n, _ in skeleton.named_children() if n != "transformer_blocks"]
    pieces = [n for n in names if n in ("pos_embed", "time_text_embed", "context_embedder")]
    pieces += [f"transformer_blocks.{i}" for i in range(len(skeleton.transformer_blocks))]
    pieces += [n for n in names if n not in pieces]

    def materialise(name: str) -> dict[str, torch.Tensor]:
        if not name.startswith("transformer_blocks."):
            module = small.get_submodule(name)
        else:  # a block: the skeleton's, on the CPU, with nn's default init (what the constructor runs)
            module = skeleton.get_submodule(name).to_empty(device="cpu")
            if any(True for _ in module.buffers()):
                raise NotImplementedError(f"{name} has buffers; no init for them here")
            done = set()
            for sub in module.modules():
                if hasattr(sub, "reset_parameters") and sub is not module:
                    sub.reset_parameters()
                    done |= {id(p) for p in sub.parameters(recurse=False)}
            missed = [n for n, p in module.named_parameters() if id(p) not in done]
            if missed:
                raise NotImplementedError(f"{name}: no default init for {missed[:5]}")
        return {f"{name}.{k}": v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}

    weight_map: dict[str, int] = {}
    shards: list[list[str]] = [[]]
    pending: dict[str, torch.Tensor] = {}
    sizes: list[int] = [0]
    total = 0

    def flush():
        save_file(pending, str(tmp / f"shard-{len(shards) - 1}.safetensors"), metadata={"format": "pt"})
        pending.clear()

    for name in pieces:
        for key, tensor in materialise(name).items():
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > max_shard:  # same greedy rule as huggingface_hub
                flush()
                shards.append([])
                sizes.append(0)
            shards[-1].append(key)
            sizes[-1] += nbytes
            pending[key] = tensor
            weight_map[key] = len(shards) - 1
            total += nbytes
        if name.startswith("transformer_blocks."):
            skeleton.get_submodule(name).to("meta")  # drop the block's CPU storage
    flush()
    if sorted(weight_map) != sorted(all_keys):
        raise RuntimeError("the pieces do not cover the model's state dict")

    n = len(shards)
    files = {i: f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)}
    for i in range(n):
        (tmp / f"shard-{i}.safetensors").rename(tmp / files[i])
    index = {"metadata": {"total_size": total},
             "weight_map": {k: files[weight_map[k]] for k in all_keys}}
    (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    skeleton.save_config(tmp)  # config.json, as save_pretrained writes it
    readable_weights(tmp)
    if folder.exists():
        raise FileExistsError(f"{folder} appeared while writing")
    tmp.rename(folder)
    return {"seconds": time.perf_counter() - t0, "shards": n, "total_bytes": total,
            "shard_bytes": sizes, "ru_maxrss_gib": ru_maxrss() / GIB, "vm_hwm_gib": proc_status()["VmHWM"] / GIB}


def worker_plan(args) -> dict:
    """The stage boundaries that build_pipeline would use, for each requested number of stages."""
    from pipeline.dusa.partition import default_costs, plan_partition

    num_blocks = json.loads((Path(args.folder) / "config.json").read_text())["num_layers"]
    step_costs = default_costs(num_blocks)
    costs = [f + b for f, b in zip(step_costs.forward, step_costs.backward)]
    names = ["SegmenterFront", "SD3Embed"] + [f"JointBlock{i}" for i in range(num_blocks)] + ["SD3Head"]
    # The transformer pieces each layer loads (as in build_pipeline's layer builders).
    pieces = [[], ["pos_embed", "time_text_embed", "context_embedder"]]
    pieces += [[f"transformer_blocks.{i}"] for i in range(num_blocks)] + [["norm_out", "proj_out"]]
    plans = {}
    for stages in args.plan_stages:
        bounds = plan_partition([step_costs], stages)[0]
        plans[str(stages)] = [
            {"stage": s, "layers": [bounds[s], bounds[s + 1] - 1],
             "first": names[bounds[s]], "last": names[bounds[s + 1] - 1],
             "cost": sum(costs[bounds[s]:bounds[s + 1]]),
             "has_front": bounds[s] == 0,
             "pieces": [p for layer in range(bounds[s], bounds[s + 1]) for p in pieces[layer]]}
            for s in range(stages)]
    return {"layer_costs": costs, "num_layers": len(costs), "plans": plans}


def worker_load(args) -> dict:
    """Load stage pieces (TransformerParts) or the whole model (from_pretrained); measure."""
    import gc

    import torch
    from diffusers import SD3Transformer2DModel

    from models.sd3 import TransformerParts

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    gc.collect()
    before = proc_status()
    baseline_peak = ru_maxrss()
    hwm_reset = reset_hwm()
    t0 = time.perf_counter()
    info = {}
    with Sampler() as sampler:
        if args.mode == "stage":
            parts = TransformerParts(args.generator, dtype)
            modules = [parts.load(name) for name in args.pieces]
            tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
            info["keys_loaded"] = len(parts.loaded_keys)
            info["first_key"] = parts.loaded_keys[0] if parts.loaded_keys else None
        else:
            kwargs = {"torch_dtype": dtype} if dtype is not None else {}
            model, loading = SD3Transformer2DModel.from_pretrained(
                args.generator, subfolder="transformer", output_loading_info=True, **kwargs)
            modules = [model]
            tensors = list(model.parameters()) + list(model.buffers())
            info["missing_keys"] = list(loading.get("missing_keys", []))
            info["unexpected_keys"] = list(loading.get("unexpected_keys", []))
            info["mismatched_keys"] = [list(map(str, m)) for m in loading.get("mismatched_keys", [])]
            info["param_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
            from diffusers.models import modeling_utils
            info["accelerate_low_cpu_mem_usage"] = bool(modeling_utils.is_accelerate_available())
    seconds = time.perf_counter() - t0
    after = proc_status()
    load_peak = ru_maxrss()
    # Read every weight once (one element per page), as a rank does when it copies them to its GPU or runs
    # them: tensors that are views of a safetensors mmap only now become resident (as file-backed pages).
    t1 = time.perf_counter()
    with torch.no_grad():
        for t in tensors:
            if t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
    touch_seconds = time.perf_counter() - t1
    touched = proc_status()
    params = sum(p.numel() for m in modules for p in m.parameters())
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return {
        **info,
        "pieces": args.pieces if args.mode == "stage" else ["<whole model>"],
        "dtype": args.dtype or "fp32 (default)",
        "seconds": seconds,
        "params": params,
        "tensor_gib": tensor_bytes / GIB,
        "baseline_rss_gib": before["VmRSS"] / GIB,
        "baseline_ru_maxrss_gib": baseline_peak / GIB,
        "peak_rss_gib": load_peak / GIB,
        "delta_gib": (load_peak - before["VmRSS"]) / GIB,
        "vm_hwm_gib": after["VmHWM"] / GIB,
        "vm_hwm_since": "after imports" if hwm_reset else "process start",
        "loaded_rss_gib": after["VmRSS"] / GIB,
        "loaded_anon_gib": after["RssAnon"] / GIB,
        "loaded_file_gib": after["RssFile"] / GIB,
        **sampler.report(),
        "touched_rss_gib": touched["VmRSS"] / GIB,
        "touched_anon_gib": touched["RssAnon"] / GIB,
        "touched_file_gib": touched["RssFile"] / GIB,
        "touched_peak_rss_gib": ru_maxrss() / GIB,
        "touch_seconds": touch_seconds,
        "weights_mmap_backed": mmap_backed(tensors),
    }


def mmap_backed(tensors) -> float:
    """Fraction of the weight bytes whose storage lies in a file mapping (a safetensors mmap)."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                a, b = (int(x, 16) for x in fields[0].split("-"))
                maps.append((a, b))
    total = mapped = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if any(a <= t.data_ptr() < b for a, b in maps):
            mapped += nbytes
    return mapped / total if total else 0.0


# ----------------------------------------------------------------------------- parent (no torch here)
def run_worker(argv: list[str], timeout: float) -> dict:
    """This script in a fresh Python; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        killed = proc.returncode in (-9, 137)
        raise RuntimeError(f"worker {argv[:2]} failed (rc {proc.returncode}{', killed: out of memory?' if killed else ''}):\n{tail}")
    return json.loads(lines[-1])


def warm_page_cache(folder: Path) -> float:
    """Read every shard once so that all loads find the files in the page cache (same footing for all)."""
    t0 = time.perf_counter()
    buf = bytearray(8 * 2 ** 20)
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def mem_info() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the random checkpoint is made (once) and reused")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4],
                        help="pipeline sizes to measure (1: the whole transformer through TransformerParts)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the staged loads")
    parser.add_argument("--out", help="where the results JSON goes (default: <workdir>/results)")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 from_pretrained comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    # worker side (internal)
    parser.add_argument("--worker", choices=["make", "plan", "stage", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--generator", help=argparse.SUPPRESS)
    parser.add_argument("--pieces", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--plan-stages", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--load-dtype", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "make":
            result = worker_make(args)
        elif args.worker == "plan":
            result = worker_plan(args)
        else:
            args.mode = args.worker
            args.dtype = args.load_dtype
            result = worker_load(args)
        print(json.dumps(result), flush=True)  # the worker's answer to its parent, which reads its stdout
        return
    problem = ("--workdir is required" if not args.workdir else
               f"--workdir {args.workdir} is a file, not a folder" if Path(args.workdir).is_file() else
               f"--stages {args.stages} must be >= 1" if min(args.stages) < 1 else
               f"--timeout {args.timeout} must be > 0" if not args.timeout > 0 else None)
    if problem:
        LOG.error(f"error: {problem}")
        sys.exit(2)

    workdir = Path(args.workdir).resolve()
    generator = workdir / "sd3-medium"
    folder = generator / "transformer"
    report = {"date": datetime.date.today().isoformat(), "device": "cpu",
              "machine": {"cpu_count": os.cpu_count(), "ram_gib": mem_info()["MemTotal"] / GIB,
                          "available_gib_at_start": mem_info()["MemAvailable"] / GIB,
                          "platform": platform.platform(), "python": platform.python_version()},
              "staged_dtype": args.dtype}
    try:
        from importlib.metadata import version
        report["machine"]["versions"] = {p: version(p) for p in ("torch", "diffusers", "safetensors", "accelerate")}
    except Exception:  # noqa: BLE001 (informative only)
        pass

    if not ((folder / "config.json").is_file() and (folder / INDEX).is_file()):
        say(f"making the random SD3-medium transformer (bf16, 2 GB shards) in {folder}")
        made = run_worker(["--worker", "make", "--folder", str(folder), "--load-dtype", "bf16",
                           "--seed", str(args.seed)], args.timeout)
        say(f"  {made['shards']} shards, {made['total_bytes'] / GIB:.2f} GiB in {made['seconds']:.0f} s, "
            f"peak RSS {made['ru_maxrss_gib']:.2f} GiB")
        report["checkpoint_made"] = made
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    report["checkpoint"] = {"folder": str(folder), "files": files,
                            "gib": sum((folder / f).stat().st_size for f in files) / GIB,
                            "index": INDEX, "config": json.loads((folder / "config.json").read_text())}
    say(f"checkpoint: {len(files)} shards, {report['checkpoint']['gib']:.2f} GiB")
    say(f"page cache warmed in {warm_page_cache(folder):.1f} s")

    plan = run_worker(["--worker", "plan", "--folder", str(folder), "--plan-stages", *map(str, args.stages)],
                      args.timeout)
    report["partition"] = {k: plan[k] for k in ("layer_costs", "num_layers")}
    report["parent_ru_maxrss_gib"] = ru_maxrss() / GIB
    report["note"] = ("Stage figures are the SD3 transformer pieces only: stage 0's SegmenterFront "
                      "(SegFormer-B5 + SD3 VAE encoder) and SD3Embed's class-embedding cache are not loaded. "
                      "Each figure is a fresh process; the page cache holds the shards (warm reads). "
                      "peak_rss = ru_maxrss while loading (includes imports), baseline = RSS after imports, delta = peak - "
                      "baseline. safetensors returns zero-copy views of its mmap (weights_mmap_backed): such weights "
                      "are not in RSS until read, so every process then reads each weight page once (touched_*: "
                      "anon = private memory, file = page-cache pages of the shards, shared and reclaimable). "
                      "A child of subprocess (vfork) inherits its parent's peak RSS as ru_maxrss: this parent stays "
                      "small (parent_ru_maxrss_gib) and vm_hwm_gib (own address space only) agrees.")

    stage_results = {}
    for stages in args.stages:
        rows = []
        for st in plan["plans"][str(stages)]:
            say(f"{stages} stages, stage {st['stage']}: layers {st['layers'][0]}-{st['layers'][1]} "
                f"({st['first']} .. {st['last']}), {len(st['pieces'])} transformer pieces")
            r = run_worker(["--worker", "stage", "--generator", str(generator), "--load-dtype", args.dtype,
                            "--pieces", *st["pieces"]], args.timeout)
            rows.append({**{k: v for k, v in st.items() if k != "pieces"}, **r})
            say(f"  peak {r['peak_rss_gib']:.2f} GiB (baseline {r['baseline_rss_gib']:.2f}, "
                f"delta {r['delta_gib']:.2f}), {r['params'] / 1e9:.3f} B params, {r['seconds']:.1f} s")
        stage_results[str(stages)] = rows
    report["stages"] = stage_results

    total_params = None
    full = {}
    for label, dtype in (("bf16", "bf16"), ("fp32", None)):
        need = 2.03e9 * (2 if dtype else 4) + 2.5 * GIB  # the model + a shard + imports, roughly
        avail = mem_info()["MemAvailable"]
        if label == "fp32" and (args.no_fp32 or avail < 1.3 * need):
            full[label] = {"skipped": "--no-fp32" if args.no_fp32 else
                           f"needs ~{need / GIB:.1f} GiB, {avail / GIB:.1f} GiB available"}
            say(f"from_pretrained {label}: skipped ({full[label]['skipped']})")
            continue
        say(f"from_pretrained, whole transformer, {label}")
        argv = ["--worker", "full", "--generator", str(generator)] + (["--load-dtype", dtype] if dtype else [])
        r = run_worker(argv, args.timeout)
        if r["missing_keys"] or r["unexpected_keys"] or r["mismatched_keys"]:
            raise RuntimeError(f"from_pretrained did not load the checkpoint cleanly: {r}")
        full[label] = r
        total_params = r["params"]
        say(f"  peak {r['peak_rss_gib']:.2f} GiB (baseline {r['baseline_rss_gib']:.2f}, "
            f"delta {r['delta_gib']:.2f}), {r['params'] / 1e9:.3f} B params, {r['seconds']:.1f} s")
    report["from_pretrained"] = full
    if total_params is not None:
        for stages, rows in stage_results.items():
            covered = sum(r["params"] for r in rows)
            if covered != total_params:
                raise RuntimeError(f"{stages} stages load {covered} params, the model has {total_params}")
        report["check"] = (f"the stages of each partition load {total_params} parameters in all, "
                           f"as from_pretrained does (no missing/unexpected keys)")

    out = Path(args.out) if args.out else workdir / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['date']}-loading-cpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(table(stage_results, full))
    print(f"staged loads ({args.dtype}) are the transformer only (no SegFormer/VAE/class embeddings); "
          f"{os.cpu_count()} CPUs, {report['machine']['ram_gib']:.1f} GiB RAM\nwrote {path}")


def table(stage_results: dict, full: dict) -> str:
    header = (f"{'load':<30} {'params':>7} {'weights':>7} {'base':>5} {'peak':>6} {'delta':>6} "
              f"{'mmap':>5} {'after touch: anon + file':>25} {'s':>5}")
    lines = [header, f"{'':<30} {'(B)':>7} {'GiB':>7} {'GiB':>5} {'GiB':>6} {'GiB':>6} {'':>5} {'GiB':>25}",
             "-" * len(header)]

    def row(name, r):
        touch = f"{r['touched_rss_gib']:.2f} = {r['touched_anon_gib']:.2f} + {r['touched_file_gib']:.2f}"
        return (f"{name:<30} {r['params'] / 1e9:>7.3f} {r['tensor_gib']:>7.2f} {r['baseline_rss_gib']:>5.2f} "
                f"{r['peak_rss_gib']:>6.2f} {r['delta_gib']:>6.2f} {r['weights_mmap_backed']:>5.0%} "
                f"{touch:>25} {r['seconds']:>5.1f}")

    for stages, rows in stage_results.items():
        for r in rows:
            name = (f"{stages} st., stage {r['stage']} ({r['first']}-{r['last']})"
                    .replace("JointBlock", "B").replace("SegmenterFront", "Front"))
            lines.append(row(name, r))
    for label, r in full.items():
        name = f"from_pretrained {label}, whole"
        lines.append(f"{name:<30} skipped: {r['skipped']}" if "skipped" in r else row(name, r))
    lines.append("peak = ru_maxrss while loading (imports included), base = RSS after imports, delta = peak - base; "
                 "mmap = share of the weight bytes that are views of the safetensors mmap; after touch = RSS once "
                 "every weight page has been read (file = page-cache pages, shared and reclaimable)")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
