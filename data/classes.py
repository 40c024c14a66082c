"""ADE20K (SceneParsing, ADEChallengeData2016) class names, a palette for pictures, and the names of
the ADE20K-C corruptions and image files (kept here, free of torch, for the builder's workers too).

Train id i is annotation value i + 1 (0 in the annotation PNGs is "other"/ignored); the order
is the one of SegFormer's `id2label` / mmsegmentation's ADE20KDataset.
"""
from __future__ import annotations

import re

# The 15 benchmark corruptions, in imagecorruptions' order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# imagecorruptions' 4 held-out corruptions (`get_corruption_names("validation")`): for choosing hyper-parameters,
# never for reporting (bench/select_lr.py).
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# A name that becomes one component of a path (a task's folders under the data root, `pictures/<task>/`,
# `state/<task>`): letters, digits, `_`, `-`, `.` and `+`, starting with a letter or digit (no `..`, no
# separator, nothing hidden).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def safe_name(name) -> bool:
    """Whether `name` may be one component of a path this program writes or reads (see SAFE_NAME)."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None and ".." not in name


ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree",                                        # 0-4
    "ceiling", "road", "bed", "windowpane", "grass",                                   # 5-9
    "cabinet", "sidewalk", "person", "earth", "door",                                  # 10-14
    "table", "mountain", "plant", "curtain", "chair",                                  # 15-19
    "car", "water", "painting", "sofa", "shelf",                                       # 20-24
    "house", "sea", "mirror", "rug", "field",                                          # 25-29
    "armchair", "seat", "fence", "desk", "rock",                                       # 30-34
    "wardrobe", "lamp", "bathtub", "railing", "cushion",                               # 35-39
    "base", "box", "column", "signboard", "chest of drawers",                          # 40-44
    "counter", "sand", "sink", "skyscraper", "fireplace",                              # 45-49
    "refrigerator", "grandstand", "path", "stairs", "runway",                          # 50-54
    "case", "pool table", "pillow", "screen door", "stairway",                         # 55-59
    "river", "bridge", "bookcase", "blind", "coffee table",                            # 60-64
    "toilet", "flower", "book", "hill", "bench",                                       # 65-69
    "countertop", "stove", "palm", "kitchen island", "computer",                       # 70-74
    "swivel chair", "boat", "bar", "arcade machine", "hovel",                          # 75-79
    "bus", "towel", "light", "truck", "tower",                                         # 80-84
    "chandelier", "awning", "streetlight", "booth", "television receiver",             # 85-89
    "airplane", "dirt track", "apparel", "pole", "land",                               # 90-94
    "bannister", "escalator", "ottoman", "bottle", "buffet",                           # 95-99
    "poster", "stage", "van", "ship", "fountain",                                      # 100-104
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool",                 # 105-109
    "stool", "barrel", "basket", "waterfall", "tent",                                  # 110-114
    "bag", "minibike", "cradle", "oven", "ball",                                       # 115-119
    "food", "step", "tank", "trade name", "microwave",                                 # 120-124
    "pot", "animal", "bicycle", "lake", "dishwasher",                                  # 125-129
    "screen", "blanket", "sculpture", "hood", "sconce",                                # 130-134
    "vase", "traffic light", "tray", "ashcan", "fan",                                  # 135-139
    "pier", "crt screen", "plate", "monitor", "bulletin board",                        # 140-144
    "shower", "radiator", "glass", "clock", "flag",                                    # 145-149
)


def _bit_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Generated palette (not the official ADE20K colours): the bits of k = i + 1 are spread
    over the high bits of R, G and B in turn. This map is injective for k < 2**24, so every
    colour is distinct; starting at k = 1 keeps pure black out of the palette."""
    colours = []
    for i in range(n):
        k, r, g, b = i + 1, 0, 0, 0
        for bit in range(8):
            r |= ((k >> (3 * bit)) & 1) << (7 - bit)
            g |= ((k >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((k >> (3 * bit + 2)) & 1) << (7 - bit)
        colours.append((r, g, b))
    return tuple(colours)


ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = _bit_palette(len(ADE20K_CLASSES))

assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
assert len(set(ADE20K_PALETTE)) == 150


def check_class_names(classes, source: str, error: type[ValueError] = ValueError) -> None:
    """A class list names at least one class, each once, each printable text without a path separator (names
    go into prompts, CSV headers, W&B keys and picture legends; `error`: the caller's exception type)."""
    if not classes:
        raise error(f"class list {source} is empty")
    bad = [c for c in classes if not (isinstance(c, str) and c.isprintable() and not {"/", "\\"} & set(c)
                                      and c.strip() not in ("", ".", ".."))]
    if bad:
        raise error(f"class list {source} has a name that is not printable text without / or \\: {bad[0]!r}")
    from collections import Counter
    duplicates = sorted(c for c, n in Counter(classes).items() if n > 1)
    if duplicates:
        raise error(f"class list {source} has duplicates: {', '.join(map(repr, duplicates))}")


def read_class_names(path, error: type[ValueError] = ValueError) -> list[str]:
    """A class-list file (UTF-8, a leading byte-order mark dropped): one class per line; blank lines and lines
    starting with `#` are skipped."""
    from pathlib import Path
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise error(f"cannot read class list {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"class list {path} is not UTF-8 text") from None
    classes = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    check_class_names(classes, str(path), error)
    return classes


def load_class_names(spec: str) -> tuple[str, ...]:
    """The run's classes: `ade20k` (the 150 above), `cityscapes` (its 19 train ids) or a class-list file
    (`read_class_names`), line i being annotation value i + 1; a missing file, an empty list or a repeated name
    is a ValueError naming the file."""
    from data.datasets import class_list_of
    known = class_list_of(spec)
    if known is not None:
        return known
    try:
        return tuple(read_class_names(spec))
    except ValueError as exc:
        raise ValueError(f"data.classes: {exc} (give `ade20k`, `cityscapes` or a text file with one class name "
                         f"per line)") from None
