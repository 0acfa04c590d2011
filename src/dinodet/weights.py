"""Opening weights: every file a user has, one error type, one report of keys that don't fit.

Sources (read with ``torch.load(weights_only=True)`` or safetensors; nothing in a file
runs): a run checkpoint of ``dinodet train`` (model config, class table, evaluation
transform, raw and EMA weights, per-class score thresholds when its validation gave them);
a model directory of ``dinodet convert`` /
:func:`save_pretrained` (safetensors + JSON, and a model card ``README.md``); a model
directory on the Hugging Face Hub, ``"owner/name"`` or ``"hf://owner/name@revision"``
(its ``config.json`` and ``model.safetensors`` only, downloaded into huggingface_hub's
cache; how a repo id is told from a local path: :mod:`dinodet.hub`); an original DINO
``.pth`` with its variant (keys renamed by :mod:`dinodet.convert`); a backbone file of
ImageNet weights.

Which weights of a run checkpoint are used is a stated choice: ``weights="ema"`` (the
default of predict, eval, export and ``--init``) takes the EMA weights when there are any,
``"raw"`` the raw ones; :attr:`Weights.which` says what was taken.

Per-class score thresholds (``class_thresholds``: class index -> the score a detection
of that class needs, in [0, 1]) travel with a model as an optional entry of a run
checkpoint or of a model directory's ``config.json``, stored as JSON (``{"0": 0.41, ...}``)
and checked on load (:func:`check_class_thresholds`); ``threshold="auto"`` of
:class:`~dinodet.predict.Detector` applies them. :func:`attach_class_thresholds` adds them
to a file that has none.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from dinodet.data.transforms import EvalTransform
from dinodet.errors import RunDirError, UserError
from dinodet.settings import is_finite_number, is_int

if TYPE_CHECKING:
    from dinodet.config import DINOConfig
    from dinodet.model.dino import DINO

__all__ = ["CLASS_THRESHOLDS_KEY", "CheckpointError", "CheckpointNotFoundError", "LoadedModel",
           "ModelMeta", "Weights", "attach_class_thresholds", "check_class_thresholds",
           "check_classes", "check_keys", "check_model_meta", "check_output_dir",
           "check_output_file", "class_thresholds_json", "from_original",
           "load_backbone_weights", "load_initial_weights", "load_into", "load_model",
           "load_pretrained", "open_weights", "read_model_meta", "read_torch_file",
           "save_pretrained"]

WeightsChoice = Literal["ema", "raw"]

#: The entry of a run checkpoint, a model directory's config.json and an exported file's
#: metadata that holds the per-class score thresholds.
CLASS_THRESHOLDS_KEY = "class_thresholds"

# Globals a released checkpoint holds besides tensors and builtins; nothing else unpickles.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class CheckpointError(UserError):
    """A weights or checkpoint file that cannot be read or written, or does not fit the
    model; the message names the file and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The file is not there."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a file may hold anything, of any size)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Advice in torch's weights-only messages that dinodet must not pass on: it tells the user
# to unpickle the file anyway (``weights_only=False``) or to allowlist what it holds.
_TORCH_ADVICE = ("weights_only", "weights only", "likely succeed", "safe_globals",
                 "allowlist", "trust", "file an issue", "documentation of torch.load")


