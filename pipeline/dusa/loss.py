"""The DUSA objective for one window as pure functions.

The segmenter's logits are LogitNormed at its own resolution (1/4 of the image), then resized to the
image, cropped per window and resized to latent resolution, as the reference does; candidates and the
class probabilities of the loss come from those normalised, resized logits."""
from __future__ import annotations

import torch
from einops import rearrange, reduce


def logit_norm(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """LogitNorm: each pixel's logit vector divided by its L2 norm over the classes (dimension `dim`)."""
    # The small epsilon keeps an all-zero logit vector finite (as in the LogitNorm paper).
    return logits / (logits.norm(p=2, dim=dim, keepdim=True) + 1e-7)


def dusa_loss(logits: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, velocity: torch.Tensor,
              target: torch.Tensor, temperature: float = 1.0, uniform: bool = False) -> torch.Tensor:
    """L_w: masked mean squared error between the class-weighted velocity and the flow target.

    logits   [C, h, w]     the window's LogitNormed logits at latent resolution (normalised at the
                           segmenter's resolution, then resized)
    classes  long [N]      the candidate classes; velocity[n] is conditioned on classes[n]
    mask     bool [h, w]   pixels that count in the loss
    velocity [N, ch, h, w] the generator's prediction for each candidate class
    target   [ch, h, w]    v = eps - z0
    p = softmax over the N candidates of logits / temperature (1: the reference's, which has none);
    `uniform` (an ablation): p = 1 / N, which gives the logits, and so the segmenter, a zero gradient.
    """
    if velocity.shape[0] != classes.shape[0]:
        raise ValueError(f"velocity has {velocity.shape[0]} samples for {classes.shape[0]} classes")
    # The loss is computed in float32 whatever the model dtype (bf16 squares lose too much).
    p = torch.softmax(logits.float()[classes] / temperature, dim=0)  # [N, h, w]
    if uniform:  # 0 x p keeps the logits in the graph: the pipeline sends a gradient (zero) for every output
        p = p * 0 + 1 / classes.shape[0]
    v_bar = reduce(rearrange(p, "n h w -> n 1 h w") * velocity.float(), "n ch h w -> ch h w", "sum")
    err = (v_bar - target.float()).square()
    # The mean over unmasked pixels and channels, as a weighted sum: selecting them (err[mask]) would have
    # a data-dependent size, which makes the host wait for the device at every window.
    keep = mask.to(torch.float32)
    return (err * keep).sum() / (keep.sum() * err.shape[0])


def candidate_statistics(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What candidate selection needs from the logits, computed on their device for a batch of windows.

    logits: [B, C, h, w] (LogitNormed, resized). Returns (top1 long [B, h, w], stats float32 [B, 3, C]):
    per class, the number of pixels with it as top-1, the number with it among their top-k, and its
    logit summed over the pixels (the score of the minimum fill). Only `stats` goes to the host: one
    transfer for every window of an image.
    """
    num_classes = logits.shape[1]
    if not 1 <= topk <= num_classes:
        raise ValueError(f"topk={topk} must be in [1, {num_classes}]")
    logits = logits.detach().float()
    ranked = logits.topk(topk, dim=1).indices.flatten(2)  # [B, k, h*w]
    ones = torch.ones(1, device=logits.device).expand(ranked.shape[0], ranked[:, 0].shape[-1])
    top1_count = torch.zeros(ranked.shape[0], num_classes, device=logits.device).scatter_add_(1, ranked[:, 0], ones)
    topk_count = torch.zeros_like(top1_count).scatter_add_(1, ranked.flatten(1), ones.repeat(1, topk))
    stats = torch.stack([top1_count, topk_count, logits.sum(dim=(2, 3))], dim=1)
    return ranked[:, 0].view(logits.shape[0], *logits.shape[2:]), stats


def choose_candidates(stats: torch.Tensor, topk: int = 1, max_classes: int = 20, min_classes: int = 0,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selection rule on one window's statistics (a row of `candidate_statistics`, on the host).

    Returns (classes: sorted long [N], kept: bool [C] or None). `kept` is given when the top-1
    classes alone exceed the budget: the loss then counts only pixels whose top-1 class is kept.
    """
    num_classes = stats.shape[-1]
    if not 1 <= topk <= num_classes:
        raise ValueError(f"topk={topk} must be in [1, {num_classes}]")
    check_class_budget(min_classes, max_classes)
    max_classes, min_classes = min(max_classes, num_classes), min(min_classes, num_classes)
    top1_count, topk_count, score = stats.cpu()
    top1_set = torch.nonzero(top1_count).flatten()
    topk_set = torch.nonzero(topk_count).flatten()
    kept = None

    if len(top1_set) > max_classes:
        keep = top1_set[torch.randperm(len(top1_set), generator=generator)[:max_classes]]
        classes = keep.sort().values
        kept = torch.zeros(num_classes, dtype=torch.bool)
        kept[classes] = True
    elif len(topk_set) > max_classes:
        others = topk_set[top1_count[topk_set] == 0]
        fill = others[torch.randperm(len(others), generator=generator)[:max_classes - len(top1_set)]]
        classes = torch.cat([top1_set, fill]).sort().values
    else:
        classes = topk_set

    if len(classes) < min_classes:
        score = score.clone()
        score[classes] = float("-inf")  # never a class already chosen
        # Gumbel-top-k: the same law as drawing one by one without replacement from softmax(score),
        # and it stays valid where the softmax underflows to exact zeros (pixel sums are large).
        gumbel = -torch.log(-torch.log(torch.rand(num_classes, generator=generator).clamp(1e-20, 1.0)))
        extra = (score + gumbel).topk(min_classes - len(classes)).indices
        classes = torch.cat([classes, extra]).sort().values
    return classes, kept


def area_scores(raw_logits: torch.Tensor, area_k: int) -> torch.Tensor:
    """Area-k scores of windows, [B, C, h, w] raw logits at latent resolution -> [B, C]: per pixel the
    `area_k` largest class probabilities (softmax over all classes) are kept and the rest zeroed, then
    summed over the pixels."""
    if not 1 <= area_k <= raw_logits.shape[1]:
        raise ValueError(f"area_k={area_k} must be in [1, {raw_logits.shape[1]}]")
    q = torch.softmax(raw_logits.detach().float(), dim=1)
    top = q.topk(area_k, dim=1)
    return torch.zeros_like(q).scatter_(1, top.indices, top.values).sum(dim=(2, 3))


def area_k_candidates(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """One window's area-k candidates from its scores [C] (host): the classes scoring above
    `threshold`, ascending, or the best class when none does. No budget and no pixel mask."""
    classes = torch.nonzero(scores > threshold).flatten()
    return classes if len(classes) else scores.argmax().reshape(1)


def check_class_budget(min_classes: int, max_classes: int) -> None:
    if not (max_classes >= 1 and 0 <= min_classes <= max_classes):
        raise ValueError(f"need 0 <= min_classes ({min_classes}) <= max_classes ({max_classes}) and max_classes >= 1")


def select_candidates(logits: torch.Tensor, topk: int = 1, max_classes: int = 20, min_classes: int = 0,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate classes of one window and the pixel mask of the loss.

    logits: [C, h, w], the window's LogitNormed logits at latent resolution.
    Returns (classes: sorted long [N] on logits' device, mask: bool [h, w]).
    - candidates = union of every pixel's top-k classes;
    - more than `max_classes`: keep every top-1 class and fill the budget with other candidates drawn
      uniformly at random; if the top-1 classes alone exceed the budget, sample `max_classes` of them
      uniformly and mask out the pixels whose top-1 class was dropped;
    - fewer than `min_classes` (0: no fill): add classes sampled without replacement with probability
      softmax over classes of the (LogitNormed) logits summed over pixels (Gumbel-top-k).
    Sampling draws from `generator` (a CPU generator), so a seed fixes the result on any device.
    (The pipeline runs the two halves itself, `candidate_statistics` for every window at once.)
    """
    check_class_budget(min_classes, max_classes)
    top1, stats = candidate_statistics(logits[None], topk)
    classes, kept = choose_candidates(stats[0], topk, max_classes, min_classes, generator)
    mask = torch.ones_like(top1[0], dtype=torch.bool) if kept is None else kept.to(logits.device)[top1[0]]
    return classes.to(logits.device), mask
