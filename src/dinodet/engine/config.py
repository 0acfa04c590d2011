"""Typed training configuration: dataclasses, a YAML file and ``--set key=value`` overrides.

A training run is described by one :class:`TrainConfig`: the network (``model``, a
:class:`~dinodet.config.DINOConfig` taken from a named preset), the data and augmentation
(``data``), the optimiser and schedule (``optim``) and the loop's own settings. Its defaults
are the paper's recipe (AdamW 1e-4 / backbone 1e-5, 12 epochs, lr x0.1 after epoch 11,
gradient clip 0.1, multi-scale 480-800 training, 800 px evaluation).

:func:`load_train_config` layers, lowest to highest precedence::

    preset  <  YAML file  <  --set key=value  <  explicit CLI keyword arguments

The YAML file mirrors the dataclasses (``optim: {lr: 2e-4}``, ``model: {backbone: {name:
resnet18}}``, top-level keys such as ``epochs: 3``); ``--set`` uses dotted keys
(``optim.lr=2e-4``). Every value is checked against its field's type on the way in, so an
unknown key or a bad value is a ``ValueError`` that names it (``unknown key 'optim.lrr'``,
``optim.lr: expected a float, got 'abc'``). Two YAML quirks are smoothed over: PyYAML reads
``2e-4`` as a string (accepted where a float is expected) and ``off`` as ``False``
(read back as ``"off"`` where that is one of the choices, as for ``amp``).

``TrainConfig.to_dict()`` gives plain JSON data (lists, not tuples) for checkpoints;
``TrainConfig.from_dict()`` reads it back with the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from dinodet.config import PRESETS, DINOConfig, get_preset
from dinodet.data.transforms import TransformConfig

__all__ = [
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "load_train_config",
    "parse_set",
]

AmpMode = Literal["off", "bf16", "fp16"]
Schedule = Literal["step", "multistep", "cosine"]

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


_RECIPE = TransformConfig()


@dataclass
class DataConfig:
    """COCO-format data and the paper's augmentation.

    Training: horizontal flip, then either a resize of the shorter side to one of ``scales``
    (longer side at most ``max_size``) or a resize to one of ``crop_resize_scales``, a random
    crop of ``crop_min``..``crop_max`` pixels and the multi-scale resize. Evaluation resizes
    the shorter side to ``eval_size``. ``keep_category_ids`` uses the raw COCO category ids
    as class indices (as the released checkpoints do); ``strict`` makes annotation problems
    errors instead of skipped boxes.
    """

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    keep_category_ids: bool = False
    strict: bool = False
    num_workers: int = 2
    # The paper's augmentation sizes, defined once in the data package.
    scales: tuple[int, ...] = _RECIPE.scales
    max_size: int = _RECIPE.max_size
    crop_resize_scales: tuple[int, ...] = _RECIPE.crop_resize_scales
    crop_min: int = _RECIPE.crop_min
    crop_max: int = _RECIPE.crop_max
    eval_size: int = _RECIPE.eval_size

    def __post_init__(self) -> None:
        _coerce_fields(self, "data.")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        for key in ("scales", "crop_resize_scales"):
            value = getattr(self, key)
            _require(len(value) > 0 and min(value) > 0, f"data.{key}", value,
                     "must be a non-empty list of positive sizes")
        for key in ("max_size", "crop_min", "eval_size"):
            _require(getattr(self, key) > 0, f"data.{key}", getattr(self, key), "must be > 0")
        _require(self.crop_max >= self.crop_min, "data.crop_max", self.crop_max,
                 f"smaller than data.crop_min={self.crop_min}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        return _build(cls, data, "data.")


@dataclass
class OptimConfig:
    """AdamW with a separate backbone learning rate and an iteration-based schedule.

    ``schedule``: ``"step"`` multiplies by ``gamma`` from the first entry of
    ``lr_drop_epochs`` on (epoch 11 counting from 0, i.e. after 11 epochs: the paper's 12-epoch
    recipe), ``"multistep"`` multiplies by ``gamma`` at every entry, ``"cosine"`` anneals to
    ``min_lr_ratio`` x the base rate. ``warmup_steps`` optimiser steps of linear warm-up come
    first. ``clip_max_norm`` <= 0 turns gradient clipping off. ``accumulate_steps`` batches
    make one optimiser step.
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
        _coerce_fields(self, "optim.")
        for key in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "gamma",
                    "min_lr_ratio"):
            value = getattr(self, key)
            _require(math.isfinite(value), f"optim.{key}", value, "must be a finite number")
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        for key in ("lr_backbone", "weight_decay"):
            _require(getattr(self, key) >= 0, f"optim.{key}", getattr(self, key), "must be >= 0")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", self.betas,
                 "each must be in [0, 1)")
        _require(self.gamma > 0, "optim.gamma", self.gamma, "must be > 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio,
                 "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps,
                 "must be >= 0")
        _require(self.accumulate_steps >= 1, "optim.accumulate_steps", self.accumulate_steps,
                 "must be >= 1")
        drops = self.lr_drop_epochs
        _require(all(d >= 0 for d in drops) and list(drops) == sorted(set(drops)),
                 "optim.lr_drop_epochs", drops, "must be increasing epoch numbers >= 0")
        _require(self.schedule != "step" or len(drops) > 0, "optim.lr_drop_epochs", drops,
                 "the 'step' schedule needs at least one epoch")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimConfig:
        return _build(cls, data, "optim.")


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
        _coerce_fields(self, "")
        _require(self.preset in PRESETS, "preset", self.preset,
                 f"choose one of {', '.join(PRESETS)}")
        if self.model is None:
            self.model = get_preset(self.preset)
        for key in ("epochs", "batch_size", "keep_last", "log_every", "max_bad_steps"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        for key in ("checkpoint_every_steps", "eval_every_epochs"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(_DEVICE.fullmatch(self.device) is not None, "device", self.device,
                 "use auto, cpu, cuda, cuda:N or mps")
        _require(bool(self.out_dir), "out_dir", self.out_dir, "must not be empty")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data (tuples become lists)."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`, with every key and value checked."""
        return _build(cls, data, "")

    def to_yaml(self) -> str:
        """The whole config as YAML, loadable again with :func:`load_train_config`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------
# Loading: preset < YAML < --set < CLI keywords
# --------------------------------------------------------------------------------------


def load_train_config(
    preset: str | None = None,
    yaml_file: str | Path | None = None,
    sets: Iterable[str] = (),
    **cli_overrides: Any,
) -> TrainConfig:
    """Build a :class:`TrainConfig` from a preset, a YAML file, ``--set`` strings and CLI keywords.

    ``preset`` picks the network preset; ``None`` leaves the choice to ``--set preset=...``,
    the YAML file's ``preset:`` key, or the default ``"r50-4scale"``, in that order. The
    preset's :class:`DINOConfig` is the base that ``model`` keys in the YAML file and
    ``--set model....`` change. ``cli_overrides`` are explicit command-line values: a
    top-level field (``epochs=3``, ``out_dir=...``) or a field of ``data`` / ``optim`` /
    ``model`` by its bare name (``train_ann=...``, ``lr=2e-4``, ``num_classes=3``); ``None``
    values are ignored, so unset argparse options fall through to the layers below.

    Raises ``ValueError`` naming the key (and the YAML file or ``--set`` string) for an
    unknown key, a bad value or a YAML syntax error.
    """
    yaml_pairs: list[tuple[str, Any]] = []
    source = ""
    if yaml_file is not None:
        source = f"{yaml_file}: "
        yaml_pairs = _flatten(TrainConfig, _read_yaml(Path(yaml_file)), "", source)
    set_pairs = [parse_set(s) for s in sets]
    cli_pairs = [(_cli_key(k), v) for k, v in cli_overrides.items() if v is not None]

    # The highest layer that names a preset picks it; every name given must exist.
    named = [v for k, v in [*yaml_pairs, *set_pairs] if k == "preset"]
    if preset is not None:
        named.append(preset)
    for value in named:
        if not isinstance(value, str) or value not in PRESETS:
            raise ValueError(f"preset: unknown preset {value!r}; "
                             f"choose one of {', '.join(PRESETS)}")
    name = named[-1] if named else TrainConfig.preset

    # The preset is settled; later layers only change fields on top of its network.
    yaml_pairs = [(k, v) for k, v in yaml_pairs if k != "preset"]
    set_pairs = [(k, v) for k, v in set_pairs if k != "preset"]
    cli_pairs = [(k, v) for k, v in cli_pairs if k != "preset"]
    tree = TrainConfig(preset=name).to_dict()
    for key, value in yaml_pairs:
        _assign(tree, key, value, source)
    for key, raw in set_pairs:
        _assign(tree, key, _parse_set_value(raw, _leaf_type(key, f"--set {key}={raw}: ")),
                f"--set {key}={raw}: ")
    for key, value in cli_pairs:
        _assign(tree, key, value, f"--{key.rsplit('.', 1)[-1].replace('_', '-')}: ")
    return TrainConfig.from_dict(tree)


def parse_set(item: str) -> tuple[str, str]:
    """Split one ``--set key=value`` string into the dotted key and the raw value text."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected key=value, e.g. optim.lr=2e-4")
    return key, raw.strip()


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


def _cli_key(name: str) -> str:
    """Map a CLI keyword to its dotted key: top-level fields first, then by unique field name."""
    if name in _field_names(TrainConfig):
        return name
    for section, cls in (("data", DataConfig), ("optim", OptimConfig), ("model", DINOConfig)):
        if name in _field_names(cls):
            return f"{section}.{name}"
    raise ValueError(f"unknown key {name!r} among the command-line overrides")


def _flatten(cls: type, data: Any, prefix: str, source: str) -> list[tuple[str, Any]]:
    """Mapping -> [(dotted key, leaf value)], checking keys against the dataclasses."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}{prefix[:-1]}: expected a mapping, got {data!r}")
    pairs: list[tuple[str, Any]] = []
    for name, value in data.items():
        tp = _field_type(cls, str(name), prefix, source)
        section = _section_class(tp)
        if section is not None and isinstance(value, Mapping):
            pairs += _flatten(section, value, f"{prefix}{name}.", source)
        elif section is not None and value is not None:
            raise ValueError(f"{source}{prefix}{name}: expected a mapping, got {value!r}")
        elif section is None:
            pairs.append((f"{prefix}{name}", value))
    return pairs


def _leaf_type(key: str, source: str) -> Any:
    cls: type = TrainConfig
    parts = key.split(".")
    for i, name in enumerate(parts):
        tp = _field_type(cls, name, "".join(p + "." for p in parts[:i]), source)
        section = _section_class(tp)
        if i == len(parts) - 1:
            return tp
        if section is None:
            raise ValueError(f"{source}unknown key {key!r}: {'.'.join(parts[:i + 1])} "
                             "is not a section")
        cls = section
    raise AssertionError("unreachable")


def _assign(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``tree[dotted key] = value`` after checking the key and coercing the value."""
    tp = _leaf_type(key, source)
    section = _section_class(tp)
    if section is not None:
        # A whole section given at once (``--set optim={lr: 2e-4}``): set its leaves.
        for sub_key, sub_value in _flatten(section, value, key + ".", source):
            _assign(tree, sub_key, sub_value, source)
        return
    try:
        value = _coerce(value, tp, key)
    except ValueError as e:
        raise ValueError(f"{source}{e}") from None
    *path, leaf = key.split(".")
    node = tree
    for name in path:
        if node.get(name) is None:
            node[name] = {}
        node = node[name]
    node[leaf] = value


def _parse_set_value(raw: str, tp: Any) -> Any:
    """YAML-parse ``raw``, but keep the text itself where the field wants a string.

    So ``amp=off`` stays ``"off"`` (YAML would say ``False``) and ``out_dir=2024`` stays a
    string; ``null`` / ``~`` still mean ``None`` for optional fields.
    """
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    if _wants_string(tp) and not isinstance(value, str) and not (value is None and
                                                                 _allows_none(tp)):
        value = raw
    return value


# --------------------------------------------------------------------------------------
# Types: field look-up and value coercion
# --------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit a type (turned into a ValueError naming the key)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _field_type(cls: type, name: str, prefix: str, source: str = "") -> Any:
    names = _field_names(cls)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        where = f"section {prefix[:-1]!r}" if prefix else "the top level"
        raise ValueError(f"{source}unknown key {prefix + name!r}{hint} "
                         f"(known in {where}: {', '.join(names)})")
    return _hints(cls)[name]


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return None


def _section_class(tp: Any) -> type | None:
    """The dataclass behind a field type (``X`` or ``X | None``), else None."""
    for t in _union_args(tp) or (tp,):
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            return t
    return None


def _allows_none(tp: Any) -> bool:
    return type(None) in (_union_args(tp) or ())


def _wants_string(tp: Any) -> bool:
    args = [t for t in _union_args(tp) or (tp,) if t is not type(None)]
    return len(args) == 1 and (args[0] is str or (
        get_origin(args[0]) is Literal and all(isinstance(a, str) for a in get_args(args[0]))))


def _describe(tp: Any) -> str:
    union = _union_args(tp)
    if union is not None:
        return " or ".join(_describe(t) for t in union)
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {str: "a string", int: "an integer", float: "a float", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {str: "strings", int: "integers", float: "floats", bool: "booleans"}.get(
        tp, _describe(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to ``tp``, or a ValueError ``"<key>: expected <type>, got <value>"``."""
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise ValueError(f"{key}: expected {_describe(tp)}, got {value!r}") from None


def _convert(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    union = _union_args(tp)
    if union is not None:
        if value is None and type(None) in union:
            return None
        for t in union:
            if t is type(None):
                continue
            try:
                return _convert(value, t)
            except _Mismatch:
                pass
        raise _Mismatch
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML reads off/on as False/True
            value = "on" if value else "off"
        if isinstance(value, str) and value in choices:
            return value
        raise _Mismatch
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, (int, float, str)) and len(args) == 2 and args[1] is Ellipsis:
            value = [value]  # a single number for a variable-length list
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, t) for v, t in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    raise TypeError(f"no conversion to {tp!r}")


def _coerce_fields(obj: Any, prefix: str) -> None:
    """Coerce every non-section field of a dataclass instance in place (lists -> tuples...)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        value = getattr(obj, f.name)
        section = _section_class(tp)
        if section is None:
            setattr(obj, f.name, _coerce(value, tp, prefix + f.name))
        elif isinstance(value, Mapping):
            setattr(obj, f.name, _build(section, value, f"{prefix}{f.name}."))
        elif not (isinstance(value, section) or (value is None and _allows_none(tp))):
            raise ValueError(f"{prefix}{f.name}: expected a mapping or {section.__name__}, "
                             f"got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A dataclass from a mapping, checking keys and values (the model via DINOConfig)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix[:-1]}: expected a mapping, got {data!r}")
    tree = _coerced_tree(cls, data, prefix)
    if cls is DINOConfig:
        try:
            return DINOConfig.from_dict(tree)
        except ValueError as e:
            raise ValueError(f"{prefix[:-1]}: {e}") from None
    return cls(**tree)


def _coerced_tree(cls: type, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Check keys and coerce leaf values; nested sections stay mappings for the constructors."""
    out: dict[str, Any] = {}
    for name, value in data.items():
        tp = _field_type(cls, str(name), prefix)
        section = _section_class(tp)
        if section is None:
            out[name] = _coerce(value, tp, prefix + name)
        elif isinstance(value, Mapping):
            out[name] = _coerced_tree(section, value, f"{prefix}{name}.")
        elif isinstance(value, section) or (value is None and _allows_none(tp)):
            out[name] = value
        else:
            raise ValueError(f"{prefix}{name}: expected a mapping, got {value!r}")
    return out


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {why}, got {value!r}")


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, DINOConfig):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