def _refusal(e: pickle.UnpicklingError) -> tuple[str, str] | None:
    """What torch's weights-only unpickler refused in a file: ("global", its dotted name)
    for a class or function (what a pickle of a Python object holds), ("object", what)
    for another construct it does not build; None when the file is damaged instead."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.<>]+)", text)
    if found:
        return "global", found.group(1)
    for pattern in (r"Can only create new object .* but got (.+)",
                    r"Can only build .*, but got (.+)", r"Trying to call reduce for (\S+)"):
        found = re.search(pattern, text)
        if found:
            return "object", found.group(1).strip().rstrip(".")
    return None


def _unpickler_detail(e: pickle.UnpicklingError) -> str:
    """The unpickler's own complaint (e.g. ``Unsupported operand 149``), without torch's
    advice around it."""
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not any(word in line.lower() for word in _TORCH_ADVICE):
            return line
    return type(e).__name__


def read_torch_file(path: str | Path, what: str = "checkpoint",
                    map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (``argparse.Namespace`` allowed: released
    checkpoints hold one); any failure is a :class:`CheckpointError` naming the file.

    A file holding pickled Python objects (an instance of some class, a function) is
    refused, naming the class: unpickling one runs code, so dinodet never does, and the
    message says so instead of torch's advice to load the file without ``weights_only``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (an interrupted save?)")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refusal(e)
        if refused is not None:
            kind, name = refused
            held = (f"a pickled {name} (a Python class or function)" if kind == "global"
                    else f"a pickled object it does not build ({name})")
            raise CheckpointError(
                f"{what} {path} was refused: it holds {held}, and such objects are not "
                "allowed to be unpickled: dinodet reads only tensors, plain data (numbers, "
                "strings, lists, dicts) and argparse.Namespace from a torch file, because "
                "unpickling anything else can run code; save the weights as a state dict "
                "of tensors") from None
        raise CheckpointError(f"{what} {path} is truncated or corrupt: "
                              f"{_unpickler_detail(e)}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except Exception as e:  # a damaged file fails in many ways (EOFError, KeyError, ...)
        raise CheckpointError(f"{what} {path} is truncated or corrupt "
                              f"({type(e).__name__}: {_first_line(e)})") from e


def _read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointNotFoundError(f"weights not found: {path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt?): {e}") from e


def check_keys(own: Mapping[str, Tensor], given: Mapping[str, Tensor], where: str,
               target: str = "the model",
               may_be_missing: Callable[[str], bool] | None = None) -> None:
    """Raise :class:`CheckpointError` naming every key of ``given`` that does not fit the
    state dict ``own``: missing (unless ``may_be_missing(key)``), unexpected, mis-shaped."""
    missing = [k for k in own if k not in given
               and not (may_be_missing is not None and may_be_missing(k))]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k}: {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
              for k in given if k in own and given[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"mis-shaped: {'; '.join(shapes[:20])}")
    if problems:
        raise CheckpointError(f"the weights in {where} do not fit {target}: "
                              + " | ".join(problems))


def load_into(module: nn.Module, state_dict: Mapping[str, Tensor], where: str,
              skip: tuple[str, ...] = ()) -> None:
    """Strict load (keys starting with ``skip`` may be missing), reported by
    :func:`check_keys`."""
    check_keys(module.state_dict(), state_dict, where,
               may_be_missing=lambda k: k.startswith(skip) if skip else False)
    module.load_state_dict(state_dict, strict=False)


@dataclass
class Weights:
    """Weights in dinodet's layout and what is known about them: ``config`` (None where
    the file has none), ``which`` ("ema" or "raw"), ``transform`` (how the model was
    evaluated; 800 px where unknown)."""

    state_dict: dict[str, Tensor]
    config: DINOConfig | None
    kind: str
    path: Path
    which: WeightsChoice = "raw"
    classes: list[dict[str, Any]] | None = None
    transform: EvalTransform = field(default_factory=EvalTransform)
    class_thresholds: dict[int, float] | None = None  # class index -> minimum score
    origin: str | None = None  # a Hub model's ``hf://owner/name@commit``; ``path`` its cache

    def describe(self) -> str:
        """e.g. ``dinodet checkpoint runs/x/best.pt (EMA weights)``."""
        where = f"{self.origin} ({self.path})" if self.origin else str(self.path)
        return f"{self.kind} {where} ({'EMA' if self.which == 'ema' else 'raw'} weights)"


def _run_transform(config: Any, where: str) -> EvalTransform:
    """The evaluation transform of a run's config (older runs kept the sizes in ``data``)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: 'config' must be a mapping, got {_short(config)}")
    data = config.get("data") or {}
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where}: 'config.data' must be a mapping, got {_short(data)}")
    meta = data.get("transform") or data
    return _eval_transform(meta, where, "config.data.transform." if data.get("transform")
                           else "config.data.")


