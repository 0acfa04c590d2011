"""A small synthetic COCO dataset of coloured shapes, for tests and quick experiments.

Each class is one shape in one saturated colour (a red rectangle, a green ellipse, ...)
drawn on a grey, textured, noisy background, from small to large, with little overlap,
so a detector can learn it in minutes on a CPU. Category ids are the odd numbers
1, 3, 5, ... so loading exercises the id → label remapping. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_synthetic_coco", "synthetic_image"]

#: (name, RGB colour) of every class, in category order.
SHAPES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("rectangle", (220, 40, 40)),
    ("ellipse", (40, 190, 60)),
    ("triangle", (40, 80, 230)),
    ("cross", (235, 210, 40)),
    ("ring", (200, 50, 200)),
    ("diamond", (40, 200, 210)),
)

_MIN_SIDE, _MAX_SIDE = 0.1, 0.45  # object size as a fraction of the image's shorter side
_MAX_OVERLAP = 0.15  # intersection / area of the smaller box, at most
_EMPTY_FRACTION = 0.1  # images without objects
_PLACEMENT_TRIES = 30


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey gradient + low-contrast grey blotches: texture without shape-like colour."""
    base = rng.uniform(70, 180)
    gy, gx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    img = base + rng.uniform(-30, 30) * gx + rng.uniform(-30, 30) * gy
    img = np.repeat(img[:, :, None], 3, axis=2)
    img += rng.uniform(-8, 8, size=3)  # a faint tint, far from the shapes' saturation
    for _ in range(int(rng.integers(3, 8))):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        bh, bw = int(rng.integers(h // 10, h // 2)), int(rng.integers(w // 10, w // 2))
        img[y0 : y0 + bh, x0 : x0 + bw] += rng.uniform(-25, 25)
    return img


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw ``shape`` filling the pixel box ``(x0, y0, x1, y1)`` (inclusive corners)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = x1 - x0 + 1, y1 - y0 + 1
    if shape == "rectangle":
        draw.rectangle(box, fill=fill)
    elif shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        draw.rectangle((x0, round(y0 + h / 3), x1, round(y0 + 2 * h / 3)), fill=fill)
        draw.rectangle((round(x0 + w / 3), y0, round(x0 + 2 * w / 3), y1), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, min(w, h) // 5))
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, h: int, w: int, placed: list) -> tuple | None:
    """A box (x0, y0, bw, bh) inside the image overlapping little with ``placed``."""
    short = min(h, w)
    for _ in range(_PLACEMENT_TRIES):
        side = short * math.exp(rng.uniform(math.log(_MIN_SIDE), math.log(_MAX_SIDE)))
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        bw = max(8, min(w, round(side * math.sqrt(aspect))))
        bh = max(8, min(h, round(side / math.sqrt(aspect))))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        ok = True
        for px, py, pw, ph in placed:
            iw = min(x0 + bw, px + pw) - max(x0, px)
            ih = min(y0 + bh, py + ph) - max(y0, py)
            if iw > 0 and ih > 0 and iw * ih > _MAX_OVERLAP * min(bw * bh, pw * ph):
                ok = False
                break
        if ok:
            return x0, y0, bw, bh
    return None


def _image_size(rng: np.random.Generator, image_size) -> tuple[int, int]:
    h, w = image_size
    if isinstance(h, int) and isinstance(w, int):
        return h, w
    return int(rng.integers(h[0], h[1] + 1)), int(rng.integers(w[0], w[1] + 1))


def _render(rng: np.random.Generator, h: int, w: int, max_objects: int | None,
            num_classes: int) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """One noisy image (uint8 [h, w, 3]) with 1..``max_objects`` shapes (none for None),
    and its objects as (label, (x0, y0, w, h))."""
    canvas = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    count = 0 if max_objects is None else int(rng.integers(1, max_objects + 1))
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(count):
        box = _place(rng, h, w, placed)
        if box is None:
            continue
        placed.append(box)
        label = int(rng.integers(num_classes))
        name, colour = SHAPES[label]
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
        x0, y0, bw, bh = box
        _draw(draw, name, (x0, y0, x0 + bw - 1, y0 + bh - 1), fill)
        objects.append((label, box))
    noisy = np.asarray(canvas, np.float32) + rng.normal(0.0, 8.0, size=(h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), objects


def synthetic_image(height: int = 480, width: int = 640, seed: int = 0,
                    max_objects: int = 6) -> np.ndarray:
    """One image of the synthetic dataset's kind (uint8 [H, W, 3]), deterministic for a
    seed: something to detect on when no photo is at hand."""
    return _render(np.random.default_rng(seed), height, width, max_objects, len(SHAPES))[0]


def _make_split(
    rng: np.random.Generator,
    image_dir: Path,
    num_images: int,
    image_size,
    num_classes: int,
    max_objects: int,
) -> dict:
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    # A fixed share of negatives (at least one when there are two images or more).
    num_empty = int(np.ceil(_EMPTY_FRACTION * num_images)) if num_images >= 2 else 0
    empty = set(rng.choice(num_images, size=num_empty, replace=False).tolist())
    for image_id in range(1, num_images + 1):
        h, w = _image_size(rng, image_size)
        count = None if image_id - 1 in empty else max_objects
        pixels, objects = _render(rng, h, w, count, num_classes)
        for label, (x0, y0, bw, bh) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 2 * label + 1,
                    "bbox": [float(x0), float(y0), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    categories = [
        {"id": 2 * i + 1, "name": SHAPES[i][0], "supercategory": "shape"}
        for i in range(num_classes)
    ]
    return {
        "info": {"description": "dinodet synthetic shapes"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def make_synthetic_coco(
    out_dir: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    image_size: tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = (320, 320),
    num_classes: int = 4,
    max_objects: int = 6,
    seed: int = 0,
) -> dict[str, Path]:
    """Write a train and a val split of COCO json + JPEG images under ``out_dir``.

    Args:
        image_size: ``(h, w)``, or ``((h_min, h_max), (w_min, w_max))`` drawn per image.
        num_classes: 1..6 shape classes, category ids 1, 3, 5, ...
        max_objects: most objects in one image (10% of the images, rounded up, have none).

    Returns:
        ``{"root", "train_ann", "train_images", "val_ann", "val_images"}`` as paths.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be ≥ 1, got {max_objects}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"root": root}
    for split_index, (split, num_images) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_index])
        coco = _make_split(rng, root / split, num_images, image_size, num_classes, max_objects)
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps(coco))
        paths[f"{split}_ann"] = ann_file
        paths[f"{split}_images"] = root / split
    return paths
