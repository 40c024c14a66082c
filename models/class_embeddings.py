"""The class-embedding cache: SD3 text-encoder outputs for one prompt per class, computed once.

File: safetensors with `prompt_embeds` [C, L, D] and `pooled` [C, P]; metadata holds the model,
the prompt template and the class list (JSON) with its hash, so a run can refuse a cache made for
other classes or another model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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
    return path


def load_class_embeddings(path: str | Path, classes: Sequence[str], model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [C, L, D], pooled [C, P]) of a cache made for exactly `classes` and `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-embedding cache {path} does not exist: build it with "
                                f"launch/embed_classes.py or set model.class_embeddings")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        cached = json.loads(meta.get("classes", "[]"))
        if cached != list(classes):
            raise ValueError(f"class-embedding cache {path} was made for {len(cached)} other classes "
                             f"(hash {meta.get('classes_hash')}), not the run's {len(classes)} "
                             f"(hash {class_list_hash(classes)}): rebuild it for this class list")
        if model_key(meta.get("model", "")) != model_key(model):
            raise ValueError(f"class-embedding cache {path} was made with {meta.get('model')!r}, "
                             f"not the run's generator {model!r}: rebuild it for this model")
        return f.get_tensor("prompt_embeds"), f.get_tensor("pooled")
