"""The evaluation report: per-class precision-recall curves, a confusion matrix and the
F1-optimal score threshold of every class, as JSON and PNG.

:func:`write_report` (or :func:`write_eval_report`, from an
:class:`~dinodet.engine.evaluate.EvalResult`) writes into one folder:

``pr_curves.json``
    The recall points (COCO's 101), and for every class and for the mean over classes
    the interpolated precision at IoU 0.5 and averaged over IoU 0.50:0.95, with AP50 and
    AP; area "all", 100 detections per image, as the AP table. ``null`` where there is
    nothing to score (a class without ground truth).
``pr_curves.png``
    Every class's curve at IoU 0.5 on one axes and their mean in bold (a legend with
    class names and AP50 up to :data:`LEGEND_MAX_CLASSES` classes).
``pr_curves_classes.png``
    One small plot per class (IoU 0.5 and 0.50:0.95), its name and APs in the title:
    readable for 80 classes.
``confusion_matrix.json`` / ``confusion_matrix.png``
    Counts of ground truth (rows, plus "background" for detections that match none) by
    predicted class (columns, plus "background" for ground truth no detection matched),
    at one IoU and score threshold (:func:`confusion_matrix`).
``thresholds.json``
    The F1-optimal score threshold of every class (:func:`f1_thresholds`), under
    ``class_thresholds`` as ``{"class index": threshold}``, and the F1, precision and
    recall reached there.

The PNGs need matplotlib (``pip install 'dinodet[plot]'``); the JSON files do not.

Matching rule (the confusion matrix and the thresholds). Per image, the detections kept
(score >= the threshold) are taken in order of decreasing score (equal scores in the
order of the results list). Each is matched to the ground-truth box, among those not
crowd and not yet matched, with which its IoU is highest, if that IoU is >= the IoU
threshold (equal IoUs: the first annotation of the image). A ground-truth box is matched
once. A detection matched to nothing whose overlap with a crowd region (intersection over
the detection's area, as COCO) is >= the IoU threshold is ignored, as COCO ignores it:
neither a true nor a false positive. The confusion matrix matches class-agnostically (a
"cat" may match a "dog", which is the confusion it counts) and ignores a detection on a
crowd region of any class; the thresholds match within a class only, as COCO's AP does.
Every detection of the results list counts (COCO's AP keeps the 100 best of an image),
and only the images evaluated (``image_ids``) are read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from dinodet.errors import UserError

if TYPE_CHECKING:
    from dinodet.engine.evaluate import EvalResult, PrecisionCurves

__all__ = ["DEFAULT_CONFUSION_IOU", "DEFAULT_CONFUSION_THRESHOLD",
           "DEFAULT_FALLBACK_THRESHOLD", "REPORT_FILES", "ClassThreshold", "ConfusionMatrix",
           "ReportClass", "check_report_options", "class_table", "confusion_matrix",
           "f1_thresholds", "plot_confusion_matrix", "plot_pr_curves", "pr_curves",
           "thresholds_json", "write_eval_report", "write_report"]

DEFAULT_CONFUSION_IOU = 0.5
#: The confusion matrix counts detections scoring at least this; ``Detector``'s default.
DEFAULT_CONFUSION_THRESHOLD = 0.3
#: The threshold of a class whose F1 cannot be measured (no ground truth, no detection,
#: or no true positive at any threshold); ``Detector``'s default threshold.
DEFAULT_FALLBACK_THRESHOLD = 0.3
#: The IoU at which the F1-optimal thresholds are measured.
F1_IOU = 0.5
#: Up to this many classes, ``pr_curves.png`` has a legend; above, see the per-class grid.
LEGEND_MAX_CLASSES = 20
#: Up to this many classes, each confusion-matrix cell shows its number.
CELL_TEXT_MAX_CLASSES = 25
#: Every file :func:`write_report` may write, in the order it writes them.
REPORT_FILES = ("pr_curves.json", "confusion_matrix.json", "thresholds.json",
                "pr_curves.png", "pr_curves_classes.png", "confusion_matrix.png")
BACKGROUND = "background"


@dataclass(frozen=True)
class ReportClass:
    """One class of the report: its class index, its dataset category id, its name."""

    label: int
    category_id: int
    name: str


def class_table(coco_gt: COCO, label_to_category_id: Sequence[int] | None = None,
                class_names: Sequence[str] | None = None) -> list[ReportClass]:
    """The classes the report covers, by class index: those whose category is in the
    ground truth (as the per-class AP table). ``label_to_category_id`` ``None`` means class
    index == category id; ``class_names`` default to the ground truth's names. A category
    given twice keeps its first class index."""
    categories = {int(c) for c in coco_gt.getCatIds()}
    if label_to_category_id is None:
        label_to_category_id = range(max(categories, default=-1) + 1)
    if class_names is not None and len(class_names) < len(label_to_category_id):
        raise UserError(f"{len(class_names)} class names for {len(label_to_category_id)} "
                        "classes")
    table: list[ReportClass] = []
    seen: set[int] = set()
    for label, cid in enumerate(label_to_category_id):
        cid = int(cid)
        if cid not in categories or cid in seen:
            continue
        seen.add(cid)
        name = class_names[label] if class_names is not None else coco_gt.cats[cid]["name"]
        table.append(ReportClass(label, cid, str(name)))
    return table


def _check_fraction(value: float, what: str, low_open: bool = False) -> float:
    """``value`` as a float in [0, 1] ((0, 1] with ``low_open``), or a UserError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        bound = "(0, 1]" if low_open else "[0, 1]"
        raise UserError(f"{what} must be a number in {bound}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------ matching

# What _match gives a detection that matched no ground truth, or only a crowd region.
_UNMATCHED, _ON_CROWD = -1, -2


def _match(det_boxes: np.ndarray, det_classes: np.ndarray, gt_boxes: np.ndarray,
           gt_classes: np.ndarray, gt_crowd: np.ndarray, iou: float,
           same_class: bool) -> np.ndarray:
    """The module's matching rule on one image, detections already in score order: per
    detection the index of the ground truth it matched, ``_UNMATCHED`` or ``_ON_CROWD``."""
    out = np.full(len(det_boxes), _UNMATCHED, dtype=np.int64)
    if not len(det_boxes) or not len(gt_boxes):
        return out
    # COCO's own IoU of xywh boxes: against a crowd box, intersection over the
    # detection's area; 0 where the denominator is 0.
    ious = np.asarray(mask_utils.iou(det_boxes.astype(np.float64),
                                     gt_boxes.astype(np.float64),
                                     gt_crowd.astype(np.uint8)), dtype=np.float64)
    if same_class:
        ious[det_classes[:, None] != gt_classes[None, :]] = -1.0
    regular = ~gt_crowd
    reachable = np.where(regular[None, :], ious, -1.0).max(1) >= iou
    on_crowd = np.where(gt_crowd[None, :], ious, -1.0).max(1) >= iou
    free = regular.copy()
    for d in range(len(det_boxes)):
        if reachable[d]:  # else no free box can match: skip the search
            row = np.where(free, ious[d], -1.0)
            best = int(np.argmax(row))
            if row[best] >= iou:
                free[best] = False
                out[d] = best
                continue
        if on_crowd[d]:
            out[d] = _ON_CROWD
    return out


@dataclass
class _Image:
    """One image's detections (in score order) and ground truth, classes as positions in
    the report's class table."""

    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_classes: np.ndarray
    gt_boxes: np.ndarray
    gt_classes: np.ndarray
    gt_crowd: np.ndarray


def _check_result(r: Any, n: int) -> tuple[int, int, list[float], float]:
    """One COCO results entry, or a UserError naming it."""
    if not isinstance(r, Mapping):
        raise UserError(f"results[{n}] must be a mapping, got {type(r).__name__}")
    for key in ("image_id", "category_id", "bbox", "score"):
        if key not in r:
            raise UserError(f"results[{n}] has no {key!r}")
    bbox, score = r["bbox"], r["score"]
    try:
        ids = int(r["image_id"]), int(r["category_id"])
        box = [float(v) for v in bbox]
        score = float(score)
    except (TypeError, ValueError):
        raise UserError(f"results[{n}]: 'image_id' and 'category_id' must be integers, "
                        f"'bbox' 4 numbers and 'score' a number, got {dict(r)!r}"[:300]
                        ) from None
    if len(box) != 4 or not all(math.isfinite(v) for v in (*box, score)):
        raise UserError(f"results[{n}]: 'bbox' must be 4 finite numbers and 'score' finite, "
                        f"got {bbox!r} and {score!r}")
    return ids[0], ids[1], box, score


def _images(coco_gt: COCO, results: Sequence[Mapping[str, Any]],
            classes: Sequence[ReportClass], image_ids: Sequence[int] | None
            ) -> tuple[list[_Image], int]:
    """The images evaluated (default: every ground-truth image) with their detections and
    ground truth of the report's classes; and how many detections were left out because
    their category is not one of the classes."""
    position = {c.category_id: k for k, c in enumerate(classes)}
    ids = sorted({int(i) for i in image_ids}) if image_ids is not None \
        else sorted(int(i) for i in coco_gt.getImgIds())
    wanted = set(ids)
    by_image: dict[int, list[tuple[int, list[float], float]]] = {i: [] for i in ids}
    outside = 0
    for n, r in enumerate(results):
        image_id, cid, box, score = _check_result(r, n)
        if image_id not in coco_gt.imgs:
            raise UserError(f"results[{n}]: image_id {image_id} is not in the ground truth")
        if image_id not in wanted:
            continue
        if cid not in position:
            outside += 1
            continue
        by_image[image_id].append((position[cid], box, score))
    images = []
    for image_id in ids:
        dets = by_image[image_id]
        scores = np.array([s for _, _, s in dets], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        anns = [a for a in coco_gt.imgToAnns.get(image_id, [])
                if int(a["category_id"]) in position]
        images.append(_Image(
            det_boxes=np.array([b for _, b, _ in dets], dtype=np.float64).reshape(-1, 4)[order],
            det_scores=scores[order],
            det_classes=np.array([k for k, _, _ in dets], dtype=np.int64)[order],
            gt_boxes=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
            gt_classes=np.array([position[int(a["category_id"])] for a in anns],
                                dtype=np.int64),
            gt_crowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)))
    return images, outside


# ---------------------------------------------------------------- confusion matrix

@dataclass(eq=False)
class ConfusionMatrix:
    """``counts`` [K + 1, K + 1]: row = ground-truth class, column = predicted class, in
    the order of ``classes``; the last row and column are "background": a detection that
    matched no ground truth (a false positive) counts in the last row, a ground-truth box
    no detection matched (a miss) in the last column; the corner stays 0. ``ignored``:
    detections on crowd regions, not counted. ``outside_classes``: detections of a
    category not among ``classes``, left out."""

    counts: np.ndarray
    classes: list[ReportClass]
    iou: float
    score_threshold: float
    num_images: int
    ignored: int
    outside_classes: int

    @property
    def names(self) -> list[str]:
        """The row and column names: the class names, then "background"."""
        return [c.name for c in self.classes] + [BACKGROUND]

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum (a row without any count stays 0)."""
        totals = self.counts.sum(1, keepdims=True).astype(np.float64)
        return np.divide(self.counts, totals, out=np.zeros(self.counts.shape), where=totals > 0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the matrix, its names and its settings."""
        return {
            "iou": self.iou, "score_threshold": self.score_threshold,
            "rows": "ground-truth class; last row 'background': detections matching no "
                    "ground truth (false positives)",
            "columns": "predicted class; last column 'background': ground truth no "
                       "detection matched (missed)",
            "names": self.names,
            "classes": [{"label": c.label, "category_id": c.category_id, "name": c.name}
                        for c in self.classes],
            "matrix": self.counts.tolist(),
            "num_images": self.num_images,
            "ignored_on_crowd": self.ignored,
            "outside_classes": self.outside_classes,
        }


def confusion_matrix(coco_gt: COCO, results: Sequence[Mapping[str, Any]],
                     classes: Sequence[ReportClass], iou: float = DEFAULT_CONFUSION_IOU,
                     score_threshold: float = DEFAULT_CONFUSION_THRESHOLD,
                     image_ids: Sequence[int] | None = None) -> ConfusionMatrix:
    """The confusion matrix of COCO ``results`` on ``coco_gt``'s images (or ``image_ids``)
    at ``iou`` and ``score_threshold``, by the module's matching rule, class-agnostic: a
    detection of class p matched to a ground-truth box of class g counts in (g, p); one
    matched to nothing in (background, p), unless it lies on a crowd region (then it is
    ignored, whatever the classes); a non-crowd box left unmatched in (g, background).
    Crowd boxes are never rows."""
    iou = _check_fraction(iou, "confusion-matrix IoU", low_open=True)
    score_threshold = _check_fraction(score_threshold, "confusion-matrix score threshold")
    classes = list(classes)
    images, outside = _images(coco_gt, results, classes, image_ids)
    size = len(classes)
    counts = np.zeros((size + 1, size + 1), dtype=np.int64)
    ignored = 0
    for im in images:
        keep = im.det_scores >= score_threshold
        det_classes = im.det_classes[keep]
        matched = _match(im.det_boxes[keep], det_classes, im.gt_boxes, im.gt_classes,
                         im.gt_crowd, iou, same_class=False)
        hit = matched >= 0
        np.add.at(counts, (im.gt_classes[matched[hit]], det_classes[hit]), 1)
        np.add.at(counts, (size, det_classes[matched == _UNMATCHED]), 1)
        ignored += int((matched == _ON_CROWD).sum())
        missed = ~im.gt_crowd
        missed[matched[hit]] = False
        np.add.at(counts, (im.gt_classes[missed], size), 1)
    return ConfusionMatrix(counts, classes, iou, score_threshold, len(images), ignored,
                           outside)


# ---------------------------------------------------------------------- thresholds

@dataclass(frozen=True)
class ClassThreshold:
    """A class's score threshold and what it reaches on the evaluation data: ``f1``,
    ``precision``, ``recall`` (``None`` where undefined: precision without a detection
    kept, recall without ground truth). ``num_gt``: its non-crowd ground-truth boxes;
    ``num_detections``: its detections, those ignored on crowd regions not counted;
    ``fallback``: the threshold is the fallback, F1 could not be measured."""

    threshold: float
    f1: float | None
    precision: float | None
    recall: float | None
    num_gt: int
    num_detections: int
    fallback: bool


def _scores_at(tp: int, fp: int, num_gt: int) -> tuple[float | None, float | None,
                                                         float | None]:
    """(F1, precision, recall) of ``tp`` true and ``fp`` false positives."""
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / num_gt if num_gt else None
    f1 = 2 * tp / (2 * tp + fp + (num_gt - tp)) if tp + fp + num_gt else None
    return f1, precision, recall


def f1_thresholds(coco_gt: COCO, results: Sequence[Mapping[str, Any]],
                  classes: Sequence[ReportClass], iou: float = F1_IOU,
                  fallback: float = DEFAULT_FALLBACK_THRESHOLD,
                  image_ids: Sequence[int] | None = None) -> dict[int, ClassThreshold]:
    """The score threshold of each class that maximises its F1 on ``coco_gt``'s images (or
    ``image_ids``), keyed by class index.

    A detection is kept at threshold t when its score is >= t, so the candidates are the
    detections' scores. Detections are matched within their class by the module's
    matching rule at ``iou``; since matching goes in score order, raising the threshold
    only drops the last detections, and one pass gives the true and false positives at
    every candidate. F1 = 2 TP / (2 TP + FP + FN). Of equal F1s the higher threshold wins
    (fewer detections, same quality). A class without ground truth, without detections, or
    without a true positive at any threshold (F1 0 everywhere) gets ``fallback``, and the
    F1, precision and recall measured at ``fallback``.
    """
    iou = _check_fraction(iou, "threshold IoU", low_open=True)
    fallback = _check_fraction(fallback, "fallback threshold")
    classes = list(classes)
    images, _ = _images(coco_gt, results, classes, image_ids)
    num_gt = np.zeros(len(classes), dtype=np.int64)
    per_class: list[list[tuple[float, bool]]] = [[] for _ in classes]  # (score, true?)
    for im in images:
        np.add.at(num_gt, im.gt_classes[~im.gt_crowd], 1)
        matched = _match(im.det_boxes, im.det_classes, im.gt_boxes, im.gt_classes,
                         im.gt_crowd, iou, same_class=True)
        for k, score, m in zip(im.det_classes.tolist(), im.det_scores.tolist(),
                               matched.tolist(), strict=True):
            if m != _ON_CROWD:
                per_class[k].append((score, m >= 0))
    out: dict[int, ClassThreshold] = {}
    for k, c in enumerate(classes):
        dets = per_class[k]
        n_gt = int(num_gt[k])
        scores = np.array([s for s, _ in dets], dtype=np.float64)
        # A stable sort keeps the matching order of equal scores (images one after another).
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        true = np.array([t for _, t in dets], dtype=bool)[order]
        tp = np.cumsum(true)
        fp = np.cumsum(~true)
        best: ClassThreshold | None = None
        if n_gt and len(dets):
            # The last detection of each run of equal scores: threshold = that score.
            ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
            f1 = 2 * tp[ends] / (tp[ends] + fp[ends] + n_gt)
            i = int(np.argmax(f1))  # the first maximum: the highest threshold
            if f1[i] > 0:
                j = int(ends[i])
                f, p, r = _scores_at(int(tp[j]), int(fp[j]), n_gt)
                best = ClassThreshold(float(scores[j]), f, p, r, n_gt, len(dets), False)
        if best is None:
            kept = int(np.searchsorted(-scores, -fallback, side="right"))  # score >= fallback
            t_pos = int(tp[kept - 1]) if kept else 0
            f, p, r = _scores_at(t_pos, kept - t_pos, n_gt)
            best = ClassThreshold(fallback, f, p, r, n_gt, len(dets), True)
        out[c.label] = best
    return out


def thresholds_json(thresholds: Mapping[int, ClassThreshold], classes: Sequence[ReportClass],
                    iou: float = F1_IOU,
                    fallback: float = DEFAULT_FALLBACK_THRESHOLD) -> dict[str, Any]:
    """The JSON of ``thresholds.json``: ``class_thresholds`` ``{"class index": threshold}``
    (what a checkpoint stores for ``predict --threshold auto``) and per class what that
    threshold reaches."""
    from dinodet.weights import CLASS_THRESHOLDS_KEY

    return {
        "iou": iou, "fallback_threshold": fallback,
        "rule": "per class the score threshold (keep score >= threshold) of highest F1 on "
                "the evaluation data, the higher one on ties; classes without ground truth, "
                "detections or true positives get fallback_threshold",
        CLASS_THRESHOLDS_KEY: {str(c.label): thresholds[c.label].threshold for c in classes
                               if c.label in thresholds},
        "classes": [{"label": c.label, "category_id": c.category_id, "name": c.name,
                     **asdict(thresholds[c.label])} for c in classes if c.label in thresholds],
    }


# ----------------------------------------------------------------------- PR curves

def _mean_valid(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` of the entries that are not -1; nan where all are."""
    valid = values > -1
    total = np.where(valid, values, 0.0).sum(axis)
    count = valid.sum(axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


def _json_list(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def pr_curves(curves: PrecisionCurves, classes: Sequence[ReportClass]) -> dict[str, Any]:
    """The JSON of ``pr_curves.json`` from an evaluation's precision table.

    Per class (and for the mean over classes): ``precision_iou50`` (IoU 0.5) and
    ``precision_iou50_95`` (at each recall point the mean over IoU 0.50:0.95) at each of
    ``recall``, and ``AP50`` / ``AP`` (their means, as COCO's). pycocotools' -1 (no ground
    truth: nothing to score) is left out of every mean and is ``null`` in the JSON, as is
    a class missing from the table. Precision past the highest recall reached is 0, as
    COCO has it.
    """
    thresholds = np.asarray(curves.iou_thresholds)
    at50 = np.flatnonzero(np.isclose(thresholds, 0.5))
    if not at50.size:
        raise ValueError(f"the evaluation has no IoU threshold 0.5: {curves.iou_thresholds}")
    precision = np.asarray(curves.precision, dtype=np.float64)  # [T, R, K]
    column = {cid: k for k, cid in enumerate(curves.category_ids)}
    missing = np.full(precision.shape[:2], -1.0)
    rows = []
    p50s, p_alls = [], []
    for c in classes:
        p = precision[:, :, column[c.category_id]] if c.category_id in column else missing
        p50 = np.where(p[at50[0]] > -1, p[at50[0]], np.nan)
        p_all = _mean_valid(p, 0)
        p50s.append(np.where(np.isnan(p50), -1.0, p50))
        p_alls.append(np.where(np.isnan(p_all), -1.0, p_all))
        rows.append({"label": c.label, "category_id": c.category_id, "name": c.name,
                     "AP50": _json_number(float(_mean_valid(p[at50[0]], 0))),
                     "AP": _json_number(float(_mean_valid(p.reshape(-1), 0))),
                     "precision_iou50": _json_list(p50),
                     "precision_iou50_95": _json_list(p_all)})
    recall_count = precision.shape[1]
    stack50 = np.array(p50s).reshape(-1, recall_count)
    stack_all = np.array(p_alls).reshape(-1, recall_count)
    ap50s = np.array([r["AP50"] if r["AP50"] is not None else -1.0 for r in rows])
    aps = np.array([r["AP"] if r["AP"] is not None else -1.0 for r in rows])
    return {
        "area": "all", "max_detections": 100,
        "iou_thresholds": [float(t) for t in thresholds],
        "recall": [float(r) for r in curves.recall_points],
        "classes": rows,
        "mean": {"AP50": _json_number(float(_mean_valid(ap50s, 0))),
                 "AP": _json_number(float(_mean_valid(aps, 0))),
                 "precision_iou50": _json_list(_mean_valid(stack50, 0)),
                 "precision_iou50_95": _json_list(_mean_valid(stack_all, 0))},
    }


# ------------------------------------------------------------------------- figures

def _pyplot(required: bool) -> Any:
    """matplotlib's pyplot on the Agg backend; ``None`` if missing and not ``required``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        if not required:
            return None
        raise ImportError("the evaluation report's figures need matplotlib: "
                          "pip install 'dinodet[plot]'") from e
    return plt


def _curve(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def plot_pr_curves(pr: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw ``pr_curves.png`` (all classes at IoU 0.5, their mean in bold) and
    ``pr_curves_classes.png`` (one small plot per class) from :func:`pr_curves`' JSON."""
    plt = _pyplot(required=True)
    out_dir = Path(out_dir)
    recall = np.asarray(pr["recall"], dtype=np.float64)
    rows = pr["classes"]
    mean = pr["mean"]
    written = []

    legend = len(rows) <= LEGEND_MAX_CLASSES
    fig, ax = plt.subplots(figsize=(10, 6) if legend else (8, 6))
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20" if legend else "turbo")
    lines = []
    for n, row in enumerate(rows):
        if row["AP50"] is None:
            continue  # nothing to draw: no ground truth
        colour = colours(n if legend else n / max(1, len(rows) - 1))
        lines += ax.plot(recall, _curve(row["precision_iou50"]), lw=1, alpha=0.7,
                         color=colour, label=f"{row['name']} ({_percent(row['AP50'])})")
    lines += ax.plot(recall, _curve(mean["precision_iou50"]), lw=3, color="black",
                     label=f"mean ({_percent(mean['AP50'])})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    title = (f"Precision-recall at IoU 0.5, {len(rows)} classes (AP50 mean "
             f"{_percent(mean['AP50'])} %)")
    if legend:
        ax.legend(handles=lines, title="class (AP50 %)", fontsize=8, loc="center left",
                  bbox_to_anchor=(1.01, 0.5))
    else:  # 80 names would hide the plot: the per-class grid names them
        ax.legend(handles=[*ax.plot([], [], lw=1, color="grey", label="one line per class"),
                           lines[-1]], loc="lower left", fontsize=8)
        title += "\nper class: pr_curves_classes.png"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    written.append(out_dir / "pr_curves.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    cols = max(1, math.ceil(math.sqrt(len(rows))))
    grid_rows = max(1, math.ceil(len(rows) / cols))
    cell = min(3.0, max(1.8, 6.0 / cols))  # inches: few classes get larger plots
    fig, axes = plt.subplots(grid_rows, cols, sharex=True, sharey=True, squeeze=False,
                             figsize=(cell * cols + 0.6, cell * grid_rows + 0.8))
    for n, ax in enumerate(axes.flat):
        if n >= len(rows):
            ax.axis("off")
            continue
        row = rows[n]
        ax.plot(recall, _curve(row["precision_iou50"]), lw=1.2, color="tab:blue")
        ax.plot(recall, _curve(row["precision_iou50_95"]), lw=1, ls="--", color="tab:orange")
        ax.set_title(f"{row['name']}\nAP50 {_percent(row['AP50'])}  AP {_percent(row['AP'])}",
                     fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        if row["AP50"] is None:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=6,
                    transform=ax.transAxes)
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    fig.suptitle("Precision-recall per class: IoU 0.5 (solid), mean over IoU 0.50:0.95 "
                 "(dashed); AP in %", fontsize=9)
    fig.tight_layout()
    written.append(out_dir / "pr_curves_classes.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def plot_confusion_matrix(matrix: ConfusionMatrix, path: str | Path,
                          normalize: bool = False) -> Path:
    """Draw ``matrix`` as a heatmap: counts (a square-root colour scale, so that the
    off-diagonal confusions show beside a large diagonal), or with ``normalize`` each row
    as fractions of its sum. Cells show their numbers up to
    :data:`CELL_TEXT_MAX_CLASSES` classes; the labels shrink with the class count."""
    plt = _pyplot(required=True)
    from matplotlib.colors import Normalize, PowerNorm

    names = matrix.names
    size = len(names)
    values = matrix.normalized() if normalize else matrix.counts.astype(np.float64)
    inches = float(np.clip(0.2 * size + 3.5, 6, 24))  # 0.2 in (14 pt) a cell at 80 classes
    font = 9 if size <= 21 else 6 if size <= 100 else 4
    fig, ax = plt.subplots(figsize=(inches + 1.2, inches))
    top = max(1.0, float(values.max())) if not normalize else 1.0
    norm = Normalize(0, 1) if normalize else PowerNorm(0.5, vmin=0, vmax=top)
    image = ax.imshow(values, cmap="Blues", norm=norm, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("fraction of the row" if normalize else "count (square-root scale)")
    ax.set_xticks(range(size), names, rotation=90, fontsize=font)
    ax.set_yticks(range(size), names, fontsize=font)
    ax.set_xlabel(f"predicted class ({BACKGROUND}: ground truth missed)")
    ax.set_ylabel(f"ground-truth class ({BACKGROUND}: false positive)")
    ax.set_title(f"Confusion matrix at IoU {matrix.iou:g}, score >= "
                 f"{matrix.score_threshold:g}" + (", rows normalised" if normalize else ""),
                 fontsize=10)
    if size - 1 <= CELL_TEXT_MAX_CLASSES:
        for (i, j), v in np.ndenumerate(values):
            if v:
                text = f"{v:.2f}" if normalize else str(int(v))
                ax.text(j, i, text, ha="center", va="center", fontsize=max(5.0, font - 1),
                        color="white" if norm(v) > 0.6 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# -------------------------------------------------------------------------- report

def check_report_options(out_dir: str | Path, confusion_iou: float = DEFAULT_CONFUSION_IOU,
                         confusion_threshold: float = DEFAULT_CONFUSION_THRESHOLD,
                         names: tuple[str, str, str] = ("report folder", "confusion_iou",
                                                        "confusion_threshold")) -> Path:
    """Refuse, before any evaluation, a report folder that cannot be written
    (:func:`~dinodet.weights.check_output_dir`), an IoU outside (0, 1] or a score threshold
    outside [0, 1]; the :class:`~dinodet.errors.UserError` names them by ``names``."""
    from dinodet.weights import check_output_dir

    _check_fraction(confusion_iou, names[1], low_open=True)
    _check_fraction(confusion_threshold, names[2])
    return check_output_dir(out_dir, names[0])


def _write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically; refuses NaN so that the file is valid JSON."""
    from dinodet.engine.checkpoint import atomic_write

    text = json.dumps(data, indent=1, allow_nan=False).encode()
    atomic_write(path, lambda f: f.write(text), what="report file")
    return path


def write_report(out_dir: str | Path, coco_gt: COCO, results: Sequence[Mapping[str, Any]],
                 label_to_category_id: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None, *,
                 curves: PrecisionCurves | None = None,
                 image_ids: Sequence[int] | None = None,
                 classes: Sequence[ReportClass] | None = None,
                 confusion_iou: float = DEFAULT_CONFUSION_IOU,
                 confusion_threshold: float = DEFAULT_CONFUSION_THRESHOLD,
                 fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
                 normalize: bool = False, plots: bool | None = None) -> list[Path]:
    """Write the evaluation report (the files of the module docstring) into ``out_dir``.

    Args:
        out_dir: the folder; created if missing, checked first
            (:func:`~dinodet.weights.check_output_dir`); existing report files replaced.
        coco_gt, results: the ground truth and the COCO results list evaluated.
        label_to_category_id, class_names: the class table as for
            :func:`~dinodet.engine.evaluate.evaluate_results` (or ``classes``, made by
            :func:`class_table`).
        curves: the evaluation's precision table (``EvalResult.curves``); without it the
            results are evaluated again to get it.
        image_ids: the images evaluated; default: those of ``curves``, else every
            ground-truth image.
        confusion_iou, confusion_threshold: the confusion matrix's IoU and score threshold.
        fallback_threshold: the threshold of classes whose F1 cannot be measured.
        normalize: the confusion-matrix figure shows row fractions instead of counts.
        plots: draw the PNGs; ``None``: if matplotlib is installed.
    Returns:
        The files written.
    """
    out = check_report_options(out_dir, confusion_iou, confusion_threshold)
    fallback_threshold = _check_fraction(fallback_threshold, "fallback_threshold")
    plt = _pyplot(required=True) if plots else (_pyplot(required=False) if plots is None
                                                else None)
    table = list(classes) if classes is not None else \
        class_table(coco_gt, label_to_category_id, class_names)
    if curves is None:
        from dinodet.engine.evaluate import evaluate_results

        curves = evaluate_results(coco_gt, results, label_to_category_id, class_names,
                                  image_ids).curves
        assert curves is not None
    if image_ids is None:
        image_ids = curves.image_ids
    pr = pr_curves(curves, table)
    matrix = confusion_matrix(coco_gt, results, table, confusion_iou, confusion_threshold,
                              image_ids)
    thresholds = f1_thresholds(coco_gt, results, table, F1_IOU, fallback_threshold, image_ids)
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_json(out / "pr_curves.json", pr),
               _write_json(out / "confusion_matrix.json", matrix.to_json()),
               _write_json(out / "thresholds.json",
                           thresholds_json(thresholds, table, F1_IOU, fallback_threshold))]
    if plt is not None:
        written += plot_pr_curves(pr, out)
        written.append(plot_confusion_matrix(matrix, out / "confusion_matrix.png", normalize))
    return written


def write_eval_report(out_dir: str | Path, result: EvalResult, **options: Any) -> list[Path]:
    """:func:`write_report` from an :class:`~dinodet.engine.evaluate.EvalResult` that
    kept its detections, curves and ground truth (what
    :func:`~dinodet.engine.evaluate.evaluate_checkpoint` returns; after
    :func:`~dinodet.engine.evaluate.evaluate`, set ``result.detections`` to the results
    it returns). The classes are those of ``result.per_class``. ``options``: the keyword
    options of :func:`write_report`."""
    if result.ground_truth is None or result.detections is None or result.curves is None:
        raise ValueError("the EvalResult lacks its ground truth, detections or curves: "
                         "give write_report the ground truth and results instead")
    return write_report(out_dir, result.ground_truth, result.detections,
                        classes=result_classes(result), curves=result.curves, **options)


def result_classes(result: EvalResult) -> list[ReportClass]:
    """The classes of ``result``'s per-class table, as the report takes them."""
    return [ReportClass(int(e["label"]), int(e["category_id"]), str(e["name"]))
            for e in result.per_class]


def result_thresholds(result: EvalResult) -> dict[int, float] | None:
    """Each class's F1-optimal score threshold (:func:`f1_thresholds`) on an evaluation
    ``result`` that kept its detections and ground truth; None without them (or with no
    class)."""
    if result.detections is None or result.ground_truth is None:
        return None
    found = f1_thresholds(result.ground_truth, result.detections, result_classes(result))
    return {label: t.threshold for label, t in found.items()} or None
