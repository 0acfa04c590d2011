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

__all__ = ["RECIPES", "DataConfig", "OptimConfig", "TrainConfig", "load_train_config",
           "parse_set", "recipe_tree"]

AmpMode = Literal["off", "bf16", "fp16"]
Schedule = Literal["step", "multistep", "cosine"]
DataFormat = Literal["auto", "coco", "yolo", "voc"]
TrackerName = Literal["tensorboard", "wandb", "mlflow"]

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class DataConfig:
    """The data (COCO, YOLO or Pascal VOC) and the paper's augmentation (its sizes:
    :class:`TransformConfig`).

    ``train_ann`` / ``val_ann``: a COCO annotation json (with its image folder in
    ``train_images`` / ``val_images``), a YOLO ``data.yaml`` or dataset folder, or a Pascal
    VOC dataset folder (these name their own images; see
    :func:`dinodet.data.formats.open_dataset`). ``format``: ``"auto"`` tells it from the
    layout; a run records the format it read, so that a resumed run reads the same.
    ``train_split`` / ``val_split``: the split of a YOLO / VOC layout that has splits (a
    data.yaml's ``train`` / ``val`` key, VOC's ``ImageSets/Main/<split>.txt``); None for
    COCO and for a layout read whole.

    ``keep_category_ids`` uses the raw COCO category ids as class indices (as the released
    checkpoints do); ``strict`` makes annotation problems errors instead of skipped boxes.
    ``max_image_pixels``: images declaring more pixels are not decoded (skipped); None:
    ``DINODET_MAX_IMAGE_PIXELS``, else about 89 million; 0: no limit.
    ``allow_outside_image_dir`` lets a ``file_name`` be absolute or climb out with ``..``.
    """

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    format: DataFormat = "auto"
    train_split: str | None = None
    val_split: str | None = None
    keep_category_ids: bool = False
    strict: bool = False
    num_workers: int = 2
    max_image_pixels: int | None = None
    allow_outside_image_dir: bool = False
    transform: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        for key in ("train_split", "val_split"):
            require(getattr(self, key) != "", key, getattr(self, key),
                    "must name a split, or be null for none")


@dataclass
class OptimConfig:
    """AdamW with a separate backbone learning rate and an iteration-based schedule.

    ``schedule``: ``"step"`` multiplies by ``gamma`` from the first of ``lr_drop_epochs`` on
    (epoch 11 from 0, i.e. after 11 of the paper's 12 epochs), ``"multistep"`` at every entry,
    ``"cosine"`` anneals to ``min_lr_ratio`` x the base rate; after ``warmup_steps`` optimiser
    steps of linear warm-up. ``clip_max_norm`` <= 0 turns clipping off. (Gradient
    accumulation follows from ``TrainConfig.total_batch_size``.)
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

    def __post_init__(self) -> None:
        coerce_fields(self)
        for key in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "gamma",
                    "min_lr_ratio"):
            value = getattr(self, key)
            require(math.isfinite(value), key, value, "must be a finite number")
        require(0 < self.lr <= 1, "lr", self.lr, "must be in (0, 1] (the paper's is 1e-4)")
        require(self.lr_backbone <= 1, "lr_backbone", self.lr_backbone, "must be <= 1")
        for key in ("lr_backbone", "weight_decay"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        require(all(0.0 <= b < 1.0 for b in self.betas), "betas", self.betas,
                "each must be in [0, 1)")
        require(self.gamma > 0, "gamma", self.gamma, "must be > 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio,
                "must be in [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        drops = self.lr_drop_epochs
        require(all(d >= 0 for d in drops) and list(drops) == sorted(set(drops)),
                "lr_drop_epochs", drops, "must be increasing epoch numbers >= 0")
        require(self.schedule != "step" or len(drops) > 0, "lr_drop_epochs", drops,
                "the 'step' schedule needs at least one epoch")


@dataclass
class TrainConfig:
    """One training run. ``model=None`` means the named ``preset``'s network; the preset's
    whole recipe (sizes, optimiser, epochs, batch) comes with :meth:`from_preset` and
    :func:`load_train_config`, while the field defaults here are the paper's recipe.

    ``batch_size`` is per process; ``total_batch_size`` the images of one optimiser step
    (None: ``batch_size`` x processes): gradients accumulate over ``total_batch_size /
    (batch_size x processes)`` batches, and the losses are normalised by the GT boxes of
    the whole accumulated batch, so the step is that of one batch of ``total_batch_size``.
    ``eval_batch_size`` 1 (the paper's) keeps padding out of the encoder's top-k.
    ``amp``: ``"bf16"`` / ``"fp16"`` autocast (fp16 with a gradient scaler).
    ``checkpoint_every_steps`` 0 saves only at the end of each epoch; ``keep_last``
    checkpoints are kept, plus the best by validation metric. ``eval_every_epochs`` 0 never
    evaluates during training. ``max_bad_steps`` consecutive steps with a NaN/inf loss stop
    the run (fp16's gradient scaler skips inf gradients itself: not counted). ``device``:
    ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    ``early_stop_patience`` > 0 ends the run once that many evaluations in a row have not
    raised the validation AP by more than ``early_stop_min_delta`` over the best so far
    (``best.pt`` keeps the best weights). ``trackers`` also send the log's numbers, the
    config and the run's plots to TensorBoard, Weights & Biases and/or MLflow (extras
    ``dinodet[tensorboard]``, ``dinodet[wandb]``, ``dinodet[mlflow]``; see
    :mod:`dinodet.engine.trackers`), under the project / experiment ``tracker_project`` and
    the run name ``tracker_run_name`` (None: the run directory's name); ``tensorboard=true``
    is the same as listing ``tensorboard``.
    """

    preset: str = "r50-4scale"
    model: DINOConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 12
    batch_size: int = 2
    total_batch_size: int | None = None
    eval_batch_size: int = 1
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
    early_stop_patience: int = 0  # evaluations without a better AP before stopping; 0: never
    early_stop_min_delta: float = 0.0  # an AP gain of at most this is no gain
    trackers: tuple[TrackerName, ...] = ()  # tensorboard, wandb, mlflow
    tracker_project: str = "dinodet"  # W&B project / MLflow experiment
    tracker_run_name: str | None = None  # None: the name of out_dir

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.preset in PRESETS, "preset", self.preset,
                f"choose one of {', '.join(PRESETS)}")
        if self.model is None:
            self.model = get_preset(self.preset)
        for key in ("epochs", "batch_size", "eval_batch_size", "keep_last", "log_every",
                    "max_bad_steps"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        for key in ("checkpoint_every_steps", "eval_every_epochs", "early_stop_patience"):
            require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        require(math.isfinite(self.early_stop_min_delta) and self.early_stop_min_delta >= 0,
                "early_stop_min_delta", self.early_stop_min_delta,
                "must be a finite AP difference >= 0")
        require(self.early_stop_patience == 0 or self.eval_every_epochs > 0,
                "early_stop_patience", self.early_stop_patience,
                "needs evaluations during training: set eval_every_epochs >= 1")
        require(len(set(self.trackers)) == len(self.trackers), "trackers", self.trackers,
                "each tracker may be named once")
        require(bool(self.tracker_project.strip()), "tracker_project", self.tracker_project,
                "must not be empty")
        require(self.tracker_run_name is None or bool(self.tracker_run_name.strip()),
                "tracker_run_name", self.tracker_run_name, "must not be empty (null: the "
                "run directory's name)")
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "must be in [0, 1)")
        require(_DEVICE.fullmatch(self.device) is not None, "device", self.device,
                "use auto, cpu, cuda, cuda:N or mps")
        require(bool(self.out_dir), "out_dir", self.out_dir, "must not be empty")
        total = self.total_batch_size
        require(total is None or total % self.batch_size == 0, "total_batch_size", total,
                f"must be a multiple of batch_size={self.batch_size}")

    @classmethod
    def from_preset(cls, name: str, image_size: int | None = None) -> TrainConfig:
        """The preset's whole recipe (:data:`RECIPES`); ``image_size`` rescales every image
        size of it (augmentation scales, crop, evaluation and longer-side caps) in
        proportion to a new evaluation size."""
        return cls.from_dict(recipe_tree(name, image_size))

    def accumulation(self, world_size: int) -> int:
        """Batches per optimiser step on ``world_size`` processes; a ``ValueError`` names
        the settings when the total batch does not divide into them."""
        total = self.total_batch_size or self.batch_size * world_size
        per_round = self.batch_size * world_size
        if total % per_round:
            raise ValueError(
                f"total_batch_size={total} is not a multiple of batch_size={self.batch_size} "
                f"x {world_size} process(es); change one of them")
        return total // per_round

    def describe_batch(self, world_size: int) -> str:
        """``"total batch 16 = 1 process x 2 images x 8 steps"``."""
        steps = self.accumulation(world_size)
        total = steps * self.batch_size * world_size
        return (f"total batch {total} = {world_size} process{'es' if world_size > 1 else ''} "
                f"x {self.batch_size} image{'s' if self.batch_size > 1 else ''} "
                f"x {steps} step{'s' if steps > 1 else ''}")

    def tracker_names(self) -> tuple[TrackerName, ...]:
        """``trackers``, with ``tensorboard`` first when ``tensorboard=true`` asks for it."""
        if self.tensorboard and "tensorboard" not in self.trackers:
            return ("tensorboard", *self.trackers)
        return self.trackers

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


# The paper's 12-epoch recipe: the field defaults above (AdamW 1e-4 / 1e-5, lr x0.1 after
# epoch 11, clip 0.1, 480-800 px multi-scale, 800 px evaluation) with batch 16 = 8 x 2.
_PAPER: dict[str, Any] = {"epochs": 12, "batch_size": 2, "total_batch_size": 16}

# Small data on a 2-core CPU: about 320 px, ResNet-18 from scratch (so backbone and head
# share one larger learning rate), cosine decay after a short warm-up, batch 4.
_CPU_SMALL: dict[str, Any] = {
    "epochs": 12, "batch_size": 4, "total_batch_size": None,
    "optim": {"lr": 4e-4, "lr_backbone": 4e-4, "schedule": "cosine", "warmup_steps": 20},
    "data": {"num_workers": 1, "transform": settings.to_dict(TransformConfig().scaled(320))},
}

RECIPES: dict[str, dict[str, Any]] = {
    "r50-4scale": _PAPER, "r50-5scale": _PAPER, "swinl-4scale": _PAPER,
    "swinl-5scale": _PAPER, "cpu-small": _CPU_SMALL,
}
"""Per preset, the training settings that differ from :class:`TrainConfig`'s defaults; the
network itself is the preset's :class:`~dinodet.config.DINOConfig`."""


def recipe_tree(preset: str, image_size: int | None = None) -> dict[str, Any]:
    """The whole recipe of ``preset`` as a config tree; ``image_size`` rescales its image
    sizes (:meth:`~dinodet.data.transforms.TransformConfig.scaled`) to that evaluation size."""
    require(preset in PRESETS, "preset", preset, f"choose one of {', '.join(PRESETS)}")
    tree = TrainConfig(preset=preset).to_dict()
    settings.merge(tree, TrainConfig, RECIPES.get(preset, {}))
    if image_size is not None:
        require(image_size >= 32, "image_size", image_size, "must be >= 32 pixels")
        transform = settings.from_dict(TransformConfig, tree["data"]["transform"])
        tree["data"]["transform"] = settings.to_dict(transform.scaled(image_size))
    return tree


def load_train_config(
    preset: str | None = None,
    yaml_file: str | Path | None = None,
    sets: Iterable[str] = (),
    image_size: int | None = None,
    **cli_overrides: Any,
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a preset, a YAML file, ``--set`` strings and CLI keywords.

    ``preset=None`` leaves the choice to ``--set preset=...``, the YAML ``preset:`` key, or
    ``"r50-4scale"``, in that order. Every layer changes that preset's recipe
    (:func:`recipe_tree`, rescaled to ``image_size`` first when given); ``model`` keys change
    its :class:`DINOConfig`.
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
    tree = recipe_tree(changes.pop("preset", TrainConfig.preset), image_size)
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
