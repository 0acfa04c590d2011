"""The evaluation report: a confusion matrix and F1-optimal thresholds that equal hand
counts, PR curves that read pycocotools' table right (its -1 included), figures that are
PNGs at 3 and at 80 classes, and `dinodet eval --report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dinodet.engine.analysis import (
    REPORT_FILES,
    ReportClass,
    class_table,
    confusion_matrix,
    f1_thresholds,
    pr_curves,
    write_report,
)
from dinodet.engine.evaluate import PrecisionCurves, evaluate_results
from dinodet.errors import UserError

NAMES = {1: "cat", 2: "dog", 3: "bird", 4: "empty"}  # "empty" has no annotation


def _coco(anns: list[tuple[int, int, list[float], int]], images: int = 3,
          names: dict[int, str] = NAMES) -> COCO:
    """A ground truth from (image_id, category_id, xywh, iscrowd) tuples, 100x100 images."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": 100, "width": 100, "file_name": f"{i}.png"}
                   for i in range(1, images + 1)],
        "categories": [{"id": c, "name": n} for c, n in names.items()],
        "annotations": [{"id": k, "image_id": img, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": crowd}
                        for k, (img, cat, box, crowd) in enumerate(anns, 1)]}
    coco.createIndex()
    return coco


def _det(image_id: int, category_id: int, box: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


# Image 1: a cat, a dog, a bird nobody finds, a cat crowd; image 2: two dogs; image 3: none.
GT = [(1, 1, [0, 0, 10, 10], 0), (1, 2, [20, 20, 10, 10], 0), (1, 3, [50, 50, 10, 10], 0),
      (1, 1, [70, 70, 30, 30], 1),
      (2, 2, [0, 0, 20, 20], 0), (2, 2, [40, 40, 20, 20], 0)]
DETECTIONS = [
    _det(1, 1, [0, 0, 10, 10], 0.9),     # the cat: (cat, cat)
    _det(1, 1, [20, 20, 10, 10], 0.8),   # "cat" on the dog, first in score: (dog, cat)
    _det(1, 2, [20, 20, 10, 10], 0.7),   # the dog again, already matched: (background, dog)
    _det(1, 3, [75, 75, 10, 10], 0.6),   # "bird" inside the cat crowd: ignored
    _det(1, 1, [0, 0, 10, 10], 0.2),     # below the 0.3 threshold: not counted
    _det(2, 2, [0, 0, 20, 20], 0.95),    # (dog, dog)
    _det(2, 2, [41, 40, 20, 20], 0.5),   # IoU 380/420 = 0.90 with the second dog: (dog, dog)
    _det(2, 2, [45, 45, 20, 20], 0.45),  # IoU 225/575 with that dog, < 0.5: (background, dog)
    _det(3, 3, [10, 10, 10, 10], 0.4),   # nothing on image 3: (background, bird)
]


def _classes(coco: COCO) -> list[ReportClass]:
    return class_table(coco, [1, 2, 3, 4])


def test_confusion_matrix_equals_a_hand_count():
    coco = _coco(GT)
    matrix = confusion_matrix(coco, DETECTIONS, _classes(coco), iou=0.5, score_threshold=0.3)
    #                 predicted: cat dog bird empty background
    expected = np.array([[1, 0, 0, 0, 0],    # cat
                         [1, 2, 0, 0, 0],    # dog
                         [0, 0, 0, 0, 1],    # bird: missed
                         [0, 0, 0, 0, 0],    # empty
                         [0, 2, 1, 0, 0]])   # background: false positives
    assert matrix.counts.tolist() == expected.tolist()
    assert matrix.ignored == 1 and matrix.num_images == 3 and matrix.outside_classes == 0
    data = matrix.to_json()
    assert data["names"] == ["cat", "dog", "bird", "empty", "background"]
    assert data["matrix"] == expected.tolist() and data["ignored_on_crowd"] == 1
    json.dumps(data, allow_nan=False)
    rows = matrix.normalized()
    assert rows[1].tolist() == pytest.approx([1 / 3, 2 / 3, 0, 0, 0])
    assert rows[3].tolist() == [0, 0, 0, 0, 0]  # a row without counts stays 0


def test_confusion_matrix_threshold_iou_and_crowd_rules():
    coco = _coco(GT)
    classes = _classes(coco)
    # At threshold 0 the 0.2 cat on the (taken) cat is a false positive too.
    low = confusion_matrix(coco, DETECTIONS, classes, score_threshold=0.0)
    assert low.counts[4, 0] == 1 and low.counts[0, 0] == 1
    # At IoU 0.95 the shifted dog (0.90) no longer matches: a false positive and a miss.
    strict = confusion_matrix(coco, DETECTIONS, classes, iou=0.95)
    assert strict.counts[1, 1] == 1 and strict.counts[4, 1] == 3 and strict.counts[1, 4] == 1
    # A crowd box is never a row: without detections only the 5 non-crowd boxes are missed.
    empty = confusion_matrix(coco, [], classes)
    assert empty.counts[:, 4].tolist() == [1, 3, 1, 0, 0] and empty.counts.sum() == 5
    # Only the images asked for count, and a detection of an unknown category is left out.
    one = confusion_matrix(coco, [*DETECTIONS, _det(2, 9, [0, 0, 5, 5], 0.9)], classes,
                           image_ids=[2])
    assert one.counts.sum() == 3 and one.counts[1, 1] == 2 and one.outside_classes == 1
    with pytest.raises(UserError, match="IoU must be a number in"):
        confusion_matrix(coco, [], classes, iou=0)
    with pytest.raises(UserError, match=r"results\[0\] has no 'score'"):
        confusion_matrix(coco, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
                         classes)


def test_f1_optimal_threshold_equals_a_hand_computation():
    dogs = [(1, 2, [0, 0, 10, 10], 0), (1, 2, [20, 0, 10, 10], 0), (1, 2, [40, 0, 10, 10], 0),
            (1, 3, [0, 50, 10, 10], 0), (2, 1, [0, 0, 50, 50], 1)]
    coco = _coco(dogs, images=2)
    results = [
        _det(1, 2, [0, 0, 10, 10], 0.9),    # TP  F1 at 0.9: 2*1/(1+0+3) = 0.5
        _det(1, 2, [80, 80, 5, 5], 0.8),    # FP  0.8: 2/(2+3) = 0.4
        _det(1, 2, [20, 0, 10, 10], 0.7),   # TP  0.7: 4/(3+3) = 0.667
        _det(1, 2, [0, 0, 10, 10], 0.6),    # FP (a duplicate)  0.6: 4/7
        _det(1, 2, [60, 60, 5, 5], 0.5),    # FP  0.5: 4/8
        _det(1, 2, [40, 0, 10, 10], 0.4),   # TP  0.4: 6/9 = 0.667, ties 0.7: 0.7 wins
        _det(2, 2, [10, 10, 10, 10], 0.85),  # on the cat crowd: a FP, the crowd is a cat's
        _det(2, 1, [10, 10, 10, 10], 0.3),  # a cat on the cat crowd: ignored
        _det(1, 1, [0, 50, 10, 10], 0.5),   # a cat on the bird: a FP of cat (no cat GT)
        _det(1, 1, [90, 90, 5, 5], 0.2),
    ]
    # With the crowd FP at 0.85: 0.9 -> 0.5, 0.85 -> 2/5, 0.8 -> 2/6, 0.7 -> 4/7,
    # 0.6 -> 4/8, 0.5 -> 4/9, 0.4 -> 6/10: the best is 0.4 (0.6).
    found = f1_thresholds(coco, results, _classes(coco))
    dog = found[1]
    assert dog.threshold == 0.4 and not dog.fallback
    assert dog.f1 == pytest.approx(0.6) and dog.precision == pytest.approx(3 / 7)
    assert dog.recall == 1.0 and dog.num_gt == 3 and dog.num_detections == 7
    without_crowd_fp = [r for r in results if r["score"] != 0.85]
    dog = f1_thresholds(coco, without_crowd_fp, _classes(coco))[1]
    assert dog.threshold == 0.7 and dog.f1 == pytest.approx(2 / 3)
    assert dog.precision == pytest.approx(2 / 3) and dog.recall == pytest.approx(2 / 3)
    # No ground truth (cat: one detection of 0.5 above the fallback, a FP), no detection
    # (bird), nothing at all (empty): the fallback, measured there.
    cat, bird, empty = found[0], found[2], found[3]
    assert (cat.threshold, cat.fallback, cat.num_gt, cat.num_detections) == (0.3, True, 0, 2)
    assert (cat.f1, cat.precision, cat.recall) == (0.0, 0.0, None)
    assert (bird.threshold, bird.fallback, bird.f1, bird.precision, bird.recall) == \
        (0.3, True, 0.0, None, 0.0)
    assert (empty.f1, empty.precision, empty.recall, empty.fallback) == (None, None, None, True)
    assert f1_thresholds(coco, results, _classes(coco), fallback=0.6)[3].threshold == 0.6


def test_equal_scores_are_one_threshold():
    coco = _coco([(1, 1, [0, 0, 10, 10], 0), (1, 1, [20, 0, 10, 10], 0)], images=1)
    results = [_det(1, 1, [0, 0, 10, 10], 0.5), _det(1, 1, [60, 60, 5, 5], 0.5),
               _det(1, 1, [20, 0, 10, 10], 0.5)]
    cat = f1_thresholds(coco, results, _classes(coco))[0]
    # 0.5 keeps all three (2 TP, 1 FP): no threshold splits equal scores.
    assert cat.threshold == 0.5 and cat.f1 == pytest.approx(4 / 5)


def test_pr_curves_of_perfect_predictions_are_precision_one_to_recall_one():
    coco = _coco(GT)
    perfect = [_det(a[0], a[1], a[2], 1.0) for a in GT if not a[3]]
    result = evaluate_results(coco, perfect)
    assert result.curves is not None and result.ground_truth is coco
    pr = pr_curves(result.curves, _classes(coco))
    assert pr["recall"] == pytest.approx(np.linspace(0, 1, 101).tolist())
    by_name = {row["name"]: row for row in pr["classes"]}
    for name in ("cat", "dog", "bird"):
        row = by_name[name]
        # pycocotools divides by tp + fp + eps: 1 - 2e-16
        assert row["precision_iou50"] == pytest.approx([1.0] * 101)
        assert row["precision_iou50_95"] == pytest.approx([1.0] * 101)
        assert row["AP50"] == pytest.approx(1.0) and row["AP"] == pytest.approx(1.0)
    # No ground truth: pycocotools' -1 everywhere, which is null and out of the mean.
    assert by_name["empty"]["precision_iou50"] == [None] * 101
    assert by_name["empty"]["AP"] is None and by_name["empty"]["AP50"] is None
    assert pr["mean"]["precision_iou50"] == pytest.approx([1.0] * 101)
    assert pr["mean"]["AP"] == pytest.approx(1.0)
    json.dumps(pr, allow_nan=False)


def test_pr_curves_leave_minus_one_out_of_the_means():
    precision = np.full((2, 3, 3), -1.0)  # IoU 0.5 and 0.75, 3 recall points, 3 classes
    precision[0, :, 0] = [1.0, 0.5, 0.0]
    precision[1, :, 0] = [-1.0, 0.5, -1.0]  # partly missing: the mean is of what is there
    precision[:, :, 1] = [[0.8, 0.4, 0.2], [0.6, 0.2, 0.0]]
    curves = PrecisionCurves(precision, (0.5, 0.75), (0.0, 0.5, 1.0), (1, 2, 3), (1,))
    classes = [ReportClass(0, 1, "a"), ReportClass(1, 2, "b"), ReportClass(2, 3, "c"),
               ReportClass(3, 9, "not evaluated")]
    pr = pr_curves(curves, classes)
    a, b, c, gone = pr["classes"]
    assert a["precision_iou50"] == [1.0, 0.5, 0.0]
    assert a["precision_iou50_95"] == pytest.approx([1.0, 0.5, 0.0])
    assert a["AP50"] == pytest.approx(0.5) and a["AP"] == pytest.approx(2.0 / 4)
    assert b["precision_iou50_95"] == pytest.approx([0.7, 0.3, 0.1])
    assert b["AP"] == pytest.approx(2.2 / 6)
    for row in (c, gone):
        assert row["precision_iou50"] == [None] * 3 and row["AP"] is None
    assert pr["mean"]["precision_iou50"] == pytest.approx([0.9, 0.45, 0.1])
    assert pr["mean"]["AP50"] == pytest.approx((0.5 + 1.4 / 3) / 2)
    with pytest.raises(ValueError, match=r"no IoU threshold 0\.5"):
        pr_curves(PrecisionCurves(precision, (0.55, 0.75), (0.0, 0.5, 1.0), (1, 2, 3), (1,)),
                  classes)


def _check_png(path: Path, min_side: int) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        assert min(im.size) >= min_side
        return im.size


def test_report_files_are_written_and_pngs_are_valid_for_3_classes(tmp_path):
    coco = _coco(GT)
    written = write_report(tmp_path / "report", coco, DETECTIONS, [1, 2, 3, 4], plots=True)
    assert [p.name for p in written] == list(REPORT_FILES)
    for path in written:
        if path.suffix == ".png":
            _check_png(path, 300)
    matrix = json.loads((tmp_path / "report" / "confusion_matrix.json").read_text())
    assert matrix["score_threshold"] == 0.3 and matrix["iou"] == 0.5
    assert matrix["matrix"][4] == [0, 2, 1, 0, 0]
    thresholds = json.loads((tmp_path / "report" / "thresholds.json").read_text())
    assert set(thresholds["class_thresholds"]) == {"0", "1", "2", "3"}
    assert [c["name"] for c in thresholds["classes"]] == ["cat", "dog", "bird", "empty"]
    assert json.loads((tmp_path / "report" / "pr_curves.json").read_text())["classes"][0][
        "name"] == "cat"
    # No figures asked for: the JSON files only; a report folder that is a file: refused.
    assert len(write_report(tmp_path / "json", coco, DETECTIONS, plots=False)) == 3
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"report folder .*file is a file"):
        write_report(tmp_path / "file", coco, DETECTIONS)


