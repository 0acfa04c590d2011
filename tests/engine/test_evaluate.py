"""COCO evaluation: our numbers are pycocotools' numbers, category ids are never shifted."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from dinodet.engine.evaluate import (
    METRIC_NAMES,
    CocoEvaluator,
    EvalResult,
    evaluate,
    evaluate_results,
    write_results,
)
from dinodet.structures import ImageBatch

CATEGORY_IDS = [1, 3, 7]  # not contiguous, not starting at 0: any id shift shows
NAMES = {1: "cat", 3: "dog", 7: "bird"}
SIZES = {1: (480, 640), 2: (480, 640), 5: (300, 400), 9: (600, 500), 11: (200, 200)}


def _gt_dataset() -> dict[str, Any]:
    """Small/medium/large boxes (areas < 32², < 96², above), a crowd region, an image
    without annotations (5) and an image nothing will be predicted for (11)."""
    anns = [  # image_id, category_id, xywh, iscrowd
        (1, 1, [10, 20, 200, 150], 0),    # large
        (1, 3, [300, 300, 60, 80], 0),    # medium
        (1, 7, [500, 50, 20, 25], 0),     # small, never detected
        (2, 1, [50, 60, 70, 90], 0),      # medium
        (2, 1, [400, 400, 30, 30], 0),    # small, never detected
        (2, 3, [200, 100, 300, 200], 1),  # crowd region
        (2, 3, [20, 200, 150, 160], 0),   # large
        (9, 7, [100, 100, 50, 60], 0),    # medium
        (9, 7, [300, 200, 120, 100], 0),  # large
        (9, 3, [10, 10, 16, 20], 0),      # small
        (11, 1, [40, 40, 100, 100], 0),   # medium, image never predicted
    ]
    return {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"}
                   for i, (h, w) in SIZES.items()],
        "categories": [{"id": c, "name": NAMES[c]} for c in CATEGORY_IDS],
        "annotations": [
            {"id": k + 1, "image_id": img, "category_id": cat, "bbox": box,
             "area": box[2] * box[3], "iscrowd": crowd}
            for k, (img, cat, box, crowd) in enumerate(anns)
        ],
    }


# A hand-made results file: exact and shifted true positives (IoU 1.0, ~0.85, ~0.71, 0.6),
# a duplicate, a detection inside the crowd region, false positives on every image
# (including the one without annotations) and distinct scores.
PREDICTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 20, 200, 150], "score": 0.95},
    {"image_id": 1, "category_id": 1, "bbox": [14, 24, 200, 150], "score": 0.9},
    {"image_id": 1, "category_id": 3, "bbox": [310, 300, 60, 80], "score": 0.8},
    {"image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 40], "score": 0.3},
    {"image_id": 2, "category_id": 1, "bbox": [52, 61, 70, 90], "score": 0.88},
    {"image_id": 2, "category_id": 3, "bbox": [250, 150, 50, 50], "score": 0.7},
    {"image_id": 2, "category_id": 3, "bbox": [25, 205, 150, 160], "score": 0.6},
    {"image_id": 2, "category_id": 1, "bbox": [600, 0, 30, 30], "score": 0.2},
    {"image_id": 5, "category_id": 3, "bbox": [10, 10, 100, 100], "score": 0.5},
    {"image_id": 5, "category_id": 1, "bbox": [100, 50, 200, 200], "score": 0.85},
    {"image_id": 9, "category_id": 7, "bbox": [100, 100, 50, 60], "score": 0.75},
    {"image_id": 9, "category_id": 7, "bbox": [330, 200, 120, 100], "score": 0.65},
    {"image_id": 9, "category_id": 3, "bbox": [11, 10, 16, 20], "score": 0.4},
    {"image_id": 9, "category_id": 3, "bbox": [200, 400, 40, 40], "score": 0.45},
]


def _coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.fixture()
def coco_gt() -> COCO:
    return _coco(_gt_dataset())


def _pycocotools(coco_gt: COCO, results: list[dict], cat_ids: list[int] | None = None,
                 img_ids: list[int] | None = None) -> list[float]:
    """The reference: pycocotools run directly, as its README does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        if img_ids is not None:
            coco_eval.params.imgIds = img_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(s) for s in coco_eval.stats]


def _as_model_predictions(results: list[dict], label_to_category_id: list[int],
                          image_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """COCO results -> what postprocess returns: xyxy pixels and class indices."""
    label_of = {cid: label for label, cid in enumerate(label_to_category_id)}
    out = {}
    for image_id in image_ids:
        rows = [r for r in results if r["image_id"] == image_id]
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float64).reshape(-1, 4)
        out[image_id] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            "scores": torch.tensor([r["score"] for r in rows], dtype=torch.float64),
            "labels": torch.tensor([label_of[r["category_id"]] for r in rows],
                                   dtype=torch.int64),
        }
    return out


