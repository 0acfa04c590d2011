"""Original DINO checkpoints -> dinodet, and dinodet's own pickle-free format.

The original stores one tensor per shared head under several names (``class_embed.0``,
``transformer.decoder.class_embed.3``, …) and names modules by the role they had in
its code base. ``original_to_dinodet`` renames every key, checks that the aliases of a
shared head agree, and reports anything missing, unexpected or mis-shaped by name.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinodet.config import DINOConfig, get_preset
from dinodet.model.dino import DINO

# Globals a released checkpoint may contain besides tensors and builtins. Nothing else is
# unpickled: torch.load runs with weights_only=True.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]

# (pattern on the original key, replacement); applied in order, first match wins.
_RENAMES: list[tuple[str, str]] = [
    (r"^backbone\.0\.body\.", "backbone."),
    (r"^backbone\.0\.", "backbone."),
    (r"^transformer\.level_embed$", "level_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.self_attn_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.ffn.norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"encoder.layers.\1.ffn.linear\2."),
    (r"^transformer\.encoder\.", "encoder."),
    # The original's decoder layer names its norms by module: norm2 follows self-attention,
    # norm1 cross-attention, norm3 the FFN.
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"decoder.layers.\1.cross_attn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"decoder.layers.\1.self_attn_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"decoder.layers.\1.ffn.norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"decoder.layers.\1.ffn.linear\2."),
    (r"^(?:transformer\.decoder\.)?bbox_embed\.\d+\.", "box_head."),
    (r"^(?:transformer\.decoder\.)?class_embed\.\d+\.", "class_head."),
    (r"^transformer\.decoder\.", "decoder."),
    (r"^transformer\.tgt_embed\.", "query_selection.content."),
    (r"^transformer\.refpoint_embed\.", "query_selection.anchors."),
    (r"^transformer\.enc_output\.", "query_selection.enc_output."),
    (r"^transformer\.enc_output_norm\.", "query_selection.enc_output_norm."),
    (r"^transformer\.enc_out_bbox_embed\.", "query_selection.box_head."),
    (r"^transformer\.enc_out_class_embed\.", "query_selection.class_head."),
    (r"^label_enc\.", "label_embed."),
    (r"^input_proj\.", "input_proj."),
]

# Heads that depend on the class count: re-initialised when fine-tuning to other classes.
CLASS_DEPENDENT = ("class_head.", "query_selection.class_head.", "label_embed.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def rename_key(key: str) -> str | None:
    """dinodet name of an original key, or None if no rule knows it."""
    for pattern, repl in _RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def load_original_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a released ``.pth`` with ``weights_only=True`` and return its model state dict.

    Accepts a plain state dict, or a dict with ``model`` (or ``state_dict``/``ema_model``)
    next to ``optimizer``, ``args`` (an ``argparse.Namespace``), … Strips ``module.``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Unsupported global" in str(e) or "weights_only" in str(e):
            raise CheckpointError(
                f"{path} contains objects that are not allowed to be unpickled ({msg}); "
                "dinodet only loads tensors, builtins and argparse.Namespace") from e
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or "
                              f"corrupt?): {msg}") from e
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("model", "state_dict", "ema_model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            raise CheckpointError(f"{where} has no model weights: expected a state dict or a "
                                  f"dict with a 'model' entry, found keys {sorted(obj)[:10]}")
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise CheckpointError(f"{where} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def original_to_dinodet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename every key; aliases of a shared head must hold equal tensors."""
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("relative_position_index") or key.endswith("num_batches_tracked"):
            continue  # derived buffers; Swin's index is checked separately
        new = rename_key(key)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            if out[new].shape != value.shape or not torch.equal(out[new], value):
                raise CheckpointError(f"{key} and {source[new]} should be the same shared "
                                      f"head ({new}) but hold different values")
            continue
        out[new], source[new] = value, key
    if unknown:
        raise CheckpointError(f"unexpected key(s) in the original checkpoint: "
                              f"{', '.join(unknown[:20])}")
    return out


def _check_swin_index(state_dict: Mapping[str, Tensor]) -> None:
    """Swin's integer index buffers are optional; when present they must be the derived ones."""
    if not any(k.endswith("relative_position_index") for k in state_dict):
        return
    from dinodet.model.swin import check_relative_position_index

    try:
        check_relative_position_index(state_dict)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def infer_config(state_dict: Mapping[str, Tensor], variant: str) -> DINOConfig:
    """The variant's preset, with class and query counts read off the weights."""
    cfg = get_preset(variant)
    changes: dict[str, Any] = {}
    head = state_dict.get("class_head.weight")
    if head is not None:
        changes["num_classes"] = head.shape[0]
    labels = state_dict.get("label_embed.weight")
    if labels is not None:
        changes["dn_labelbook_size"] = labels.shape[0] - 1
    content = state_dict.get("query_selection.content.weight")
    if content is not None:
        changes["num_queries"] = content.shape[0]
    return cfg.replace(**changes) if changes else cfg


