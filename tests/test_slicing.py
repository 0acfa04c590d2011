"""Sliced inference: the tile grid, boxes back in image pixels, NMS / WBF merges, cut
boxes, batching of tiles, and a small object in a large image that only slicing finds.

The detector here is a deterministic stand-in (:class:`BrightSquares`) with the DINO output
interface: it "detects" bright squares of at least ``MIN_SIDE`` pixels *in its input*, so
what it finds depends on the Detector's resize, as a real model's recall does."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import Tensor, nn

from dinodet.cli import build_parser
from dinodet.data.transforms import EvalTransform
from dinodet.errors import UserError
from dinodet.export import ExportedModel, ExportGraph
from dinodet.predict import Detections, Detector
from dinodet.slicing import (
    Slicing,
    as_slicing,
    cut_boxes,
    exported_runner,
    merge_nms,
    merge_wbf,
    sliced_detect,
    tile_grid,
)
from dinodet.structures import ImageBatch

MIN_SIDE = 6  # pixels of the model's input a square needs to be seen
QUERIES = 8
SIZE = 256  # the Detector's eval size; the tiles are this size too: no resize for them


class BrightSquares(nn.Module):
    """A stand-in DINO: ``pred_logits`` [B, Q, 1] and ``pred_boxes`` [B, Q, 4]
    (normalised cxcywh) of the connected bright blobs of every (normalised) input image
    whose sides are both >= ``MIN_SIDE`` pixels; ``calls`` counts forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(num_classes=1, num_select=QUERIES)
        self.calls = 0
        self.batches: list[int] = []

    def forward(self, images: ImageBatch | Tensor) -> dict[str, Tensor]:
        self.calls += 1
        batch = images if isinstance(images, ImageBatch) else ImageBatch.unpadded(images)
        self.batches.append(len(batch))
        b = len(batch)
        logits = torch.full((b, QUERIES, 1), -20.0)
        boxes = torch.full((b, QUERIES, 4), 0.5)
        bright = batch.tensors.mean(1) > 1.0  # white after normalisation is ~2.2
        bright &= ~batch.mask
        for i, (h, w) in enumerate(batch.image_sizes):
            for q, (x0, y0, x1, y1) in enumerate(_blobs(bright[i, :h, :w])[:QUERIES]):
                logits[i, q, 0] = 4.0
                boxes[i, q] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h,
                                            (x1 - x0) / w, (y1 - y0) / h])
        return {"pred_logits": logits, "pred_boxes": boxes}


