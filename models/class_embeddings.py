"""The class-embedding cache: SD3 text-encoder outputs for one prompt per class, computed once.

File: safetensors with `prompt_embeds` [C, L, D] and `pooled` [C, P]; metadata holds the model,
the prompt template and the class list (JSON) with its hash, so a run can refuse a cache made for
other classes or another model.

The builder (`write_class_embeddings`, `build_class_embeddings`) runs SD3's three text encoders once over
one prompt per class; row c equals what diffusers' `StableDiffusion3Pipeline.encode_prompt(prompt, None,
None, do_classifier_free_guidance=False, max_sequence_length=...)` returns for the prompt of class c. The
encoders (CLIP-L, CLIP-G, T5-XXL) are loaded one at a time, each freed before the next, so the peak is
the largest of them (T5-XXL: about 9.5 GB in bf16). `launch/embed_classes.py` is its command line.
"""
from __future__ import annotations

import gc
import logging
import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import transformers
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from data.classes import check_class_names, read_class_names
from models.checkpoints import load_checkpoint, readable_weights

DEFAULT_TEMPLATE = "a photo of a {}"
# transformers renamed `torch_dtype` to `dtype` (4.56) and warns about the old name.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
# What a hub download fetches: the text stacks and the transformer's config, not its weights.
_HUB_FILES = ["model_index.json", "transformer/config.json", "tokenizer*/*", "text_encoder*/*.json",
              "text_encoder*/*.safetensors"]


class EmbedError(ValueError):
    """A user-facing problem (missing subfolder, bad template or class list): one line, exit code 2."""


