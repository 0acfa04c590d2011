"""Sliced inference: small objects in large images (aerial photos, scanned pages,
microscopy) are found by running the model on overlapping tiles at the model's size
instead of on the whole image shrunk to it.

An image is cut into a grid of ``tile`` x ``tile`` crops (:func:`tile_grid`) that cover it
exactly: neighbours share at least ``overlap`` of a tile, the last tiles lie flush with the
right and bottom borders, and a side shorter than a tile is one tile of that side's length.
All tiles of a batch of images go through the model in batched calls, ``batch_size`` tiles
a call (tiles of the same size: no padding); the boxes are moved back to image pixels and
merged across tiles, per class, by NMS or weighted box fusion (:func:`merge_nms`,
:func:`merge_wbf`), with the detections of an optional pass on the whole image
(``full=True``, for the objects larger than a tile).

Boxes cut by a tile border: a box touching an inner edge of its tile (an edge that is not
the image's border, within ``edge`` pixels) is *cut*. A cut box is dropped when another
tile holds it away from that tile's own inner edges (that tile sees the object whole,
always so for objects no larger than the overlap), or when it lies mostly (intersection
over its area > ``iou``) inside a full-pass detection of its class. The cut boxes left
(objects larger than the overlap) are stitched: two cut boxes of one class from different
tiles are parts of one object when, clipped to the region both tiles see (the same pixels),
they agree (IoU > ``iou``); the parts of an object become their union (score: the
highest). Then the merge.

The model is any callable ``run(tiles) -> per-tile detections``
(:data:`TileRunner`): :class:`~dinodet.predict.Detector` builds one from its model and
transform (``Detector(..., slice=(640, 0.2))``), :func:`exported_runner` from an
:class:`~dinodet.export.ExportedModel`; slicing and merging happen outside the model, so
an exported graph slices as well as a PyTorch one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from dinodet.errors import UserError

if TYPE_CHECKING:
    from dinodet.export import ExportedModel

__all__ = ["MERGES", "Slicing", "TileRunner", "as_slicing", "cut_boxes", "exported_runner",
           "merge_nms", "merge_wbf", "sliced_detect", "sliced_detect_batch", "tile_grid"]

#: (boxes [K, 4] xyxy, scores [K], labels [K] int64) of one tile or image.
Found = tuple[Tensor, Tensor, Tensor]
#: The model: a [N, 3, h, w] batch of tiles (crops of the image as given, e.g. uint8 RGB)
#: -> N (boxes xyxy in the tile's pixels, scores, labels), the threshold already applied.
TileRunner = Callable[[Tensor], Sequence[Found]]
#: Tile (or image) box: (x0, y0, x1, y1) in pixels, x1 / y1 exclusive.
Box = tuple[int, int, int, int]
MERGES = ("nms", "wbf")
#: The smallest tile: a model sees too little of a smaller one.
MIN_TILE = 32


@dataclass(frozen=True)
class Slicing:
    """How to slice: ``tile`` side in pixels of the image (>= 32), ``overlap`` the share
    of a tile its neighbour covers at least, in [0, 1); ``merge`` "nms" or "wbf" with its
    ``iou`` threshold in [0, 1]; ``full`` adds a pass on the whole image; ``batch_size``
    tiles a model call; ``edge`` pixels within which a box touches a tile's inner edge."""

    tile: int
    overlap: float = 0.2
    merge: Literal["nms", "wbf"] = "nms"
    iou: float = 0.5
    full: bool = False
    batch_size: int = 8
    edge: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or \
                self.tile < MIN_TILE:
            raise UserError(f"slice tile (--slice) must be an integer >= {MIN_TILE} (pixels "
                            f"of the image), got {self.tile!r}")
        if not _number(self.overlap) or not 0 <= self.overlap < 1:
            raise UserError("slice overlap (--overlap) must be a number in [0, 1) (the share "
                            f"of a tile its neighbour covers), got {self.overlap!r}")
        if self.merge not in MERGES:
            raise UserError(f"slice merge (--slice-merge) must be one of {', '.join(MERGES)}, "
                            f"got {self.merge!r}")
        if not _number(self.iou) or not 0 <= self.iou <= 1:
            raise UserError(f"slice iou (--slice-iou) must be a number in [0, 1], got "
                            f"{self.iou!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or \
                self.batch_size < 1:
            raise UserError(f"slice batch_size must be an integer >= 1, got "
                            f"{self.batch_size!r}")
        if not _number(self.edge) or self.edge < 0:
            raise UserError(f"slice edge must be a number >= 0 (pixels), got {self.edge!r}")


    @classmethod
    def from_options(cls, tile: int | None, overlap: float | None = None,
                     merge: str | None = None, iou: float | None = None,
                     full: bool | None = None, batch_size: int = 8) -> Slicing | None:
        """``dinodet predict``'s --slice, --overlap, --slice-merge, --slice-iou,
        --slice-full (None: not given) -> a Slicing, None without --slice; the others
        without --slice are a :class:`~dinodet.errors.UserError`."""
        if tile is None:
            given = [name for name, value in [("--overlap", overlap), ("--slice-merge", merge),
                                              ("--slice-iou", iou), ("--slice-full", full)]
                     if value is not None]
            if given:
                raise UserError(f"{', '.join(given)} only apply with --slice TILE")
            return None
        return cls(tile, 0.2 if overlap is None else overlap,
                   merge or "nms",  # type: ignore[arg-type]  # checked by __post_init__
                   0.5 if iou is None else iou, bool(full), batch_size)


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and abs(value) != float("inf"))


