"""Original DINO checkpoints -> dinodet's layout: key renames with a report by name.

Reading the files is :mod:`dinodet.weights`' job; this module only translates. The original
stores one tensor per shared head under several names (``class_embed.0``,
``transformer.decoder.class_embed.3``, …) and names modules by the role they had in
its code base. ``original_to_dinodet`` renames every key, checks that the aliases of a
shared head agree, and reports anything missing, unexpected or mis-shaped by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dinodet.config import DINOConfig, get_preset
from dinodet.weights import CheckpointError

__all__ = ["CLASS_DEPENDENT", "CheckpointError", "check_swin_index", "extract_state_dict",
           "infer_config", "is_original_layout", "original_to_dinodet", "rename_key"]

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


def rename_key(key: str) -> str | None:
    """dinodet name of an original key, or None if no rule knows it."""
    for pattern, repl in _RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def extract_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """The model state dict inside a loaded checkpoint: a plain state dict, or a dict with
    ``model`` (or ``state_dict`` / ``ema_model``) next to ``optimizer``, ``args``, ...;
    ``module.`` prefixes stripped."""
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


def is_original_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the keys are the original code base's (``transformer.``, ``backbone.0.``)."""
    return any(k.startswith(("transformer.", "backbone.0.")) for k in state_dict)


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


def check_swin_index(state_dict: Mapping[str, Tensor]) -> None:
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
