#!/usr/bin/env python
"""Test-time adaptation of SegFormer on ADE20K-C, Cityscapes-C and ACDC: DUSA (SD3 feedback through a DeepSpeed
pipeline), or a baseline of the method registry (source, tent, bn_adapt, cotta, sar).

    deepspeed --num_gpus 2 launch/tta.py --config ds_configs/tta.json
    deepspeed --num_gpus 2 launch/tta.py --config ds_configs/demo.json --tta.lr 5e-6
    deepspeed --num_gpus 1 launch/tta.py --config ds_configs/tta.json --tta.method tent
    python launch/tta.py --print_config
"""
from __future__ import annotations

import difflib
import json
import os
import signal
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Union

from pipeline.run import timing  # noqa: E402,F401  (first: its clock starts with the process)
from pipeline.run.log import LOG  # noqa: E402

# DeepSpeed builds its CPU communication extension into ~/.cache/torch_extensions, shared by every environment
# of this Python, which then rebuild it in turns (25-40 s each): one build folder per environment instead.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
from argparse import ArgumentError  # noqa: E402

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings  # noqa: E402

from pipeline.run.config import (MOVED_OPTIONS, DataConfig, LoggingConfig, ModelConfig,  # noqa: E402
                                 PipelineConfig, RunConfig, TTAConfig, method_sections)

# The CLI's sections: the run's groups, then one per method that has options of its own (the registry's).
GROUPS = {"model": ModelConfig, "data": DataConfig, "tta": TTAConfig, "pipeline": PipelineConfig,
          "logging": LoggingConfig, **method_sections()}


