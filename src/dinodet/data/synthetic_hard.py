"""A hard synthetic COCO dataset: small hand-drawn digits in cluttered, photo-like scenes.

Where :mod:`dinodet.data.synthetic` draws a few large shapes whose colour gives their class
away, this generator aims at what users' small real datasets look like (a few hundred
photos of small handwritten marks):

* **Classes by shape only.** Class ``d`` is the digit ``d`` drawn as pen strokes (polylines
  and arcs on a unit box), each instance with its own slant, shear, aspect, stroke width
  and jittered control points, in a random colour chosen only to contrast with the local
  background, so neither colour nor a fixed template identifies it.
* **Small objects.** Glyph heights are log-uniform in ``object_size`` (8-44 px at a
  256-px shorter side, scaled with the image), so most boxes are COCO "small"
  (area < 32²) and the rest "medium"; 1-12 of them per image.
* **Distractors.** Unlabelled strokes in the same pen style (letters such as A, H, K, M,
  N, T, V, W, X, Y, E and "+", and random scribbles) plus small solid blobs; letters that
  read as digits (O, I, S, Z, B, G, q) are left out so the labels stay unambiguous.
* **Clutter.** The background is a smooth two-colour gradient, multi-octave value noise,
  out-of-focus blobs and polygons, and ruled or stray lines; then global brightness,
  contrast and vignetting, an optional blur, sensor noise and JPEG compression.
* **A little occlusion.** A new stroke may cover at most ``max_occlusion`` (10%) of the
  pixels of an earlier labelled object, and labelled boxes barely overlap one another.

A box is tight around the visible pixels of its object (alpha >= 0.5 before the blur,
where no later stroke covers it), as COCO boxes are. Image ``i`` (its json id) of split
``s`` (0 train, 1 val) is ``hard_scene((seed, s, i), height, width, ...)``, so it can be
reproduced, with its pixel ownership map, from the json's image size alone. Category ids
are ``1..K``, named ``"0".."K-1"``. One 256-px image takes about 15-20 ms to render.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dinodet.data.synthetic import _image_size

__all__ = ["DIGIT_STROKES", "DISTRACTOR_STROKES", "HardScene", "hard_scene", "make_hard_coco"]

Stroke = list[tuple[float, float]]


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float,
         n: int = 12) -> Stroke:
    """Points of an elliptic arc from ``start`` to ``stop`` degrees (0 = right, 90 = down)."""
    angles = np.radians(np.linspace(start, stop, n))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


#: The pen strokes of each digit on a unit box (x right, y down), in class order 0..9.
DIGIT_STROKES: tuple[list[Stroke], ...] = (
    [_arc(0.5, 0.5, 0.5, 0.5, -90, 270, 24)],
    [[(0.2, 0.25), (0.6, 0.0), (0.6, 1.0)]],
    [[*_arc(0.5, 0.3, 0.45, 0.3, 190, 390), (0.0, 1.0), (1.0, 1.0)]],
    [[*_arc(0.45, 0.25, 0.45, 0.25, 200, 450), *_arc(0.45, 0.74, 0.5, 0.26, 270, 520)]],
    [[(0.75, 1.0), (0.75, 0.0), (0.0, 0.68), (1.0, 0.68)]],
    [[(0.9, 0.0), (0.2, 0.0), (0.13, 0.5), *_arc(0.5, 0.68, 0.45, 0.32, 215, 490, 14)]],
    [[(0.85, 0.04), (0.45, 0.06), (0.15, 0.35), *_arc(0.5, 0.72, 0.45, 0.28, 180, 540, 20)]],
    [[(0.0, 0.0), (1.0, 0.0), (0.35, 1.0)]],
    [_arc(0.5, 0.24, 0.38, 0.24, 90, 450, 18), _arc(0.5, 0.73, 0.48, 0.27, -90, 270, 20)],
    [_arc(0.45, 0.3, 0.45, 0.3, 0, 360, 20), [(0.9, 0.3), (0.75, 1.0)]],
)

#: Unlabelled glyphs in the same pen style (letters that do not read as a digit, and "+").
DISTRACTOR_STROKES: tuple[list[Stroke], ...] = (
    [[(0.0, 1.0), (0.5, 0.0), (1.0, 1.0)], [(0.22, 0.6), (0.78, 0.6)]],  # A
    [[(0.0, 0.0), (0.0, 1.0)], [(1.0, 0.0), (1.0, 1.0)], [(0.0, 0.5), (1.0, 0.5)]],  # H
    [[(0.0, 0.0), (0.0, 1.0)], [(1.0, 0.0), (0.0, 0.55), (1.0, 1.0)]],  # K
    [[(0.0, 1.0), (0.0, 0.0), (0.5, 0.6), (1.0, 0.0), (1.0, 1.0)]],  # M
    [[(0.0, 1.0), (0.0, 0.0), (1.0, 1.0), (1.0, 0.0)]],  # N
    [[(0.0, 0.0), (1.0, 0.0)], [(0.5, 0.0), (0.5, 1.0)]],  # T
    [[(0.0, 0.0), (0.5, 1.0), (1.0, 0.0)]],  # V
    [[(0.0, 0.0), (0.25, 1.0), (0.5, 0.4), (0.75, 1.0), (1.0, 0.0)]],  # W
    [[(0.0, 0.0), (1.0, 1.0)], [(1.0, 0.0), (0.0, 1.0)]],  # X
    [[(0.0, 0.0), (0.5, 0.5), (1.0, 0.0)], [(0.5, 0.5), (0.5, 1.0)]],  # Y
    [[(1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 1.0)], [(0.0, 0.5), (0.7, 0.5)]],  # E
    [[(0.5, 0.0), (0.5, 1.0)], [(0.0, 0.5), (1.0, 0.5)]],  # +
)

_SUPERSAMPLE = 2  # glyph masks are drawn at twice the size, then box-filtered down
_VISIBLE = 0.5  # alpha from which a pixel belongs to its object
_MAX_LABELLED_OVERLAP = 0.2  # labelled boxes: intersection / area of the smaller, at most
_PLACEMENT_TRIES = 25
_REFERENCE_SIDE = 256  # object_size is given for this shorter image side
# Standard normal quantiles at 256 equal steps of probability: a random byte through this
# table is a (quantised) Gaussian sample, several times cheaper than drawing one.
_GAUSS = np.asarray([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)


@dataclass(frozen=True)
class HardScene:
    """One rendered image: ``pixels`` uint8 [H, W, 3]; ``objects`` as (label,
    (x0, y0, w, h)) tight pixel boxes; ``owner`` int32 [H, W]: ``i + 1`` where
    ``objects[i]`` is visible, a negative id on a distractor, 0 on background; and the
    ``jpeg_quality`` it is saved with."""

    pixels: np.ndarray
    objects: list[tuple[int, tuple[int, int, int, int]]]
    owner: np.ndarray
    jpeg_quality: int


# --------------------------------------------------------------------------- background


def _noise_octaves(rng: np.random.Generator, h: int, w: int, amplitude: float) -> np.ndarray:
    """Multi-octave value noise [h, w, 3] around 0: coarse random grids resized bicubically,
    each octave half as strong as the one before; grey but for one tinted octave."""
    grey = np.zeros((h, w), np.float32)
    cells = int(rng.integers(2, 5))
    tinted = int(rng.integers(4))
    out = np.zeros((h, w, 3), np.float32)
    for octave in range(4):
        g = cells * 2**octave
        weight = amplitude * 0.55**octave / 127.5
        if octave == tinted:
            grid = rng.integers(0, 256, size=(g, g, 3), dtype=np.uint8)
            up = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
            out += (np.asarray(up, np.float32) - 127.5) * weight
        else:
            grid = rng.integers(0, 256, size=(g, g), dtype=np.uint8)
            up = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
            grey += (np.asarray(up, np.float32) - 127.5) * weight
    return out + grey[:, :, None]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float [h, w, 3]: a smooth gradient between two colours, octave noise and soft blobs
    (drawn and blurred at half resolution: they are out of focus anyway), then sharp ruled
    and stray lines."""
    sh, sw = max(1, h // 2), max(1, w // 2)
    c0, c1 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (math.cos(angle) * np.arange(sw, dtype=np.float32)[None, :] / sw
         + math.sin(angle) * np.arange(sh, dtype=np.float32)[:, None] / sh)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = c0 + (c1 - c0) * t[:, :, None]
    img += _noise_octaves(rng, sh, sw, rng.uniform(10, 45))
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    short = min(sh, sw)
    for _ in range(int(rng.integers(3, 14))):  # blobs and polygons, out of focus below
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        cx, cy = rng.uniform(0, sw), rng.uniform(0, sh)
        r = short * math.exp(rng.uniform(math.log(0.03), math.log(0.35)))
        if rng.random() < 0.5:
            rx, ry = r, r * rng.uniform(0.4, 1.0)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:
            k = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, size=k))
            radii = r * rng.uniform(0.5, 1.0, size=k)
            draw.polygon([(cx + q * math.cos(a), cy + q * math.sin(a))
                          for a, q in zip(angles, radii, strict=True)], fill=colour)
    blur = ImageFilter.BoxBlur(float(rng.uniform(0.5, 2.0)))
    small = small.filter(blur).filter(blur)  # two box passes: close to a Gaussian
    canvas = small.resize((w, h), Image.Resampling.BILINEAR)
    lines = canvas.copy()
    draw = ImageDraw.Draw(lines)
    if rng.random() < 0.4:  # ruled paper: parallel lines
        gap = rng.uniform(0.06, 0.15) * min(h, w)
        slope = rng.uniform(-0.05, 0.05) * w
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        y = rng.uniform(0, gap) - max(0.0, slope)
        while y < h + abs(slope):
            draw.line((0, y, w, y + slope), fill=colour, width=1)
            y += gap
    for _ in range(int(rng.integers(0, 5))):  # stray lines: edges, cracks, scratches
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = rng.uniform(0, 1, size=4) * (w, h, w, h)
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(Image.blend(canvas, lines, float(rng.uniform(0.35, 1.0))), np.float32)