def as_slicing(value: Any) -> Slicing | None:
    """``slice=`` of the Detector: None or False: no slicing; a :class:`Slicing`; a tile
    side; or ``(tile, overlap)``. Anything else is a :class:`~dinodet.errors.UserError`."""
    if value is None or value is False:
        return None
    if isinstance(value, Slicing):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Slicing(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Slicing(value[0], value[1])
    raise UserError(f"slice must be (tile, overlap), a tile size, a dinodet.slicing.Slicing "
                    f"or None, got {value!r}")


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Starts of the fewest tiles along one side whose neighbours share at least
    ``overlap`` of a tile, spread evenly from 0 to ``length - tile``."""
    if length <= tile:
        return [0]
    shared = min(int(overlap * tile), tile - 1)  # a step of at least one pixel
    step = tile - shared
    count = 1 + -(-(length - tile) // step)  # ceil
    last = length - tile
    return [round(i * last / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, tile: int, overlap: float = 0.2) -> list[Box]:
    """The tiles of a (``height``, ``width``) image, row by row: (x0, y0, x1, y1), all of
    one size, min(``tile``, side) per side; see the module docstring."""
    if height < 1 or width < 1:
        raise ValueError(f"an image of {height}x{width} has no tiles")
    th, tw = min(tile, height), min(tile, width)
    return [(x, y, x + tw, y + th) for y in _starts(height, tile, overlap)
            for x in _starts(width, tile, overlap)]


def cut_boxes(boxes: Tensor, tile: Box, image_size: tuple[int, int],
              edge: float = 2.0) -> Tensor:
    """[K] bool: the boxes (image pixels) that touch an inner edge of ``tile``, an edge
    that is not the border of the (h, w) image, within ``edge`` pixels."""
    x0, y0, x1, y1 = tile
    h, w = image_size
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + edge
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + edge
    if x1 < w:
        cut |= boxes[:, 2] >= x1 - edge
    if y1 < h:
        cut |= boxes[:, 3] >= y1 - edge
    return cut


def _inside_uncut(boxes: Tensor, tiles: Tensor, image_size: tuple[int, int],
                  edge: float) -> Tensor:
    """[K, T] bool: box k lies inside tile t and touches none of its inner edges."""
    h, w = image_size
    b = boxes[:, None, :]
    x0, y0, x1, y1 = (tiles[None, :, i] for i in range(4))
    # an inner edge needs the box strictly beyond ``edge`` from it; a border, only inside
    lo_x = torch.where(x0 > 0, x0 + edge, x0.new_full((), float("-inf")))
    lo_y = torch.where(y0 > 0, y0 + edge, y0.new_full((), float("-inf")))
    hi_x = torch.where(x1 < w, x1 - edge, x1.new_full((), float("inf")))
    hi_y = torch.where(y1 < h, y1 - edge, y1.new_full((), float("inf")))
    return ((b[..., 0] > lo_x) & (b[..., 1] > lo_y) & (b[..., 2] < hi_x) & (b[..., 3] < hi_y)
            & (b[..., 0] >= x0) & (b[..., 1] >= y0) & (b[..., 2] <= x1) & (b[..., 3] <= y1))


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """[A, B] intersection areas of xyxy boxes."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (rb - lt).clamp(min=0).prod(-1)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)


def _empty() -> Found:
    return (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))