def _eval_transform(meta: Any, where: str, prefix: str = "") -> EvalTransform:
    """The :class:`EvalTransform` stored with a model, every value checked first: sizes
    are integers within :data:`dinodet.config.MAX_EVAL_SIZE` /
    :data:`~dinodet.config.MAX_EVAL_MAX_SIZE` (a file asking for a 10^9-pixel resize is an
    error, not an allocation), mean and std three finite numbers (std > 0)."""
    from dinodet.config import MAX_EVAL_MAX_SIZE, MAX_EVAL_SIZE

    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{where}: the transform settings must be a mapping, got "
                              f"{_short(meta)}")
    for key, limit in (("eval_size", MAX_EVAL_SIZE), ("max_size", MAX_EVAL_MAX_SIZE)):
        value = meta.get(key)
        if value is not None and not (is_int(value) and 1 <= value <= limit):
            raise CheckpointError(f"{where}: {prefix}{key} must be an integer in [1, {limit}] "
                                  f"(or null), got {_short(value)}")
    for key in ("mean", "std"):
        value = meta.get(key)
        if value is None:
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(map(is_finite_number, value))
                and (key == "mean" or all(v > 0 for v in value))):
            raise CheckpointError(f"{where}: {prefix}{key} must be 3 finite numbers"
                                  f"{' > 0' if key == 'std' else ''}, got {_short(value)}")
    try:
        return EvalTransform.from_metadata(dict(meta))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {prefix.rstrip('.') or 'transform'}: {e}") from None


def _config(data: Any, where: str, key: str) -> DINOConfig:
    """A stored model config, checked (types, ranges, :data:`dinodet.config.LIMITS`) before
    anything is built; errors name ``where`` and the key. The attention backend is where
    the model runs, not part of the weights: a file saved with "triton" opens without
    triton (env var, else auto)."""
    from dinodet.config import DINOConfig

    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where}: '{key}' must be a mapping of model settings, got "
                              f"{_short(data)}")
    try:
        return DINOConfig.from_dict({**data, "attention_backend": None})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {key}.{e}") from None


def check_classes(classes: Any, num_classes: int, where: str, complete: bool = True
                  ) -> list[dict[str, Any]] | None:
    """A model's class table, checked: None, or a list of ``{"label": int, "category_id":
    int, "name": str}`` objects with distinct labels in ``[0, num_classes)``
    (``complete=False``: ``category_id`` and ``name`` may be left out). Anything else is a
    :class:`CheckpointError` naming ``where`` and the entry. Returns copies of the entries."""
    if classes is None:
        return None
    if not isinstance(classes, list):
        raise CheckpointError(f"{where}: 'classes' must be a list of {{label, category_id, "
                              f"name}} objects, got {_short(classes)}")
    if len(classes) > num_classes:
        raise CheckpointError(f"{where}: 'classes' has {len(classes)} entries for a model of "
                              f"{num_classes} classes")
    seen: set[int] = set()
    table = []
    for i, entry in enumerate(classes):
        name = f"{where}: classes[{i}]"
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"{name} must be an object with label, category_id and "
                                  f"name, got {_short(entry)}")
        for key, ok, what in (("label", is_int, "an integer"),
                              ("category_id", is_int, "an integer"),
                              ("name", lambda v: isinstance(v, str), "a string")):
            if key not in entry:
                if complete or key == "label":
                    raise CheckpointError(f"{name} has no {key!r}")
                continue
            if not ok(entry[key]):
                raise CheckpointError(f"{name}.{key} must be {what}, got {_short(entry[key])}")
        label = entry["label"]
        if not 0 <= label < num_classes:
            raise CheckpointError(f"{name}.label {label} is outside the model's {num_classes} "
                                  f"classes (0 to {num_classes - 1})")
        if label in seen:
            raise CheckpointError(f"{name}.label {label} is given twice")
        seen.add(label)
        table.append(dict(entry))
    return table


