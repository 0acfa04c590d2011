"""The augmentation recipe of DINO, built from ``torchvision.transforms.v2``.

Training: horizontal flip, then with equal probability either a multi-scale resize of
the shorter side, or resize → random crop → multi-scale resize; then float conversion
and ImageNet normalisation. Evaluation: one fixed shorter-side resize. Every geometric
step is a v2 transform working on ``tv_tensors.Image`` and ``tv_tensors.BoundingBoxes``
(XYXY pixels), so boxes follow the image without hand-written box maths.

Transforms are called as ``transforms(image, target)`` with
``target = {"boxes": BoundingBoxes, "labels": Tensor}`` and return the same structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinodet.settings import coerce_fields, require

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "RandomShorterSideResize",
    "RandomSizeCrop",
    "TransformConfig",
    "build_transforms",
    "default_max_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_max_size(size: int) -> int:
    """The longer-side cap that goes with a shorter side of ``size``: COCO's 1333 for 800,
    in proportion for other sizes (533 for 320)."""
    return round(size * 1333 / 800)


@dataclass
class TransformConfig:
    """Sizes of the augmentation recipe, in pixels; the defaults are the paper's.

    ``scales``: shorter-side choices of the multi-scale (train) resize; ``max_size``: cap on
    the longer side of every resize but the pre-crop one; ``crop_resize_scales``: shorter
    sides of that pre-crop resize; ``crop_min``, ``crop_max``: range of the random crop's
    height and width; ``eval_size``: shorter side at evaluation; ``hflip_prob``: flip probability.
    """

    scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    eval_size: int = 800
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        coerce_fields(self)  # lists (JSON / YAML) become tuples; a wrong type is named
        for name in ("scales", "crop_resize_scales"):
            values = getattr(self, name)
            require(len(values) > 0 and min(values) > 0, name, values,
                    "must be a non-empty list of positive sizes")
        for name in ("max_size", "crop_min", "crop_max", "eval_size"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(self.crop_max >= self.crop_min, "crop_max", self.crop_max,
                f"smaller than crop_min={self.crop_min}")
        require(0.0 <= self.hflip_prob <= 1.0, "hflip_prob", self.hflip_prob, "must be in [0, 1]")

    def scaled(self, eval_size: int) -> TransformConfig:
        """This recipe with every size scaled by ``eval_size / self.eval_size`` (the paper's
        ``TransformConfig().scaled(320)``: scales 192..320, max_size 533, crop 154..240)."""
        f = eval_size / self.eval_size
        return dataclasses.replace(
            self,
            scales=tuple(sorted({round(s * f) for s in self.scales})),
            max_size=round(self.max_size * f),
            crop_resize_scales=tuple(sorted({round(s * f) for s in self.crop_resize_scales})),
            crop_min=round(self.crop_min * f),
            crop_max=round(self.crop_max * f),
            eval_size=eval_size,
        )


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(h, w) of the image (or, failing that, the boxes' canvas) among the inputs."""
    # A plain tensor is an image to v2 (when no tv_tensors.Image is there): last resort.
    for kind in (tv_tensors.Image, tv_tensors.BoundingBoxes, torch.Tensor):
        for inpt in flat_inputs:
            if isinstance(inpt, kind):
                h, w = F.get_size(inpt)
                return h, w
    raise TypeError("expected an image tensor or tv_tensors.BoundingBoxes among the inputs")