def make_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the config fields' docstrings are the help
    # exit_on_error=False: a bad argument is raised, and `main` says it once (rank 0), not usage per rank.
    parser = ArgumentParser(prog="launch/tta.py", description=__doc__.split("\n\n")[0], env_prefix="DUSA",
                            default_env=False, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A JSON/YAML file of these arguments.")
    for name, cls in GROUPS.items():
        parser.add_class_arguments(cls, name)
    defaults = RunConfig()
    parser.add_argument("--deepspeed", type=Union[str, dict], default=defaults.deepspeed,
                        help="DeepSpeed engine JSON: a path or an inline dict (bf16, zero_optimization, "
                             "optimizer without lr, gradient_clipping, steps_per_print, ...).")
    parser.add_argument("--output_dir", type=str, default=defaults.output_dir,
                        help="Where results.json/.csv, the effective config, pictures and W&B offline files go.")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="Seeds noise, timesteps and candidate sampling per image.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    return parser


def parse(argv=None) -> tuple[RunConfig, dict, list[str]]:
    """(config, its JSON record, the config files given with --config)."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    argv = [a for a in argv if a not in printing]  # printed below: as JSON for a JSON config, without local_rank
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as exc:
        message = " ".join(str(exc).split())  # jsonargparse's messages span lines
        old = (unknown_option(message) or "").removeprefix("--")
        if old in MOVED_OPTIONS:  # an option that moved to its method's section: its new name, not a guess
            new = MOVED_OPTIONS[old]
            raise BadArguments(f"{old} is now {new}: DUSA's own options have their section (--{new} on the command "
                               f"line, \"{new.partition('.')[0]}\": {{...}} in a config file)") from None
        guess = close_option(message, [s for a in parser._actions for s in a.option_strings if s.startswith("--")])
        raise BadArguments(f"{message} (did you mean {guess}?)" if guess else message) from None
    if printing:
        print_config(ns)
    try:
        objects = parser.instantiate(ns)
    except TypeError as exc:  # a section given as something other than a mapping of its options
        raise BadArguments(f"a config section has the wrong type: {' '.join(str(exc).split())[:200]}") from None
    cfg = RunConfig(**{name: objects[name] for name in GROUPS}, deepspeed=ns.deepspeed,
                    output_dir=ns.output_dir, seed=ns.seed)
    return cfg, asdict(cfg), [str(path) for path in ns.get("config") or []]


def print_config(ns) -> None:
    """Prints the effective config, every option with its value, and exits: JSON unless the config files given
    are YAML, so that the output is itself a config file of the same kind; the launcher's --local_rank left out."""
    files = [str(path) for path in ns.get("config") or []]
    yaml = bool(files) and all(Path(f).suffix.lower() in (".yaml", ".yml") for f in files)
    values = {k: v for k, v in ns.clone().as_dict().items() if k not in ("config", "local_rank", "__path__")}
    import yaml as yaml_module
    try:
        print(yaml_module.safe_dump(values, sort_keys=False) if yaml else json.dumps(values, indent=2) + "\n",
              end="", flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


class BadArguments(ValueError):
    """Arguments or config file keys the parser refuses: every rank finds the same, rank 0 says it."""


def unknown_option(message: str) -> str | None:
    """The option (`--group.name`) that a parser message names as unknown: a command-line option or a config
    file's key; None when it names none."""
    found = re.search(r"unrecognized arguments: (--[\w.-]+)", message)
    if found:
        return found[1]
    # a config file's key: "Group 'tta' does not accept option 'x'", "Option 'x' is not accepted"
    found = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'|Option '([\w.]+)' is not accepted", message)
    return found and "--" + (f"{found[1]}.{found[2]}" if found[1] else found[3])


def close_option(message: str, known: list[str]) -> str | None:
    """The known option nearest to the one a parser message names as unknown (a command-line option or a
    config file's key), or None. Looked for in its own group first (`--tta.methd`: `--tta.method`), then as
    the same name in another group (`--tta.verbose`: `--logging.verbose`), then anywhere."""
    name = unknown_option(message)
    if not name:
        return None
    group, _, leaf = name.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == group and not k.endswith("+")}
    initials = "".join(word[:1] for word in leaf.lstrip("-").split("_"))  # learning_rate: lr
    if len(initials) > 1 and initials in siblings:
        return siblings[initials]
    match = difflib.get_close_matches(leaf, list(siblings), n=1)
    if match:
        return siblings[match[0]]
    moved = [k for k in known if k.rpartition(".")[2] == leaf]
    return (moved or difflib.get_close_matches(name, known, n=1) or [None])[0]


def quiet_libraries() -> None:
    """Turns off what the libraries print on their own, so that a run prints one line per event, on rank 0
    (`--logging.verbose` keeps it all). Called before they are imported: DeepSpeed warns at import."""
    import logging
    # torch's note that NCCL's eager init serialises P2P: a pipeline run can do nothing about it.
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    # DeepSpeed makes its logger at import, level WARNING (the accelerator banner comes then): a filter stays.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    import diffusers
    import transformers
    for library in (transformers, diffusers):  # log levels and the "Loading weights" bars
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    from pipeline.dusa.deepspeed_seam import quiet_deepspeed  # imports DeepSpeed: after its logger's filter
    quiet_deepspeed()


# Failures a user can fix (bad paths, data, config values, numerics): one line, exit code 2.
USER_ERRORS = (FileNotFoundError, ValueError, OSError, FloatingPointError, NotImplementedError)
OOM_HELP = ("out of GPU memory: lower --dusa.max_classes (the transformer batch per window), set "
            "--pipeline.activation_checkpoint_interval 1, use bf16 weights (--deepspeed ds_configs/ds_tta_bf16.json), "
            "or spread the model over more GPUs (--pipeline.num_stages with deepspeed --num_gpus)")


def main(argv=None) -> int:
    from pipeline.run.folder import PeerError, Stopped, default_signals, launcher_ended, stop_signal_received
    rank = int(os.environ.get("RANK", "0"))
    claim = OutputClaim()
    try:
        try:
            return run(argv, claim)
        except Exception:
            received = stop_signal_received()
            if received is None and launcher_ended():  # the watchdog's notice is at most a second away
                received = int(signal.SIGTERM)
            if received is None:
                raise
            # Told to stop while waiting on a peer that stopped first: a stop, not a failure.
            raise Stopped(f"stopped by {signal.Signals(received).name}", 128 + received) from None
    except Stopped as stop:
        default_signals()  # from here, the launcher's SIGTERM ends this process quietly
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if rank == 0 and not (several and other_ranks_running() is False):  # else the launcher is ending us
            kept = (f"finished tasks are kept in {Path(claim.folder.path) / 'results.json'}; rerun the same command "
                    f"to resume" if claim.started and claim.folder is not None else "nothing was written")
            end_progress_bars()
            LOG.warning(f"{stop.why}{f' (rank {rank})' if several else ''}: {kept}")
        elif rank and stopped_alone():
            LOG.error(f"{stop.why} (rank {rank}): the run stops; rerun the same command to resume")
        leave(stop.code, claim)
    except Exception as exc:  # noqa: BLE001 - sorted below: only user-facing failures are shortened
        default_signals()
        if isinstance(exc, BadArguments) and not os.environ.get("DUSA_TRACEBACK"):
            if rank == 0:
                LOG.error(f"error: {exc}\n`python launch/tta.py --help` lists every option")
            else:  # every rank refuses the same arguments: rank 0 says it, the launcher stops this one
                time.sleep(3)
            leave(2, claim)
        import torch
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (isinstance(exc, PeerError) and rank or peer_lost(exc)) \
                and not os.environ.get("DUSA_TRACEBACK"):
            # Another rank failed or was stopped first and says why: one message, not one per rank. A lost peer
            # may have been stopped by a signal: its status (128 + the signal) reaches the launcher first.
            if peer_lost(exc):
                claim.release()
                time.sleep(PEER_LOST_WAIT_S)
            leave(2, claim)
        oom = isinstance(exc, torch.OutOfMemoryError)
        if not (oom or isinstance(exc, USER_ERRORS)) or os.environ.get("DUSA_TRACEBACK"):
            claim.release()
            raise
        if rank:  # rank 0 mostly fails alike: give the launcher time to stop this process first
            time.sleep(3)
        end_progress_bars()
        LOG.error(f"error: {f'[rank {rank}] ' if rank else ''}{OOM_HELP if oom else error_line(exc)}"
                  f"{' (DUSA_TRACEBACK=1 shows the traceback)' if not oom else ''}")
        leave(2, claim)


def error_line(exc: BaseException) -> str:
    """The one line that says what went wrong: the message's first line, or for an error raised in a data
    loader worker (which torch re-raises as "Caught ValueError in DataLoader worker process 0." and the
    worker's traceback) the worker's own message, its traceback's last line."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def end_progress_bars() -> None:
    """A progress bar may hold the terminal's current line: it is cleared before a last message."""
    if "pipeline.run.progress" in sys.modules:
        sys.modules["pipeline.run.progress"].end_bars()


PEER_LOST_WAIT_S = 3.0  # the launcher polls its ranks every second and ends the rest at the first failure
STOP_NOTICE_S = 2.0


def other_ranks_running() -> bool | None:
    """Whether every other rank that this rank's launcher started on this node is still running (None: no
    launcher, or it has ended). A rank that ended first means the launcher is stopping the rest after it."""
    from pipeline.run.folder import launcher_ended, launcher_processes
    launchers = launcher_processes()
    if launcher_ended() or not launchers:
        return None
    import psutil
    try:
        siblings = [p for p in launchers[0].children() if p.pid != os.getpid()]
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in siblings)
    except psutil.Error:
        return None