def check_class_thresholds(thresholds: Any, num_classes: int, where: str,
                           key: str = CLASS_THRESHOLDS_KEY) -> dict[int, float] | None:
    """A model's per-class score thresholds, checked: None, or a mapping of class index
    (an integer, or its decimal string as JSON keys are) to a number in [0, 1], every index
    in ``[0, num_classes)`` and given once. Anything else is a :class:`CheckpointError`
    naming ``where``, ``key`` and the entry. Returns ``{index: float}`` sorted by index; a
    class left out has no threshold (``threshold="auto"`` keeps none of its detections)."""
    if thresholds is None:
        return None
    if not isinstance(thresholds, Mapping):
        raise CheckpointError(f"{where}: {key!r} must be a mapping of class index to score "
                              f"threshold in [0, 1], got {_short(thresholds)}")
    found: dict[int, float] = {}
    for name, value in thresholds.items():
        if is_int(name) or (isinstance(name, str) and name.isascii() and name.isdigit()):
            index = int(name)
        else:
            raise CheckpointError(f"{where}: {key}[{_short(name)}]: the key must be a class "
                                  "index (an integer)")
        if not 0 <= index < num_classes:
            raise CheckpointError(f"{where}: {key}[{_short(name)}]: class {index} is outside "
                                  f"the model's {num_classes} classes (0 to {num_classes - 1})")
        if index in found:
            raise CheckpointError(f"{where}: {key}[{_short(name)}]: class {index} is given "
                                  "twice")
        if not (is_finite_number(value) and 0 <= value <= 1):
            raise CheckpointError(f"{where}: {key}[{_short(name)}] must be a number in "
                                  f"[0, 1], got {_short(value)}")
        found[index] = float(value)
    return dict(sorted(found.items()))


def class_thresholds_json(thresholds: Mapping[int, float]) -> dict[str, float]:
    """``{index: threshold}`` as stored in every file: decimal-string keys in index order
    (what JSON keeps), plain floats."""
    return {str(int(k)): float(v) for k, v in sorted(thresholds.items())}


@dataclass
class ModelMeta:
    """A model directory's ``config.json``, checked: the raw JSON object (``variant``,
    ``source``, ``metrics``, ``license``, ... as saved) and what loading takes from it."""

    raw: dict[str, Any]
    config: DINOConfig
    classes: list[dict[str, Any]] | None
    transform: EvalTransform
    class_thresholds: dict[int, float] | None


def check_model_meta(meta: Any, where: str) -> ModelMeta:
    """The JSON object of a model directory's ``config.json``, checked key by key (model
    config, class table, transform, per-class thresholds) before anything is built; errors
    are :class:`CheckpointError` naming ``where`` and the key."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is not a valid dinodet config: expected a JSON "
                              f"object with a 'config' entry, got {type(meta).__name__}")
    if "config" not in meta:
        raise CheckpointError(f"{where} is not a valid dinodet config: no 'config' entry "
                              f"(found {', '.join(map(repr, list(meta)[:10])) or 'nothing'})")
    config = _config(meta["config"], where, "config")
    classes = check_classes(meta.get("classes"), config.num_classes, where)
    transform = _eval_transform(meta, where)
    thresholds = check_class_thresholds(meta.get(CLASS_THRESHOLDS_KEY), config.num_classes,
                                        where)
    return ModelMeta(meta, config, classes, transform, thresholds)


def read_model_meta(cfg_file: str | Path) -> ModelMeta:
    """A model directory's ``config.json`` read and checked (:func:`check_model_meta`)."""
    cfg_file = Path(cfg_file)
    try:
        meta = json.loads(cfg_file.read_bytes())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"model config not found: {cfg_file} does not "
                                      "exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or bytes that aren't UTF-8
        raise CheckpointError(f"{cfg_file} is not a valid dinodet config: not JSON "
                              f"({_first_line(e)})") from None
    return check_model_meta(meta, str(cfg_file))


def _model_directory(path: Path) -> Weights:
    """``config.json`` + ``model.safetensors`` (or the weights alone, enough for --init);
    the JSON is checked key by key before the weights are read or anything is built."""
    cfg_file, weights_file = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file():
        if weights_file.is_file():  # weights without a config (enough for --init)
            return Weights(_read_safetensors(weights_file), None, "safetensors file",
                           weights_file)
        raise CheckpointNotFoundError(f"{path} is not a dinodet model directory: "
                                      "config.json missing")
    meta = read_model_meta(cfg_file)
    sd = _read_safetensors(weights_file)
    return Weights(sd, meta.config, "dinodet model directory", path, "raw", meta.classes,
                   meta.transform, meta.class_thresholds)


