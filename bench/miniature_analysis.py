"""The miniature benchmark's analysis section (`bench/miniature.py report`): why dusa gains over the source.

For one declared pair of runs (bench/miniature.py: ANALYSIS_LR, the source and dusa rows of the grid), per dusa
run (each seed of the grid, in each training of the benchmark reported) against its training's source, and every
corruption:

- the change in mIoU and in every class's IoU, dusa - source (results.json of both runs);
- DUSA's candidate-class recall (each run's images.csv, pipeline/run/image_figures.py): the mean over the images
  of the share of the label's classes among the image's candidate classes, and the share of images whose
  candidates hold every one of them;
- the DUSA loss against the pixel error of the prediction scored at that step (after adapting on the images
  before it): Spearman and Pearson over the corruption's images, and the mean pixel error per loss quantile
  (the images split by their loss into `quantiles` groups of equal size, lowest loss first); pooled over the
  corruptions, the correlation over every image and the mean of the within-corruption ones, and the quantiles
  of the images binned within their corruption (the corruptions shift the loss's level).

Every figure is given per run, then as the mean over the runs and half their range (the spread). The verdict
follows a rule fixed before the results (`verdict`): a corruption's gain is explained by the loss when, in
every run, the loss ranks the corruption's images by their error (Spearman >= `min_spearman`).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np


def read_image_figures(path: Path) -> list[dict]:
    """images.csv's rows with numbers (None for an empty cell)."""
    def number(text: str) -> float | None:
        return float(text) if text else None
    with open(path, newline="", encoding="utf-8") as f:
        return [{"task": r["task"], "image": r["image"], "loss": number(r["loss"]),
                 "pixel_error": number(r["pixel_error"]), "candidate_recall": number(r["candidate_recall"])}
                for r in csv.DictReader(f)]