def stopped_alone() -> bool:
    """Whether this rank (not rank 0) was told to stop on its own, rather than with the whole run: after a
    moment, its launcher is still there and so are the other ranks (a run-wide stop ends rank 0 at once, and
    the launcher then ends this process quietly during the wait)."""
    time.sleep(STOP_NOTICE_S)
    return other_ranks_running() is True


def peer_lost(exc: BaseException) -> bool:
    """Whether a failure is the communication with another rank breaking off (that rank failed or was
    stopped, and reports for itself)."""
    import torch.distributed as dist
    while exc is not None:
        text = str(exc)
        if isinstance(exc, dist.DistError) or isinstance(exc, RuntimeError) and any(
                s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo/transport")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class OutputClaim:
    """The claimed --output_dir (rank 0) and whether the run got past its checks and model loading (then what
    it wrote stays), released on every way out."""

    def __init__(self):
        self.folder = None
        self.started = False

    def release(self) -> None:
        """Unlocks --output_dir; a run that never started removes what it made there (nothing stays behind)."""
        if self.folder is not None:
            self.folder.release(started=self.started)


def leave(code: int, claim: OutputClaim) -> None:
    claim.release()
    release_cpu_shared_memory()
    os._exit(code)  # no atexit / process-group teardown: it can wait forever on peers that are gone


def release_cpu_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce keeps a 69 MB buffer per rank in /dev/shm (RAM) after exit: drop ours.
    (Peers that still map it keep their mapping; the name goes.)"""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '0')}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def on_rank0(work, rank: int, world: int, dist) -> None:
    """`work()` on rank 0 alone; its user error is raised on every rank (PeerError on the others, which
    exit quietly: one message)."""
    error = None
    if rank == 0:
        try:
            work()
        except USER_ERRORS as exc:
            error = exc
    if world > 1:
        verdict = [None if error is None else str(error)]
        dist.broadcast_object_list(verdict, src=0)
        if rank and verdict[0] is not None:
            from pipeline.run.folder import PeerError
            raise PeerError(verdict[0])
    if error is not None:
        raise error


def fit_layout(pipe, launched: bool) -> list[str]:
    """One process started without the launcher runs the pipeline as 1 stage; a fixed partition made for
    another stage count gives way to the planned one. Changes `pipe`; one line for each change."""
    notes = []
    if not launched and pipe.num_stages > 1:
        notes.append(f"one process (no deepspeed launcher): 1 stage instead of pipeline.num_stages "
                     f"{pipe.num_stages} (`deepspeed --num_gpus {pipe.num_stages} launch/tta.py ...` runs them)")
        pipe.num_stages = 1
    if pipe.partition is not None and len(pipe.partition) != pipe.num_stages + 1:
        notes.append(f"pipeline.partition {list(pipe.partition)} is a split into {len(pipe.partition) - 1} stages, "
                     f"not {pipe.num_stages}: the split is planned instead")
        pipe.partition = None
    return notes


def all_tasks_done(finished: dict, tasks, world: int, dist) -> bool:
    """Whether rank 0 found every task of the run in results.json already (then no model needs to load)."""
    verdict = [bool(finished) and set(tasks) <= set(finished)]
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def configure(argv=None) -> tuple[RunConfig, dict, list[str], list[str]]:
    """The run's options, checked before anything heavy is imported or read: (config, its JSON record, the
    config files, the class names). Every rank finds the same problems; rank 0 says them."""
    from data.classes import load_class_names
    from pipeline.methods import METHODS
    from pipeline.run.checks import check_argument_files, check_deepspeed_config, check_window_size, load_unique
    from pipeline.run.config import cap_class_budget, validate

    check_argument_files(sys.argv[1:] if argv is None else argv)  # a duplicate key is refused, not resolved
    cfg, record, config_files = parse(argv)
    class_names = load_class_names(cfg.data.classes)
    validate(cfg, len(class_names))
    for note in cap_class_budget(cfg, len(class_names)):
        record["dusa"].update(max_classes=cfg.dusa.max_classes, min_classes=cfg.dusa.min_classes)  # as it runs
        LOG.warning(note)
    if not cfg.output_dir.strip():
        raise ValueError("--output_dir is empty: name the folder for the results")
    if isinstance(cfg.deepspeed, str) and Path(cfg.deepspeed).is_file():
        check_deepspeed_config(load_unique(Path(cfg.deepspeed).read_text(), f"DeepSpeed config {cfg.deepspeed}"),
                               cfg.deepspeed)
    elif isinstance(cfg.deepspeed, dict):
        check_deepspeed_config(cfg.deepspeed, "--deepspeed")
    if not cfg.logging.verbose:
        quiet_libraries()
    if METHODS[cfg.tta.method].generator:
        check_window_size(cfg.data.window_size, cfg.model.generator)  # from the config files: no weights read
    return cfg, record, config_files, class_names


def start_processes() -> tuple[int, int, bool]:
    """DeepSpeed's process group (one process without a launcher, like `deepspeed --num_gpus 1`), this rank's
    GPU, and the shared-memory buffers of ended runs removed: (rank, world size, whether a launcher started it)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pipeline.run.folder import free_local_port, remove_orphaned_shared_memory
    timing.mark("imports")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        removed = remove_orphaned_shared_memory(f"deepspeed_allreduce_buffer_{os.getuid()}_")
        if removed:
            LOG.info(f"removed {len(removed)} shared-memory buffers of ended DeepSpeed runs from /dev/shm")
    launched = "RANK" in os.environ
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_local_port()))
    deepspeed.init_distributed()
    if torch.cuda.is_available():  # this rank's GPU before anything touches CUDA
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timing.mark("distributed init")
    if get_accelerator().device_name() == "cpu":
        import atexit
        atexit.register(release_cpu_shared_memory)
    return dist.get_rank(), dist.get_world_size(), launched


