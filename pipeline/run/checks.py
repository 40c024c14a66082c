"""Checks made before any model loads: config files, the DeepSpeed JSON, model files, window geometry.

Each failure is a ValueError of one line that names the file or option and the fix; the launcher prints
it as `error: ...` with exit code 2. The domains of the plain options are in `pipeline.run.config.validate`.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

# ------------------------------------------------------------------------------ duplicate keys
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _unique_pairs(source: str):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{source} sets {key!r} twice: keep one (a config with a duplicate key is "
                                 f"refused, not resolved silently)")
            seen[key] = value
        return seen
    return hook


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (PyYAML keeps the last one)."""

    source = "config"

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise ValueError(f"{self.source} sets {key!r} twice (line {key_node.start_mark.line + 1}): keep "
                                 f"one (a config with a duplicate key is refused, not resolved silently)")
            keys.add(key)
        return super().construct_mapping(node, deep)


def load_unique(text: str, source: str) -> Any:
    """JSON, else YAML, refusing duplicate keys at any depth."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs(source))
    except json.JSONDecodeError:
        pass
    loader = type("Loader", (_UniqueKeyLoader,), {"source": source})
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} is neither JSON nor YAML: {' '.join(str(exc).split())}") from None


# The config's sections (option groups), each a mapping of its options; `deepspeed` is a path or a mapping.
SECTIONS = ("model", "data", "tta", "pipeline", "logging", "logging.wandb")


def check_config_sections(loaded: Any, source: str) -> None:
    """A config file is a mapping whose sections (SECTIONS) are mappings: a list or a number there is refused
    in one line naming the section, instead of failing inside the parser."""
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{source} must be a mapping of option groups (model, data, tta, ...), not a "
                         f"{type(loaded).__name__}")
    for section in SECTIONS:
        parent, _, name = section.rpartition(".")
        holder = loaded.get(parent) if parent else loaded
        if isinstance(holder, Mapping) and name in holder and not isinstance(holder[name], Mapping):
            raise ValueError(f"{source}: section {section} must be a mapping of its options, not "
                             f"{holder[name]!r}")
    if "deepspeed" in loaded and not isinstance(loaded["deepspeed"], (str, Mapping)):
        raise ValueError(f"{source}: deepspeed must be a path or a mapping, not {loaded['deepspeed']!r}")


def check_argument_files(argv: Sequence[str]) -> None:
    """The files (or inline texts) given to --config and --deepspeed hold no duplicate keys; a config
    file's sections are mappings; a config file's `deepspeed` path is checked too."""
    values = []
    for i, arg in enumerate(argv):
        for option in ("--config", "--deepspeed"):
            if arg == option and i + 1 < len(argv):
                values.append((option, argv[i + 1]))
            elif arg.startswith(option + "="):
                values.append((option, arg.split("=", 1)[1]))
    for option, value in values:
        path = Path(value)
        if path.is_file():
            try:
                loaded = load_unique(path.read_text(), f"{option} file {path}")
            except UnicodeDecodeError:
                raise ValueError(f"{option} file {path} is not a text file") from None
            if option == "--config":
                check_config_sections(loaded, f"--config file {path}")
            nested = loaded.get("deepspeed") if option == "--config" and isinstance(loaded, dict) else None
            if isinstance(nested, str) and Path(nested).is_file():
                load_unique(Path(nested).read_text(), f"DeepSpeed config {nested} (from {path})")
        elif value.lstrip().startswith("{"):
            loaded = load_unique(value, f"{option} text")
            if option == "--config":
                check_config_sections(loaded, "--config text")


# ------------------------------------------------------------------------------ the DeepSpeed JSON
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Switches that DeepSpeed or torch's optimizers read as truth values, by key, at any depth (`enabled` of every
# section): a string such as "no" would be read as true.
BOOLEAN_KEYS = frozenset({
    "enabled", "immediate_grad_update", "check_grad_overflow", "wall_clock_breakdown", "memory_breakdown",
    "zero_allow_untested_optimizer", "prescale_gradients", "sparse_gradients", "dump_state", "auto_cast",
    "contiguous_gradients", "overlap_comm", "reduce_scatter", "allgather_partitions", "round_robin_gradients",
    "elastic_checkpoint", "load_from_fp32_weights", "use_multi_rank_bucket_allreduce", "ignore_unused_parameters",
    "amsgrad", "fused", "foreach", "maximize", "capturable", "differentiable", "nesterov", "torch_adam",
    "adam_w_mode", "decoupled_weight_decay", "bf16_master_weights_and_grads", "bf16_optimizer_states"})
# DeepSpeed's spellings of bfloat16 for torch_autocast.dtype (runtime/config.py: DtypeEnum).
BF16_NAMES = ("torch.bfloat16", "bfloat16", "bf16")


def _not_boolean(ds: Any, path: str = "") -> tuple[str, Any] | None:
    """The first (dotted key, value) of a switch in BOOLEAN_KEYS whose value is not true or false."""
    if isinstance(ds, Mapping):
        for key, value in ds.items():
            name = f"{path}.{key}" if path else str(key)
            if key in BOOLEAN_KEYS and not isinstance(value, bool):
                return name, value
            found = _not_boolean(value, name)
            if found:
                return found
    elif isinstance(ds, list):
        for item in ds:
            found = _not_boolean(item, path)
            if found:
                return found
    return None


def check_deepspeed_config(ds: Mapping[str, Any], source: str) -> None:
    """What the pipeline engine can take: ZeRO stage 0 or 1 (DeepSpeed's pipeline refuses 2 and 3),
    gradient clipping >= 0, AdamW-style optimizer parameters in their domains, switches that are true or
    false, and autocast to bfloat16 only (fp16 overflows in SD3)."""
    def refuse(what: str) -> None:
        raise ValueError(f"DeepSpeed config {source}: {what}")
    if not isinstance(ds, Mapping):
        refuse("must be a JSON object")
    switch = _not_boolean(ds)
    if switch:
        refuse(f"{switch[0]} {switch[1]!r} must be true or false (JSON booleans, not strings or numbers)")
    for key in ("torch_autocast", "optimizer", "bf16", "fp16", "zero_optimization"):
        if key in ds and not isinstance(ds[key], Mapping):
            refuse(f"{key} must be an object, not {ds[key]!r}")
    autocast = ds.get("torch_autocast", {})
    if autocast.get("enabled", False) and autocast.get("dtype", "bfloat16") not in BF16_NAMES:
        dtype = autocast.get("dtype")
        half = str(dtype).lower() in ("torch.float16", "fp16", "float16", "half")
        refuse(f"torch_autocast.dtype {dtype!r} is not supported: "
               + ("fp16 overflows in SD3; use bfloat16" if half else "autocast here is to bfloat16 (\"bfloat16\")"))
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        refuse("zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1) or isinstance(stage, bool):
        refuse(f"zero_optimization.stage {stage!r} is not supported: a DeepSpeed pipeline takes ZeRO stage 0 or 1")
    clip = ds.get("gradient_clipping", 0.0)
    if not (_number(clip) and clip >= 0):
        refuse(f"gradient_clipping {clip!r} must be a finite number >= 0 (0: no clipping)")
    for key in ("bf16", "fp16"):
        if key in ds and not (isinstance(ds[key], Mapping) and isinstance(ds[key].get("enabled", False), bool)):
            refuse(f"{key} must be an object with enabled true or false")
    every = ds.get("steps_per_print", 1)
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        refuse(f"steps_per_print {every!r} must be an integer >= 1")
    optimizer = ds.get("optimizer")
    if optimizer is None:
        return
    params = optimizer.get("params", {}) if isinstance(optimizer, Mapping) else None
    if not isinstance(params, Mapping):
        refuse("optimizer must be an object with a params object")
    betas = params.get("betas", (0.9, 0.999))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
        refuse(f"optimizer.params.betas {betas!r} must be two numbers in [0, 1)")
    eps = params.get("eps", 1e-8)
    if not (_number(eps) and eps > 0):
        refuse(f"optimizer.params.eps {eps!r} must be a finite number > 0")
    decay = params.get("weight_decay", 0.0)
    if not (_number(decay) and decay >= 0):
        refuse(f"optimizer.params.weight_decay {decay!r} must be a finite number >= 0")
    for key in ("momentum", "dampening"):
        value = params.get(key, 0.0)
        if not (_number(value) and value >= 0):
            refuse(f"optimizer.params.{key} {value!r} must be a finite number >= 0")
    kind = optimizer.get("type", "AdamW")
    if not isinstance(kind, str):
        refuse(f"optimizer.type {kind!r} must be a name: AdamW, Adam or SGD")


# ------------------------------------------------------------------------------ cost tables
def check_cost_table(table: Any, source: str) -> dict:
    """A per-layer cost table as `launch/calibrate.py` writes it (what `partition.table_costs` reads):
    card, signature, segmenter_ms (forward, backward), optimizer_ms and optional state_mib per layer, and per
    class count forward_ms, backward_ms and optional activation_mib per layer; every time and size a finite
    number >= 0 (memory figures: finite; a measured difference may dip below 0). ValueError naming `source`
    otherwise."""
    def refuse(what: str):
        raise ValueError(f"{source} is not a cost table of launch/calibrate.py ({what}): measure it again "
                         f"or use another")

    def numbers(value, key: str, length: int | None = None, signed: bool = False) -> int:
        if not (isinstance(value, list) and value and all(_number(v) and (signed or v >= 0) for v in value)):
            refuse(f"{key} must be a list of {'finite numbers' if signed else 'numbers >= 0'}")
        if length is not None and len(value) != length:
            refuse(f"{key} has {len(value)} entries, not one per layer ({length})")
        return len(value)
    if not isinstance(table, Mapping):
        refuse("not a JSON object")
    if not isinstance(table.get("card"), str) or not isinstance(table.get("signature"), Mapping):
        refuse("no card name or signature")
    numbers(table.get("segmenter_ms"), "segmenter_ms", 2)
    layers = numbers(table.get("optimizer_ms"), "optimizer_ms")
    if "state_mib" in table and table["state_mib"] is not None:
        numbers(table["state_mib"], "state_mib", layers, signed=True)
    classes = table.get("classes")
    if not isinstance(classes, Mapping) or not classes:
        refuse("no per-class-count entries")
    for count, entry in classes.items():
        if not (isinstance(count, str) and count.isdigit() and isinstance(entry, Mapping)):
            refuse(f"classes entry {count!r} must be a class count with an object")
        numbers(entry.get("forward_ms"), f"classes.{count}.forward_ms", layers)
        numbers(entry.get("backward_ms"), f"classes.{count}.backward_ms", layers)
        if entry.get("activation_mib") is not None:
            numbers(entry["activation_mib"], f"classes.{count}.activation_mib", layers, signed=True)
    return dict(table)


def read_cost_table(path: Path, source: str) -> dict:
    """A cost table file, read and checked (`check_cost_table`); ValueError naming `source` and the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {source} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source} {path} is not a JSON text file") from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} {path} is not valid JSON ({exc.msg} at line {exc.lineno}): cut short or "
                         f"damaged; measure it again (launch/calibrate.py) or use another") from None
    return check_cost_table(table, f"{source} {path}")


