"""Pictures of a prediction for people to look at: input | prediction | ground truth, with a class legend.

PIL only. Classes are drawn in the ADE20K palette of `data/classes.py`; ignored pixels (255) are black.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data.classes import ADE20K_PALETTE

GAP = 4  # pixels between panels and around the text
TITLES = ("input", "prediction", "ground truth")


def colorize(label: torch.Tensor) -> Image.Image:
    """Train ids [H, W] -> RGB picture; ids outside the palette (the ignore index 255) are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:len(ADE20K_PALETTE)] = np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    ids = label.detach().cpu().long().clamp(0, 255).numpy().astype(np.uint8)
    return Image.fromarray(lut[ids])


def to_image(image: torch.Tensor) -> Image.Image:
    """Float [3, H, W] or [1, 3, H, W] in [0, 1] -> RGB picture."""
    pixels = image.detach().float().cpu().reshape(3, *image.shape[-2:]).clamp(0, 1).mul(255).round()
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy())


def classes_present(*labels: torch.Tensor, num_classes: int) -> list[int]:
    """Class ids that occur in any of the label maps, most pixels first."""
    counts = sum(torch.bincount(lab.detach().cpu().flatten().long().clamp(0, num_classes), minlength=num_classes + 1)
                 for lab in labels)[:num_classes]  # the last bin collects ignored pixels
    order = torch.sort(counts, descending=True, stable=True).indices
    return [int(c) for c in order if counts[c] > 0]


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def make_picture(image: torch.Tensor, prediction: torch.Tensor, label: torch.Tensor, class_names: Sequence[str],
                 notes: Sequence[str] = ()) -> Image.Image:
    """Input (resized to the label's size), prediction and ground truth side by side; titles above; below,
    `notes` (one paragraph each) and a legend of every class in the prediction or the ground truth."""
    h, w = label.shape[-2:]
    if tuple(prediction.shape[-2:]) != (h, w):
        raise ValueError(f"prediction is {tuple(prediction.shape[-2:])} but the label is {(h, w)}")
    panels = [to_image(image).resize((w, h), Image.BILINEAR), colorize(prediction), colorize(label)]
    font = ImageFont.load_default(size=max(12, h // 32))  # readable at full ADE size (512 px: 16 pt)
    line = int(font.getbbox("Hg")[3]) + GAP
    width = 3 * w + 4 * GAP

    # Legend entries (swatch + name) flow into rows that fit the width.
    swatch = line - GAP
    entries = [(c, class_names[c]) for c in classes_present(prediction, label, num_classes=len(class_names))]
    rows: list[list[tuple[int, str, int]]] = [[]]
    x = GAP
    for c, name in entries:
        size = swatch + GAP + int(font.getlength(name)) + 3 * GAP
        if rows[-1] and x + size > width:
            rows.append([])
            x = GAP
        rows[-1].append((c, name, x))
        x += size
    text = [wrapped for note in notes for wrapped in _wrap(note, font, width - 2 * GAP)]

    height = line + h + GAP + line * (len(text) + len(rows)) + GAP
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for k, (panel, title) in enumerate(zip(panels, TITLES)):
        left = GAP + k * (w + GAP)
        draw.text((left, 0), title, fill="black", font=font)
        picture.paste(panel, (left, line))
    y = line + h + GAP
    for paragraph in text:
        draw.text((GAP, y), paragraph, fill="black", font=font)
        y += line
    for row in rows:
        for c, name, x in row:
            draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(ADE20K_PALETTE[c]), outline="black")
            draw.text((x + swatch + GAP, y), name, fill="black", font=font)
        y += line
    return picture


def save_picture(picture: Image.Image, output_dir: str | Path, task: str, name: str) -> Path:
    """Writes `<output_dir>/pictures/<task>/<name>.png`; the task and the image's name are one path component
    each (never a separator or `..`: nothing is written outside `pictures/`)."""
    from pipeline.run.config import safe_name
    from pipeline.run.folder import write_atomic
    if not safe_name(task) or not name or {"/", "\\", "\0"} & set(name) or name in (".", ".."):
        raise ValueError(f"picture of task {task!r}, image {name!r}: not a name that can be a file under pictures/")
    path = Path(output_dir) / "pictures" / task / f"{name}.png"
    # A rename into place: never written through a link (or over a file) already at that name.
    return write_atomic(path, lambda f: picture.save(f, format="PNG"), root=Path(output_dir))