def merge_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float = 0.5) -> Found:
    """Class-aware NMS: of boxes of one class overlapping by IoU > ``iou``, the best
    scoring stays; best first."""
    from torchvision.ops import batched_nms

    if not len(scores):
        return boxes, scores, labels
    keep = batched_nms(boxes.float(), scores.float(), labels, float(iou))
    return boxes[keep], scores[keep], labels[keep]


def merge_wbf(boxes: Tensor, scores: Tensor, labels: Tensor, iou: float = 0.5) -> Found:
    """Weighted box fusion, class-aware: in score order, every box joins the cluster of
    its class whose fused box it overlaps most with IoU > ``iou``, or starts a cluster.
    A cluster's box is the score-weighted mean of its boxes; its score is its best
    member's (one tile seeing an object counts as much as several: tiles overlap unevenly,
    so the count of views says little); best first."""
    if not len(scores):
        return boxes, scores, labels
    from torchvision.ops import box_iou

    order = torch.sort(scores, descending=True, stable=True).indices
    fused: list[Tensor] = []  # per cluster: the fused box
    weighted: list[Tensor] = []  # per cluster: sum of score * box
    weight: list[float] = []
    best: list[float] = []
    label_of: list[int] = []
    for i in order.tolist():
        box, score, label = boxes[i].double(), float(scores[i]), int(labels[i])
        join = -1
        if fused:
            overlap = box_iou(box[None], torch.stack(fused))[0]
            overlap[torch.tensor(label_of) != label] = -1
            j = int(overlap.argmax())
            if overlap[j] > iou:
                join = j
        if join < 0:
            fused.append(box)
            weighted.append(box * score)
            weight.append(score)
            best.append(score)
            label_of.append(label)
            continue
        weighted[join] = weighted[join] + box * score
        weight[join] += score
        fused[join] = weighted[join] / weight[join] if weight[join] > 0 else fused[join]
    return (torch.stack(fused).to(boxes.dtype), torch.tensor(best, dtype=scores.dtype),
            torch.tensor(label_of, dtype=labels.dtype))


def _stitch(boxes: Tensor, scores: Tensor, labels: Tensor, tiles: Tensor, iou: float
            ) -> Found:
    """Cut boxes -> objects: boxes ``i``, ``j`` of one class from different tiles
    (``tiles`` [K, 4], each box's) are parts of one object when, clipped to the region
    both tiles see, their IoU is > ``iou``; an object's parts (transitively) become their
    union, its score their best."""
    n = len(scores)
    if n < 2:
        return boxes, scores, labels
    shared_lo = torch.maximum(tiles[:, None, :2], tiles[None, :, :2])  # [K, K, 2]
    shared_hi = torch.minimum(tiles[:, None, 2:], tiles[None, :, 2:])
    lo_i = torch.maximum(boxes[:, None, :2], shared_lo)
    hi_i = torch.minimum(boxes[:, None, 2:], shared_hi).maximum(lo_i)
    lo_j = torch.maximum(boxes[None, :, :2], shared_lo)
    hi_j = torch.minimum(boxes[None, :, 2:], shared_hi).maximum(lo_j)
    inter = (torch.minimum(hi_i, hi_j) - torch.maximum(lo_i, lo_j)).clamp(min=0).prod(-1)
    union = (hi_i - lo_i).prod(-1) + (hi_j - lo_j).prod(-1) - inter
    other_tile = (tiles[:, None, :] != tiles[None, :, :]).any(-1)
    joined = ((inter / union.clamp(min=1e-9) > iou) & (inter > 0) & other_tile
              & (labels[:, None] == labels[None, :]))
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in joined.nonzero().tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    out_boxes, out_scores, out_labels = [], [], []
    for members in groups.values():
        idx = torch.tensor(members)
        b = boxes[idx]
        out_boxes.append(torch.cat([b[:, :2].amin(0), b[:, 2:].amax(0)]))
        out_scores.append(scores[idx].max())
        out_labels.append(labels[members[0]])
    return torch.stack(out_boxes), torch.stack(out_scores), torch.stack(out_labels)


