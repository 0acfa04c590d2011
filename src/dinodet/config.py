"""Typed configuration of the DINO detector and its named presets.

A config is plain data: dataclasses that round-trip through ``to_dict`` / ``from_dict``
(JSON or YAML), validated on the way in, so an unknown key or a bad value is an error
that names it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "swin_l_384"]
DenoisingMode = Literal["contrastive", "positives_only", "off"]
QuerySelection = Literal["mixed", "pure", "static"]


@dataclass
class BackboneConfig:
    """The image backbone.

    ``return_levels`` indexes the backbone's stages (ResNet layer1..4 / Swin stages 0..3):
    (1, 2, 3) gives C3-C5 (4-scale with one extra level), (0, 1, 2, 3) C2-C5 (5-scale).
    ``frozen_batchnorm`` keeps BatchNorm statistics and affine fixed, as the original does
    on top of ImageNet weights; ``freeze_stem`` gives conv1/bn1/layer1 no gradient.
    ``weights`` is a local file of pretrained weights (nothing is downloaded).
    """

    name: BackboneName = "resnet50"
    return_levels: tuple[int, ...] = (1, 2, 3)
    frozen_batchnorm: bool = True
    freeze_stem: bool = True
    weights: str | None = None
    drop_path_rate: float = 0.2  # Swin only
    use_checkpoint: bool = False  # Swin only: gradient checkpointing


@dataclass
class DINOConfig:
    """Everything that shapes the network (training options live elsewhere)."""

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

    def __post_init__(self) -> None:
        validate(self)

    @property
    def labelbook_size(self) -> int:
        return self.num_classes if self.dn_labelbook_size is None else self.dn_labelbook_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone"]["return_levels"] = list(self.backbone.return_levels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DINOConfig:
        return _from_dict(cls, data, "")

    def replace(self, **changes: Any) -> DINOConfig:
        """A copy with top-level fields changed (``backbone`` may be a dict of changes)."""
        d = self.to_dict()
        bb = changes.pop("backbone", None)
        if isinstance(bb, dict):
            d["backbone"].update(bb)
        elif isinstance(bb, BackboneConfig):
            d["backbone"] = dataclasses.asdict(bb)
        d.update(changes)
        return DINOConfig.from_dict(d)


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "backbone" and cls is DINOConfig:
            value = _from_dict(BackboneConfig, value, "backbone.")
        elif name == "return_levels":
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_CHOICES = {
    "name": BackboneName.__args__,  # type: ignore[attr-defined]
    "denoising": DenoisingMode.__args__,  # type: ignore[attr-defined]
    "query_selection": QuerySelection.__args__,  # type: ignore[attr-defined]
}


def validate(cfg: DINOConfig) -> None:
    """Raise ValueError naming the first key whose value cannot work."""

    def bad(key: str, value: Any, why: str) -> ValueError:
        return ValueError(f"config key {key!r} has bad value {value!r}: {why}")

    bb = cfg.backbone
    if isinstance(bb, dict):
        raise bad("backbone", bb, "use DINOConfig.from_dict for nested dicts")
    if bb.name not in _CHOICES["name"]:
        raise bad("backbone.name", bb.name, f"choose one of {_CHOICES['name']}")
    for key in ("denoising", "query_selection"):
        if getattr(cfg, key) not in _CHOICES[key]:
            raise bad(key, getattr(cfg, key), f"choose one of {_CHOICES[key]}")
    levels = tuple(bb.return_levels)
    if not levels or any(lv not in (0, 1, 2, 3) for lv in levels) or list(levels) != sorted(
            set(levels)):
        raise bad("backbone.return_levels", levels, "increasing stage indices in 0..3")
    if cfg.num_feature_levels < len(levels):
        raise bad("num_feature_levels", cfg.num_feature_levels,
                  f"fewer than the {len(levels)} backbone levels")
    positive = ("num_classes", "hidden_dim", "num_heads", "enc_layers", "dec_layers",
                "dim_feedforward", "enc_points", "dec_points", "num_queries", "num_select",
                "num_feature_levels")
    for key in positive:
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(key, value, "must be a positive integer")
    if cfg.hidden_dim % cfg.num_heads:
        raise bad("hidden_dim", cfg.hidden_dim, f"not divisible by num_heads={cfg.num_heads}")
    if cfg.hidden_dim % 32:
        raise bad("hidden_dim", cfg.hidden_dim, "GroupNorm(32) needs a multiple of 32")
    if not 0.0 <= cfg.dropout < 1.0:
        raise bad("dropout", cfg.dropout, "must be in [0, 1)")
    if not 0.0 <= cfg.dn_label_noise_ratio <= 1.0:
        raise bad("dn_label_noise_ratio", cfg.dn_label_noise_ratio, "must be in [0, 1]")
    if cfg.dn_box_noise_scale < 0:
        raise bad("dn_box_noise_scale", cfg.dn_box_noise_scale, "must be >= 0")
    if cfg.dn_number < 0:
        raise bad("dn_number", cfg.dn_number, "must be >= 0")
    if cfg.dn_labelbook_size is not None and cfg.dn_labelbook_size < cfg.num_classes:
        raise bad("dn_labelbook_size", cfg.dn_labelbook_size,
                  f"smaller than num_classes={cfg.num_classes}")


def _r50(levels: tuple[int, ...]) -> DINOConfig:
    return DINOConfig(
        backbone=BackboneConfig(name="resnet50", return_levels=levels),
        num_feature_levels=len(levels) + 1,
    )


def _swin(levels: tuple[int, ...]) -> DINOConfig:
    return DINOConfig(
        backbone=BackboneConfig(name="swin_l_384", return_levels=levels),
        num_feature_levels=len(levels) + 1,
    )


PRESETS: dict[str, DINOConfig] = {
    "r50-4scale": _r50((1, 2, 3)),
    "r50-5scale": _r50((0, 1, 2, 3)),
    "swinl-4scale": _swin((1, 2, 3)),
    "swinl-5scale": _swin((0, 1, 2, 3)),
    # Small enough to train on a 2-core CPU at ~320 px: ResNet-18, narrow and shallow.
    "cpu-small": DINOConfig(
        backbone=BackboneConfig(name="resnet18", return_levels=(1, 2, 3), frozen_batchnorm=False,
                                freeze_stem=False),
        hidden_dim=128,
        num_feature_levels=4,
        num_heads=4,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=512,
        num_queries=100,
        dn_number=30,
        num_select=100,
    ),
}


def get_preset(name: str) -> DINOConfig:
    """A fresh copy of a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