def _run_checkpoint(obj: Mapping[str, Any], path: Path, weights: WeightsChoice) -> Weights:
    """A checkpoint of ``dinodet train``: its config, class table and transform checked
    before anything is built."""
    where = f"checkpoint {path}"
    config = _config(obj["model_config"], where, "model_config")
    ema = obj.get("ema")
    which: WeightsChoice = "ema" if weights == "ema" and ema else "raw"
    if which == "ema":
        if not isinstance(ema, Mapping) or "module" not in ema:
            raise CheckpointError(f"{where}: 'ema' must be a mapping with the EMA weights "
                                  "under 'module'")
        sd, key = ema["module"], "ema.module"
    else:
        sd, key = obj.get("model"), "model"
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{where}: {key!r} is not a state dict of tensors")
    classes = check_classes(obj.get("classes"), config.num_classes, where)
    thresholds = check_class_thresholds(obj.get(CLASS_THRESHOLDS_KEY), config.num_classes,
                                        where)
    return Weights(dict(sd), config, "dinodet checkpoint", path, which, classes,
                   _run_transform(obj.get("config") or {}, where), thresholds)


def open_weights(path: str | Path, variant: str | None = None,
                 weights: WeightsChoice = "ema", *, revision: str | None = None) -> Weights:
    """Any weights file of the module docstring, in dinodet's layout. ``variant``: the
    preset of an original DINO ``.pth``; ``weights``: EMA or raw of a run checkpoint;
    ``revision``: the branch, tag or commit of a Hugging Face Hub repo (or
    ``"owner/name@revision"``), which is opened as the model directory it holds."""
    from dinodet.config import get_preset
    from dinodet.hub import download_model, hub_reference

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    if variant is not None:
        get_preset(variant)  # an unknown variant fails before any file is read
    ref = hub_reference(path, revision)
    if ref is not None:
        snapshot = download_model(ref)
        found = _model_directory(snapshot)
        found.origin = f"hf://{ref.repo_id}@{snapshot.name}"
        return found
    if revision is not None:
        raise UserError(f"revision={revision!r} is for a Hugging Face Hub repo, and {path} is "
                        "a local path: drop the revision")
    path = Path(path)
    if path.is_dir():
        return _model_directory(path)
    if path.suffix == ".safetensors":
        return Weights(_read_safetensors(path), None, "safetensors file", path)
    obj = read_torch_file(path)
    if isinstance(obj, dict) and "model_config" in obj:  # a dinodet run checkpoint
        return _run_checkpoint(obj, path, weights)
    return _state_dict_weights(obj, path, variant)


def _state_dict_weights(obj: Any, path: Path, variant: str | None) -> Weights:
    """A loaded state dict (or a checkpoint holding one): the original's layout renamed
    (and configured from ``variant``), anything else taken as dinodet's."""
    from dinodet import convert

    raw = convert.extract_state_dict(obj, str(path))
    if not convert.is_original_layout(raw):
        return Weights(raw, None, "state dict", path)
    convert.check_swin_index(raw)
    renamed = convert.original_to_dinodet(raw)
    config = convert.infer_config(renamed, variant) if variant is not None else None
    return Weights(renamed, config, "original DINO checkpoint", path)


@dataclass
class LoadedModel:
    """A model in eval mode and what goes with it."""

    model: DINO
    classes: list[dict[str, Any]] | None  # label, category_id, name (None: class = id)
    transform: EvalTransform
    weights: Weights

    @property
    def class_thresholds(self) -> dict[int, float] | None:
        """The per-class score thresholds stored with the model (None: it has none)."""
        return self.weights.class_thresholds


def load_model(path: str | Path, variant: str | None = None,
               weights: WeightsChoice = "ema",
               map_location: str | torch.device = "cpu", *,
               revision: str | None = None) -> LoadedModel:
    """A model in eval mode from any source of :func:`open_weights` that has a config
    (a Hugging Face Hub repo id too: ``"owner/name"``, ``revision`` its branch, tag or
    commit)."""
    from dinodet.model.dino import DINO

    found = open_weights(path, variant, weights, revision=revision)
    if found.config is None:
        hint = ("give its variant (e.g. --variant r50-4scale)"
                if found.kind == "original DINO checkpoint"
                else "it holds no model config: use a run checkpoint, a model directory "
                     "or an original DINO checkpoint with its variant")
        raise CheckpointError(f"{path} ({found.kind}): {hint}")
    model = DINO(found.config)
    load_into(model, found.state_dict, str(path))
    model.to(map_location)
    return LoadedModel(model.eval(), found.classes, found.transform, found)


def from_original(source: str | Path | Mapping[str, Any], variant: str,
                  num_classes: int | None = None) -> DINO:
    """Build ``variant`` and load an original DINO checkpoint into it (eval mode).

    Args:
        source: path of a released ``.pth`` or its (state) dict.
        variant: ``r50-4scale``, ``r50-5scale``, ``swinl-4scale`` or ``swinl-5scale``.
        num_classes: fine-tune to this many classes: the class heads and the denoising
            label table are re-initialised (a warning names them); all else is loaded.
    """
    from dinodet import convert
    from dinodet.config import get_preset
    from dinodet.model.dino import DINO

    get_preset(variant)  # unknown variants fail before any file is read
    if isinstance(source, (str, Path)):
        where, obj = Path(source), read_torch_file(source)
    else:
        where, obj = Path("state dict"), source
    found = _state_dict_weights(obj, where, variant)
    if found.config is None:
        raise CheckpointError(f"{where} is not an original DINO checkpoint (no "
                              "'transformer.' or 'backbone.0.' keys)")
    sd, cfg = found.state_dict, found.config
    skip: tuple[str, ...] = ()
    if num_classes is not None and num_classes != cfg.num_classes:
        warnings.warn(
            f"fine-tuning from {cfg.num_classes} to {num_classes} classes: re-initialising "
            f"{', '.join(p.rstrip('.') for p in convert.CLASS_DEPENDENT)}", stacklevel=2)
        cfg = cfg.replace(num_classes=num_classes, dn_labelbook_size=None)
        sd = {k: v for k, v in sd.items() if not k.startswith(convert.CLASS_DEPENDENT)}
        skip = convert.CLASS_DEPENDENT
    model = DINO(cfg)
    load_into(model, sd, str(where), skip=skip)
    return model.eval()


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that is there (a dangling symbolic link counts)."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _check_folder(folder: Path, subject: str, error: type[UserError]) -> None:
    """``folder`` is a folder that is there or can be created, and can be written in."""
    base = _nearest_existing(Path(os.path.abspath(folder)))
    if not base.exists():
        raise error(f"{subject}: {base} is a broken symbolic link")
    if not base.is_dir():
        raise error(f"{subject}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise error(f"{subject}: cannot write in {base} (no permission, or a read-only file "
                    "system)")


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Refuse, before any work, a folder that cannot receive output: an existing file, a
    path under a file, or a folder that can neither be written in nor created. Raises
    :class:`~dinodet.errors.RunDirError` naming ``what`` and the path; creates nothing."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        kind = "a broken symbolic link" if not path.exists() else "a file, not a folder"
        raise RunDirError(f"{what} {path} is {kind}")
    _check_folder(path, f"{what} {path}", RunDirError)
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Refuse, before any work, a file that cannot be written (atomically, beside it): an
    existing folder or special file, a path under a file, a folder that cannot be written
    in or created. Raises :class:`~dinodet.errors.UserError` naming ``what`` and the path;
    creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder: give the name of a file to write")
    if path.exists() and not path.is_file():
        raise UserError(f"{what} {path} is not a regular file")
    if os.path.islink(path) and not path.exists():
        raise UserError(f"{what} {path} is a broken symbolic link")
    _check_folder(path.parent, f"{what} {path}", UserError)
    return path


def save_pretrained(model: DINO, out_dir: str | Path, extra: dict[str, Any] | None = None,
                    transform: EvalTransform | None = None,
                    class_thresholds: Mapping[int, float] | None = None, *,
                    metrics: Mapping[str, float] | None = None,
                    license: str | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (no pickle), with ``extra``
    (``classes``, ``source``, ``variant``, ...), ``transform``'s metadata and
    ``class_thresholds`` (class index -> score threshold; or
    ``extra["class_thresholds"]``) in the JSON, and a Hugging Face model card
    ``README.md`` made from it (:func:`dinodet.hub.model_card`). ``metrics`` (name ->
    number, e.g. ``{"AP": 0.49}``) and ``license`` (a Hub license id, e.g.
    ``"apache-2.0"``) go into both. ``out_dir``, the thresholds, metrics and license are
    checked first (:func:`check_output_dir`, :func:`check_class_thresholds`); the card is
    written last, so a directory with a ``README.md`` is complete."""
    from safetensors.torch import save_file

    from dinodet.hub import METRICS_KEY, check_license, check_metrics, model_card

    if class_thresholds is None:
        class_thresholds = (extra or {}).get(CLASS_THRESHOLDS_KEY)
    thresholds = check_class_thresholds(class_thresholds, model.cfg.num_classes,
                                        f"save_pretrained {out_dir}")
    if metrics is None:
        metrics = (extra or {}).get(METRICS_KEY)
    metrics = check_metrics(metrics, "save_pretrained metrics")
    if license is None:
        license = (extra or {}).get("license")
    license = check_license(license, "save_pretrained license")
    out = check_output_dir(out_dir, "model directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "dinodet"})
    meta = {"config": model.cfg.to_dict(), **(transform.metadata() if transform else {}),
            **(extra or {})}
    for key in (CLASS_THRESHOLDS_KEY, METRICS_KEY, "license"):
        meta.pop(key, None)
    if thresholds is not None:
        meta[CLASS_THRESHOLDS_KEY] = class_thresholds_json(thresholds)
    if metrics is not None:
        meta[METRICS_KEY] = metrics
    if license is not None:
        meta["license"] = license
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    (out / "README.md").write_text(model_card(check_model_meta(meta, str(out / "config.json"))),
                                   encoding="utf-8")
    return out


def _threshold_source(thresholds: Any) -> tuple[Any, str | None]:
    """(the table, the JSON file it came from) of what :func:`attach_class_thresholds`
    takes: a path of a JSON file (``thresholds.json`` of ``dinodet eval --report``, or a
    bare table), or a mapping; an object holding ``class_thresholds`` gives that entry."""
    source = None
    if isinstance(thresholds, (str, Path)):
        source = str(thresholds)
        try:
            thresholds = json.loads(Path(thresholds).read_bytes())
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"thresholds file not found: {source} does not "
                                          "exist") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {source}: {e.strerror or e}") from e
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{source} is not JSON ({_first_line(e)})") from None
    if isinstance(thresholds, Mapping) and CLASS_THRESHOLDS_KEY in thresholds:
        thresholds = thresholds[CLASS_THRESHOLDS_KEY]
    return thresholds, source


def attach_class_thresholds(path: str | Path, thresholds: Any) -> Path:
    """Store per-class score thresholds in a run checkpoint or a model directory's
    ``config.json``, replacing any there; ``None`` removes them. ``thresholds``: a mapping
    of class index to score in [0, 1] (``{"0": 0.41, ...}`` as JSON gives it), or the path
    of a JSON file holding one, e.g. ``thresholds.json`` of ``dinodet eval --report``
    (its ``class_thresholds``). They are checked against the model's classes first (errors
    name the JSON file when there is one); the file is rewritten atomically. Returns the
    file written."""
    from dinodet.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint

    table, source = _threshold_source(thresholds)
    path = Path(path)
    if path.is_dir():
        from dinodet.hub import is_generated_card, model_card

        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointNotFoundError(f"{path} is not a dinodet model directory: "
                                          "config.json missing")
        try:
            meta = json.loads(cfg_file.read_bytes())
        except OSError as e:
            raise CheckpointError(f"cannot read {cfg_file}: {e.strerror or e}") from e
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{cfg_file} is not a valid dinodet config: not JSON "
                                  f"({_first_line(e)})") from None
        if not isinstance(meta, dict) or "config" not in meta:
            raise CheckpointError(f"{cfg_file} is not a valid dinodet config: no 'config' "
                                  "entry")
        config = _config(meta["config"], str(cfg_file), "config")
        found = check_class_thresholds(table, config.num_classes, source or str(cfg_file))
        card = path / "README.md"
        try:  # the model card shows the thresholds: rewritten unless someone edited it
            refresh = card.is_file() and is_generated_card(
                card, check_model_meta(meta, str(cfg_file)))
        except UserError:  # a stored table this replaces, or metrics the card cannot show
            refresh = False
        meta.pop(CLASS_THRESHOLDS_KEY, None)
        if found is not None:
            meta[CLASS_THRESHOLDS_KEY] = class_thresholds_json(found)
        text = json.dumps(meta, indent=2).encode()
        atomic_write(cfg_file, lambda f: f.write(text), what="model config")
        if refresh:
            card_text = model_card(check_model_meta(meta, str(cfg_file))).encode()
            atomic_write(card, lambda f: f.write(card_text), what="model card")
        return cfg_file
    state = load_checkpoint(path)
    where = f"checkpoint {path}"
    if "model_config" not in state:
        raise CheckpointError(f"{where} is not a run checkpoint of dinodet train (no "
                              "'model_config'): per-class thresholds go into a run "
                              "checkpoint or a model directory")
    config = _config(state["model_config"], where, "model_config")
    found = check_class_thresholds(table, config.num_classes, source or where)
    state.pop(CLASS_THRESHOLDS_KEY, None)
    if found is not None:
        state[CLASS_THRESHOLDS_KEY] = class_thresholds_json(found)
    return save_checkpoint(path, state)


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu", *,
                    revision: str | None = None) -> DINO:
    """A model directory of :func:`save_pretrained` / ``dinodet convert``, in eval mode: a
    local folder, or a Hugging Face Hub repo holding one (``"owner/name"``,
    ``"hf://owner/name@revision"``; ``revision``: a branch, tag or commit), whose
    ``config.json`` and ``model.safetensors`` are downloaded into huggingface_hub's cache
    (a local folder of that name wins: see :mod:`dinodet.hub`)."""
    from dinodet.hub import hub_reference

    if hub_reference(path, revision) is None:
        if revision is not None:
            raise UserError(f"revision={revision!r} is for a Hugging Face Hub repo, and {path} "
                            "is a local path: drop the revision")
        if not Path(path).is_dir():
            raise CheckpointNotFoundError(f"{path} is not a dinodet model directory")
    return load_model(path, map_location=map_location, revision=revision).model


def load_initial_weights(model: DINO, path: str | Path,
                         weights: WeightsChoice = "ema") -> Weights:
    """Start training from ``path`` (any source of :func:`open_weights`). Class-head
    tensors of another class count stay re-initialised (a warning names them); anything
    else that does not fit is an error naming the keys. Returns what was read."""
    from dinodet.convert import CLASS_DEPENDENT

    found = open_weights(path, weights=weights)
    own = model.state_dict()
    reinit = sorted(k for k, v in found.state_dict.items() if k in own
                    and k.startswith(CLASS_DEPENDENT) and v.shape != own[k].shape)
    if reinit:
        warnings.warn(f"{path} ({found.kind}) has another number of classes: "
                      f"re-initialising {', '.join(reinit)}", stacklevel=2)
    load_into(model, {k: v for k, v in found.state_dict.items() if k not in reinit},
              str(path), skip=tuple(reinit))
    return found


# Classifier-only parts and derived buffers of ImageNet checkpoints: not the detector's.
_CLASSIFIER = ("fc.", "head.", "norm.")
_DERIVED = ("num_batches_tracked", "relative_position_index", "attn_mask")


def read_backbone_file(path: str | Path) -> Any:
    """What a local ``.pth`` / ``.pt`` / ``.safetensors`` backbone file holds (no download);
    :func:`load_backbone_state_dict` takes it."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return read_torch_file(path, "backbone weights")


def load_backbone_state_dict(body: nn.Module, sd: Any, where: str) -> None:
    """Load ImageNet weights read from ``where`` into a backbone body.

    A checkpoint holding the state dict under ``model`` / ``state_dict`` is opened;
    classifier heads and derived buffers are ignored; Swin's per-level output norms may be
    missing; Swin weights in timm's layout are renamed to the original's
    (:func:`dinodet.model.pretrained.timm_swin_to_original`). Anything else that does not
    fit is a :class:`CheckpointError` naming the keys.
    """
    from dinodet.model.pretrained import timm_swin_to_original
    from dinodet.model.swin import SwinTransformer

    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{where} holds no state dict")
    if isinstance(body, SwinTransformer):
        sd = timm_swin_to_original(sd, len(body.layers))
    sd = {k: v for k, v in sd.items()
          if not k.startswith(_CLASSIFIER) and not k.endswith(_DERIVED)}
    check_keys(body.state_dict(), sd, where, type(body).__name__,
               may_be_missing=lambda k: bool(re.match(r"norm\d\.", k)) or k.endswith(_DERIVED))
    body.load_state_dict(sd, strict=False)


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """ImageNet weights from a local ``.pth`` / ``.pt`` / ``.safetensors`` file (no
    download) into a backbone body, as :func:`load_backbone_state_dict` says."""
    load_backbone_state_dict(body, read_backbone_file(path), f"backbone weights {path}")
