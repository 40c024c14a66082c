"""Tiny models, one image and the run configs shared by the pipeline tests and their worker."""
from __future__ import annotations

from pathlib import Path

import torch

from data.classes import ADE20K_CLASSES
from models.tiny import make_tiny_class_embeddings, make_tiny_sd3, make_tiny_segformer
from pipeline.methods.dusa import DusaOptions
from pipeline.run.config import DataConfig, ModelConfig, PipelineConfig, TTAConfig
from models.segformer import Segmenter
from pipeline.dusa.windows import AdaptiveWindows, WindowDraw, draw_windows, resize_short_edge, window_boxes

CLASSES = ADE20K_CLASSES
NUM_BLOCKS = 3
WINDOW, STRIDE = 64, 21  # a 64 x 96 image -> 3 windows
# The options test: a SegFormer whose classifier is scaled up, so its entropy map has structure (the tiny
# random one predicts nearly uniform probabilities), and an adaptive rule scaled to the 64 x 96 image
# (it places 4 windows of sides 45, 18, 45 and 16).
SHARP_SEGFORMER, SHARPNESS = "segformer-sharp", 300.0
ADAPTIVE_TEST_RULE = AdaptiveWindows(std=0.5, dilation=1, min_size=16, max_size=48, min_distance=8.0, max_windows=4,
                                     min_windows=2)
WINDOW_TAU = 0.05
ACCUMULATION, ACCUMULATION_IMAGES, ACCUMULATE_LR = 2, 5, 0.05  # 2 updates, then 1 leftover image


def make_assets(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_tiny_segformer(root / "segformer", CLASSES)
    make_tiny_sd3(root / "sd3", num_layers=NUM_BLOCKS)
    make_tiny_class_embeddings(root / "classes.safetensors", CLASSES, root / "sd3")  # tiny text encoders + builder
    sharp = Segmenter.from_pretrained(str(root / "segformer"))
    with torch.no_grad():
        sharp.model.decode_head.classifier.weight.mul_(SHARPNESS)
    sharp.model.save_pretrained(root / SHARP_SEGFORMER)
    g = torch.Generator().manual_seed(0)
    # Smooth structure plus noise, so the segmenter's classes vary across the image.
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 6, generator=g), size=(80, 120), mode="bilinear")
    torch.save((0.8 * base + 0.2 * torch.rand(1, 3, 80, 120, generator=g)).clamp(0, 1), root / "image.pt")
    return root


# Stage boundaries over [front, embed, block0, block1, block2, head]; 4 stages: one holds only the head.
PARTITIONS = {2: [0, 3, NUM_BLOCKS + 3], 4: [0, 2, 3, NUM_BLOCKS + 2, NUM_BLOCKS + 3]}


def run_configs(root: Path, num_stages: int = 2) -> tuple[ModelConfig, DataConfig, TTAConfig, DusaOptions,
                                                         PipelineConfig]:
    model = ModelConfig(segmenter=str(root / "segformer"), generator=str(root / "sd3"),
                        class_embeddings=str(root / "classes.safetensors"))
    data = DataConfig(root=str(root), window_size=WINDOW, window_stride=STRIDE)
    # topk 2 with a small budget exercises the fill rule; min 3 the sampling rule; t is random.
    dusa = DusaOptions(topk=2, max_classes=6, min_classes=3, temperature=0.7, timestep_range=(0.2, 0.6))
    pipe = PipelineConfig(num_stages=num_stages, partition=PARTITIONS[num_stages])
    return model, data, TTAConfig(), dusa, pipe


def fixed_windows(root: Path, seed: int) -> tuple[torch.Tensor, list[WindowDraw]]:
    """The resized saved image and its windows' draws for one step (same seed: same noise, t and sampling)."""
    image = resize_short_edge(torch.load(root / "image.pt"), WINDOW)
    corners = window_boxes(image.shape[-2], image.shape[-1], WINDOW, STRIDE)
    return image, draw_windows(corners, (16, WINDOW // 8, WINDOW // 8), (0.2, 0.6), torch.Generator().manual_seed(seed))
