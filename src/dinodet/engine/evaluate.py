"""COCO box evaluation: model outputs -> COCO results -> pycocotools metrics.

The numbers are pycocotools' own (``COCOeval`` with its default parameters); this module
only converts predictions into COCO's results format, gathers them across processes and
reads the summary and a per-class AP out of ``COCOeval``.

Category ids are never shifted: a prediction with class index ``label`` is written with
``category_id = label_to_category_id[label]``, nothing else. With ``keep_category_ids``
that mapping is the identity, so a checkpoint converted from the original DINO and
evaluated on data in COCO's id convention scores exactly what the original would.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from dinodet.errors import UserError
from dinodet.model.postprocess import postprocess

__all__ = ["METRIC_NAMES", "CocoEvaluator", "EvalResult", "PrecisionCurves", "evaluate",
           "evaluate_checkpoint", "evaluate_results", "label_table", "write_results"]

# The names of COCOeval.stats[0..11], in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# The autocast dtype of each ``amp`` setting (evaluation's and training's).
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def _quiet(verbose: bool) -> contextlib.AbstractContextManager:
    """pycocotools prints progress and the summary; keep it only when asked."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _fmt(value: float) -> str:
    # pycocotools marks "nothing to average" as -1; per-class AP of such a class is nan.
    return "-" if value < 0 or math.isnan(value) else f"{100 * value:.1f}"


@dataclass(eq=False)
class PrecisionCurves:
    """What the evaluation report (:mod:`dinodet.engine.analysis`) needs of COCOeval's
    ``accumulate()``: the interpolated precision at area "all" and 100 detections per image
    (as AP), without COCOeval's per-image tables, which are large on a large dataset.

    ``precision`` [T, R, K]: at ``iou_thresholds[t]`` and ``recall_points[r]`` for
    ``category_ids[k]``; pycocotools' -1 where a class has nothing to score (no
    ground truth). ``image_ids``: the images evaluated."""

    precision: np.ndarray
    iou_thresholds: tuple[float, ...]
    recall_points: tuple[float, ...]
    category_ids: tuple[int, ...]
    image_ids: tuple[int, ...]

    @classmethod
    def from_cocoeval(cls, coco_eval: COCOeval) -> PrecisionCurves:
        """The curves of an accumulated ``COCOeval`` (a copy: it may be freed after)."""
        params = coco_eval.params
        area = list(params.areaRngLbl).index("all")
        max_dets = list(params.maxDets).index(100)
        precision = np.array(coco_eval.eval["precision"][:, :, :, area, max_dets])
        return cls(precision, tuple(float(t) for t in params.iouThrs),
                   tuple(float(r) for r in params.recThrs),
                   tuple(int(c) for c in params.catIds), tuple(int(i) for i in params.imgIds))


@dataclass
class EvalResult:
    """COCO box metrics: ``metrics`` maps ``METRIC_NAMES`` to [0, 1] (pycocotools' -1 where
    undefined, e.g. APl without large objects); ``per_class`` has ``label``,
    ``category_id``, ``name`` and ``AP`` (0.50:0.95, all areas, 100 detections; nan without
    ground truth) of every class in the ground truth. ``detections``: the COCO results
    scored, where the caller kept them (:func:`evaluate_checkpoint` does).

    For the evaluation report (:func:`dinodet.engine.analysis.write_eval_report`), without
    evaluating again: ``curves``, the precision-recall curves of the evaluation, and
    ``ground_truth``, the COCO object scored against (a reference, not a copy)."""

    metrics: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    curves: PrecisionCurves | None = field(default=None, repr=False, compare=False)
    ground_truth: COCO | None = field(default=None, repr=False, compare=False)

    def format_table(self) -> str:
        """The main metrics and the per-class AP as fixed-width text, in percent."""
        lines = []
        for row in (METRIC_NAMES[:6], METRIC_NAMES[6:]):
            lines.append("  ".join(f"{name:>6}" for name in row))
            lines.append("  ".join(f"{_fmt(self.metrics[name]):>6}" for name in row))
        if self.per_class:
            width = max(4, *(len(str(entry["name"])) for entry in self.per_class))
            lines.append("")
            lines.append(f"{'label':>5}  {'cat_id':>6}  {'name':<{width}}  {'AP':>6}")
            for entry in self.per_class:
                lines.append(f"{entry['label']:>5}  {entry['category_id']:>6}  "
                             f"{entry['name']!s:<{width}}  {_fmt(entry['AP']):>6}")
        return "\n".join(lines)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections (``COCO.loadRes`` fails on an empty list)."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]),
                   "categories": list(coco_gt.dataset.get("categories", [])),
                   "annotations": []}
    res.createIndex()
    return res