def prepare(cfg: RunConfig, record: dict, class_names: list[str], method, claim: OutputClaim) -> tuple[dict, dict]:
    """Rank 0, before any model loads: the output folder (locked; resumable), the data (every image's window
    count from its header), every model file (whole, shapes as its config makes them); returns the tasks'
    datasets and the tasks finished before, and completes `record` with the inputs' identity."""
    from data.demo import make_demo_data
    from models.tiny import build_demo_models
    from pipeline.run.checks import (check_accumulation, check_class_embedding_file, check_generator_files,
                                     check_segmenter_files, check_window_counts, check_window_size, read_cost_table)
    from pipeline.run.folder import RunFolder
    from pipeline.run.identity import input_identity
    from pipeline.run.loop import open_tasks
    from pipeline.run.protocol import task_sequence
    from pipeline.run.resume import finished_tasks, saved_results

    claim.folder = RunFolder.claim(cfg.output_dir)
    saved_results(cfg.output_dir)  # a damaged results.json is named before anything is built
    if cfg.data.build_demo_data:
        sequence = task_sequence(cfg.data)
        make_demo_data(cfg.data.dataset, cfg.data.root, list(dict.fromkeys(t.domain for t in sequence)),
                       [t.severity for t in sequence if t.severity is not None])
    datasets = open_tasks(cfg.data, len(class_names))
    if method.adapts:
        note = check_accumulation(cfg.tta.accumulation_steps, {t: len(d) for t, d in datasets.items()})
        if note:
            LOG.warning(note)
    if cfg.pipeline.cost_table is not None and method.pipeline:
        read_cost_table(Path(cfg.pipeline.cost_table), "--pipeline.cost_table")
    if method.generator:  # each window is a micro-batch of the image's step
        check_window_counts(datasets, cfg.data.window_size, cfg.data.window_stride, cfg.data.max_windows,
                            cfg.data.short_edge)
    if cfg.model.build_demo_models:  # source and tent need no generator
        build_demo_models(cfg.model.segmenter, cfg.model.generator if method.generator else None,
                          cfg.model.class_embeddings, class_names)
    check_segmenter_files(cfg.model.segmenter, len(class_names))
    if method.generator:
        check_window_size(cfg.data.window_size, cfg.model.generator)
        transformer = check_generator_files(cfg.model.generator)
        check_class_embedding_file(cfg.model.class_embeddings, class_names, cfg.model.generator, transformer)
    record["inputs"] = input_identity(cfg.model, class_names, datasets, method.generator)
    finished = finished_tasks(cfg, record, class_names)  # the same options and inputs as the results it resumes
    return datasets, finished