def correlation(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman and Pearson of paired values (None with fewer than 3 pairs or a constant side)."""
    from scipy.stats import pearsonr, spearmanr
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"n": len(x), "spearman": None, "pearson": None}
    return {"n": len(x), "spearman": float(spearmanr(x, y).statistic), "pearson": float(pearsonr(x, y).statistic)}


def quantile_groups(losses: Sequence[float], quantiles: int) -> list[np.ndarray]:
    """The images' indices split by loss into `quantiles` groups of (nearly) equal size, lowest loss first."""
    return np.array_split(np.argsort(np.asarray(losses), kind="stable"), quantiles)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def spread(values: Sequence[float | None]) -> dict:
    """Over the runs: the mean, half the range (None with one run) and the values (None where unmeasured)."""
    known = [v for v in values if v is not None]
    return {"mean": float(np.mean(known)) if known else None,
            "half_range": float(np.ptp(known)) / 2 if len(known) > 1 else None, "values": list(values)}


def run_figures(source: dict, dusa: dict, images: list[dict] | None, corruptions: Sequence[str],
                 classes: Sequence[str], quantiles: int) -> dict:
    """One dusa run against its source: per corruption and pooled (see the module's docstring). `source`,
    `dusa`: results.json's tasks; `images`: the dusa run's images.csv rows (None: the run has none)."""
    out: dict = {"tasks": {}, "points": {}}  # points: per corruption, every image's (loss, pixel error)
    pooled_loss, pooled_error, binned = [], [], [[] for _ in range(quantiles)]
    within, all_recalls = [], []
    for task in corruptions:
        iou_s, iou_d = source[task]["IoU"], dusa[task]["IoU"]
        gain = None if None in (dusa[task]["mIoU"], source[task]["mIoU"]) else dusa[task]["mIoU"] - source[task]["mIoU"]
        entry = {"mIoU_gain": gain,  # None: mIoU undefined in either run
                 "class_IoU_change": {c: None if iou_s.get(c) is None or iou_d.get(c) is None else iou_d[c] - iou_s[c]
                                      for c in classes}}
        if images is not None:
            rows = [r for r in images if r["task"] == task and r["loss"] is not None and r["pixel_error"] is not None
                    and math.isfinite(r["loss"])]
            recalls = [r["candidate_recall"] for r in images if r["task"] == task and r["candidate_recall"] is not None]
            losses, errors = [r["loss"] for r in rows], [r["pixel_error"] for r in rows]
            groups = quantile_groups(losses, quantiles) if len(rows) >= quantiles else []
            entry.update(
                candidate_recall=_mean(recalls), all_true_classes=_mean([float(v == 1.0) for v in recalls]),
                loss_vs_error=correlation(losses, errors),
                error_by_loss_quantile=[float(np.mean([errors[i] for i in g])) for g in groups] or None)
            out["points"][task] = [[loss, error] for loss, error in zip(losses, errors)]
            all_recalls += recalls
            pooled_loss += losses
            pooled_error += errors
            for q, g in enumerate(groups):
                binned[q] += [errors[i] for i in g]
            within.append(entry["loss_vs_error"]["spearman"])
        out["tasks"][task] = entry
    gains = [out["tasks"][t]["mIoU_gain"] for t in corruptions]
    out["mIoU_gain"] = None if None in gains else float(np.mean(gains))
    if images is not None:
        out["loss_vs_error_pooled"] = correlation(pooled_loss, pooled_error)
        out["spearman_mean_within"] = None if None in within else float(np.mean(within))
        out["error_by_loss_quantile"] = [float(np.mean(b)) for b in binned] if all(binned) else None
        out["candidate_recall"] = _mean(all_recalls)  # over every image (the corruptions have as many each)
        out["all_true_classes"] = _mean([float(v == 1.0) for v in all_recalls])
    return out


def verdict(tasks: dict, min_spearman: float, gain_points: float) -> dict:
    """The declared rule. A corruption gains when dusa - source mIoU > `gain_points` (mean over the runs); its
    gain is explained when, in every run, the loss ranks its images by their error: Spearman >= `min_spearman`
    (unmeasured: not explained). The gain is explained when every gaining corruption's is; partly when some are;
    unexplained when none is."""
    gaining = [t for t, e in tasks.items() if (e["mIoU_gain"]["mean"] or 0) > gain_points]
    explained = [t for t in gaining if None not in (values := tasks[t]["spearman"]["values"])
                 and min(values) >= min_spearman]
    if not gaining:
        word, text = "nothing to explain", f"dusa gains over {gain_points:g} mIoU point on no corruption"
    elif len(explained) == len(gaining):
        word, text = "explained", ("the DUSA loss ranks the images by their pixel error on every corruption where "
                                   "dusa gains")
    elif explained:
        word, text = "partly explained", (f"the DUSA loss ranks the images by their pixel error on "
                                          f"{', '.join(explained)} only, of the corruptions where dusa gains "
                                          f"({', '.join(gaining)})")
    else:
        word, text = "unexplained", ("on no corruption where dusa gains does the DUSA loss rank the images by their "
                                     "pixel error")
    return {"verdict": word, "gaining": gaining, "explained": explained,
            "rule": (f"a corruption gains when dusa - source mIoU is over {gain_points:g} point (mean over the runs); "
                     f"its gain is explained when, in every run, the DUSA loss ranks its images by their pixel error "
                     f"after adaptation (Spearman >= {min_spearman:g}); the gain is explained when every gaining "
                     f"corruption's is, partly when some are, unexplained when none is"),
            "text": text}


def analyse(pairs: dict[str, tuple[dict, dict, list[dict] | None]], corruptions: Sequence[str],
            classes: Sequence[str], quantiles: int, min_spearman: float, gain_points: float) -> dict:
    """The section: per run (`pairs`: its label -> its source's and its own results.json tasks and its images.csv
    rows, None without one), then over the runs."""
    runs = list(pairs)
    per_run = {r: run_figures(source, dusa, images, corruptions, classes, quantiles)
               for r, (source, dusa, images) in pairs.items()}
    measured = all(images is not None for _, _, images in pairs.values())

    def over(get) -> dict:
        values = []
        for r in runs:
            try:
                values.append(get(per_run[r]))
            except (KeyError, TypeError):
                values.append(None)
        return spread(values)

    def quantile_spread(get) -> list[dict] | None:
        lists = [get(per_run[r]) if measured else None for r in runs]
        if None in lists:
            return None
        return [spread([lst[q] for lst in lists]) for q in range(quantiles)]

    tasks = {}
    for t in corruptions:
        tasks[t] = {"mIoU_gain": over(lambda f: f["tasks"][t]["mIoU_gain"]),
                    "class_IoU_change": {c: over(lambda f: f["tasks"][t]["class_IoU_change"][c]) for c in classes}}
        if measured:
            tasks[t].update(
                candidate_recall=over(lambda f: f["tasks"][t]["candidate_recall"]),
                all_true_classes=over(lambda f: f["tasks"][t]["all_true_classes"]),
                spearman=over(lambda f: f["tasks"][t]["loss_vs_error"]["spearman"]),
                pearson=over(lambda f: f["tasks"][t]["loss_vs_error"]["pearson"]),
                images=over(lambda f: f["tasks"][t]["loss_vs_error"]["n"]),
                error_by_loss_quantile=quantile_spread(lambda f: f["tasks"][t]["error_by_loss_quantile"]))
    document = {"runs": runs, "quantiles": quantiles, "per_run": per_run, "tasks": tasks,
                "pooled": {"mIoU_gain": over(lambda f: f["mIoU_gain"])}}
    if measured:
        document["pooled"].update(
            candidate_recall=over(lambda f: f["candidate_recall"]),
            all_true_classes=over(lambda f: f["all_true_classes"]),
            spearman=over(lambda f: f["loss_vs_error_pooled"]["spearman"]),
            pearson=over(lambda f: f["loss_vs_error_pooled"]["pearson"]),
            spearman_mean_within=over(lambda f: f["spearman_mean_within"]),
            error_by_loss_quantile=quantile_spread(lambda f: f["error_by_loss_quantile"]))
        document["verdict"] = verdict(tasks, min_spearman, gain_points)
    else:
        document["verdict"] = {"verdict": "not measured", "text": "a dusa run of the pair has no images.csv (made "
                               "before the loop kept per-image figures): rerun it in a fresh workdir"}
    return document


HEADLINES = {"explained": "the gain is EXPLAINED", "partly explained": "the gain is PARTLY EXPLAINED",
             "unexplained": "the gain REMAINS UNEXPLAINED", "nothing to explain": "NO GAIN TO EXPLAIN",
             "not measured": "NOT MEASURED"}


def _cell(s: dict | None, digits: int = 1, sign: bool = False, scale: float = 1.0) -> str:
    if s is None or s["mean"] is None:
        return "–"
    fmt = f"{'+' if sign else ''}.{digits}f"
    text = format(scale * s["mean"], fmt)
    return text if s["half_range"] is None else f"{text} ± {format(scale * s['half_range'], f'.{digits}f')}"


def analysis_markdown(document: dict, label: str) -> str:
    """The section as Markdown: a table per corruption and pooled, the per-class changes, the verdict."""
    runs = document["runs"]
    tasks, pooled = document["tasks"], document["pooled"]
    lines = [f"Analysis (declared before its results): {label}, per run, then mean ± half range over the "
             f"{len(runs)} run{'s' if len(runs) > 1 else ''} ({'; '.join(runs)}); per image from each run's "
             f"images.csv (the prediction scored at each step, after adapting on the images before it)."]
    measured = "spearman" in pooled
    if measured:
        q = document["quantiles"]
        head = ["corruption", "mIoU gain", "candidate recall", "images with every true class (%)",
                "Spearman loss vs error", "Pearson", f"pixel error % by loss {q}-quantile, low to high", "explained"]
        lines += ["", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 2) + " --- |"]
        verdict = document["verdict"]
        for name, entry in [*tasks.items(), ("pooled", pooled)]:
            quantiles = entry.get("error_by_loss_quantile")
            by_q = " / ".join(f"{s['mean']:.1f}" for s in quantiles) if quantiles else "–"
            spearman = _cell(entry["spearman"], 2)
            if name == "pooled":
                spearman += f" (within: {_cell(entry['spearman_mean_within'], 2)})"
                flag = verdict["verdict"]
            else:
                flag = "yes" if name in verdict["explained"] else "no" if name in verdict["gaining"] else "no gain"
            lines.append(f"| {name} | {_cell(entry['mIoU_gain'], sign=True)} | {_cell(entry['candidate_recall'], 2)} | "
                         f"{_cell(entry['all_true_classes'], 0, scale=100)} | "
                         f"{spearman} | {_cell(entry['pearson'], 2)} | {by_q} | {flag} |")
    else:
        lines.append("")
        lines.append("mIoU gain per corruption: " + ", ".join(f"{t} {_cell(e['mIoU_gain'], sign=True)}"
                                                             for t, e in tasks.items()) + ".")
    classes = list(next(iter(tasks.values()))["class_IoU_change"]) if tasks else []
    lines += ["", "Per-class IoU change, dusa - source (points):", "",
              "| class | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    lines += [f"| {c} | " + " | ".join(_cell(tasks[t]["class_IoU_change"][c], sign=True) for t in tasks) + " |"
              for c in classes]
    v = document["verdict"]
    lines += ["", f"**Verdict: {HEADLINES[v['verdict']]}**: {v['text']}."
              + (f" Rule, fixed before the results: {v['rule']}." if "rule" in v else "")]
    return "\n".join(lines)