def _merge_image(found: list[tuple[Box, bool, Found]], image_size: tuple[int, int],
                 slicing: Slicing) -> Found:
    """The detections of one image from those of its tiles (``(tile, is_full, found)``,
    boxes already in image pixels): cut boxes dropped or stitched, then merged."""
    h, w = image_size
    tile_boxes = [tile for tile, full, _ in found if not full]
    tiles = torch.tensor(tile_boxes, dtype=torch.float32).reshape(-1, 4)
    kept: list[Found] = []
    cut_parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    full_found: Found | None = None
    for tile, full, (boxes, scores, labels) in found:
        if full:
            full_found = (boxes, scores, labels)
            kept.append(full_found)
            continue
        cut = cut_boxes(boxes, tile, image_size, slicing.edge)
        kept.append((boxes[~cut], scores[~cut], labels[~cut]))
        if cut.any():
            cut_parts.append((boxes[cut], scores[cut], labels[cut],
                              torch.tensor(tile, dtype=torch.float32).expand(
                                  int(cut.sum()), 4)))
    if cut_parts:
        boxes, scores, labels, source = (torch.cat(parts) for parts in zip(*cut_parts))
        # another tile sees the object whole
        drop = _inside_uncut(boxes.float(), tiles, (h, w), slicing.edge).any(1)
        if full_found is not None and len(full_found[1]):  # so does the full pass
            inside = _intersection(boxes.float(), full_found[0].float()) / \
                _area(boxes.float()).clamp(min=1e-9)[:, None]
            same = labels[:, None] == full_found[2][None, :]
            drop |= ((inside > slicing.iou) & same).any(1)
        kept.append(_stitch(boxes[~drop], scores[~drop], labels[~drop], source[~drop],
                            slicing.iou))
    if not kept:
        return _empty()
    boxes, scores, labels = (torch.cat(parts) for parts in zip(*kept))
    merge = merge_wbf if slicing.merge == "wbf" else merge_nms
    boxes, scores, labels = merge(boxes, scores, labels, slicing.iou)
    order = torch.sort(scores, descending=True, stable=True).indices
    return boxes[order], scores[order], labels[order]