# ------------------------------------------------------------------------------ model files
def safetensors_header(path: Path, what: str, fix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} of a safetensors file, after checking that the file is whole: its header
    parses and its size is what the header describes (a truncated download fails here, by name)."""
    def damaged(reason: str):
        raise ValueError(f"{what} {path} is damaged ({reason}): {fix}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                damaged(f"{size} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                damaged(f"{size} bytes, its header alone claims {length + 8}")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        damaged("its header is not valid")
    if not isinstance(header, dict):
        damaged("its header is not valid")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
            width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
            if width is not None and stop - begin != width * math.prod(shape):
                damaged(f"tensor {name} has {stop - begin} bytes for shape {list(shape)} in {dtype}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith(what):
                raise
            damaged(f"tensor {name} is described badly in the header")
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    if size != 8 + length + end:
        damaged(f"{size} bytes where its header describes {8 + length + end}: cut short" if size < 8 + length + end
                else f"{size} bytes where its header describes {8 + length + end}")
    return tensors


def _read_config(path: Path, what: str, fix: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is damaged (not JSON: {' '.join(str(exc).split())}): {fix}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what} {path} is damaged (not a JSON object): {fix}")
    return config


def _weight_files(folder: Path, name: str, what: str, fix: str) -> list[Path] | None:
    """The safetensors files of a checkpoint folder (one file or an index of shards); None when it has
    only other formats (left to the loader)."""
    index = folder / f"{name}.safetensors.index.json"
    if index.is_file():
        weight_map = _read_config(index, f"{what} index", fix).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{what} index {index} is damaged (no weight_map): {fix}")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{what} shard {missing[0]} is missing (named by {index}): {fix}")
        return files
    single = folder / f"{name}.safetensors"
    return [single] if single.is_file() else None


def _compare_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                    required: Iterable[str], where: str, fix: str) -> None:
    for key, shape in expected.items():
        if key in found and tuple(found[key]) != tuple(shape):
            raise ValueError(f"{where}: tensor {key} is {list(found[key])} but its config.json makes it {list(shape)}: "
                             f"the weights and config.json are of different models; {fix}")
    # Libraries rename tensors between versions (transformers maps old names as it loads): a tensor
    # counts as present when an unclaimed one of the file has its shape.
    unclaimed = Counter(tuple(found[k]) for k in set(found) - set(expected))
    missing = []
    for key in sorted(set(required) - set(found)):
        if unclaimed[tuple(expected[key])] > 0:
            unclaimed[tuple(expected[key])] -= 1
        else:
            missing.append(key)
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) that its config.json needs, e.g. {missing[0]}: {fix}")


def _meta_shapes(build) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(shape of every state-dict tensor, names of the parameters) of a model built on the meta device."""
    import torch
    with torch.device("meta"):
        model = build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, {k for k, _ in model.named_parameters()}


