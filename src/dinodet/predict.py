"""User-facing detection: ``Detector.from_pretrained(path)(image, threshold=0.3)``.

Any common image form goes in (a file path, a PIL image, a numpy array, a tensor); every
one becomes an RGB uint8 [3, H, W] tensor, is resized the way the model was evaluated,
and the boxes come back in the pixels of the image as it was given (upright, for files
and PIL images with an EXIF orientation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

__all__ = ["IMAGE_EXTENSIONS", "Detections", "Detector", "ImageReadError", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_EVAL_SIZE = 800


def default_max_size(eval_size: int) -> int:
    """The longer-side cap that goes with a shorter side: COCO's 1333 for 800, in scale."""
    return round(1333 / 800 * eval_size)


ImageInput = str | Path | Image.Image | np.ndarray | Tensor


class ImageReadError(ValueError):
    """An image file that is missing or cannot be decoded."""


@dataclass
class Detections:
    """The detections of one image.

    boxes: [K, 4] xyxy in pixels of the original image; scores: [K]; labels: [K] int64
    class indices; class_names: the name of every class index (``class_names[label]``);
    image_size: (h, w) of the original image. Sorted by score, highest first.
    """

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


def _from_pil(im: Image.Image) -> Tensor:
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit / 32-bit greyscale: scale the value range to 8 bits, don't clip it.
        arr = np.asarray(im)
        if im.mode == "F":
            arr = arr * 255.0 if arr.size and float(arr.max()) <= 1.0 else arr
        elif arr.dtype.itemsize > 1 or (arr.size and int(arr.max()) > 255):
            arr = arr.astype(np.float64) / 257.0
        return _from_numpy(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_uint8(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    if x.is_floating_point():  # values in [0, 1]
        return (x.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    if x.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16):
        return (x.double() / 257).round_().clamp_(0, 255).to(torch.uint8)
    raise TypeError(f"unsupported image dtype {x.dtype}")


def _from_numpy(arr: np.ndarray) -> Tensor:
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        hwc = arr
    elif arr.ndim == 2:
        hwc = arr[:, :, None]
    else:
        raise ValueError(f"a numpy image must be HxW or HxWxC with C in 1, 3, 4; "
                         f"got shape {arr.shape}")
    if arr.dtype == np.uint16:
        hwc = hwc.astype(np.int32)
    elif arr.dtype not in (np.uint8, np.bool_) and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"unsupported numpy image dtype {arr.dtype} "
                        "(use uint8, uint16 or float in [0, 1])")
    return _from_chw(torch.from_numpy(np.array(hwc)).permute(2, 0, 1))  # a writable copy


def _from_chw(x: Tensor) -> Tensor:
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        hint = " (give a list of images, not a batch tensor)" if x.ndim == 4 else ""
        raise ValueError(f"an image tensor must be [3, H, W] (or [1|4, H, W], [H, W]); "
                         f"got shape {tuple(x.shape)}{hint}")
    x = _to_uint8(x.detach().cpu())
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3].contiguous()


def load_image(image: ImageInput) -> Tensor:
    """Any supported image form -> RGB uint8 [3, H, W] (upright for EXIF-rotated files).

    Tensors are CHW, uint8 0-255 or float 0-1; numpy arrays are HWC or HW, uint8.
    Raises ImageReadError for a file that is missing or cannot be decoded.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageReadError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(im)
        except Exception as e:  # decoders raise many types (OSError, SyntaxError, ...)
            raise ImageReadError(f"cannot read image {path}: {e}") from e
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_numpy(image)
    if isinstance(image, Tensor):
        return _from_chw(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, a PIL "
                    "image, a numpy array or a [3, H, W] tensor")


class Detector:
    """A model ready for images: preprocessing, batching, devices and class names.

    >>> det = Detector.from_pretrained("runs/exp/checkpoint_best.pt")
    >>> found = det("street.jpg", threshold=0.5)
    >>> found.boxes, found.names
    """

    def __init__(self, model: torch.nn.Module, classes: list[dict[str, Any]] | None = None,
                 eval_size: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_size: int | None = None) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.eval().to(self.device)
        # Every image is resized to this shorter side, its longer side capped at max_size
        # (images far larger than the model's training size are scaled down, not tiled).
        self.eval_size = int(eval_size or DEFAULT_EVAL_SIZE)
        self.max_size = int(max_size or default_max_size(self.eval_size))
        if self.eval_size < 32 or self.max_size < self.eval_size:
            raise ValueError(f"eval_size {self.eval_size} / max_size {self.max_size}: need "
                             "eval_size >= 32 and max_size >= eval_size")
        self.num_select = int(getattr(getattr(model, "cfg", None), "num_select", 300))
        num_classes = int(getattr(getattr(model, "cfg", None), "num_classes", 0))
        self.class_names = [str(i) for i in range(num_classes)]
        self.label_to_category_id: dict[int, int] | None = None
        if classes:
            self.label_to_category_id = {}
            for c in classes:
                label = int(c["label"])
                if label >= len(self.class_names):
                    self.class_names += [str(i) for i in range(len(self.class_names),
                                                               label + 1)]
                self.class_names[label] = str(c.get("name", label))
                self.label_to_category_id[label] = int(c.get("category_id", label))
        from dinodet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str | None = None,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, eval_size: int | None = None,
                        max_size: int | None = None) -> Detector:
        """A training checkpoint (.pt), a model directory, or an original DINO .pth with
        ``variant``; see :func:`dinodet.engine.run.load_model`. ``eval_size`` (shorter
        side) defaults to the one the checkpoint was evaluated at, else 800; ``max_size``
        (longer side) to 1333/800 of it."""
        from dinodet.engine.run import load_model

        loaded = load_model(path, variant)
        return cls(loaded.model, loaded.classes, eval_size or loaded.eval_size, device, dtype,
                   max_size=max_size)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image is resized to: the shorter side to ``eval_size``, unless the
        longer would exceed ``max_size``, which then caps it (torchvision's rounding)."""
        short, long = min(height, width), max(height, width)
        new_short, new_long = self.eval_size, int(self.eval_size * long / short)
        if new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def preprocess(self, image: Tensor) -> Tensor:
        """RGB uint8 [3, H, W] -> resized, normalised float [3, h, w]."""
        from torchvision.transforms.v2 import functional as F

        resized = F.resize(image, list(self.resized_size(*image.shape[-2:])), antialias=True)
        return (resized.float() / 255 - self._mean) / self._std

    def __call__(self, images: ImageInput | Sequence[ImageInput], threshold: float = 0.3,
                 batch_size: int = 4) -> Detections | list[Detections]:
        """Detect objects in one image (returns Detections) or a list (returns a list).

        Detections scoring below ``threshold`` are dropped; the model keeps at most its
        ``cfg.num_select`` best before that.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)  # load_image rejects unknown types
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            batch = [load_image(x) for x in items[start:start + batch_size]]
            results += self._detect(batch, threshold)
        return results[0] if single else results

    @torch.inference_mode()
    def _detect(self, images: list[Tensor], threshold: float) -> list[Detections]:
        from dinodet.model.postprocess import postprocess

        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        inputs = [self.preprocess(im).to(self.device) for im in images]
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            outputs = self.model(inputs)
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
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