def _blobs(mask: Tensor, min_side: int = MIN_SIDE) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1), x1 / y1 exclusive, of the 8-connected blobs of ``mask`` with both
    sides >= ``min_side``, in raster order of their first pixel."""
    labelled, _ = ndimage.label(mask.numpy(), structure=np.ones((3, 3)))
    found = []
    for ys, xs in ndimage.find_objects(labelled):
        box = (xs.start, ys.start, xs.stop, ys.stop)
        if box[2] - box[0] >= min_side and box[3] - box[1] >= min_side:
            found.append(box)
    return found


def _picture(h: int, w: int, squares: list[tuple[int, int, int, int]]) -> Tensor:
    """uint8 [3, h, w]: dark grey with white squares (x0, y0, x1, y1)."""
    image = torch.full((3, h, w), 30, dtype=torch.uint8)
    for x0, y0, x1, y1 in squares:
        image[:, y0:y1, x0:x1] = 255
    return image


def _detector(**kwargs) -> Detector:
    return Detector(BrightSquares(), [{"label": 0, "name": "square"}], eval_size=SIZE,
                    **kwargs)


SMALL = (380, 300, 394, 314)  # 14 px: 3.5 px at 256 / 1024 (missed), 14 px in a tile
LARGE = (600, 600, 800, 800)  # found either way


# --- the tile grid --------------------------------------------------------------------

@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [
    (1024, 1024, 256, 0.25), (1000, 700, 256, 0.2), (300, 257, 256, 0.0),
    (4000, 3000, 640, 0.5), (511, 513, 128, 0.9)])
def test_grid_covers_the_image_with_the_overlap_and_flush_borders(h, w, tile, overlap):
    grid = tile_grid(h, w, tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.int32)
    for x0, y0, x1, y1 in grid:
        assert (x1 - x0, y1 - y0) == (tile, tile)  # one size: batches without padding
        assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h
        covered[y0:y1, x0:x1] += 1
    assert (covered > 0).all()
    xs, ys = sorted({t[0] for t in grid}), sorted({t[1] for t in grid})
    assert xs[0] == 0 and ys[0] == 0
    assert xs[-1] + tile == w and ys[-1] + tile == h  # flush with right and bottom
    assert len(grid) == len(xs) * len(ys)
    shared = int(overlap * tile)
    for starts in (xs, ys):
        steps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(0 < s <= tile - shared for s in steps)  # at least the overlap asked
        assert max(steps, default=0) - min(steps, default=0) <= 1  # spread evenly
        if len(starts) > 2:  # the fewest tiles: one less would need a longer step
            assert starts[-1] / (len(starts) - 2) > tile - shared


def test_grid_of_images_smaller_than_a_tile():
    assert tile_grid(100, 80, 256) == [(0, 0, 80, 100)]
    assert tile_grid(256, 256, 256, 0.5) == [(0, 0, 256, 256)]
    # one side shorter: a row of tiles as high as the image
    assert tile_grid(100, 500, 256, 0.0) == [(0, 0, 256, 100), (244, 0, 500, 100)]


def test_slicing_options_are_checked():
    assert as_slicing(None) is None and as_slicing(False) is None
    assert as_slicing((512, 0.1)) == Slicing(512, 0.1)
    assert as_slicing(300) == Slicing(300)
    for bad, word in [((16, 0.2), "tile"), ((256, 1.0), "overlap"), ((256, -0.1), "overlap"),
                      ("big", "slice must be")]:
        with pytest.raises(UserError, match=word):
            as_slicing(bad)
    with pytest.raises(UserError, match="merge"):
        Slicing(256, merge="mean")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="iou"):
        Slicing(256, iou=1.5)


# --- merges and cut boxes on hand-made boxes -----------------------------------------

def test_nms_merge_is_class_aware():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [20, 20, 30, 30.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    b, s, lab = merge_nms(boxes, scores, labels, 0.5)
    assert torch.equal(b, boxes[[0, 2, 3]])
    assert torch.equal(s, scores[[0, 2, 3]]) and torch.equal(lab, labels[[0, 2, 3]])


def test_wbf_merge_averages_by_score_and_keeps_the_best_score():
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [2, 0, 12, 10], [20, 20, 30, 30.]])
    scores = torch.tensor([0.9, 0.6, 0.5, 0.7])
    labels = torch.tensor([0, 0, 1, 0])
    b, s, lab = merge_wbf(boxes, scores, labels, 0.5)  # boxes 0 and 1: IoU 80/120
    torch.testing.assert_close(b, torch.tensor([[0.8, 0, 10.8, 10], [20, 20, 30, 30],
                                                [2, 0, 12, 10]]))
    torch.testing.assert_close(s, torch.tensor([0.9, 0.7, 0.5]))
    assert lab.tolist() == [0, 0, 1]
    # below the threshold nothing fuses
    b, s, lab = merge_wbf(boxes, scores, labels, 0.7)
    assert len(s) == 4 and s.tolist() == sorted(s.tolist(), reverse=True)


def test_boxes_touching_inner_tile_edges_are_cut():
    boxes = torch.tensor([[100, 100, 110, 110], [101, 150, 120, 160],
                          [150, 150, 199, 199.], [120, 120, 130, 130]])
    # tile (100, 100)-(200, 200) of a 200 x 300 (h, w) image: left and top are inner,
    # the bottom is the border, the right (x 200 < 300) inner
    assert cut_boxes(boxes, (100, 100, 200, 200), (200, 300)).tolist() == [
        True, True, True, False]
    assert cut_boxes(boxes, (100, 100, 200, 200), (200, 200), edge=0).tolist() == [
        True, False, False, False]


def _oracle(tiles: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """A tile runner in pixel space: every white blob of at least 1 px, boxes in tile
    pixels, cut exactly at the tile's borders."""
    found = []
    for tile in tiles:
        b = torch.tensor(_blobs(tile[0] > 128, 1), dtype=torch.float32).reshape(-1, 4)
        found.append((b, torch.full((len(b),), 0.9), torch.zeros(len(b), dtype=torch.int64)))
    return found