def evaluate_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]],
                     label_to_category_id: Sequence[int] | None = None,
                     class_names: Sequence[str] | None = None,
                     image_ids: Iterable[int] | None = None,
                     verbose: bool = False) -> EvalResult:
    """Run pycocotools' box evaluation on a COCO results list.

    Args:
        coco_gt: the ground truth.
        results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts; not
            modified (``loadRes`` adds keys to what it is given, so it gets copies).
        label_to_category_id: class index -> category id, to label the per-class table;
            ``None`` means the identity (class index == category id).
        class_names: names for the table by class index; default: the ground truth's.
        image_ids: evaluate on these images only; default: every ground-truth image.
        verbose: let pycocotools print.
    """
    with _quiet(verbose):
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:
            coco_dt = _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted({int(i) for i in image_ids})
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats, strict=True)}
    return EvalResult(metrics, _per_class_ap(coco_eval, coco_gt, label_to_category_id,
                                             class_names),
                      curves=PrecisionCurves.from_cocoeval(coco_eval), ground_truth=coco_gt)


def _per_class_ap(coco_eval: COCOeval, coco_gt: COCO,
                  label_to_category_id: Sequence[int] | None,
                  class_names: Sequence[str] | None) -> list[dict[str, Any]]:
    # precision: [T iou thresholds, R recall points, K categories, A areas, M max dets];
    # area index 0 is "all", the last max-dets index is 100, as for stats[0].
    precision = coco_eval.eval["precision"]
    cat_index = {cid: k for k, cid in enumerate(coco_eval.params.catIds)}
    if label_to_category_id is None:
        label_to_category_id = range(max(cat_index, default=-1) + 1)
    rows = []
    for label, cid in enumerate(label_to_category_id):
        if cid not in cat_index:
            continue
        p = precision[:, :, cat_index[cid], 0, -1]
        valid = p[p > -1]
        ap = float(np.mean(valid)) if valid.size else float("nan")
        name = class_names[label] if class_names is not None else coco_gt.cats[cid]["name"]
        rows.append({"label": label, "category_id": int(cid), "name": name, "AP": ap})
    return rows


def write_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> Path:
    """Write a COCO results json atomically (a reader never sees half a file)."""
    from dinodet.engine.checkpoint import atomic_write

    text = json.dumps(list(results)).encode()
    atomic_write(Path(path), lambda f: f.write(text), what="results")
    return Path(path)


