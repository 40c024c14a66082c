"""SegFormer (HuggingFace transformers) as the segmenter: images in [0, 1] -> logits at 1/4 resolution."""
from __future__ import annotations

import torch
from torch import nn
from transformers import SegformerForSemanticSegmentation

from models.checkpoints import load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    def __init__(self, model: SegformerForSemanticSegmentation):
        super().__init__()
        self.model = model
        # Normalisation constants per device, in float32 (model buffers would be cast to bf16 with the
        # model); made once, so a forward copies nothing from the host (and can be a CUDA graph).
        self._normalization: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Segmenter":
        """Loads a hub id or a local folder; the checkpoint's own head defines the classes."""
        return cls(load_checkpoint(name_or_path, "segmenter", SegformerForSemanticSegmentation.from_pretrained))

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> logits [B, classes, ~H/4, ~W/4] in the model's dtype."""
        if images.device not in self._normalization:
            self._normalization[images.device] = (torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1),
                                                  torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1))
        mean, std = self._normalization[images.device]
        pixels = ((images.float() - mean) / std).to(self.model.dtype)
        return self.model(pixel_values=pixels).logits