def run(argv=None, claim: OutputClaim | None = None) -> int:
    """One run: its options, processes, checks (rank 0), the method's models, the loop, the results."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pipeline.dusa.engine import load_ds_config
    from pipeline.methods import METHODS
    from pipeline.run.folder import launcher_processes, stop_on_signals, stop_when_launcher_ends, write_text_atomic
    from pipeline.run.loop import TTARunner, open_tasks
    from pipeline.run.replicas import ReplicaFeed, Replicas, layout_error
    from pipeline.run.reporting import RunLogger, startup_summary

    claim = claim or OutputClaim()
    stop_on_signals()
    stop_when_launcher_ends(launcher_processes())  # the single-node launcher does not pass SIGTERM on
    cfg, record, config_files, class_names = configure(argv)
    rank, world, launched = start_processes()
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.tta.method]  # the registry: its class checks, builds and runs the method
    if method.pipeline:
        for note in fit_layout(cfg.pipeline, launched):
            record["pipeline"].update(num_stages=cfg.pipeline.num_stages, partition=cfg.pipeline.partition)
            LOG.info(note)
    method.check(cfg, world)
    stages = cfg.pipeline.num_stages if method.pipeline else 1  # source and tent: one process per replica
    wrong = layout_error(world, stages, cfg.tta.continual and method.adapts,
                         "data.gradual" if cfg.data.gradual else "tta.continual")
    if wrong:
        raise ValueError(wrong)
    replicas = Replicas.form(stages)
    ds_config = load_ds_config(cfg.deepspeed, cfg.tta.lr)
    record["deepspeed"] = ds_config
    found: list = []
    on_rank0(lambda: found.append(prepare(cfg, record, class_names, method, claim)), rank, world, dist)
    datasets, finished = found[0] if found else (None, {})
    from pipeline.run.protocol import task_sequence
    # Task keys, not corruption names: with rounds or the gradual protocol one corruption is several tasks.
    if all_tasks_done(finished, [t.key for t in task_sequence(cfg.data)], world, dist):  # before any model loads
        LOG.info(f"every task is already done in {Path(cfg.output_dir) / 'results.json'}: nothing to run "
                 f"(another --output_dir starts a new run)")
        dist.destroy_process_group()
        claim.release()
        return 0
    if datasets is None:
        datasets = open_tasks(cfg.data, len(class_names))
    timing.mark("checks and data listed")
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    timing.configure(cfg.logging.timing, device)

    built = method.build(cfg, class_names, device, ds_config, report=LOG.info, replicas=replicas)
    if built.segmenter is not None and built.segmenter.num_classes != len(class_names):
        raise ValueError(f"segmenter {cfg.model.segmenter} predicts {built.segmenter.num_classes} "
                         f"classes, data.classes={cfg.data.classes} has {len(class_names)}")
    if rank == 0:  # the run starts: from here on, what it writes stays
        write_text_atomic(Path(cfg.output_dir) / "config.json", json.dumps(record, indent=2) + "\n",
                          Path(cfg.output_dir))
        claim.started = True
    logger = None  # W&B on rank 0; the other replicas' scoring processes feed it
    if rank == 0:
        logger = RunLogger(cfg.logging, cfg.output_dir, record, class_names)
    elif built.method.scoring:
        logger = ReplicaFeed(replicas)
    runner = TTARunner(cfg, class_names, device, built.method, logger=logger, config_record=record,
                       datasets=datasets, replicas=replicas)
    processes = (f"{world} ({built.processes}{', tasks from a shared queue' if replicas.count > 1 else ''}), "
                 f"{accelerator.device_count()} x {accelerator.device_name()} visible")
    LOG.info(startup_summary(cfg, config_files, processes, built.parameters, runner.total_images))
    timing.mark("runner ready")
    runner.run()
    timing.RECORDER.write(cfg.output_dir, rank)
    LOG.info(f"results: {Path(cfg.output_dir) / 'results.json'} (and .csv); config: "
             f"{Path(cfg.output_dir) / 'config.json'}")
    # The stages of a replica leave together: one that tears down its communication threads while another
    # still finishes (results, W&B) can abort the process at exit. Replicas do not wait for one another.
    replicas.barrier()
    dist.destroy_process_group()
    claim.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