def load_into(model: DINO, state_dict: Mapping[str, Tensor], where: str = "checkpoint",
              skip: tuple[str, ...] = ()) -> None:
    """Strict load that names every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(skip)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"mis-shaped: {'; '.join(shapes[:20])}")
    if problems:
        raise CheckpointError(f"{where} does not fit the model: " + " | ".join(problems))
    model.load_state_dict(state_dict, strict=False)


def from_original(source: str | Path | Mapping[str, Any], variant: str,
                  num_classes: int | None = None) -> DINO:
    """Build ``variant`` and load an original DINO checkpoint into it (eval mode).

    Args:
        source: path of a released ``.pth`` or its (state) dict.
        variant: ``r50-4scale``, ``r50-5scale``, ``swinl-4scale`` or ``swinl-5scale``.
        num_classes: fine-tune to this many classes: the class heads and the denoising
            label table are re-initialised (a warning names them); all else is loaded.
    """
    get_preset(variant)  # unknown variants fail before any file is read
    if isinstance(source, (str, Path)):
        where = str(source)
        raw = load_original_checkpoint(source)
    else:
        where = "state dict"
        raw = extract_state_dict(source, where)
    _check_swin_index(raw)
    sd = original_to_dinodet(raw)
    cfg = infer_config(sd, variant)
    skip: tuple[str, ...] = ()
    if num_classes is not None and num_classes != cfg.num_classes:
        warnings.warn(
            f"fine-tuning from {cfg.num_classes} to {num_classes} classes: re-initialising "
            f"{', '.join(p.rstrip('.') for p in CLASS_DEPENDENT)}", stacklevel=2)
        cfg = cfg.replace(num_classes=num_classes, dn_labelbook_size=None)
        sd = {k: v for k, v in sd.items() if not k.startswith(CLASS_DEPENDENT)}
        skip = CLASS_DEPENDENT
    model = DINO(cfg)
    load_into(model, sd, where, skip=skip)
    return model.eval()


def save_pretrained(model: DINO, out_dir: str | Path, extra: dict[str, Any] | None = None
                    ) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (loadable with no pickle at all)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "dinodet"})
    meta = {"config": model.cfg.to_dict(), **(extra or {})}
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    return out


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> DINO:
    """Load a directory written by ``save_pretrained`` / ``dinodet convert`` (eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{path} is not a dinodet model directory: {f.name} missing")
    try:
        meta = json.loads(cfg_file.read_text())
        cfg = DINOConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file} is not a valid dinodet config: {e}") from e
    try:
        sd = load_file(str(weights), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} cannot be read (truncated or corrupt?): {e}") from e
    model = DINO(cfg)
    load_into(model, sd, str(weights))
    return model.eval()


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """dinodet-layout weights from any file dinodet knows, and what kind it was.

    A dinodet training checkpoint (``.pt`` with ``model`` and ``config``), a model
    directory (``model.safetensors``) or an original DINO ``.pth`` (renamed on the fly).
    """
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file

        weights = path / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{path} is not a dinodet model directory: "
                                  "model.safetensors missing")
        return load_file(str(weights)), "dinodet model directory"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), "safetensors file"
    raw = load_original_checkpoint(path) if path.is_file() else None
    if raw is None:
        raise CheckpointError(f"weights not found: {path}")
    if any(k.startswith(("transformer.", "backbone.0.")) for k in raw):
        _check_swin_index(raw)
        return original_to_dinodet(raw), "original DINO checkpoint"
    return dict(raw), "dinodet checkpoint"


def load_initial_weights(model: DINO, path: str | Path) -> list[str]:
    """Start training from ``path``: every tensor that fits is loaded; tensors of the class
    heads whose class count differs are left re-initialised (returned, and warned about).
    Anything else that does not fit is an error naming the keys."""
    sd, kind = read_weights(path)
    own = model.state_dict()
    reinit = sorted(k for k in sd if k in own and k.startswith(CLASS_DEPENDENT)
                    and sd[k].shape != own[k].shape)
    if reinit:
        warnings.warn(f"{path} ({kind}) has another number of classes: re-initialising "
                      f"{', '.join(reinit)}", stacklevel=2)
    load_into(model, {k: v for k, v in sd.items() if k not in reinit}, str(path),
              skip=tuple(reinit))
    return reinit
