"""User-facing detection: ``Detector.from_pretrained(path)(image, threshold=0.3)``. Any
image form of :func:`~dinodet.data.images.load_image` goes in, through the model's
EvalTransform; boxes come back in the pixels of the image as given (upright).

``threshold="auto"`` keeps each detection whose score reaches its own class's threshold:
the per-class thresholds stored with the model (``class_thresholds``, see
:mod:`dinodet.weights`), e.g. those that maximise F1 on the validation set of its run.

``slice=(tile, overlap)`` (or a :class:`~dinodet.slicing.Slicing`) detects on overlapping
tiles of the image, each through the transform as an image would be, and merges their
boxes: small objects in large images (see :mod:`dinodet.slicing`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dinodet.data.coco import SkippedImage
from dinodet.data.images import IMAGE_EXTENSIONS, ImageInput, ImageReadError, load_image
from dinodet.data.transforms import EvalTransform
from dinodet.errors import UserError
from dinodet.settings import is_finite_number
from dinodet.slicing import Slicing, TileRunner, as_slicing, sliced_detect_batch
from dinodet.structures import ImageBatch
from dinodet.weights import WeightsChoice, check_class_thresholds, check_classes, load_model

__all__ = ["IMAGE_EXTENSIONS", "DetectionError", "Detections", "Detector", "ImageFiles",
           "ImageReadError", "SliceOption", "Slicing", "Threshold", "check_threshold",
           "keep_above", "load_image", "no_thresholds_error"]

#: A score threshold: a number in [0, 1] for every class, or "auto": each class's own.
Threshold = float | Literal["auto"]
#: ``slice=``: (tile, overlap), a tile side, a :class:`~dinodet.slicing.Slicing`, or None
#: (calls: the detector's) / False (calls: no slicing).
SliceOption = tuple[int, float] | int | Slicing | Literal[False] | None


def check_threshold(threshold: Any, what: str = "threshold") -> Threshold:
    """``threshold`` if it is a finite number in [0, 1] or ``"auto"``, else a
    :class:`~dinodet.errors.UserError` naming ``what`` and the value."""
    if threshold == "auto" and isinstance(threshold, str):
        return "auto"
    if not (is_finite_number(threshold) and 0 <= threshold <= 1):
        raise UserError(f"{what} must be a number in [0, 1] or 'auto', got {threshold!r}")
    return float(threshold)


def no_thresholds_error(source: str) -> UserError:
    """The error for ``threshold="auto"`` on a model without per-class thresholds: it says
    where they come from instead of falling back to some number."""
    return UserError(
        f"{source} has no per-class score thresholds (no 'class_thresholds'), so threshold "
        "'auto' has nothing to apply: give a number instead (e.g. 0.3), or give the model "
        "its thresholds: training with a validation set stores the F1-optimal ones in its "
        "checkpoints, and `dinodet eval --checkpoint MODEL ... --report DIR` writes them to "
        "DIR/thresholds.json, which "
        "dinodet.weights.attach_class_thresholds(MODEL, 'DIR/thresholds.json') stores in a "
        "run checkpoint or model directory")


def keep_above(scores: Tensor, labels: Tensor, threshold: Threshold,
               class_thresholds: dict[int, float] | None = None,
               source: str = "the model") -> Tensor:
    """The mask of the detections to keep: ``scores >= threshold``, or with ``"auto"``
    ``scores >= class_thresholds[label]``, where a class without a threshold keeps none
    (its validation gave no threshold to trust). ``"auto"`` without ``class_thresholds``
    is :func:`no_thresholds_error` naming ``source``."""
    if threshold != "auto":
        return scores >= float(threshold)
    if not class_thresholds:
        raise no_thresholds_error(source)
    size = max(max(class_thresholds) + 1, int(labels.max()) + 1 if labels.numel() else 0)
    # in the scores' own precision, as a number threshold compares: a threshold read off a
    # score (or written as the score prints) keeps that score
    floor = torch.full((size,), float("inf"), dtype=scores.dtype)
    for label, value in class_thresholds.items():
        floor[label] = value
    return scores >= floor.to(scores.device)[labels.long().clamp(min=0)]


class DetectionError(RuntimeError):
    """The model failed on one image file; the message names the file and the error. The
    other images of its batch are detected one by one (:meth:`Detector.detect_files`)."""

    def __init__(self, file: str, error: BaseException) -> None:
        reason = str(error).strip().splitlines()
        detail = f"{type(error).__name__}: {reason[0]}" if reason else type(error).__name__
        super().__init__(f"detection failed on {file}: {detail}")
        self.file = file


@dataclass
class Detections:
    """The detections of one image, best first: boxes [K, 4] xyxy in pixels of the
    original (h, w) ``image_size``, scores [K], labels [K] int64 class indices, and the
    name of every class index (``class_names[label]``)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: list[str]
    image_size: tuple[int, int]
    label_to_category_id: dict[int, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.scores.numel())

    @property
    def names(self) -> list[str]:
        """The class name of every detection."""
        return [self._name(int(label)) for label in self.labels]

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, ready for ``json.dumps``."""
        return {
            "image_size": [int(s) for s in self.image_size],
            "boxes": [[float(v) for v in box] for box in self.boxes.tolist()],
            "scores": [float(s) for s in self.scores.tolist()],
            "labels": [int(label) for label in self.labels.tolist()],
            "names": self.names,
        }

    def to_coco(self, image_id: int,
                label_to_category_id: dict[int, int] | None = None) -> list[dict[str, Any]]:
        """COCO result records (``bbox`` xywh). Category ids come from
        ``label_to_category_id``, else the model's class table, else id = class index."""
        table = label_to_category_id if label_to_category_id is not None else (
            self.label_to_category_id or {})
        results = []
        for (x0, y0, x1, y1), score, label in zip(self.boxes.tolist(), self.scores.tolist(),
                                                  self.labels.tolist()):
            results.append({
                "image_id": image_id,
                "category_id": int(table.get(int(label), int(label))),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            })
        return results