def sliced_detect_batch(run: TileRunner, images: Sequence[Tensor], slicing: Slicing
                        ) -> list[Found]:
    """(boxes xyxy in image pixels, scores, labels) of every [3, H, W] image, best first.

    The tiles of all ``images`` (and the images themselves with ``slicing.full``) are
    grouped by size and go through ``run`` ``slicing.batch_size`` at a time: one call per
    batch of tiles."""
    jobs: list[tuple[int, Box, bool]] = []  # (image, tile, is the full-image pass)
    for index, image in enumerate(images):
        h, w = int(image.shape[-2]), int(image.shape[-1])
        grid = tile_grid(h, w, slicing.tile, slicing.overlap)
        jobs += [(index, tile, False) for tile in grid]
        if slicing.full and grid != [(0, 0, w, h)]:  # a one-tile image is its own full pass
            jobs.append((index, (0, 0, w, h), True))
    by_size: dict[tuple[int, int], list[int]] = {}
    for j, (_, (x0, y0, x1, y1), _) in enumerate(jobs):
        by_size.setdefault((y1 - y0, x1 - x0), []).append(j)
    results: list[Found | None] = [None] * len(jobs)
    for group in by_size.values():
        for start in range(0, len(group), slicing.batch_size):
            chunk = group[start:start + slicing.batch_size]
            crops = torch.stack([images[jobs[j][0]][:, y0:y1, x0:x1]
                                 for j in chunk for x0, y0, x1, y1 in [jobs[j][1]]])
            found = list(run(crops))
            if len(found) != len(chunk):
                raise ValueError(f"the tile runner gave {len(found)} results for "
                                 f"{len(chunk)} tiles")
            for j, (boxes, scores, labels) in zip(chunk, found):
                image_index, (x0, y0, _, _), _ = jobs[j]
                ih, iw = images[image_index].shape[-2:]
                moved = boxes.detach().float().cpu() + torch.tensor([x0, y0, x0, y0],
                                                                     dtype=torch.float32)
                moved[:, 0::2] = moved[:, 0::2].clamp(0, int(iw))
                moved[:, 1::2] = moved[:, 1::2].clamp(0, int(ih))
                results[j] = (moved, scores.detach().float().cpu(),
                              labels.detach().cpu().to(torch.int64))
    per_image: list[list[tuple[Box, bool, Found]]] = [[] for _ in images]
    for (index, tile, full), found_j in zip(jobs, results):
        assert found_j is not None
        per_image[index].append((tile, full, found_j))
    return [_merge_image(found, (int(im.shape[-2]), int(im.shape[-1])), slicing)
            for found, im in zip(per_image, images)]


def sliced_detect(run: TileRunner, image: Tensor, tile: int, overlap: float = 0.2, *,
                  batch_size: int = 8, merge: Literal["nms", "wbf"] = "nms",
                  iou: float = 0.5, full: bool = False, edge: float = 2.0) -> Found:
    """(boxes xyxy in pixels of ``image`` [3, H, W], scores, labels), best first, of a
    sliced detection with ``run`` (e.g. :func:`exported_runner`); the options are those of
    :class:`Slicing`."""
    return sliced_detect_batch(run, [image], Slicing(tile, overlap, merge, iou, full,
                                                     batch_size, edge))[0]


def exported_runner(model: ExportedModel, threshold: float | str = "auto") -> TileRunner:
    """A :data:`TileRunner` of an exported file: uint8 (or float [0, 1]) RGB tiles resized
    by the file's transform (to its fixed size where it has one), through
    :meth:`~dinodet.export.ExportedModel.detect` at ``threshold``, boxes back in tile
    pixels. A file with a fixed batch runs the tiles in batches of that size."""
    from torchvision.transforms.v2 import functional as F

    from dinodet.data.transforms import EvalTransform
    from dinodet.predict import check_threshold

    threshold = check_threshold(threshold)
    transform = EvalTransform.from_metadata(model.metadata)
    fixed_batch, fixed_h, fixed_w = model.input_shape[0], *model.input_shape[2:]

    def run(tiles: Tensor) -> list[Found]:
        h, w = tiles.shape[-2:]
        size = ((fixed_h, fixed_w) if fixed_h is not None and fixed_w is not None
                else transform.output_size(int(h), int(w)))
        images = F.resize(tiles, list(size), antialias=True)  # as the Detector resizes
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        step = fixed_batch or len(images)
        found: list[Found] = []
        for start in range(0, len(images), step):
            part = images[start:start + step]
            real = len(part)
            if len(part) < step:  # a fixed batch: fill it with copies, drop their results
                part = torch.cat([part, part[-1:].expand(step - real, -1, -1, -1)])
            for boxes, scores, labels in model.detect(part, threshold)[:real]:
                found.append((transform.boxes_to_original(boxes.float(), size, (h, w)),
                              scores, labels))
        return found

    return run