def test_report_figures_stay_readable_for_80_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = {c: f"class_{c}" for c in range(1, 81)}
    anns, results = [], []
    for image_id in range(1, 21):
        for _ in range(8):
            cid = int(rng.integers(1, 81))
            x, y = rng.uniform(0, 60, 2).tolist()
            anns.append((image_id, cid, [x, y, 30.0, 30.0], 0))
            guess = cid if rng.random() < 0.7 else int(rng.integers(1, 81))
            results.append(_det(image_id, guess, [x + 2, y + 1, 30.0, 30.0],
                                float(rng.uniform(0.1, 1))))
    coco = _coco(anns, images=20, names=names)
    result = evaluate_results(coco, results)
    written = write_report(tmp_path, coco, results, curves=result.curves, plots=True)
    sizes = {p.name: _check_png(p, 500) for p in written if p.suffix == ".png"}
    assert set(sizes) == {"pr_curves.png", "pr_curves_classes.png", "confusion_matrix.png"}
    assert min(sizes["pr_curves_classes.png"]) >= 1200  # 9 x 9 small plots
    assert min(sizes["confusion_matrix.png"]) >= 1200   # 81 rows and columns of labels
    matrix = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert len(matrix["matrix"]) == 81 and len(matrix["names"]) == 81
    # Every ground-truth box is in exactly one cell of its row.
    assert sum(sum(row) for row in matrix["matrix"][:80]) == len(anns)