class Detector:
    """A model ready for images: preprocessing, batching, devices and class names.

    >>> det = Detector.from_pretrained("runs/exp/best.pt")
    >>> found = det("street.jpg", threshold=0.5)
    >>> found.boxes, found.names

    Every image goes through ``transform``, the :class:`~dinodet.data.EvalTransform` that
    evaluation uses, so a 50-megapixel photo runs at the model's size.

    ``int8=True`` (CPU and float32 only) runs a copy of the model with its Linear and
    convolution layers in int8 (:func:`dinodet.model.quantize.quantize_int8`): faster
    on the CPU, and approximate, so it warns once (an
    :class:`~dinodet.model.quantize.Int8Warning`); measure the AP change with
    ``dinodet eval --int8``. Each image's activations are quantised with a scale taken from
    its whole batch, so with int8 the batch can change an image's detections slightly.

    ``threshold`` is the score a detection needs when a call gives none: a number in [0, 1],
    or ``"auto"``: each class's own threshold from ``class_thresholds`` (class index ->
    score in [0, 1]; :meth:`from_pretrained` takes the model's). A class without one keeps
    no detection; ``"auto"`` with no thresholds at all is a
    :class:`~dinodet.errors.UserError` saying where they come from.

    ``slice=(tile, overlap)`` (or a :class:`~dinodet.slicing.Slicing`, for the merge, the
    full-image pass and tiles per model call) slices every image: tiles of ``tile`` pixels
    of the image, neighbours sharing ``overlap`` of a tile, each resized by ``transform``
    as an image is, boxes merged across tiles (:mod:`dinodet.slicing`). A call's
    ``slice=`` overrides it (False: none). A sliced image's detections are not capped at
    ``num_select``: each tile gives at most that many. :meth:`detect_batch` takes images
    already transformed and never slices.
    """

    def __init__(self, model: torch.nn.Module, classes: list[dict[str, Any]] | None = None,
                 transform: EvalTransform | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, *, eval_size: int | None = None,
                 max_size: int | None = None, int8: bool = False,
                 threshold: Threshold = 0.3,
                 class_thresholds: dict[int, float] | None = None,
                 slice: SliceOption = None) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.threshold = check_threshold(threshold)
        #: How every call slices its images (None: it does not), see :mod:`dinodet.slicing`
        self.slicing = as_slicing(slice)
        #: Where the model came from, for messages (``from_pretrained`` gives the path).
        self.source = "the model"
        num_classes = int(getattr(getattr(model, "cfg", None), "num_classes", 0))
        #: class index -> the score its detections need with ``threshold="auto"``
        self.class_thresholds = check_class_thresholds(
            class_thresholds, num_classes or len(classes or []), "Detector class_thresholds")
        if self.threshold == "auto" and not self.class_thresholds:
            raise no_thresholds_error(self.source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.int8 = bool(int8)
        if self.int8:
            _check_int8(self.device, dtype)
        self.model = model.eval().to(self.device)
        if self.int8:
            from dinodet.model.quantize import Int8Warning, int8_counts, quantize_int8

            self.model = quantize_int8(self.model)  # a copy: ``model`` stays float
            warnings.warn(f"int8: {int8_counts(self.model).describe()}; int8 detections "
                          "are approximate, measure the AP change on your data with "
                          "`dinodet eval --int8`", Int8Warning, stacklevel=2)
        self.transform = (transform or EvalTransform()).with_sizes(eval_size, max_size)
        if self.transform.size < 32 or self.transform.max_limit < self.transform.size:
            raise ValueError(f"eval_size {self.transform.size} / max_size "
                             f"{self.transform.max_size}: need eval_size >= 32 and max_size "
                             ">= eval_size")
        self.num_select = int(getattr(getattr(model, "cfg", None), "num_select", 300))
        # The table names the model's classes, never more: a label outside them (or of a
        # model without a config, outside the table's own length) is an error.
        table = check_classes(list(classes) if classes else None,
                              num_classes or len(classes or []), "Detector classes",
                              complete=False)
        self.class_names = [str(i) for i in range(num_classes or len(table or []))]
        self.label_to_category_id: dict[int, int] | None = None
        if table:
            self.label_to_category_id = {}
            for c in table:
                label = c["label"]
                self.class_names[label] = str(c.get("name", label))
                self.label_to_category_id[label] = int(c.get("category_id", label))

    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, eval_size: int | None = None,
                        max_size: int | None = None, weights: WeightsChoice = "ema",
                        int8: bool = False, threshold: Threshold = 0.3,
                        slice: SliceOption = None, *,
                        revision: str | None = None) -> Detector:
        """A run checkpoint (.pt), a model directory, an original DINO .pth with
        ``variant``, or a Hugging Face Hub repo holding a model directory (``"owner/name"``,
        ``"hf://owner/name@revision"``; ``revision``: its branch, tag or commit; see
        :func:`dinodet.weights.load_model` and :mod:`dinodet.hub`; ``weights`` picks the
        EMA or raw weights of a run checkpoint). The transform is the one the model was
        evaluated with (800 px where unknown); ``eval_size`` / ``max_size`` change it
        (:meth:`EvalTransform.with_sizes`). The per-class thresholds stored with the model
        (if any) are what ``threshold="auto"`` applies. ``int8``, ``threshold``, ``slice``:
        as for the constructor."""
        check_threshold(threshold)  # mistakes before the (slow) read of the checkpoint
        as_slicing(slice)
        if int8:
            _check_int8(torch.device(device), dtype)
        loaded = load_model(path, variant, weights, revision=revision)
        if threshold == "auto" and not loaded.class_thresholds:
            raise no_thresholds_error(str(path))
        detector = cls(loaded.model, loaded.classes, loaded.transform, device, dtype,
                       eval_size=eval_size, max_size=max_size, int8=int8, threshold=threshold,
                       class_thresholds=loaded.class_thresholds, slice=slice)
        detector.source = str(path)
        return detector

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of (``height``, ``width``) is resized to."""
        return self.transform.output_size(height, width)

    def __call__(self, images: ImageInput | Sequence[ImageInput],
                 threshold: Threshold | None = None,
                 batch_size: int = 4, slice: SliceOption = None
                 ) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list: at most the model's
        ``num_select`` best, those below ``threshold`` dropped (a number in [0, 1], or
        ``"auto"``: each class's own; default: the detector's ``threshold``). ``slice``:
        as for the constructor (None: the detector's, False: none); sliced, the tiles of
        ``batch_size`` images at a time go through the model, its ``batch_size`` tiles a
        call."""
        threshold = self._threshold(threshold)
        slicing = self._slicing(slice)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = not isinstance(images, (list, tuple))  # load_image rejects unknown types
        items: list[Any] = [images] if single else list(images)  # type: ignore[arg-type]
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            batch = [load_image(x) for x in items[start:start + batch_size]]
            if slicing is not None:
                results += self.detect_sliced(batch, threshold, slicing)
                continue
            images_in = ImageBatch.from_images([self.transform(im) for im in batch])
            results += self.detect_batch(images_in, [(im.shape[1], im.shape[2]) for im in batch],
                                         threshold)
        return results[0] if single else results

    def detect_files(self, files: Sequence[str | Path], threshold: Threshold | None = None,
                     batch_size: int = 4, num_workers: int = 0, slice: SliceOption = None
                     ) -> Iterator[tuple[str, Detections | ImageReadError | DetectionError]]:
        """(file, Detections) for every image file, in order, read and transformed by
        ``num_workers`` loader processes; an unreadable file yields (file,
        ImageReadError), before the others of its batch, and the others go on. Where the
        model fails on a batch, its images are detected one by one, and the one that fails
        alone yields (file, :class:`DetectionError`). ``threshold``, ``slice``: as for a
        call (sliced, the loader reads the images and the tiles are cut here)."""
        from dinodet.data.collate import build_loader

        threshold = self._threshold(threshold)
        slicing = self._slicing(slice)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if slicing is not None:
            yield from self._sliced_files(files, threshold, batch_size, num_workers, slicing)
            return
        loader = build_loader(ImageFiles(files, self.transform), batch_size, train=False,
                              num_workers=num_workers)
        for batch in loader:
            for skipped in batch.skipped:  # read again here for the reason (workers drop it)
                yield skipped, _read_error(skipped)
            if not batch.targets:
                continue
            found: Sequence[Detections | DetectionError]
            try:
                found = self.detect_batch(batch.images,
                                          [t["orig_size"] for t in batch.targets], threshold)
            except Exception as e:  # find the image at fault; the others still count
                found = (self._one_by_one(batch.images, batch.targets, threshold)
                         if len(batch.targets) > 1 else [DetectionError(
                             batch.targets[0]["file"], e)])
            for target, detections in zip(batch.targets, found):
                yield target["file"], detections

    def _sliced_files(self, files: Sequence[str | Path], threshold: Threshold,
                      batch_size: int, num_workers: int, slicing: Slicing
                      ) -> Iterator[tuple[str, Detections | ImageReadError | DetectionError]]:
        """:meth:`detect_files` with slicing: the loader reads the images whole (unpadded,
        as read), their tiles go through the model; a batch that fails is redone image by
        image."""
        from dinodet.data.collate import build_loader

        loader = build_loader(ImageFiles(files, _as_read), batch_size, train=False,
                              num_workers=num_workers, collate=_collate_as_read)
        for images, targets, skipped in loader:
            for file in skipped:
                yield file, _read_error(file)
            if not targets:
                continue
            found: list[Detections | DetectionError]
            try:
                found = list(self.detect_sliced(images, threshold, slicing))
            except Exception as e:
                if len(images) == 1:
                    found = [DetectionError(targets[0]["file"], e)]
                else:
                    found = []
                    for image, target in zip(images, targets):
                        try:
                            found += self.detect_sliced([image], threshold, slicing)
                        except Exception as e_one:
                            found.append(DetectionError(target["file"], e_one))
            for target, detections in zip(targets, found):
                yield target["file"], detections

    def tile_runner(self, threshold: Threshold | None = None) -> TileRunner:
        """The model as a :data:`~dinodet.slicing.TileRunner`: a [N, 3, h, w] batch of
        same-sized tiles (uint8 RGB, or float [0, 1]) through ``transform`` and one model
        call, boxes in tile pixels, ``threshold`` (as for a call) applied."""
        threshold = self._threshold(threshold)

        def run(tiles: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
            batch = ImageBatch.unpadded(torch.stack([self.transform(t) for t in tiles]))
            h, w = int(tiles.shape[-2]), int(tiles.shape[-1])
            return [(d.boxes, d.scores, d.labels)
                    for d in self.detect_batch(batch, [(h, w)] * len(tiles), threshold)]

        return run

    def detect_sliced(self, images: Sequence[Tensor], threshold: Threshold | None = None,
                      slicing: SliceOption = None) -> list[Detections]:
        """Detections of loaded [3, H, W] images (:func:`load_image`'s), sliced by
        ``slicing`` (None: the detector's; it needs one): all their tiles through the model
        in batches of ``slicing.batch_size``, boxes merged (:mod:`dinodet.slicing`)."""
        chosen = self.slicing if slicing is None else as_slicing(slicing)
        if chosen is None:
            raise UserError("detect_sliced needs slice=(tile, overlap): the detector has "
                            "none")
        found = sliced_detect_batch(self.tile_runner(threshold), list(images), chosen)
        return [Detections(boxes, scores, labels, list(self.class_names),
                           (int(im.shape[-2]), int(im.shape[-1])), self.label_to_category_id)
                for (boxes, scores, labels), im in zip(found, images)]

    def _slicing(self, slicing: SliceOption) -> Slicing | None:
        """The slicing of a call: None: the detector's; False: none."""
        return self.slicing if slicing is None else as_slicing(slicing)

    def _threshold(self, threshold: Threshold | None) -> Threshold:
        """The threshold of a call, checked (None: the detector's); ``"auto"`` needs
        per-class thresholds."""
        found = self.threshold if threshold is None else check_threshold(threshold)
        if found == "auto" and not self.class_thresholds:
            raise no_thresholds_error(self.source)
        return found

    def _one_by_one(self, images: ImageBatch, targets: Sequence[dict[str, Any]],
                    threshold: Threshold) -> list[Detections | DetectionError]:
        results: list[Detections | DetectionError] = []
        for i, target in enumerate(targets):
            h, w = target["size"]
            alone = ImageBatch.unpadded(images.tensors[i:i + 1, :, :h, :w])
            try:
                results += self.detect_batch(alone, [target["orig_size"]], threshold)
            except Exception as e:
                results.append(DetectionError(target["file"], e))
        return results

    @torch.inference_mode()
    def detect_batch(self, images: ImageBatch, sizes: Sequence[tuple[int, int]],
                     threshold: Threshold | None = None) -> list[Detections]:
        """Detections of an already transformed, padded batch; ``sizes``: the (h, w) of
        every original image, which the boxes are scaled and clipped to. ``threshold``: as
        for a call."""
        from dinodet.model.postprocess import postprocess

        threshold = self._threshold(threshold)
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            outputs = self.model(images.to(self.device))
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = [(int(h), int(w)) for h, w in sizes]
        found = postprocess(outputs, torch.tensor(sizes, device=self.device), self.num_select)
        results = []
        for r, (h, w) in zip(found, sizes):
            keep = keep_above(r["scores"], r["labels"], threshold, self.class_thresholds,
                              self.source)
            boxes = r["boxes"][keep].cpu()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            results.append(Detections(boxes, r["scores"][keep].cpu(),
                                      r["labels"][keep].cpu().to(torch.int64),
                                      list(self.class_names), (h, w),
                                      self.label_to_category_id))
        return results


def _check_int8(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu":
        raise UserError(f"int8 runs on the CPU only, not on device {device}; use "
                        "device='cpu' or drop int8")
    if dtype != torch.float32:
        raise UserError(f"int8 needs dtype float32, not {str(dtype).removeprefix('torch.')}; "
                        "drop the dtype or int8")


def _read_error(file: str) -> ImageReadError:
    try:
        load_image(file)
    except ImageReadError as e:
        return e
    return ImageReadError(f"cannot read image {file}")  # readable now: it changed since


def _as_read(image: Tensor) -> Tensor:
    """The transform of sliced file reading: none (the tiles are transformed)."""
    return image


def _collate_as_read(samples: Sequence[Any]
                     ) -> tuple[list[Tensor], list[dict[str, Any]], list[str]]:
    """Sliced file reading's batches: (images as read, unpadded; targets; skipped files)."""
    images, targets, skipped = [], [], []
    for sample in samples:
        if isinstance(sample, SkippedImage):
            skipped.append(sample.path)
        else:
            images.append(sample[0])
            targets.append(sample[1])
    return images, targets, skipped


class ImageFiles(Dataset):
    """Image files as a dataset for :func:`~dinodet.data.build_loader`: item ``i`` is
    ``(transformed image, {"orig_size": (h, w), "size": (h, w) transformed, "file": path})``
    as the COCO dataset's samples are, or a :class:`~dinodet.data.SkippedImage` for a file
    that cannot be read. ``transform``: usually an :class:`EvalTransform`."""

    def __init__(self, files: Sequence[str | Path],
                 transform: EvalTransform | Callable[[Tensor], Tensor]) -> None:
        self.files = [str(f) for f in files]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]] | SkippedImage:
        try:
            image = load_image(self.files[i])
        except ImageReadError as e:
            return SkippedImage(self.files[i], str(e))
        size = (int(image.shape[1]), int(image.shape[2]))
        resized = self.transform(image)
        return resized, {"orig_size": size, "size": (int(resized.shape[1]),
                                                     int(resized.shape[2])),
                         "file": self.files[i]}