# --------------------------------------------------------------------------- glyphs


def _glyph_alpha(rng: np.random.Generator, strokes: Sequence[Stroke], height: float,
                 aspect: float) -> np.ndarray:
    """Alpha [h, w] in [0, 1] of the strokes drawn by a slightly random hand: a box of
    ``height`` x ``height * aspect`` px, slanted, sheared and jittered."""
    theta = math.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.25, 0.25)
    jitter = rng.normal(0.0, 0.035, size=(sum(len(s) for s in strokes), 2))
    cos, sin = math.cos(theta), math.sin(theta)
    scale = height * _SUPERSAMPLE
    pts, k = [], 0
    for stroke in strokes:
        xy = np.asarray(stroke, np.float64) + jitter[k : k + len(stroke)]
        k += len(stroke)
        x, y = (xy[:, 0] - 0.5) * aspect, xy[:, 1] - 0.5
        x = x - shear * y
        pts.append(np.stack([cos * x - sin * y, sin * x + cos * y], 1) * scale)
    width = max(1.0, height * rng.uniform(0.08, 0.17)) * _SUPERSAMPLE
    allpts = np.concatenate(pts)
    pad = width / 2 + 2 * _SUPERSAMPLE
    lo = allpts.min(0) - pad
    size = np.ceil(allpts.max(0) + pad - lo).astype(int)
    size += (-size) % _SUPERSAMPLE  # whole pixels after the reduction
    mask = Image.new("L", (int(size[0]), int(size[1])), 0)
    draw = ImageDraw.Draw(mask)
    r = width / 2
    for p in pts:
        q = [(float(a), float(b)) for a, b in p - lo]
        draw.line(q, fill=255, width=round(width))
        if r >= 1.5:  # a round pen: its ends, and the corners of a stroke of few points
            # (an arc's many points turn too little to show a gap at the joints)
            for a, b in (q if len(q) <= 6 else (q[0], q[-1])):
                draw.ellipse((a - r, b - r, a + r, b + r), fill=255)
    return np.asarray(mask.reduce(_SUPERSAMPLE), np.float32) / 255.0