class CocoEvaluator:
    """Collects predictions image by image and scores them with pycocotools.

    Args:
        coco_gt: the ground truth (``dataset.coco``).
        label_to_category_id: class index -> dataset category id.
        class_names: names by class index for the per-class table (default: the gt's).
    """

    def __init__(self, coco_gt: COCO, label_to_category_id: Sequence[int],
                 class_names: Sequence[str] | None = None) -> None:
        self.coco_gt = coco_gt
        self.label_to_category_id = [int(c) for c in label_to_category_id]
        self.class_names = list(class_names) if class_names is not None else None
        # image_id -> its COCO results. An image with no detection is kept (empty list):
        # it was evaluated, so its ground truth counts as missed.
        self._per_image: dict[int, list[dict[str, Any]]] = {}

    @property
    def image_ids(self) -> list[int]:
        """The images seen so far, in the order they came."""
        return list(self._per_image)

    def update(self, predictions: Mapping[int, Mapping[str, Tensor]]) -> None:
        """Add the predictions of some images.

        Args:
            predictions: image_id -> ``scores`` [K], ``labels`` [K] (class indices),
                ``boxes`` [K, 4] xyxy in pixels of the original image. An image seen again
                replaces its earlier predictions.
        """
        num_classes = len(self.label_to_category_id)
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image_id {image_id} is not in the ground truth")
            boxes = torch.as_tensor(pred["boxes"]).detach().cpu().reshape(-1, 4).double()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            scores = torch.as_tensor(pred["scores"]).detach().cpu().double().tolist()
            labels = torch.as_tensor(pred["labels"]).detach().cpu().tolist()
            if not len(xywh) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: {len(xywh)} boxes, {len(scores)} scores "
                                 f"and {len(labels)} labels")
            bad = [lab for lab in labels if not 0 <= lab < num_classes]
            if bad:
                raise ValueError(f"image {image_id}: labels {sorted(set(bad))} outside the "
                                 f"{num_classes} classes of label_to_category_id")
            self._per_image[image_id] = [
                {"image_id": image_id, "category_id": self.label_to_category_id[lab],
                 "bbox": box, "score": score}
                for box, score, lab in zip(xywh, scores, labels, strict=True)
            ]

    def results(self) -> list[dict[str, Any]]:
        """The COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``)."""
        return [r for rows in self._per_image.values() for r in rows]

    def gather(self) -> None:
        """Merge the predictions of every process into every process.

        A no-op unless torch.distributed is initialised with more than one process. An image
        reported by several processes (a DistributedSampler pads the dataset by repeating
        images) keeps the predictions of the lowest rank that saw it.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._per_image)
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for image_id, rows in part.items():
                merged.setdefault(image_id, rows)
        self._per_image = merged

    def summarize(self, verbose: bool = False) -> EvalResult:
        """pycocotools' metrics on the images seen (all gt images if none was)."""
        return evaluate_results(self.coco_gt, self.results(), self.label_to_category_id,
                                self.class_names, self._per_image or None, verbose=verbose)


def _to_device(batch: Any, device: torch.device) -> Any:
    """The batch's images on ``device``: via ``batch.to`` when it has one."""
    if hasattr(batch, "to"):
        return batch.to(device).images
    images = batch.images
    if isinstance(images, (list, tuple)):
        return [im.to(device) for im in images]
    return images.to(device)


