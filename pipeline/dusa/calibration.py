"""A card's per-layer cost table, as the partition planner reads it (pipeline/dusa/partition.py): measured on one
stage holding every layer, through the engine users run (launch/calibrate.py is the entry point)."""
from __future__ import annotations

import datetime
import statistics
import time

import torch

# A typical ADE20K image after resizing to the window size: 2 windows of 512 (the tables' `image_size`).
IMAGE_SIZE = (512, 683)


def smooth_random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image [1, 3, H, W] in [0, 1] (fixed seed), already at the segmenter's size."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (0.85 * image + 0.15 * torch.rand(1, 3, height, width, generator=g)).clamp(0, 1)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_layer_costs(engine, image: torch.Tensor, corners, latent, classes, optimizer_s: float) -> dict:
    """The cost table of the partition (one stage holds every layer here): per layer, forward and backward
    seconds for one window micro-batch (medians of 5) and the bytes of activations it keeps for the
    backward; SegFormer's forward and backward per image; each layer's share of the optimizer step and
    of the memory held across steps (weights, gradients, optimizer state; SegFormer's graphs and
    activations on the front)."""
    from pipeline.dusa.windows import draw_windows
    module, front = engine.module, engine.module.front
    layers = list(module.forward_funcs)
    cuda = torch.cuda.is_available()
    autocast = engine.engine.torch_autocast_enabled()

    def precision():  # the forwards under the engine's precision, as its steps run them (autocast preset)
        return torch.autocast(engine.device.type, engine.engine.torch_autocast_dtype() if autocast else torch.bfloat16,
                              enabled=autocast)

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def timed(fn, n=5):
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), result

    def as_inputs(outputs):
        # A fresh leaf per float activation that carries gradient (bit-views of constants stay integers).
        return tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in outputs)

    def window_costs(c: int) -> dict:
        """Per-layer costs of one window micro-batch at c classes (its tensors are freed on return)."""
        front.min_classes = front.max_classes = c
        draws = draw_windows(corners, latent, (0.25, 0.25), torch.Generator().manual_seed(7))
        with precision():
            x = front.begin_image(image.to(engine.device), draws).inputs[0]
        forward_ms, backward_ms, activation_mib = [], [], []
        for layer in layers:
            before = allocated()
            with precision():
                fwd, y = timed(lambda: layer(x))
            if layer is layers[-1]:  # the loss belongs to the last layer's cost
                fwd_loss, loss = timed(lambda: module.loss_fn(y, None))
                fwd, y = fwd + fwd_loss, (loss,)
            activation_mib.append((allocated() - before) / 2**20)
            outs = [t for t in y if t.is_floating_point() and t.requires_grad]
            grads = [torch.randn_like(t) for t in outs]
            bwd, _ = timed(lambda: torch.autograd.backward(outs, grads, retain_graph=True)) if outs else (0.0, None)
            forward_ms.append(1e3 * fwd)
            backward_ms.append(1e3 * bwd)
            x = as_inputs(y) if layer is not layers[-1] else x
        return {"forward_ms": forward_ms, "backward_ms": backward_ms, "activation_mib": activation_mib}

    def segmenter_costs() -> tuple[float, float, int]:
        """SegFormer's forward and backward seconds per image and the bytes of its activations."""
        before = allocated()
        with precision():
            seg_fwd, logits = timed(lambda: front._run_segmenter(image.to(engine.device)))
        activations = allocated() - before
        grad = torch.randn_like(logits)
        seg_bwd, _ = timed(lambda: logits.backward(grad, retain_graph=True))
        return seg_fwd, seg_bwd, activations

    held = allocated()  # between steps: weights, gradients, optimizer state (and SegFormer's graph pool)
    table: dict = {"classes": {}}
    for c in classes:
        table["classes"][str(c)] = window_costs(c)
        front.backward_segmenter()  # drops the step's SegFormer graph
        module.zero_grad(set_to_none=True)
    seg_fwd, seg_bwd, segmenter_activations = segmenter_costs()
    module.zero_grad(set_to_none=True)
    table["segmenter_ms"] = [1e3 * seg_fwd, 1e3 * seg_bwd]
    trainable = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    frozen = [sum(p.numel() * p.element_size() for p in layer.parameters() if not p.requires_grad)
              + sum(b.numel() * b.element_size() for b in layer.buffers()) for layer in layers]
    per_param = max(held - sum(frozen), 0) / max(sum(trainable), 1)
    state = [n * per_param + f for n, f in zip(trainable, frozen)]
    state[0] += segmenter_activations  # SegFormer's activations live through the step on the front's stage
    table["state_mib"] = [b / 2**20 for b in state]
    table["bytes_per_trainable_parameter"] = per_param
    table["optimizer_ms"] = [1e3 * optimizer_s * n / max(sum(trainable), 1) for n in trainable]
    table["layers"] = [type(layer).__name__ for layer in layers]
    table["card_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    return table


def cost_table(costs: dict, card: str, signature: dict, image_size: tuple[int, int], how: str) -> dict:
    """The table file's content: the card, what the costs depend on (`partition.model_signature`), when and how
    they were measured, the image size, and the measured costs (`measure_layer_costs`)."""
    return {"card": card, "signature": signature, "measured": f"{datetime.date.today().isoformat()}, {how}",
            "image_size": list(image_size), **costs}


def cost_table_name(card: str, generator: str, segmenter: str, precision: str) -> str:
    """The file name the planner looks for (`partition.find_cost_table`): <card>-<generator>-<segmenter>-<precision>."""
    slug = card.lower().replace("nvidia ", "").split()[0] if card != "cpu" else "cpu"
    return f"{slug}-{generator}-{segmenter}-{precision}.json"
