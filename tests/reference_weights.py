"""Deterministic stand-in weights in the original DINO key layout, from a manifest.

The recorded fixtures in tests/fixtures were produced by the original implementation with
weights that are a pure function of (seed, key name, shape). This module re-derives them
from those rules; the manifest's checksums prove it right (see test_reference_weights).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

DATA = Path(__file__).parent / "fixtures"


def load_manifest(name: str) -> dict:
    return json.loads((DATA / f"{name}.manifest.json").read_text())


def _uniform(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()))
                                        % (2**63 - 1))
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def stand_in_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Value rules by role: norms near one, class biases at the focal prior, fan-in scaled
    weights, unit-variance embeddings, wide deformable offsets."""
    u = _uniform(seed, name, shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return 0.5 + u
    if leaf == "running_mean":
        return (u - 0.5) * 0.2
    if len(shape) == 1 and leaf == "weight":
        return 0.8 + 0.4 * u
    if name.endswith("sampling_offsets.bias"):
        return (u - 0.5) * 8.0
    if "class_embed" in name and leaf == "bias":
        return -math.log(99.0) + (u - 0.5)
    if leaf == "bias" or len(shape) == 1:
        return (u - 0.5) * 0.1
    if any(k in name for k in ("level_embed", "tgt_embed", "label_enc", "refpoint_embed")):
        return (u - 0.5) * math.sqrt(12.0)
    bound = math.sqrt(3.0 / max(math.prod(shape[1:]), 1))
    return (2 * u - 1) * bound


def make_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    """Original-layout float32 state dict; aliases share one tensor, int buffers omitted."""
    out: dict[str, torch.Tensor] = {}
    for e in manifest["tensors"]:
        if e["dtype"].startswith("int"):
            continue
        if "alias_of" in e:
            out[e["name"]] = out[e["alias_of"]]
        else:
            t = stand_in_tensor(e["name"], tuple(e["shape"]), manifest["seed"])
            out[e["name"]] = t.to(getattr(torch, e["dtype"]))
    return out