def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | str,
             label_to_category_id: Sequence[int], coco_gt: COCO, num_select: int = 300,
             amp: str = "off", class_names: Sequence[str] | None = None,
             verbose: bool = False) -> tuple[EvalResult, list[dict[str, Any]]]:
    """COCO box metrics of ``model`` on ``loader``.

    Args:
        model: called as ``model(images)``, returns ``pred_logits`` [B, Q, C] and
            ``pred_boxes`` [B, Q, 4] (cxcywh normalised to each transformed image). It must
            already be on ``device``; its train/eval mode is restored afterwards.
        loader: batches with ``images`` (an ImageBatch or a list of [3, H, W] tensors) and
            ``targets`` (dicts with ``image_id`` and ``orig_size`` [2] (h, w)).
        num_select: detections kept per image (the original evaluates with 300).
        amp: "off", "bf16" or "fp16" autocast for the forward pass.
    Returns:
        The metrics (gathered over all processes) and the COCO results list.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    device = torch.device(device)
    evaluator = CocoEvaluator(coco_gt, label_to_category_id, class_names)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                targets = batch.targets
                if not targets:
                    continue
                images = _to_device(batch, device)
                with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "off"):
                    outputs = model(images)
                # Boxes are relative to each (transformed, unpadded) image, and resizing keeps
                # relative coordinates, so scaling by the original size gives original pixels.
                outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
                orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets])
                detections = postprocess(outputs, orig_sizes, num_select=num_select)
                evaluator.update({int(t["image_id"]): d
                                  for t, d in zip(targets, detections, strict=True)})
    finally:
        model.train(was_training)
    evaluator.gather()
    return evaluator.summarize(verbose=verbose), evaluator.results()


def label_table(classes: Sequence[Mapping[str, Any]] | None, num_classes: int, dataset: Any,
                source: str | Path) -> tuple[list[int], list[str]]:
    """Class index -> (dataset category id, name) for scoring a model on ``dataset`` (a
    :class:`~dinodet.data.coco.CocoDetection`; ``source`` names it in errors).

    From the model's class table (``classes``: ``{"label", "category_id", "name"}`` entries,
    in any order, not necessarily complete) when it has one: a label without an entry gets
    category -1, which no ground truth has. Without one, the dataset's own order. A
    :class:`~dinodet.errors.UserError` names categories of the data the model was not
    trained on, or a model with fewer classes than the data needs.
    """
    label_to_id = [int(c) for c in dataset.label_to_category_id]
    names = [str(n) for n in dataset.class_names]
    if classes is not None:
        by_label = {int(c["label"]): c for c in classes}
        size = max(num_classes, max(by_label, default=-1) + 1)
        label_to_id = [int(by_label[i]["category_id"]) if i in by_label else -1
                       for i in range(size)]
        names = [str(by_label[i].get("name", i)) if i in by_label else str(i)
                 for i in range(size)]
        unknown = sorted(set(dataset.label_to_category_id) - set(label_to_id))
        if unknown:
            raise UserError(f"{source} has categories {unknown[:10]} the model was not "
                            "trained on")
    if num_classes < len(label_to_id):
        raise UserError(f"the model predicts {num_classes} classes but {source} needs "
                        f"{len(label_to_id)}")
    return label_to_id, names


def evaluate_checkpoint(checkpoint: str | Path, ann: str | Path,
                        images: str | Path | None = None,
                        out: str | Path | None = None, variant: str | None = None,
                        batch_size: int = 1, eval_size: int | None = None,
                        max_size: int | None = None, keep_category_ids: bool = False,
                        num_workers: int = 2, device: str = "auto",
                        weights: str = "ema", int8: bool = False,
                        report: str | Path | None = None, confusion_iou: float = 0.5,
                        confusion_threshold: float = 0.3, data_format: str = "auto",
                        split: str | None = None) -> EvalResult:
    """COCO metrics of any model file :func:`~dinodet.weights.load_model` opens, its images
    through the model's :class:`~dinodet.data.EvalTransform` (``eval_size`` / ``max_size``
    override it as in ``dinodet predict``). The detections are kept in the result's
    ``detections`` and written to ``out`` if given (atomically); ``out`` is checked
    (:func:`~dinodet.weights.check_output_file`) before anything is read or evaluated.
    ``int8``: evaluate the model with its Linear and convolution layers in int8
    (:func:`~dinodet.model.quantize.quantize_int8`), on the CPU ("auto" picks it), to
    measure what int8 costs in AP. ``report``: a folder to write the evaluation report into
    (:func:`dinodet.engine.analysis.write_eval_report`: PR curves, the confusion matrix at
    ``confusion_iou`` / ``confusion_threshold``, F1-optimal class thresholds), checked
    before anything is evaluated too. ``ann``: a COCO json (``images``: its image folder),
    a YOLO data.yaml / dataset folder or a Pascal VOC folder (``split``: which of its
    splits), as :func:`dinodet.data.formats.open_dataset` reads them (``data_format``:
    ``"auto"`` tells the format from the layout)."""
    from dinodet.data.collate import build_loader
    from dinodet.data.formats import open_dataset
    from dinodet.engine.distributed import resolve_device
    from dinodet.weights import check_output_file, load_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if out is not None:
        check_output_file(out, "results file")
    if report is not None:
        from dinodet.engine.analysis import check_report_options

        check_report_options(report, confusion_iou, confusion_threshold)
    if int8 and device != "auto" and str(device).split(":")[0] != "cpu":
        raise UserError(f"int8 runs on the CPU only, not on device {device!r}; use "
                        "device cpu or auto, or drop int8")
    dev = resolve_device("cpu" if int8 else device)
    loaded = load_model(checkpoint, variant, weights)  # type: ignore[arg-type]
    # The original checkpoints index classes by raw COCO id.
    keep_ids = keep_category_ids or loaded.classes is None
    transform = loaded.transform.with_sizes(eval_size, max_size)
    dataset = open_dataset(ann, images, format=data_format, split=split,
                           transforms=transform, keep_category_ids=keep_ids)
    label_to_id, names = label_table(loaded.classes, loaded.model.num_classes, dataset, ann)
    model = loaded.model.to(dev)
    if int8:
        from dinodet.model.quantize import quantize_int8

        quantize_int8(model, inplace=True)  # the model is this function's own
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers)
    result, results = evaluate(model, loader, dev, label_to_id, dataset.coco,
                               num_select=model.cfg.num_select, class_names=names)
    result.detections = results
    if out is not None:
        write_results(out, results)
    if report is not None:
        from dinodet.engine.analysis import write_eval_report

        write_eval_report(report, result, confusion_iou=confusion_iou,
                          confusion_threshold=confusion_threshold)
    return result
