"""User-facing detection: ``Detector.from_pretrained(path)(image, threshold=0.3)``. Any
image form of :func:`~dinodet.data.images.load_image` goes in, through the model's
EvalTransform; boxes come back in the pixels of the image as given (upright)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dinodet.data.coco import SkippedImage
from dinodet.data.images import IMAGE_EXTENSIONS, ImageInput, ImageReadError, load_image
from dinodet.data.transforms import EvalTransform
from dinodet.errors import UserError
from dinodet.structures import ImageBatch
from dinodet.weights import WeightsChoice, check_classes, load_model

__all__ = ["IMAGE_EXTENSIONS", "DetectionError", "Detections", "Detector", "ImageFiles",
           "ImageReadError", "load_image"]


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

    ``int8=True`` (CPU and float32 only) runs a copy of the model with its Linear layers
    dynamically quantised to int8 (:func:`dinodet.model.quantize.quantize_int8`): faster
    on the CPU, and approximate, so it warns once (an
    :class:`~dinodet.model.quantize.Int8Warning`); measure the AP change with
    ``dinodet eval --int8``. Each image's activations are quantised with a scale taken from
    its whole batch, so with int8 the batch can change an image's detections slightly.
    """

    def __init__(self, model: torch.nn.Module, classes: list[dict[str, Any]] | None = None,
                 transform: EvalTransform | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, *, eval_size: int | None = None,
                 max_size: int | None = None, int8: bool = False) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
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
        num_classes = int(getattr(getattr(model, "cfg", None), "num_classes", 0))
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
                        int8: bool = False) -> Detector:
        """A run checkpoint (.pt), a model directory, or an original DINO .pth with
        ``variant`` (see :func:`dinodet.weights.load_model`; ``weights`` picks the EMA or
        raw weights of a run checkpoint). The transform is the one the model was
        evaluated with (800 px where unknown); ``eval_size`` / ``max_size`` change it
        (:meth:`EvalTransform.with_sizes`). ``int8``: as for the constructor."""
        if int8:  # before the (slow) read of the checkpoint
            _check_int8(torch.device(device), dtype)
        loaded = load_model(path, variant, weights)
        return cls(loaded.model, loaded.classes, loaded.transform, device, dtype,
                   eval_size=eval_size, max_size=max_size, int8=int8)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of (``height``, ``width``) is resized to."""
        return self.transform.output_size(height, width)

    def __call__(self, images: ImageInput | Sequence[ImageInput], threshold: float = 0.3,
                 batch_size: int = 4) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list: at most the model's
        ``num_select`` best, those below ``threshold`` dropped."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = not isinstance(images, (list, tuple))  # load_image rejects unknown types
        items: list[Any] = [images] if single else list(images)  # type: ignore[arg-type]
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            batch = [load_image(x) for x in items[start:start + batch_size]]
            images_in = ImageBatch.from_images([self.transform(im) for im in batch])
            results += self.detect_batch(images_in, [(im.shape[1], im.shape[2]) for im in batch],
                                         threshold)
        return results[0] if single else results

    def detect_files(self, files: Sequence[str | Path], threshold: float = 0.3,
                     batch_size: int = 4, num_workers: int = 0
                     ) -> Iterator[tuple[str, Detections | ImageReadError | DetectionError]]:
        """(file, Detections) for every image file, in order, read and transformed by
        ``num_workers`` loader processes; an unreadable file yields (file,
        ImageReadError), before the others of its batch, and the others go on. Where the
        model fails on a batch, its images are detected one by one, and the one that fails
        alone yields (file, :class:`DetectionError`)."""
        from dinodet.data.collate import build_loader

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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

    def _one_by_one(self, images: ImageBatch, targets: Sequence[dict[str, Any]],
                    threshold: float) -> list[Detections | DetectionError]:
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
                     threshold: float = 0.3) -> list[Detections]:
        """Detections of an already transformed, padded batch; ``sizes``: the (h, w) of
        every original image, which the boxes are scaled and clipped to."""
        from dinodet.model.postprocess import postprocess

        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            outputs = self.model(images.to(self.device))
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = [(int(h), int(w)) for h, w in sizes]
        found = postprocess(outputs, torch.tensor(sizes, device=self.device), self.num_select)
        results = []
        for r, (h, w) in zip(found, sizes):
            keep = r["scores"] >= threshold
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


class ImageFiles(Dataset):
    """Image files as a dataset for :func:`~dinodet.data.build_loader`: item ``i`` is
    ``(transformed image, {"orig_size": (h, w), "size": (h, w) transformed, "file": path})``
    as the COCO dataset's samples are, or a :class:`~dinodet.data.SkippedImage` for a file
    that cannot be read."""

    def __init__(self, files: Sequence[str | Path], transform: EvalTransform) -> None:
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