def plot_analysis(document: dict, path: Path, title: str) -> None:
    """Per corruption, the DUSA loss against the pixel error of every image (one colour per run; the loss
    scaled to the corruption's range), with its Spearman; below, the per-class IoU change as a coloured grid
    (blue: dusa gains, red: it loses). PIL only."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=14)
    tasks = list(document["tasks"])
    classes = list(next(iter(document["tasks"].values()))["class_IoU_change"]) if tasks else []
    panel, pad, top = 220, 50, 100
    cell_h, label_w = 22, 110
    width = max(pad + len(tasks) * (panel + pad), label_w + 90 * len(tasks) + pad, 1100)  # the title's width
    height = top + panel + 70 + cell_h * (len(classes) + 1) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    headline = HEADLINES[document["verdict"]["verdict"]].lower()
    draw.text((10, 30), f"verdict: {headline}; x: DUSA loss (scaled per corruption), "
                        "y: pixel error % after adaptation (0-100)", fill="black", font=font)
    colours = [(8, 69, 148), (241, 105, 19), (0, 109, 44), (166, 54, 3)]
    for k, run in enumerate(document["runs"]):
        draw.ellipse([10 + 200 * k, 54, 18 + 200 * k, 62], fill=colours[k % len(colours)])
        draw.text((24 + 200 * k, 50), run, fill="black", font=font)
    for k, task in enumerate(tasks):
        x0, y0 = pad + k * (panel + pad), top + 20
        draw.rectangle([x0, y0, x0 + panel, y0 + panel], outline="black")
        entry = document["tasks"][task]
        draw.text((x0, y0 - 36), f"{task}: mIoU gain {_cell(entry['mIoU_gain'], sign=True)}", fill="black", font=font)
        draw.text((x0, y0 - 18), f"Spearman {_cell(entry.get('spearman'), 2)}", fill="black", font=font)
        for s, run in enumerate(document["runs"]):
            figures = document["per_run"][run].get("points", {}).get(task) or []
            if not figures:
                continue
            losses = [p[0] for p in figures]
            lo, hi = min(losses), max(losses)
            for loss, error in figures:
                x = x0 + 4 + (panel - 8) * ((loss - lo) / (hi - lo) if hi > lo else 0.5)
                y = y0 + panel - 4 - (panel - 8) * min(max(error, 0.0), 100.0) / 100
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[s % len(colours)])
    y0 = top + panel + 60
    draw.text((10, y0 - 22), "per-class IoU change, dusa - source (points, mean over the runs)", fill="black",
              font=font)
    for k, task in enumerate(tasks):
        draw.text((label_w + 90 * k, y0), task, fill="black", font=font)
    for r, c in enumerate(classes):
        y = y0 + cell_h * (r + 1)
        draw.text((10, y + 3), c, fill="black", font=font)
        for k, task in enumerate(tasks):
            change = document["tasks"][task]["class_IoU_change"][c]["mean"]
            x = label_w + 90 * k
            if change is None:
                fill = (235, 235, 235)
            else:
                strength = min(abs(change) / 30, 1.0)
                fill = tuple(int(255 - strength * (255 - v)) for v in ((33, 102, 172) if change > 0 else (178, 24, 43)))
            draw.rectangle([x, y, x + 86, y + cell_h - 2], fill=fill)
            draw.text((x + 6, y + 3), "n/a" if change is None else f"{change:+.1f}", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