def class_list_hash(classes: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()[:16]


def model_key(name_or_path: str) -> str:
    """A hub id and a local copy of it compare equal: the last path component names the model."""
    return Path(str(name_or_path).rstrip("/")).name


def save_class_embeddings(path: str | Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                          classes: Sequence[str], model: str, template: str,
                          extra: Mapping[str, str] | None = None) -> Path:
    """`extra`: more metadata strings (the builder records the T5 length and the dtype)."""
    if prompt_embeds.shape[0] != len(classes) or pooled.shape[0] != len(classes):
        raise ValueError(f"{len(classes)} classes but embeddings for {prompt_embeds.shape[0]} / {pooled.shape[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**(extra or {}), "model": str(model), "template": template, "classes": json.dumps(list(classes)),
                "classes_hash": class_list_hash(classes), "sequence_length": str(prompt_embeds.shape[1])}
    save_file({"prompt_embeds": prompt_embeds.contiguous(), "pooled": pooled.contiguous()}, str(path), metadata)
    return readable_weights(path)


def load_class_embeddings(path: str | Path, classes: Sequence[str], model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [C, L, D], pooled [C, P]) of a cache made for exactly `classes` and `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-embedding cache {path} does not exist: build it with "
                                f"launch/embed_classes.py or set model.class_embeddings")
    with safe_open(str(path), framework="pt") as f:
        check_cache_metadata(f.metadata() or {}, path, classes, model)
        return f.get_tensor("prompt_embeds"), f.get_tensor("pooled")


def check_cache_metadata(meta: dict, path, classes: Sequence[str], model: str) -> None:
    """A cache made for these classes (in this order) with this generator, or one line naming the fix."""
    try:
        cached = json.loads(meta.get("classes", "[]"))
    except json.JSONDecodeError:
        cached = None
    if cached != list(classes):
        count = len(cached) if isinstance(cached, list) else "unknown"
        made, run = _class_list_name(cached), _class_list_name(classes)
        if made and run:  # two known datasets: say which
            raise ValueError(f"class-embedding cache {path} was made for the {made} classes ({count}), not the "
                             f"run's {run} classes ({len(classes)}): use the cache of this dataset, or build it "
                             f"with launch/embed_classes.py --dataset {run}")
        raise ValueError(f"class-embedding cache {path} was made for {count} other classes "
                         f"(hash {meta.get('classes_hash')}), not the run's {len(classes)} "
                         f"(hash {class_list_hash(classes)}): rebuild it for this class list")
    if model_key(meta.get("model", "")) != model_key(model):
        raise ValueError(f"class-embedding cache {path} was made with {meta.get('model')!r}, "
                         f"not the run's generator {model!r}: rebuild it for this model")


def _class_list_name(classes) -> str | None:
    """`ade20k` or `cityscapes` when `classes` is that dataset's class list, else None."""
    from data.datasets import class_list_of
    for name in ("ade20k", "cityscapes"):
        if isinstance(classes, (list, tuple)) and list(classes) == list(class_list_of(name)):
            return name
    return None


def read_class_list(path: str | Path) -> list[str]:
    """One class per line; blank lines and lines starting with `#` are skipped."""
    return read_class_names(path, EmbedError)


def check_class_list(classes: Sequence[str], source: str) -> None:
    check_class_names(classes, source, EmbedError)


def make_prompts(template: str, classes: Sequence[str], custom: Mapping[str, str] | None = None) -> list[str]:
    """The prompt of every class: `custom[class]` verbatim where given, else the template filled."""
    if "{}" not in template:
        raise EmbedError(f"template {template!r} has no '{{}}' for the class name")
    custom = dict(custom or {})
    unknown = sorted(set(custom) - set(classes))
    if unknown:
        raise EmbedError(f"custom prompts for classes not in the class list: {', '.join(map(repr, unknown))}")
    if not all(isinstance(v, str) and v.strip() for v in custom.values()):
        raise EmbedError("custom prompts must be non-empty strings")
    # not str.format: other braces stay literal
    return [custom[c] if c in custom else template.replace("{}", c) for c in classes]


def read_custom_prompts(path: str | Path) -> dict[str, str]:
    """A JSON or YAML mapping class name -> full prompt."""
    from pipeline.run.checks import load_unique  # JSON or YAML, a repeated class refused
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a leading byte-order mark is dropped
    except OSError as e:
        raise EmbedError(f"cannot read prompts file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise EmbedError(f"prompts file {path} is not UTF-8 text (JSON or YAML)") from None
    try:
        mapping = load_unique(text, f"prompts file {path}")
    except ValueError as e:
        raise EmbedError(str(e)) from None
    if not isinstance(mapping, dict):
        raise EmbedError(f"prompts file {path} must map class names to prompts")
    return {str(k): v for k, v in mapping.items()}


def check_output_file(out: str | Path) -> Path:
    """Where the cache goes can take a file: not a folder, its parent a folder or creatable (checked before
    any encoder runs)."""
    out = Path(out)
    if out.is_dir():
        raise EmbedError(f"--out {out} is a folder: name the cache file (e.g. {out / 'classes.safetensors'})")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EmbedError(f"--out {out}: {parent} is a file, not a folder")
            break
    return out


def resolve_model(model: str) -> tuple[Path, bool]:
    """(local SD3 folder, whether it has T5). A hub id is fetched (text stacks only) into the HF cache."""
    def find(name: str) -> Path:
        if Path(name).exists():
            if not Path(name).is_dir():
                raise EmbedError(f"{model} is not a folder (expected a diffusers SD3 folder or a hub id)")
            return Path(name)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))

    try:  # the project's one rule for "local folder or hub id", with its one-line errors
        folder = load_checkpoint(model, "text encoders", find)
    except FileNotFoundError as exc:
        raise EmbedError(str(exc)) from None
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if not (folder / sub).is_dir():
            raise EmbedError(f"{model} has no {sub}/ subfolder: not a diffusers SD3 folder with its text encoders")
    has_t5 = (folder / "text_encoder_3").is_dir()
    if has_t5 and not (folder / "tokenizer_3").is_dir():
        raise EmbedError(f"{model} has text_encoder_3/ but no tokenizer_3/ subfolder")
    if not has_t5 and not (folder / "transformer" / "config.json").is_file():
        raise EmbedError(f"{model} has no text_encoder_3/ and no transformer/config.json to size its zero T5 part")
    return folder, has_t5


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def _run_encoder(load: Callable[[], torch.nn.Module], encode: Callable, batches: list[list[str]],
                 device: torch.device, desc: str, progress: bool) -> list[torch.Tensor]:
    """Loads one encoder, runs every batch through it, frees it; outputs go to the CPU per batch."""
    encoder = load().to(device).eval()
    try:
        outs = [tuple(t.cpu() for t in encode(encoder, batch))
                for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress)]
    finally:
        del encoder  # the only reference: the weights go now, before the next encoder loads
        _free(device)
    return [torch.cat(parts) for parts in zip(*outs)]