def test_cut_boxes_of_small_objects_are_dropped_and_large_ones_stitched():
    # 100 x 400, tiles of 100 at x 0, 75, 150, 225, 300 (25 px shared)
    # tile 0 holds it whole; tile 1 (x 75-175) sees a 5 px cut part of it, IoU 5/28 with
    # the whole box: NMS alone would keep both, the cut-box rule drops the part
    small = (52, 40, 80, 60)
    large = (60, 20, 210, 60)  # 150 px: no tile holds it, three see parts of it
    image = _picture(100, 400, [small])
    b, s, _ = sliced_detect(_oracle, image, 100, 0.2)
    assert b.tolist() == [list(map(float, small))]
    image = _picture(100, 400, [large])
    for merge in ("nms", "wbf"):
        b, s, _ = sliced_detect(_oracle, image, 100, 0.2, merge=merge)
        assert b.tolist() == [list(map(float, large))]  # one box, the whole object
        assert s.tolist() == pytest.approx([0.9])
    # the full pass sees it whole too: still one box
    b, _, _ = sliced_detect(_oracle, image, 100, 0.2, full=True)
    assert b.tolist() == [list(map(float, large))]


def test_boxes_are_mapped_back_to_image_pixels():
    # one square in the last tile of each row and column: offsets on both axes
    square = (900, 950, 920, 980)
    b, _, _ = sliced_detect(_oracle, _picture(1000, 1000, [square]), 256, 0.1)
    assert b.tolist() == [list(map(float, square))]


# --- the Detector: the real resize and box mapping ------------------------------------

def test_small_object_found_with_slicing_and_missed_without():
    image = _picture(1024, 1024, [SMALL, LARGE])
    det = _detector()
    plain = det(image, threshold=0.5)
    assert isinstance(plain, Detections)
    assert len(plain) == 1  # the small square is 3.5 px at 256 / 1024: unseen
    torch.testing.assert_close(plain.boxes[0], torch.tensor(LARGE, dtype=torch.float32),
                               atol=4.5, rtol=0)  # one input pixel is 4 image pixels
    for merge in ("nms", "wbf"):
        for full in (False, True):
            sliced = det(image, threshold=0.5, slice=Slicing(SIZE, 0.25, merge=merge,
                                                                full=full))
            assert isinstance(sliced, Detections) and sliced.image_size == (1024, 1024)
            assert len(sliced) == 2, (merge, full, sliced.boxes)  # no duplicates
            order = sliced.boxes[:, 0].argsort()
            torch.testing.assert_close(sliced.boxes[order],
                                       torch.tensor([SMALL, LARGE], dtype=torch.float32),
                                       atol=1.0 if not full else 4.5, rtol=0)
            assert sliced.names == ["square", "square"]


def test_tiles_are_resized_like_images():
    # tiles of 512 px shrink to 256: the small square is 7 px there, the detector's
    # resize path maps it back to image pixels
    image = _picture(1024, 1024, [(100, 100, 114, 114)])
    det = _detector(slice=(512, 0.25))
    found = det(image, threshold=0.5)
    assert isinstance(found, Detections) and len(found) == 1
    torch.testing.assert_close(found.boxes[0], torch.tensor([100, 100, 114, 114.]),
                               atol=2.0, rtol=0)
    assert len(det(image, threshold=0.5, slice=False)) == 0  # a call turns it off


