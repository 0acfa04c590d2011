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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandomShorterSideResize",
    "RandomSizeCrop",
    "TransformConfig",
    "build_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TransformConfig:
    """Sizes of the augmentation recipe, in pixels; the defaults are the paper's.

    scales: shorter-side choices of the multi-scale resize (train).
    max_size: cap on the longer side of every resize but the pre-crop one.
    crop_resize_scales: shorter-side choices of the resize before the random crop.
    crop_min, crop_max: range of the random crop's height and width.
    eval_size: shorter side at evaluation.
    hflip_prob: probability of the horizontal flip.
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
        # Accept lists (from JSON / YAML) but store tuples.
        for name in ("scales", "crop_resize_scales", "mean", "std"):
            setattr(self, name, tuple(getattr(self, name)))
        sizes = {
            "max_size": self.max_size,
            "crop_min": self.crop_min,
            "crop_max": self.crop_max,
            "eval_size": self.eval_size,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformConfig.{name} must be a positive int, got {value!r}")
        for name in ("scales", "crop_resize_scales"):
            values = getattr(self, name)
            if not values or not all(isinstance(v, int) and v > 0 for v in values):
                raise ValueError(f"TransformConfig.{name} must be positive ints, got {values!r}")
        if self.crop_min > self.crop_max:
            raise ValueError(
                f"TransformConfig.crop_min ({self.crop_min}) > crop_max ({self.crop_max})"
            )
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"TransformConfig.hflip_prob must be in [0, 1], got {self.hflip_prob}")

    @classmethod
    def for_eval_size(cls, eval_size: int) -> TransformConfig:
        """The default recipe with every size scaled by ``eval_size / 800``.

        E.g. ``for_eval_size(320)``: scales 192..320, max_size 533, crop 154..240.
        """
        f = eval_size / 800
        default = cls()
        return cls(
            scales=tuple(sorted({round(s * f) for s in default.scales})),
            max_size=round(default.max_size * f),
            crop_resize_scales=tuple(round(s * f) for s in default.crop_resize_scales),
            crop_min=round(default.crop_min * f),
            crop_max=round(default.crop_max * f),
            eval_size=eval_size,
        )


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(h, w) of the image (or, failing that, the boxes' canvas) among the inputs."""
    for kind in (tv_tensors.Image, tv_tensors.BoundingBoxes):
        for inpt in flat_inputs:
            if isinstance(inpt, kind):
                h, w = F.get_size(inpt)
                return h, w
    raise TypeError("expected a tv_tensors.Image or tv_tensors.BoundingBoxes among the inputs")


def shorter_side_size(
    height: int, width: int, size: int, max_size: int | None = None
) -> tuple[int, int]:
    """Output (h, w) for a shorter side of ``size``, the longer side kept ≤ ``max_size``.

    The original DETR/DINO rule: the shorter side shrinks when the longer would
    exceed ``max_size``; the shorter side is exact, the longer one is rounded down.
    One change: the shrunk shorter side is rounded down too (the original rounds to
    nearest, which can put the longer side 1 px over ``max_size``).
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = max(1, int(max_size * short / long))
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


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


def build_transforms(train: bool, cfg: TransformConfig | None = None) -> v2.Compose:
    """The training augmentation or the evaluation resize, then normalisation."""
    cfg = cfg if cfg is not None else TransformConfig()
    if train:
        multi_scale = RandomShorterSideResize(cfg.scales, cfg.max_size)
        geometric = [
            v2.RandomHorizontalFlip(cfg.hflip_prob),
            v2.RandomChoice(
                [
                    multi_scale,
                    v2.Compose(
                        [
                            RandomShorterSideResize(cfg.crop_resize_scales),
                            RandomSizeCrop(cfg.crop_min, cfg.crop_max),
                            v2.SanitizeBoundingBoxes(labels_getter=target_labels),
                            multi_scale,
                        ]
                    ),
                ]
            ),
        ]
    else:
        geometric = [RandomShorterSideResize([cfg.eval_size], cfg.max_size)]
    return v2.Compose(
        [
            *geometric,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )
