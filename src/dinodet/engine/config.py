"""Typed training configuration: dataclasses, a YAML file and ``--set key=value`` overrides.

:class:`TrainConfig` holds the network (``model``, from a named preset), ``data`` (sizes in
``data.transform``), ``optim`` and the loop's settings; its defaults are the paper's recipe
(AdamW 1e-4 / backbone 1e-5, 12 epochs, lr x0.1 after epoch 11, gradient clip 0.1,
multi-scale 480-800 training, 800 px evaluation). :func:`load_train_config` layers, lowest
to highest precedence: preset < YAML file < ``--set`` < explicit CLI keyword arguments. The
YAML file mirrors the dataclasses (``optim: {lr: 2e-4}``), ``--set`` uses dotted keys
(``data.transform.eval_size=640``); :mod:`dinodet.settings` checks both on the way in
(``optim.lrr: unknown key (did you mean 'optim.lr'?), got 1``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from dinodet import settings
from dinodet.config import PRESETS, DINOConfig, get_preset
from dinodet.data.transforms import TransformConfig
from dinodet.settings import coerce_fields, parse_set, require

__all__ = ["DataConfig", "OptimConfig", "TrainConfig", "load_train_config", "parse_set"]

AmpMode = Literal["off", "bf16", "fp16"]
Schedule = Literal["step", "multistep", "cosine"]

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class DataConfig:
    """COCO-format data and the paper's augmentation (its sizes: :class:`TransformConfig`).

    ``keep_category_ids`` uses the raw COCO category ids as class indices (as the released
    checkpoints do); ``strict`` makes annotation problems errors instead of skipped boxes.
    """

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    keep_category_ids: bool = False
    strict: bool = False
    num_workers: int = 2
    transform: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with a separate backbone learning rate and an iteration-based schedule.

    ``schedule``: ``"step"`` multiplies by ``gamma`` from the first of ``lr_drop_epochs`` on
    (epoch 11 from 0, i.e. after 11 of the paper's 12 epochs), ``"multistep"`` at every entry,
    ``"cosine"`` anneals to ``min_lr_ratio`` x the base rate; after ``warmup_steps`` optimiser
    steps of linear warm-up. ``clip_max_norm`` <= 0 turns clipping off; ``accumulate_steps``
    batches make one optimiser step.
    """

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_max_norm: float = 0.1
    schedule: Schedule = "step"
    lr_drop_epochs: tuple[int, ...] = (11,)
    gamma: float = 0.1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        coerce_fields(self)
        for key in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "gamma",
                    "min_lr_ratio"):
            value = getattr(self, key)
            require(math.isfinite(value), key, value, "must be a finite number")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        for key in ("lr_backbone", "weight_decay"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        require(all(0.0 <= b < 1.0 for b in self.betas), "betas", self.betas,
                "each must be in [0, 1)")
        require(self.gamma > 0, "gamma", self.gamma, "must be > 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio,
                "must be in [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.accumulate_steps >= 1, "accumulate_steps", self.accumulate_steps,
                "must be >= 1")
        drops = self.lr_drop_epochs
        require(all(d >= 0 for d in drops) and list(drops) == sorted(set(drops)),
                "lr_drop_epochs", drops, "must be increasing epoch numbers >= 0")
        require(self.schedule != "step" or len(drops) > 0, "lr_drop_epochs", drops,
                "the 'step' schedule needs at least one epoch")


@dataclass
class TrainConfig:
    """One training run. ``model=None`` means the named ``preset``'s network.

    ``amp``: ``"bf16"`` / ``"fp16"`` autocast (fp16 with a gradient scaler).
    ``checkpoint_every_steps`` 0 saves only at the end of each epoch; ``keep_last``
    checkpoints are kept, plus the best by validation metric. ``eval_every_epochs`` 0 never
    evaluates during training. ``max_bad_steps`` consecutive steps with a NaN/inf loss stop
    the run. ``device``: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"mps"``.
    """

    preset: str = "r50-4scale"
    model: DINOConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 12
    batch_size: int = 2
    amp: AmpMode = "off"
    ema: bool = False
    ema_decay: float = 0.9997
    seed: int = 42
    deterministic: bool = False
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    log_every: int = 10
    eval_every_epochs: int = 1
    max_bad_steps: int = 10
    device: str = "auto"
    out_dir: str = "runs/dino"
    tensorboard: bool = False  # also write TensorBoard event files (extra: dinodet[tensorboard])

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.preset in PRESETS, "preset", self.preset,
                f"choose one of {', '.join(PRESETS)}")
        if self.model is None:
            self.model = get_preset(self.preset)
        for key in ("epochs", "batch_size", "keep_last", "log_every", "max_bad_steps"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        for key in ("checkpoint_every_steps", "eval_every_epochs"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "must be in [0, 1)")
        require(_DEVICE.fullmatch(self.device) is not None, "device", self.device,
                "use auto, cpu, cuda, cuda:N or mps")
        require(bool(self.out_dir), "out_dir", self.out_dir, "must not be empty")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data (tuples become lists)."""
        return settings.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`, with every key and value checked."""
        return settings.from_dict(cls, data)

    def to_yaml(self) -> str:
        """The whole config as YAML, loadable again with :func:`load_train_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_train_config(
    preset: str | None = None,
    yaml_file: str | Path | None = None,
    sets: Iterable[str] = (),
    **cli_overrides: Any,
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a preset, a YAML file, ``--set`` strings and CLI keywords.

    ``preset=None`` leaves the choice to ``--set preset=...``, the YAML ``preset:`` key, or
    ``"r50-4scale"``, in that order; ``model`` keys change that preset's :class:`DINOConfig`.
    ``cli_overrides`` name a top-level field (``epochs=3``) or a field of ``data`` / ``optim``
    / ``model`` / ``data.transform`` by its bare name (``lr=2e-4``); ``None`` values are
    ignored, so unset argparse options fall through. Raises ``ValueError`` naming the key
    (and the YAML file or ``--set`` string) for an unknown key, a bad value or bad YAML.
    """
    # Changes are collected first: the preset they apply to is known only after every layer.
    changes: dict[str, Any] = {}

    def layer(source: str, updates: Mapping[str, Any] | str) -> None:
        try:
            if isinstance(updates, str):
                settings.apply_override(changes, TrainConfig, updates)
            else:
                settings.merge(changes, TrainConfig, updates)
        except ValueError as e:
            raise ValueError(f"{source}{e}") from None
        name = changes.get("preset", TrainConfig.preset)
        require(name in PRESETS, "preset", name, f"choose one of {', '.join(PRESETS)}")

    if yaml_file is not None:
        layer(f"{yaml_file}: ", _read_yaml(Path(yaml_file)))
    for item in sets:
        layer("", item)  # apply_override names the --set string itself
    for name, value in {**cli_overrides, "preset": preset}.items():
        if value is not None:
            key = _cli_key(name, value)
            for part in reversed(key.split(".")):
                value = {part: value}
            layer(f"--{name.replace('_', '-')}: ", value)
    tree = TrainConfig(preset=changes.pop("preset", TrainConfig.preset)).to_dict()
    settings.merge(tree, TrainConfig, changes)
    return TrainConfig.from_dict(tree)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"YAML syntax error in config file {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys, "
                         f"got {type(data).__name__}")
    return data


def _cli_key(name: str, value: object) -> str:
    """Map a CLI keyword to its dotted key: top-level fields first, then by unique field name."""
    for prefix, cls in (("", TrainConfig), ("data.", DataConfig), ("optim.", OptimConfig),
                        ("model.", DINOConfig), ("data.transform.", TransformConfig)):
        if name in {f.name for f in fields(cls)}:
            return prefix + name
    raise ValueError(f"{name}: unknown key among the command-line overrides, got {value!r}")