def _evaluator(coco_gt: COCO, label_to_category_id: list[int],
               results: list[dict] = PREDICTIONS) -> CocoEvaluator:
    evaluator = CocoEvaluator(coco_gt, label_to_category_id)
    evaluator.update(_as_model_predictions(results, label_to_category_id, list(SIZES)))
    return evaluator


def test_metrics_equal_pycocotools(coco_gt):
    result = _evaluator(coco_gt, CATEGORY_IDS).summarize()

    expected = _pycocotools(coco_gt, PREDICTIONS)
    assert list(result.metrics) == list(METRIC_NAMES)
    assert list(result.metrics.values()) == expected  # the same floats, not approximately
    # The case is not degenerate: every number is defined and strictly between 0 and 1.
    assert all(0 < v < 1 for v in expected), expected


def test_per_class_ap_equals_single_category_cocoeval(coco_gt):
    result = _evaluator(coco_gt, CATEGORY_IDS).summarize()

    assert [(r["label"], r["category_id"], r["name"]) for r in result.per_class] == [
        (0, 1, "cat"), (1, 3, "dog"), (2, 7, "bird")]
    for row in result.per_class:
        assert row["AP"] == _pycocotools(coco_gt, PREDICTIONS, cat_ids=[row["category_id"]])[0]
    assert len({row["AP"] for row in result.per_class}) == 3


def test_category_ids_are_never_shifted(coco_gt):
    # keep_category_ids: label i <-> category id i; contiguous: labels 0..2 <-> [1, 3, 7].
    identity = list(range(max(CATEGORY_IDS) + 1))
    by_identity = _evaluator(coco_gt, identity)
    by_contiguous = _evaluator(coco_gt, CATEGORY_IDS)

    for evaluator in (by_identity, by_contiguous):
        assert evaluator.results() == PREDICTIONS
    a, b = by_identity.summarize(), by_contiguous.summarize()
    assert a.metrics == b.metrics == dict(zip(METRIC_NAMES, _pycocotools(coco_gt, PREDICTIONS)))
    assert [r["label"] for r in a.per_class] == CATEGORY_IDS
    assert [r["label"] for r in b.per_class] == [0, 1, 2]
    for ra, rb in zip(a.per_class, b.per_class, strict=True):
        assert (ra["category_id"], ra["name"], ra["AP"]) == (rb["category_id"], rb["name"],
                                                             rb["AP"])


def test_results_json_round_trip(coco_gt, tmp_path):
    evaluator = _evaluator(coco_gt, CATEGORY_IDS)
    direct = evaluator.summarize()
    path = write_results(tmp_path / "out" / "results.json", evaluator.results())

    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    # summarize() must not have let loadRes add its keys (area, id, ...) to our results.
    assert json.loads(path.read_text()) == PREDICTIONS
    assert _pycocotools(coco_gt, json.loads(path.read_text())) == list(direct.metrics.values())
    with contextlib.redirect_stdout(io.StringIO()):
        reloaded = coco_gt.loadRes(str(path))
    assert len(reloaded.anns) == len(PREDICTIONS)
    assert evaluate_results(coco_gt, json.loads(path.read_text()), CATEGORY_IDS) == direct


def test_empty_predictions_score_zero(coco_gt):
    no_detections = CocoEvaluator(coco_gt, CATEGORY_IDS)
    no_detections.update(_as_model_predictions([], CATEGORY_IDS, list(SIZES)))
    never_updated = CocoEvaluator(coco_gt, CATEGORY_IDS)

    for evaluator in (no_detections, never_updated):
        assert evaluator.results() == []
        result = evaluator.summarize()
        assert result.metrics == dict.fromkeys(METRIC_NAMES, 0.0)
        assert [r["AP"] for r in result.per_class] == [0.0, 0.0, 0.0]
    assert evaluate_results(coco_gt, []).metrics == dict.fromkeys(METRIC_NAMES, 0.0)


def test_only_the_images_seen_are_evaluated(coco_gt):
    evaluator = CocoEvaluator(coco_gt, CATEGORY_IDS)
    evaluator.update(_as_model_predictions(PREDICTIONS, CATEGORY_IDS, [9, 1]))
    seen = [r for r in PREDICTIONS if r["image_id"] in (1, 9)]

    assert evaluator.image_ids == [9, 1]
    assert list(evaluator.summarize().metrics.values()) == _pycocotools(coco_gt, seen,
                                                                        img_ids=[1, 9])