def _blob_alpha(rng: np.random.Generator, height: float, aspect: float) -> np.ndarray:
    """A small solid ellipse or polygon as a distractor."""
    w, h = max(3, round(height * aspect)), max(3, round(height))
    s = _SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(mask)
    if rng.random() < 0.5:
        draw.ellipse((0, 0, w * s - 1, h * s - 1), fill=255)
    else:
        k = int(rng.integers(3, 6))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=k))
        draw.polygon([((0.5 + 0.5 * math.cos(a)) * (w * s - 1),
                       (0.5 + 0.5 * math.sin(a)) * (h * s - 1)) for a in angles], fill=255)
    return np.asarray(mask.reduce(s), np.float32) / 255.0


def _distractor_alpha(rng: np.random.Generator, height: float) -> np.ndarray:
    """A letter, a scribble or a blob, about ``height`` px tall. A scribble zigzags
    through 6-9 random points (fewer could pass for a 1, 4 or 7)."""
    kind = rng.random()
    aspect = rng.uniform(0.5, 0.9)
    if kind < 0.55:
        strokes = DISTRACTOR_STROKES[int(rng.integers(len(DISTRACTOR_STROKES)))]
        return _glyph_alpha(rng, strokes, height, aspect)
    if kind < 0.8:
        n = int(rng.integers(6, 10))
        xs = np.linspace(0, 1, n) + rng.uniform(-0.1, 0.1, size=n)
        ys = np.where(np.arange(n) % 2 == 0, rng.uniform(0, 0.3, n), rng.uniform(0.7, 1, n))
        return _glyph_alpha(rng, [list(zip(xs.tolist(), ys.tolist(), strict=True))], height,
                            aspect * 1.5)
    return _blob_alpha(rng, height * rng.uniform(0.4, 0.9), rng.uniform(0.5, 1.5))