def test_all_tiles_of_a_batch_of_images_go_in_one_call_per_tile_batch():
    images = [_picture(1024, 1024, [SMALL]), _picture(1024, 1024, [LARGE])]
    det = _detector()
    model = det.model
    assert isinstance(model, BrightSquares)
    # 5 x 5 tiles an image, 50 in all
    found = det(images, threshold=0.5, slice=Slicing(SIZE, 0.25, batch_size=64))
    assert model.calls == 1 and model.batches == [50]
    assert [len(d) for d in found] == [1, 1]
    model.calls, model.batches = 0, []
    det(images, threshold=0.5, slice=Slicing(SIZE, 0.25, batch_size=16, full=True))
    # 50 tiles in 16s, then the two full images (another size) together
    assert model.batches == [16, 16, 16, 2, 2] and model.calls == 5


def test_detect_files_slices(tmp_path):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(_picture(1024, 1024, [SMALL, LARGE]).permute(1, 2, 0).numpy()).save(path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    det = _detector(slice=(SIZE, 0.25))
    found = dict(det.detect_files([path, tmp_path / "broken.png"], threshold=0.5))
    assert len(found[str(path)]) == 2
    assert not isinstance(found[str(tmp_path / "broken.png")], Detections)


# --- exported models ------------------------------------------------------------------

class _Exported:
    """An in-memory stand-in for :class:`~dinodet.export.ExportedModel`: the real export
    graph of the stand-in model and the real :meth:`ExportedModel.detect`."""

    detect = ExportedModel.detect

    def __init__(self, batch: int | None = None) -> None:
        transform = EvalTransform(SIZE)
        self.net = BrightSquares()
        self.graph = ExportGraph(self.net, QUERIES, transform)
        self.metadata = transform.metadata()
        self.class_thresholds = None
        self.path = "stand-in.onnx"
        self.input_shape = [batch, 3, None, None]

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert images.dtype == torch.float32 and images.max() <= 1
        return self.graph(images)


def test_an_exported_model_slices_with_the_same_function():
    image = _picture(1024, 1024, [SMALL, LARGE])
    exported = _Exported()
    run = exported_runner(exported, threshold=0.5)  # type: ignore[arg-type]
    boxes, scores, labels = sliced_detect(run, image, SIZE, 0.25, batch_size=32)
    assert exported.net.calls == 1 and exported.net.batches == [25]
    order = boxes[:, 0].argsort()
    torch.testing.assert_close(boxes[order], torch.tensor([SMALL, LARGE], dtype=torch.float32),
                               atol=1.0, rtol=0)
    assert labels.tolist() == [0, 0] and (scores > 0.9).all()
    # the same as the Detector's
    det_found = _detector()(image, threshold=0.5, slice=Slicing(SIZE, 0.25))
    assert isinstance(det_found, Detections)
    torch.testing.assert_close(det_found.boxes, boxes, atol=1e-3, rtol=0)
    # a file with a fixed batch of 4: 25 tiles in 7 calls, the last one filled up
    fixed = _Exported(batch=4)
    found = sliced_detect(exported_runner(fixed, 0.5), image, SIZE, 0.25,  # type: ignore[arg-type]
                          batch_size=32)
    assert fixed.net.batches == [4] * 7
    torch.testing.assert_close(found[0], boxes)


def test_cli_predict_slice_options():
    args = build_parser().parse_args(["predict", "model", "a.png", "--out", "o", "--slice",
                                      "640", "--overlap", "0.3", "--slice-merge", "wbf",
                                      "--slice-iou", "0.6", "--slice-full"])
    assert (args.slice, args.overlap, args.slice_merge, args.slice_iou, args.slice_full) == (
        640, 0.3, "wbf", 0.6, True)
    args = build_parser().parse_args(["predict", "model", "a.png", "--out", "o"])
    assert Slicing.from_options(args.slice, args.overlap, args.slice_merge, args.slice_iou,
                                args.slice_full) is None
    with pytest.raises(UserError, match="--overlap, --slice-full only apply with --slice"):
        Slicing.from_options(None, 0.3, full=False)
    assert Slicing.from_options(640, batch_size=2) == Slicing(640, batch_size=2)
    with pytest.raises(UserError, match="--overlap"):
        Slicing.from_options(640, 1.0)