def test_gather_merges_ranks_and_drops_padding_duplicates(coco_gt, monkeypatch):
    # Rank 0 saw images 1, 2, 5; rank 1 saw 9, 11 and image 1 again (sampler padding), with
    # different predictions for it: the lowest rank's copy wins.
    rank0 = CocoEvaluator(coco_gt, CATEGORY_IDS)
    rank0.update(_as_model_predictions(PREDICTIONS, CATEGORY_IDS, [1, 2, 5]))
    rank1 = CocoEvaluator(coco_gt, CATEGORY_IDS)
    rank1.update(_as_model_predictions(PREDICTIONS, CATEGORY_IDS, [9, 11]))
    rank1.update({1: {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
                      "scores": torch.tensor([0.99]), "labels": torch.tensor([0])}})

    sent: list[Any] = []

    def all_gather_object(out: list, obj: Any, group: Any = None) -> None:
        sent.append(obj)
        out[:] = [sent[0], obj]  # rank 0 sent first

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    rank0.gather()
    rank1.gather()

    assert sorted(rank1.image_ids) == sorted(SIZES)
    assert sorted(rank1.results(), key=lambda r: -r["score"]) == sorted(
        PREDICTIONS, key=lambda r: -r["score"])
    assert list(rank1.summarize().metrics.values()) == _pycocotools(coco_gt, PREDICTIONS)


def test_update_rejects_unknown_images_and_labels(coco_gt):
    evaluator = CocoEvaluator(coco_gt, CATEGORY_IDS)
    one = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match="labels"):
        evaluator.update({1: one})
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update({4: {**one, "labels": torch.tensor([0])}})


def test_format_table():
    result = EvalResult(dict(zip(METRIC_NAMES, [0.5] * 5 + [-1.0] + [0.25] * 6)),
                        [{"label": 0, "category_id": 1, "name": "cat", "AP": 0.123},
                         {"label": 2, "category_id": 7, "name": "bird", "AP": math.nan}])
    lines = result.format_table().splitlines()

    assert lines[0].split() == list(METRIC_NAMES[:6])
    assert lines[1].split() == ["50.0"] * 5 + ["-"]
    assert lines[3].split() == ["25.0"] * 6
    assert lines[5].split() == ["label", "cat_id", "name", "AP"]
    assert lines[6].split() == ["0", "1", "cat", "12.3"]
    assert lines[7].split() == ["2", "7", "bird", "-"]
    assert len({len(line) for line in lines[5:]}) == 1  # fixed width


# --- evaluate(): a fake model and a fake loader ------------------------------------------

@dataclass
class _ListBatch:
    images: list[torch.Tensor]
    targets: list[dict]


@dataclass
class _PaddedBatch:
    images: ImageBatch
    targets: list[dict]

    def to(self, device: torch.device) -> _PaddedBatch:
        return _PaddedBatch(self.images.to(device), self.targets)


class _PerfectModel(nn.Module):
    """Outputs the ground truth of the image whose pixels hold its index in ``image_ids``:
    one confident query per gt box (logit +10 for its class, -10 for the others) and two
    junk queries (-10 everywhere). Boxes are normalised cxcywh, as the detector's."""

    def __init__(self, coco_gt: COCO, image_ids: list[int], label_to_category_id: list[int]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        label_of = {cid: label for label, cid in enumerate(label_to_category_id)}
        queries = 2 + max(len(coco_gt.getAnnIds(imgIds=[i], iscrowd=False)) for i in image_ids)
        self.register_buffer("logits", torch.full((len(image_ids), queries,
                                                   len(label_to_category_id)), -10.0))
        self.register_buffer("boxes", torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(
            len(image_ids), queries, 1))
        for n, image_id in enumerate(image_ids):
            h, w = SIZES[image_id]
            for q, ann in enumerate(coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id],
                                                                        iscrowd=False))):
                x, y, bw, bh = ann["bbox"]
                self.logits[n, q, label_of[ann["category_id"]]] = 10.0
                self.boxes[n, q] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h,
                                                 bw / w, bh / h])
        self.calls: list[tuple[bool, bool]] = []  # (training, autocast) per forward

    def forward(self, images: list[torch.Tensor] | ImageBatch) -> dict[str, torch.Tensor]:
        self.calls.append((self.training, torch.is_autocast_enabled("cpu")))
        tensors = images.tensors if isinstance(images, ImageBatch) else torch.stack(images)
        index = tensors[:, 0, 0, 0].long()
        dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32
        return {"pred_logits": self.logits[index].to(dtype),
                "pred_boxes": self.boxes[index].to(dtype)}