# --------------------------------------------------------------------------- scene


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _ink(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour whose luminance differs from the mean of ``background`` [n, 3] by
    35-130 (darker on light ground, lighter on dark ground, now and then the other way)."""
    bg = float(_luminance(background.reshape(-1, 3).mean(0)))
    sign = -1.0 if bg > 128 else 1.0
    if rng.random() < 0.15:
        sign = -sign
    target = bg + sign * rng.uniform(35, 130)
    if not 0 <= target <= 255:  # no room that way: go the other
        target = bg - sign * rng.uniform(35, 130)
    colour = rng.uniform(0, 255, size=3).astype(np.float32)
    colour += target - _luminance(colour)
    return np.clip(colour, 0, 255)


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller area of two (x0, y0, x1, y1) boxes (exclusive ends)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1)


def hard_scene(seed: int | Sequence[int], height: int = 256, width: int = 256,
               num_classes: int = 10, min_objects: int = 1, max_objects: int = 12,
               max_distractors: int = 8, object_size: tuple[float, float] = (8.0, 44.0),
               max_occlusion: float = 0.1) -> HardScene:
    """Render one image of the hard dataset, deterministic for ``seed`` (an int or a
    sequence of ints, as ``numpy.random.default_rng`` takes).

    ``object_size``: range of glyph heights in pixels at a 256-px shorter side (scaled in
    proportion for other sizes); ``max_occlusion``: the share of a labelled object's
    pixels later strokes may cover.
    """
    return _render(np.random.default_rng(seed), height, width, num_classes, min_objects,
                   max_objects, max_distractors, object_size, max_occlusion)


def _render(rng: np.random.Generator, h: int, w: int, num_classes: int, min_objects: int,
            max_objects: int, max_distractors: int, object_size: tuple[float, float],
            max_occlusion: float) -> HardScene:
    canvas = _background(rng, h, w).copy()
    owner = np.zeros((h, w), np.int32)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    n_distractors = int(rng.integers(0, max_distractors + 1))
    kinds = np.asarray([1] * n_objects + [0] * n_distractors)
    rng.shuffle(kinds)
    scale = min(h, w) / _REFERENCE_SIDE
    lo, hi = math.log(object_size[0] * scale), math.log(object_size[1] * scale)
    labels: list[int] = []  # of labelled thing i (owner id i + 1)
    full: list[int] = []  # its pixel count when drawn
    visible: list[int] = []  # its pixels no later stroke covers
    drawn_boxes: list[tuple[int, int, int, int]] = []  # its drawn extent, xyxy exclusive
    next_distractor = -1
    for labelled in kinds:
        glyph_h = math.exp(rng.uniform(lo, hi))
        if labelled:
            label = int(rng.integers(num_classes))
            alpha = _glyph_alpha(rng, DIGIT_STROKES[label], glyph_h, rng.uniform(0.55, 0.8))
        else:
            alpha = _distractor_alpha(rng, glyph_h)
        ah, aw = alpha.shape
        if ah > h or aw > w:
            continue
        solid = alpha >= _VISIBLE
        if not solid.any():
            continue
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, w - aw + 1)), int(rng.integers(0, h - ah + 1))
            box = (x0, y0, x0 + aw, y0 + ah)
            if labelled and any(_boxes_overlap(box, b) > _MAX_LABELLED_OVERLAP
                                for b in drawn_boxes):
                continue
            covered = owner[y0 : y0 + ah, x0 : x0 + aw][solid]
            ids, counts = np.unique(covered[covered > 0], return_counts=True)
            hits = list(zip(ids.tolist(), counts.tolist(), strict=True))
            if any(visible[i - 1] - c < (1 - max_occlusion) * full[i - 1] for i, c in hits):
                continue
            break
        else:
            continue
        region = canvas[y0 : y0 + ah, x0 : x0 + aw]
        colour = _ink(rng, region[solid])
        a = alpha[:, :, None] * rng.uniform(0.85, 1.0)
        region += (colour - region) * a
        for i, c in hits:
            visible[i - 1] -= c
        if labelled:
            labels.append(label)
            full.append(int(solid.sum()))
            visible.append(full[-1])
            drawn_boxes.append(box)
            thing = len(labels)
        else:
            thing, next_distractor = next_distractor, next_distractor - 1
        owner[y0 : y0 + ah, x0 : x0 + aw][solid] = thing
    objects = []
    for i, label in enumerate(labels):
        x0, y0, x1, y1 = drawn_boxes[i]
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == i + 1)
        bx, by = x0 + int(xs.min()), y0 + int(ys.min())
        objects.append((label, (bx, by, x0 + int(xs.max()) + 1 - bx,
                                y0 + int(ys.max()) + 1 - by)))
    pixels, quality = _photograph(rng, canvas)
    return HardScene(pixels, objects, owner, quality)


def _photograph(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, int]:
    """Camera-like global changes: vignetting, contrast, brightness, blur, noise; and the
    JPEG quality to save with."""
    h, w, _ = img.shape
    gy, gx = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    contrast = rng.uniform(0.6, 1.3)
    gain = (1.0 - rng.uniform(0.0, 0.35) * (gx**2 + gy**2) / 2).astype(np.float32) * contrast
    mean = float(img.mean())
    offset = mean * (1 - contrast) + rng.uniform(-35, 35)
    out = Image.fromarray(np.clip(img * gain[:, :, None] + offset, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:  # a 3x3 Gaussian of sigma 0.4-1 px: a little out of focus
        side = math.exp(-1 / (2 * rng.uniform(0.4, 1.0) ** 2))
        out = out.filter(ImageFilter.Kernel((3, 3), [side * side, side, side * side, side, 1,
                                                     side, side * side, side, side * side]))
    noise = _GAUSS[rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)]
    noise *= rng.uniform(2.0, 10.0)
    noise += np.asarray(out, np.float32)
    return np.clip(noise, 0, 255).astype(np.uint8), int(rng.integers(60, 96))


# --------------------------------------------------------------------------- COCO files


def make_hard_coco(
    out_dir: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    image_size: tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = (256, 256),
    seed: int = 0,
    num_classes: int = 10,
    min_objects: int = 1,
    max_objects: int = 12,
    max_distractors: int = 8,
    object_size: tuple[float, float] = (8.0, 44.0),
    max_occlusion: float = 0.1,
) -> dict[str, Path]:
    """Write a train and a val split of the hard dataset (COCO json + JPEG images) under
    ``out_dir``, in the layout of :func:`~dinodet.data.synthetic.make_synthetic_coco`.

    Args:
        image_size: ``(h, w)``, or ``((h_min, h_max), (w_min, w_max))`` drawn per image.
        num_classes: 1..10 digit classes, category ids 1..K named "0".."K-1".
        min_objects, max_objects: labelled objects per image, drawn uniformly (fewer when
            the image has no room left for one).
        max_distractors: most unlabelled look-alikes per image (0..max drawn uniformly).
        object_size, max_occlusion: as in :func:`hard_scene`.

    Returns:
        ``{"root", "train_ann", "train_images", "val_ann", "val_images"}`` as paths.
    """
    if not 1 <= num_classes <= len(DIGIT_STROKES):
        raise ValueError(f"num_classes must be in 1..{len(DIGIT_STROKES)}, got {num_classes}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, "
                         f"{max_objects}")
    if not 0 < object_size[0] <= object_size[1]:
        raise ValueError(f"object_size must be (min, max) with 0 < min <= max, got "
                         f"{object_size}")
    if not 0.0 <= max_occlusion < 1.0:
        raise ValueError(f"max_occlusion must be in [0, 1), got {max_occlusion}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"root": root}
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"}
                  for d in range(num_classes)]
    for split_index, (split, num_images) in enumerate((("train", num_train), ("val", num_val))):
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images: list[dict] = []
        annotations: list[dict] = []
        sizes = np.random.default_rng([seed, split_index])
        for image_id in range(1, num_images + 1):
            h, w = _image_size(sizes, image_size)
            scene = hard_scene((seed, split_index, image_id), h, w, num_classes, min_objects,
                               max_objects, max_distractors, object_size, max_occlusion)
            for label, (x0, y0, bw, bh) in scene.objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [float(x0), float(y0), float(bw), float(bh)],
                    "area": float(bw * bh), "iscrowd": 0,
                })
            file_name = f"{image_id:06d}.jpg"
            Image.fromarray(scene.pixels).save(image_dir / file_name,
                                               quality=scene.jpeg_quality)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        coco = {"info": {"description": "dinodet hard synthetic digits"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.write_text(json.dumps(coco))
        paths[f"{split}_ann"] = ann_file
        paths[f"{split}_images"] = image_dir
    return paths