def build_class_embeddings(model: str, classes: Sequence[str], template: str = DEFAULT_TEMPLATE,
                           max_sequence_length: int = 256, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, batch_size: int = 16,
                           progress: bool = True, custom: Mapping[str, str] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [C, 77 + max_sequence_length, D_T5], pooled [C, P_L + P_G]) on the CPU, in `dtype`,
    equal to SD3's `encode_prompt` for each class's prompt (`make_prompts`)."""
    prompts = make_prompts(template, classes, custom)
    check_class_list(classes, "given")
    folder, has_t5 = resolve_model(model)
    device = torch.device(device)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    load_kw = {_DTYPE_KWARG: dtype}

    # Both CLIPs are padded/truncated to CLIP-L's tokenizer length (77), as diffusers does.
    clip_length = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer").model_max_length

    def clip(sub: str, tok_sub: str, desc: str) -> list[torch.Tensor]:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder=tok_sub)

        def encode(encoder, batch):
            ids = tokenizer(batch, padding="max_length", max_length=clip_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            # SD3 takes the penultimate hidden state per token and the projected pooled output.
            return out.hidden_states[-2].to(dtype), out.text_embeds

        return _run_encoder(lambda: CLIPTextModelWithProjection.from_pretrained(folder, subfolder=sub, **load_kw),
                            encode, batches, device, desc, progress)

    hidden_l, pooled_l = clip("text_encoder", "tokenizer", "CLIP-L")
    hidden_g, pooled_g = clip("text_encoder_2", "tokenizer_2", "CLIP-G")

    if has_t5:
        tokenizer_3 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3")

        def encode_t5(encoder, batch):
            ids = tokenizer_3(batch, padding="max_length", max_length=max_sequence_length, truncation=True,
                              add_special_tokens=True, return_tensors="pt").input_ids
            return (encoder(ids.to(device))[0].to(dtype),)  # last hidden state, no attention mask (as SD3)

        (t5,) = _run_encoder(lambda: T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", **load_kw),
                             encode_t5, batches, device, "T5", progress)
    else:
        from diffusers import SD3Transformer2DModel

        width = SD3Transformer2DModel.load_config(folder, subfolder="transformer")["joint_attention_dim"]
        logging.getLogger("dusa").warning(f"warning: {model} has no text_encoder_3: its {max_sequence_length} T5 tokens are zeros "
                                          f"(what diffusers does without T5)")
        t5 = torch.zeros(len(prompts), max_sequence_length, width, dtype=dtype)

    clip_hidden = torch.cat([hidden_l, hidden_g], dim=-1)
    # Zero-pad the CLIP tokens to the T5 width, then CLIP tokens first, T5 tokens after.
    clip_hidden = torch.nn.functional.pad(clip_hidden, (0, t5.shape[-1] - clip_hidden.shape[-1]))
    return torch.cat([clip_hidden, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)


def write_class_embeddings(out: str | Path, model: str, classes: Sequence[str], template: str = DEFAULT_TEMPLATE,
                           max_sequence_length: int = 256, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, batch_size: int = 16, progress: bool = True,
                           custom: Mapping[str, str] | None = None) -> Path:
    """`build_class_embeddings`, saved to `out` with what made it (T5 length, dtype, custom prompts)."""
    prompt, pooled = build_class_embeddings(model, classes, template, max_sequence_length, device, dtype,
                                            batch_size, progress, custom)
    return save_class_embeddings(out, prompt, pooled, classes, model, template,
                                 extra={"t5_sequence_length": str(max_sequence_length),
                                        "dtype": str(dtype).removeprefix("torch."),
                                        "custom_prompts": json.dumps(dict(custom or {}))})