def _loader(image_ids: list[int]) -> list[Any]:
    """Batches of 2 (the last one padded) with an empty batch in between; images are at a
    quarter of the original size, as after a resize, and carry their index as pixels."""
    def sample(n: int) -> tuple[torch.Tensor, dict]:
        h, w = SIZES[image_ids[n]]
        image = torch.full((3, h // 40, w // 40), float(n))
        return image, {"image_id": image_ids[n], "orig_size": torch.tensor([h, w]),
                       "size": torch.tensor(image.shape[1:])}

    first, second = [sample(n) for n in (0, 1)], [sample(n) for n in range(2, len(image_ids))]
    return [_ListBatch([im for im, _ in first], [t for _, t in first]),
            _ListBatch([], []),
            _PaddedBatch(ImageBatch.from_images([im for im, _ in second]),
                         [t for _, t in second])]


def test_evaluate_perfect_model_scores_one(coco_gt):
    image_ids = list(SIZES)
    model = _PerfectModel(coco_gt, image_ids, CATEGORY_IDS).train()

    result, results = evaluate(model, _loader(image_ids), "cpu", CATEGORY_IDS, coco_gt,
                               num_select=300)

    # 1 up to pycocotools' eps in tp / (tp + fp + eps); AR@1 misses the second box of an
    # image with two boxes of one class.
    assert result.metrics.pop("AR1") < 1
    assert result.metrics == pytest.approx(dict.fromkeys(METRIC_NAMES[:6] + METRIC_NAMES[7:],
                                                         1.0), abs=1e-12)
    assert [r["AP"] for r in result.per_class] == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    assert model.training and model.calls == [(False, False), (False, False)]
    # Results are in original-image pixels with the dataset's own category ids.
    confident = [r for r in results if r["score"] > 0.5]
    expected = [a for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    assert len(confident) == len(expected)
    for ann in expected:
        match = [r for r in confident if r["image_id"] == ann["image_id"]
                 and r["category_id"] == ann["category_id"]
                 and r["bbox"] == pytest.approx(ann["bbox"], abs=1e-3)]
        assert len(match) == 1, ann


def test_evaluate_with_autocast_and_bad_amp(coco_gt):
    image_ids = list(SIZES)
    model = _PerfectModel(coco_gt, image_ids, CATEGORY_IDS).eval()

    result, results = evaluate(model, _loader(image_ids), "cpu", CATEGORY_IDS, coco_gt,
                               num_select=10, amp="bf16")

    assert not model.training and {c[1] for c in model.calls} == {True}
    # bf16 boxes are off by a pixel or so: fine at IoU 0.5.
    assert result.metrics["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert all(isinstance(r["score"], float) for r in results)
    assert len(results) == 10 * len(image_ids)
    with pytest.raises(ValueError, match="amp"):
        evaluate(model, [], "cpu", CATEGORY_IDS, coco_gt, amp="fp8")


def test_evaluate_checkpoint_checks_out_before_reading_anything(tmp_path):
    from dinodet.engine.evaluate import evaluate_checkpoint
    from dinodet.errors import UserError

    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    for out, why in [(a_file / "r.json", r"file\.txt is a file, not a folder"),
                     (tmp_path, "is a folder")]:
        # the checkpoint and the data do not exist: the output is checked first
        with pytest.raises(UserError, match=rf"^results file {re.escape(str(out))}\b.*{why}"):
            evaluate_checkpoint(tmp_path / "none.pt", tmp_path / "none.json", tmp_path,
                                out=out)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_checkpoint(tmp_path / "none.pt", "a.json", "img", batch_size=0)


def test_eval_result_keeps_the_detections_out_of_comparisons():
    metrics = dict.fromkeys(METRIC_NAMES, 0.5)
    a = EvalResult(metrics, detections=[{"image_id": 1}])
    assert a == EvalResult(dict(metrics)) and "detections" not in repr(a)
    assert a.detections == [{"image_id": 1}]


def test_label_table_from_the_model_or_the_data():
    """The class table of eval and export --verify: the model's own (by label, gaps get -1),
    else the dataset's; data the model was not trained on is named."""
    from types import SimpleNamespace

    from dinodet.engine.evaluate import label_table
    from dinodet.errors import UserError

    data = SimpleNamespace(label_to_category_id=[3, 7], class_names=["cat", "dog"])
    assert label_table(None, 2, data, "val.json") == ([3, 7], ["cat", "dog"])
    classes = [{"label": 2, "category_id": 3, "name": "cat"},
               {"label": 0, "category_id": 7, "name": "dog"}]
    assert label_table(classes, 3, data, "val.json") == ([7, -1, 3], ["dog", "1", "cat"])
    with pytest.raises(UserError, match=r"val\.json has categories \[7\] the model was not"):
        label_table(classes[:1], 3, data, "val.json")
    with pytest.raises(UserError, match=r"predicts 1 classes but val\.json needs 2"):
        label_table(None, 1, data, "val.json")
