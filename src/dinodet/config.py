"""Typed configuration of the DINO detector and its named presets.

Dataclasses that round-trip through ``to_dict`` / ``from_dict`` (:mod:`dinodet.settings`);
types and choices are checked by the annotations, checks between values in ``__post_init__``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from dinodet import settings
from dinodet.settings import coerce_fields, require

BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "swin_l_384"]
DenoisingMode = Literal["contrastive", "positives_only", "off"]
QuerySelection = Literal["mixed", "pure", "static"]
AttentionBackend = Literal["auto", "triton", "torch"]

#: Upper bounds of :class:`DINOConfig`'s sizes. A config comes from files (a model
#: directory's ``config.json``, a checkpoint) that a user may have from anywhere, and every
#: one of these sizes allocates: the bounds are checked before a model is built, so a
#: mistyped or hostile file is an error naming the key instead of an allocation without
#: limit. They are generous: the released DINO models use 91 classes, 900 queries, 300
#: selected, width 256, FFN 2048, 6 + 6 layers, 8 heads, 4 points, 4-5 levels, 100
#: denoising groups.
LIMITS: dict[str, int] = {
    "num_classes": 100_000,
    "num_queries": 100_000,
    "num_select": 100_000,
    "hidden_dim": 4096,
    "dim_feedforward": 65_536,
    "enc_layers": 64,
    "dec_layers": 64,
    "num_heads": 128,
    "enc_points": 64,
    "dec_points": 64,
    "num_feature_levels": 8,
    "dn_number": 10_000,
    "dn_labelbook_size": 100_000,
}

#: Bounds of an evaluation resize (shorter side, longer-side cap), given on the command line
#: (``--size``, ``--max-size``) or stored with a model: below 32 px a model sees almost
#: nothing; above these, one image would need gigabytes.
MIN_EVAL_SIZE = 32
MAX_EVAL_SIZE = 10_000
MAX_EVAL_MAX_SIZE = 20_000


@dataclass
class BackboneConfig:
    """The image backbone.

    ``return_levels`` indexes the stages (ResNet layer1..4 / Swin stages 0..3): (1, 2, 3) gives
    C3-C5 (4-scale with one extra level), (0, 1, 2, 3) C2-C5 (5-scale).

    ``weights``: where pretrained weights come from, read only when training starts on a fresh
    model (:func:`dinodet.model.pretrained.load_pretrained_backbone`); building a model never
    reads or downloads them. ``"imagenet"`` (the original's: torchvision's IMAGENET1K_V1 for
    a ResNet, the Swin authors' ImageNet-22k ``swin_large_patch4_window12_384_22k.pth`` for
    Swin-L), a torchvision weights name (``"IMAGENET1K_V2"``,
    ``"ResNet50_Weights.IMAGENET1K_V2"``), a Hugging Face Hub repository of timm weights
    (``"timm/swin_large_patch4_window12_384.ms_in22k"``, optionally ``hf-hub:``-prefixed), a
    local ``.pth`` / ``.pt`` / ``.safetensors`` file, or None (``"none"``): random weights.

    ``frozen_batchnorm`` and ``freeze_stem`` say what trains, and default to the original's
    rule for pretrained weights: every BatchNorm frozen (FrozenBatchNorm2d: affine and
    statistics are buffers) and, with ``freeze_stem``, no gradient for ResNet's conv1, bn1
    and layer1 whatever ``return_levels`` (the original freezes nothing in Swin, so
    ``freeze_stem`` changes nothing there). Training from scratch (no ``weights`` and no
    ``--init``) turns both off: BatchNorm trains and every parameter gets a gradient.
    """

    name: BackboneName = "resnet50"
    return_levels: tuple[int, ...] = (1, 2, 3)
    frozen_batchnorm: bool = True
    freeze_stem: bool = True
    weights: str | None = None
    drop_path_rate: float = 0.2  # Swin only
    use_checkpoint: bool = False  # Swin only: gradient checkpointing

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.weights is not None and self.weights.strip().lower() in ("", "none"):
            self.weights = None
        levels = self.return_levels
        require(len(levels) > 0 and set(levels) <= {0, 1, 2, 3} and list(levels) == sorted(
            set(levels)), "return_levels", levels, "must be increasing stage indices in 0..3")


@dataclass
class DINOConfig:
    """Everything that shapes the network (training options live elsewhere). Every size is
    at least 1 and at most its :data:`LIMITS` entry."""

    num_classes: int = 91
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    hidden_dim: int = 256
    num_feature_levels: int = 4
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    enc_points: int = 4
    dec_points: int = 4
    num_queries: int = 900
    pe_temperature: float = 20.0
    # Contrastive denoising (training only).
    denoising: DenoisingMode = "contrastive"
    dn_number: int = 100
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0
    dn_labelbook_size: int | None = None  # rows of the label table minus one; None = num_classes
    # Ablation switches for the paper's parts.
    query_selection: QuerySelection = "mixed"
    look_forward_twice: bool = True
    # Keep padded positions out of the encoder's top-k (the original does not).
    mask_padded_proposals: bool = False
    # Post-processing.
    num_select: int = 300
    # "auto" (Triton on CUDA when installed), "triton" or "torch"; None: the
    # DINODET_MS_DEFORM_ATTN environment variable, else "auto", read when the model is built.
    attention_backend: AttentionBackend | None = None

    def __post_init__(self) -> None:
        coerce_fields(self)
        levels = len(self.backbone.return_levels)
        require(self.num_feature_levels >= levels, "num_feature_levels", self.num_feature_levels,
                f"fewer than the {levels} backbone levels")
        for key in ("num_classes", "hidden_dim", "num_heads", "enc_layers", "dec_layers",
                    "dim_feedforward", "enc_points", "dec_points", "num_queries", "num_select"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be a positive integer")
        for key, limit in LIMITS.items():
            value = getattr(self, key)
            if value is not None and value > limit:
                raise ValueError(f"{key}: must be <= {limit}, got {value}")
        require(math.isfinite(self.pe_temperature) and self.pe_temperature > 0,
                "pe_temperature", self.pe_temperature, "must be a finite number > 0")
        require(math.isfinite(self.dn_box_noise_scale), "dn_box_noise_scale",
                self.dn_box_noise_scale, "must be finite")
        require(self.hidden_dim % self.num_heads == 0, "hidden_dim", self.hidden_dim,
                f"not divisible by num_heads={self.num_heads}")
        require(self.hidden_dim % 32 == 0, "hidden_dim", self.hidden_dim,
                "GroupNorm(32) needs a multiple of 32")
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        require(0.0 <= self.dn_label_noise_ratio <= 1.0, "dn_label_noise_ratio",
                self.dn_label_noise_ratio, "must be in [0, 1]")
        require(self.dn_box_noise_scale >= 0, "dn_box_noise_scale", self.dn_box_noise_scale,
                "must be >= 0")
        require(self.dn_number >= 0, "dn_number", self.dn_number, "must be >= 0")
        require(self.dn_labelbook_size is None or self.dn_labelbook_size >= self.num_classes,
                "dn_labelbook_size", self.dn_labelbook_size,
                f"smaller than num_classes={self.num_classes}")

    @property
    def labelbook_size(self) -> int:
        """Rows of the denoising label table minus one (``num_classes`` unless set)."""
        return self.num_classes if self.dn_labelbook_size is None else self.dn_labelbook_size

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data (tuples become lists)."""
        return settings.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DINOConfig:
        """The inverse of :meth:`to_dict`, with every key and value checked."""
        return settings.from_dict(cls, data)

    def replace(self, **changes: Any) -> DINOConfig:
        """A copy with fields changed (``backbone`` may be a dict of changes or a config)."""
        tree = self.to_dict()
        settings.merge(tree, DINOConfig, changes)
        return DINOConfig.from_dict(tree)