def shorter_side_size(
    height: int, width: int, size: int, max_size: int | None = None
) -> tuple[int, int]:
    """Output (h, w) for a shorter side of ``size``, the longer side kept ≤ ``max_size``.

    The original DETR/DINO rule: the shorter side shrinks when the longer would
    exceed ``max_size``; the shorter side is exact, the longer one is rounded down.
    Two changes: the shrunk shorter side is rounded down too (the original rounds to
    nearest, which can put the longer side 1 px over ``max_size``), and it is at least 1
    px, the longer side then still capped at ``max_size`` (a 3 x 20000 strip would
    otherwise reach the model at 1 x 6666, or the original would make it 0 px high).
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = max(1, int(max_size * short / long))
    long_out = int(size * long / short)
    if max_size is not None:
        long_out = min(long_out, max_size)
    return (long_out, size) if width <= height else (size, long_out)


class RandomShorterSideResize(v2.Transform):
    """Resize so the shorter side is a random choice of ``sizes`` (longer ≤ ``max_size``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": shorter_side_size(h, w, size, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, list(params["size"]), antialias=True)


class ShorterSideResize(RandomShorterSideResize):
    """The one-size resize of :class:`EvalTransform`: draws no random number (evaluation
    must not move the caller's random stream)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        return {"size": shorter_side_size(h, w, self.sizes[0], self.max_size)}


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are drawn independently.

    Each side is uniform in ``[min_size, min(image side, max_size)]`` (the lower
    bound shrinks to the image side for images smaller than ``min_size``), and the
    window's position is uniform. Boxes are clipped to the window by torchvision;
    follow with ``SanitizeBoundingBoxes`` to drop those left empty.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _image_size(flat_inputs)
        h_hi, w_hi = min(h, self.max_size), min(w, self.max_size)
        ch = int(torch.randint(min(self.min_size, h_hi), h_hi + 1, ()))
        cw = int(torch.randint(min(self.min_size, w_hi), w_hi + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def target_labels(inputs: Any) -> torch.Tensor:
    """``labels_getter`` of SanitizeBoundingBoxes for ``(image, target)`` inputs.

    A module-level function (not a lambda) so the transforms pickle into spawned workers.
    """
    return inputs[1]["labels"]


@dataclass(frozen=True)
class EvalTransform:
    """How an image enters the model outside training, shared by evaluation,
    :class:`~dinodet.predict.Detector`, the demo and exported models.

    Shorter side to ``size``, longer side at most ``max_size`` (None:
    :func:`default_max_size`) by :func:`shorter_side_size`; then float [0, 1] and
    normalisation. ``transform(image)`` takes uint8 [3, H, W]; ``transform(image, target)``
    moves the boxes too. The model's boxes are relative to the image, so the original size
    maps them back; :meth:`boxes_to_original` does it for pixel boxes (exported models).
    """

    size: int = 800
    max_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.max_size is None:
            object.__setattr__(self, "max_size", default_max_size(self.size))
        if not isinstance(self.size, int) or self.size < 1 or self.max_limit < 1:
            raise ValueError(f"eval_size {self.size} / max_size {self.max_size}: need "
                             "positive sizes")
        steps = v2.Compose([ShorterSideResize([self.size], self.max_limit),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(self.mean), list(self.std))])
        object.__setattr__(self, "_steps", steps)

    @property
    def max_limit(self) -> int:
        """``max_size``, never None after construction."""
        assert self.max_size is not None
        return self.max_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) an image of (``height``, ``width``) is resized to."""
        return shorter_side_size(height, width, self.size, self.max_limit)

    def __call__(self, *inputs: Any) -> Any:
        return self._steps(*inputs)  # type: ignore[attr-defined]

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """Only the resize, uint8 [.., 3, H, W] -> [.., 3, h, w] (exported models normalise
        inside)."""
        return F.resize(image, list(self.output_size(*image.shape[-2:])), antialias=True)

    @staticmethod
    def boxes_to_original(boxes: torch.Tensor, input_size: Sequence[int],
                          original_size: Sequence[int]) -> torch.Tensor:
        """xyxy boxes [..., 4] in pixels of the (h, w) ``input_size`` -> of ``original_size``."""
        sy, sx = original_size[0] / input_size[0], original_size[1] / input_size[1]
        return boxes * boxes.new_tensor([sx, sy, sx, sy])

    def with_sizes(self, size: int | None = None, max_size: int | None = None
                   ) -> EvalTransform:
        """A copy with other sizes (a new ``size`` alone takes its default ``max_size``)."""
        if size is None:
            return self if max_size is None else dataclasses.replace(self, max_size=max_size)
        return dataclasses.replace(self, size=size, max_size=max_size)

    def metadata(self) -> dict[str, Any]:
        """Plain data to store with a model."""
        return {"eval_size": self.size, "max_size": self.max_size, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> EvalTransform:
        """The inverse of :meth:`metadata` (800 px where missing)."""
        return cls(int(meta.get("eval_size") or 800), meta.get("max_size"),
                   tuple(meta.get("mean") or IMAGENET_MEAN), tuple(meta.get("std") or IMAGENET_STD))


def build_transforms(train: bool, cfg: TransformConfig | None = None) -> Any:
    """The training augmentation (then normalisation), or the :class:`EvalTransform` of
    ``cfg``."""
    cfg = cfg if cfg is not None else TransformConfig()
    if not train:
        return EvalTransform(cfg.eval_size, cfg.max_size, cfg.mean, cfg.std)
    multi_scale = RandomShorterSideResize(cfg.scales, cfg.max_size)
    crop = v2.Compose([RandomShorterSideResize(cfg.crop_resize_scales),
                       RandomSizeCrop(cfg.crop_min, cfg.crop_max),
                       v2.SanitizeBoundingBoxes(labels_getter=target_labels),
                       multi_scale])
    return v2.Compose([v2.RandomHorizontalFlip(cfg.hflip_prob),
                       v2.RandomChoice([multi_scale, crop]),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(cfg.mean), list(cfg.std))])
