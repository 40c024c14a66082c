"""What the segmenter-only baselines (tent, cotta, sar) share: their compute precision, their saved state file,
their reset / save / load (`AdapterMethod`, unnamed: the registry does not list it) and the checks of their
options."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pipeline.methods.base import Method


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on `device` when `dtype` is set (either bf16 preset), else nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def read_state(path: Path) -> dict:
    """A state that a method saved with `torch.save` (tensors and plain containers only)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # any failure to read it is a damaged file
        raise ValueError(f"cannot read the saved state {path} ({type(exc).__name__}): "
                         f"delete the output folder to start over") from exc


def pixel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] logits -> [B, h, w] entropy of the softmax over classes, in float32."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def refuse_accumulation(cfg, name: str) -> None:
    """`--tta.accumulation_steps` above 1 is refused (one line) rather than silently ignored: the segmenter
    baselines update after every image, as their papers do."""
    if cfg.tta.accumulation_steps != 1:
        raise ValueError(f"--tta.accumulation_steps {cfg.tta.accumulation_steps}: {name} updates after every image "
                         f"(1)")


def check_domains(name: str, values: list) -> None:
    """(field, value, domain text, test) of `--<name>.*` options: the first value that is not a number or fails
    its test is refused (ValueError, one line)."""
    for option, value, domain, test in values:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and test(value)):
            raise ValueError(f"--{name}.{option} {value!r} is outside its domain: {domain}")


class AdapterMethod(Method):
    """A method whose whole adapted state is one object, `self.adapter` (with `reset()`, `state_dict()` and
    `load_state_dict()`): reset, save and load go to it."""

    adapter = None

    def reset(self) -> None:
        self.adapter.reset()

    def save(self, folder: Path, task: str) -> None:
        torch.save(self.adapter.state_dict(), folder / task)

    def load(self, folder: Path, task: str) -> None:
        self.adapter.load_state_dict(read_state(folder / task))