def _preset(backbone: BackboneName, levels: tuple[int, ...]) -> DINOConfig:
    # The original's ImageNet weights (IN-1k V1 for ResNet-50, IN-22k for Swin-L), loaded
    # when training starts; a model built from the preset stays offline.
    return DINOConfig(backbone=BackboneConfig(name=backbone, return_levels=levels,
                                              weights="imagenet"),
                      num_feature_levels=len(levels) + 1)


PRESETS: dict[str, DINOConfig] = {
    "r50-4scale": _preset("resnet50", (1, 2, 3)),
    "r50-5scale": _preset("resnet50", (0, 1, 2, 3)),
    "swinl-4scale": _preset("swin_l_384", (1, 2, 3)),
    "swinl-5scale": _preset("swin_l_384", (0, 1, 2, 3)),
    # Small enough to train on a 2-core CPU at ~320 px: ResNet-18, narrow and shallow.
    "cpu-small": DINOConfig(
        backbone=BackboneConfig(name="resnet18", return_levels=(1, 2, 3), frozen_batchnorm=False,
                                freeze_stem=False),
        hidden_dim=128, num_feature_levels=4, num_heads=4, enc_layers=2, dec_layers=3,
        dim_feedforward=512, num_queries=100, dn_number=30, num_select=100),
}


def get_preset(name: str) -> DINOConfig:
    """A fresh copy of a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