# ------------------------------------------------------------------ dinodet eval

@pytest.fixture(scope="module")
def eval_case(tmp_path_factory) -> dict[str, Path]:
    """The tiny two-class model and synthetic data of tests/test_cli_inputs.py's eval."""
    import torch

    import dinodet
    from dinodet.data.synthetic import make_synthetic_coco
    from test_cli import _config

    root = tmp_path_factory.mktemp("eval_report")
    torch.manual_seed(0)
    classes = [{"label": 0, "category_id": 1, "name": "circle"},
               {"label": 1, "category_id": 3, "name": "square"}]
    dinodet.save_pretrained(dinodet.build_model(_config()).eval(), root / "m",
                            extra={"classes": classes}, transform=dinodet.EvalTransform(64))
    coco = make_synthetic_coco(root / "coco", num_train=1, num_val=2, image_size=(48, 64),
                               num_classes=2, max_objects=2, seed=1)
    return {"model": root / "m", "ann": coco["val_ann"], "images": coco["val_images"]}


def _eval_args(case: dict[str, Path], *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(case["model"]), "--ann", str(case["ann"]),
            "--images", str(case["images"]), "--workers", "0", *extra]


def test_eval_cli_writes_the_report(eval_case, tmp_path, capsys):
    from dinodet.cli import main

    report = tmp_path / "report"
    assert main(_eval_args(eval_case, "--report", str(report), "--confusion-iou", "0.4",
                           "--confusion-threshold", "0")) == 0
    out = capsys.readouterr().out
    assert "AP50" in out and f"wrote the evaluation report to {report}" in out
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES)
    for name in REPORT_FILES:
        if name.endswith(".png"):
            _check_png(report / name, 300)
    matrix = json.loads((report / "confusion_matrix.json").read_text())
    assert (matrix["iou"], matrix["score_threshold"]) == (0.4, 0.0)
    assert matrix["names"] == ["circle", "square", "background"]
    assert matrix["num_images"] == 2
    thresholds = json.loads((report / "thresholds.json").read_text())
    assert set(thresholds["class_thresholds"]) == {"0", "1"}
    assert all(0 <= t <= 1 for t in thresholds["class_thresholds"].values())


def test_eval_cli_checks_the_report_options_before_evaluating(eval_case, tmp_path, capsys,
                                                              monkeypatch):
    from dinodet.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the report options were checked")

    monkeypatch.setattr("dinodet.weights.load_model", refuse)
    (tmp_path / "file").write_text("")
    for extra, message in [
            (["--confusion-iou", "0.5"], "--confusion-iou set the report's confusion matrix: "
                                         "add --report DIR"),
            (["--report", str(tmp_path / "r"), "--confusion-iou", "0"],
             "--confusion-iou must be a number in (0, 1], got 0.0"),
            (["--report", str(tmp_path / "file")], f"--report {tmp_path / 'file'} is a file")]:
        assert main(_eval_args(eval_case, *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