def _local(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.exists() else None


def _check_checkpoint(folder: Path, config_name: str, weights: str, what: str, fix: str, build) -> dict:
    """config.json readable, every safetensors file whole, every tensor's shape as the config makes it."""
    config_path = folder / config_name
    if not config_path.is_file():
        return {}  # a missing layout is the loader's error, with its own message
    config = _read_config(config_path, f"{what} config", fix)
    files = _weight_files(folder, weights, f"{what} weights", fix)
    if files is None:
        return config
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        found.update({k: shape for k, (_, shape) in safetensors_header(file, f"{what} weights", fix).items()})
    try:
        expected, params = _meta_shapes(lambda: build(config_path))
    except Exception as exc:  # noqa: BLE001 - a config the library cannot build a model from
        raise ValueError(f"{what} config {config_path} does not describe a model this program can build "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): {fix}") from None
    _compare_shapes(expected, found, params, f"{what} weights in {folder}", fix)
    return config


def check_segmenter_files(segmenter: str, num_classes: int) -> None:
    folder = _local(segmenter)
    if folder is None or not folder.is_dir():
        return  # a hub id (checked as it downloads) or missing (the loader says so)
    fix = "download the checkpoint again or rebuild it"

    def build(path):
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
        return SegformerForSemanticSegmentation(SegformerConfig.from_pretrained(path.parent))
    config = _check_checkpoint(folder, "config.json", "model", "segmenter", fix, build)
    labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
    if labels is not None and labels != num_classes:
        raise ValueError(f"segmenter {segmenter} predicts {labels} classes, the run's class list (data.classes) "
                         f"has {num_classes}: use a checkpoint trained on these classes")


def generator_geometry(generator: str) -> tuple[int, int, int | None, dict]:
    """(VAE downsampling, transformer patch size, largest latent side of its position embedding or None,
    transformer config) from a local SD3 folder's config files, without loading weights; SD3's values
    (8, 2, None, {}) for a hub id."""
    folder = _local(generator)
    fix = "download the checkpoint again or rebuild it"
    if folder is None or not (folder / "vae" / "config.json").is_file() \
            or not (folder / "transformer" / "config.json").is_file():
        return 8, 2, None, {}
    vae = _read_config(folder / "vae" / "config.json", "generator VAE config", fix)
    transformer = _read_config(folder / "transformer" / "config.json", "generator transformer config", fix)
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        patch = int(transformer["patch_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"generator configs in {folder} lack block_out_channels (vae) or patch_size "
                         f"(transformer): {fix}") from None
    max_size = transformer.get("pos_embed_max_size")
    return factor, patch, (int(max_size) * patch if max_size else None), transformer


def check_generator_files(generator: str) -> dict:
    """The VAE's and the transformer's files (configs, whole weights, shapes); the transformer config."""
    folder = _local(generator)
    if folder is None or not folder.is_dir():
        return {}
    fix = "download the checkpoint again or rebuild it"

    def vae(path):
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_config(AutoencoderKL.load_config(path.parent))

    def transformer(path):
        from diffusers import SD3Transformer2DModel
        return SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(path.parent))
    _check_checkpoint(folder / "vae", "config.json", "diffusion_pytorch_model", "generator VAE", fix, vae)
    return _check_checkpoint(folder / "transformer", "config.json", "diffusion_pytorch_model",
                             "generator transformer", fix, transformer)


def check_class_embedding_file(path: str, classes: Sequence[str], generator: str, transformer: Mapping) -> None:
    """The cache is whole, made for these classes and this generator, and its widths are the
    transformer's (a mismatch would otherwise fail only at the first step, or when a high class id is
    drawn)."""
    from models.class_embeddings import check_cache_metadata
    file = Path(path)
    if not file.is_file():
        return  # the loader's message says how to build it
    fix = "rebuild it with launch/embed_classes.py"
    tensors = safetensors_header(file, "class-embedding cache", fix)
    if "prompt_embeds" not in tensors or "pooled" not in tensors:
        raise ValueError(f"class-embedding cache {file} lacks prompt_embeds or pooled: {fix}")
    from safetensors import safe_open
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    check_cache_metadata(meta, file, classes, generator)
    prompt, pooled = tensors["prompt_embeds"][1], tensors["pooled"][1]
    if len(prompt) != 3 or len(pooled) != 2 or prompt[0] != len(classes) or pooled[0] != len(classes):
        raise ValueError(f"class-embedding cache {file} holds prompt_embeds {list(prompt)} and pooled {list(pooled)}, "
                         f"not [{len(classes)}, tokens, width] and [{len(classes)}, width]: {fix}")
    joint, pooled_dim = transformer.get("joint_attention_dim"), transformer.get("pooled_projection_dim")
    if joint is not None and prompt[2] != joint or pooled_dim is not None and pooled[1] != pooled_dim:
        raise ValueError(f"class-embedding cache {file} has widths {prompt[2]} / {pooled[1]} but the generator "
                         f"{generator} takes {joint} / {pooled_dim} (joint_attention_dim / pooled_projection_dim): "
                         f"it was made for another model; {fix}")


# ------------------------------------------------------------------------------ tasks
def check_accumulation(steps: int, sizes: Mapping[str, int]) -> str | None:
    """Gradient accumulation drops a task's leftover images: steps larger than every task would never update
    (ValueError); larger than some tasks, those never update (the returned warning line)."""
    if steps <= 1 or not sizes:
        return None
    if steps > max(sizes.values()):
        raise ValueError(f"--tta.accumulation_steps {steps} is larger than every task (at most "
                         f"{max(sizes.values())} images): no update would ever happen; lower it")
    short = [task for task, size in sizes.items() if size < steps]
    if short:
        return (f"warning: --tta.accumulation_steps {steps} is larger than {len(short)} task(s) ({', '.join(short[:3])}"
                f"{', ...' if len(short) > 3 else ''}): their images are scored without any update")
    return None


# ------------------------------------------------------------------------------ windows
def check_window_size(window_size: int, generator: str) -> None:
    """The window must be a whole number of latent patches (VAE downsampling x transformer patch) and
    fit the transformer's position embedding."""
    factor, patch, largest, _ = generator_geometry(generator)
    unit = factor * patch
    if window_size % unit:
        low, high = max(unit, window_size // unit * unit), (window_size // unit + 1) * unit
        raise ValueError(f"--data.window_size {window_size} is not a multiple of {unit}, the generator's latent "
                         f"patch (VAE downsampling {factor} x transformer patch {patch}): use {low} or {high}")
    if largest is not None and window_size // factor > largest:
        raise ValueError(f"--data.window_size {window_size} is larger than the generator's position embedding "
                         f"takes ({largest * factor} pixels: pos_embed_max_size x patch x {factor}): use a smaller "
                         f"window")


def check_window_counts(datasets: Mapping[str, Any], size: int, stride: int, cap: int,
                        short_edge: int | None = None) -> int:
    """Every image's window count from its header alone, against the cap; returns the largest count."""
    from pipeline.dusa.windows import window_count
    largest = 0
    for dataset in {id(d): d for d in datasets.values()}.values():  # a task of several rounds: read once
        for i in range(len(dataset)):
            height, width = dataset.image_size(i)
            n = window_count(height, width, size, stride, short_edge)
            if n > cap:
                raise ValueError(f"image {dataset._images[i]} ({height}x{width}) needs {n} windows of {size} "
                                 f"(stride {stride}) in one step, more than --data.max_windows {cap}: crop it, "
                                 f"leave it out, or raise --data.max_windows (time and memory grow with the count)")
            largest = max(largest, n)
    return largest
