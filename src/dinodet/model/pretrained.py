"""Pretrained backbone weights by name, read once when training starts on a fresh model.

``BackboneConfig.weights`` names the source (:func:`resolve_backbone_weights`):

* ``"imagenet"``: what the original starts from. For a ResNet, torchvision's
  ``IMAGENET1K_V1``; for ``swin_l_384``, the Swin authors' ImageNet-22k
  ``swin_large_patch4_window12_384_22k.pth`` (:data:`SWIN_L_22K_URL`). Both come through
  torch.hub's cache, ``torch.hub.get_dir()/checkpoints/<file name of the URL>`` (``TORCH_HOME``
  moves it), downloaded with a progress bar when not there yet.
* a torchvision weights name of the ResNet: ``"IMAGENET1K_V2"`` or
  ``"ResNet50_Weights.IMAGENET1K_V2"`` (same cache).
* a Hugging Face Hub repository, ``"owner/name"`` or ``"hf-hub:owner/name"``, e.g.
  ``"timm/swin_large_patch4_window12_384.ms_in22k"``: its ``model.safetensors`` (else
  ``pytorch_model.bin``) through ``huggingface_hub``'s cache (``pip install 'dinodet[hub]'``).
  timm's Swin layout is renamed to the original's (:func:`timm_swin_to_original`); timm's
  ResNets already use torchvision's names.
* a local ``.pth`` / ``.pt`` / ``.safetensors`` file
  (:func:`dinodet.weights.load_backbone_weights`).
* None / ``"none"``: random weights.

Nothing here runs when a model is built: ``DINO(cfg)``, ``Detector.from_pretrained`` and
loading a checkpoint never read or download backbone weights. Weights that are neither
cached nor downloadable raise :class:`BackboneWeightsUnavailableError` (a
:class:`~dinodet.weights.CheckpointError`: the CLI exits with status 2), saying which file
to put where and how to do without.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from dinodet.config import BackboneConfig
from dinodet.weights import (
    CheckpointError,
    load_backbone_state_dict,
    read_backbone_file,
    read_torch_file,
)

__all__ = ["SWIN_L_22K_HF", "SWIN_L_22K_URL", "BackboneSource",
           "BackboneWeightsUnavailableError", "hub_cache_path", "load_pretrained_backbone",
           "read_pretrained_backbone", "resolve_backbone_weights", "timm_swin_to_original"]

# The ImageNet-22k Swin-L (384 px, window 12) the original DINO starts from, as the Swin
# authors released it, and the same weights on the Hugging Face Hub in timm's layout.
SWIN_L_22K_URL = ("https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                  "swin_large_patch4_window12_384_22k.pth")
SWIN_L_22K_HF = "timm/swin_large_patch4_window12_384.ms_in22k"

_LOCAL_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")
_TORCHVISION_NAME = re.compile(r"^(?:[A-Za-z0-9]+_Weights\.)?[A-Z][A-Z0-9_]*$")
_HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_OPT_OUT = ("or train the backbone from random weights: --set model.backbone.weights=none "
            "(BackboneConfig(weights=None))")


class BackboneWeightsUnavailableError(CheckpointError):
    """Pretrained backbone weights that are not cached and cannot be downloaded (offline);
    the message names the file, where to put it and how to do without."""


@dataclass(frozen=True)
class BackboneSource:
    """Where ``BackboneConfig.weights`` points: ``kind`` "url" (torch.hub's cache: the
    ImageNet weights of a ResNet via torchvision, or of Swin-L), "hf-hub" (a Hugging Face
    Hub repository id) or "file" (a local path); ``label`` names it in messages."""

    kind: Literal["url", "hf-hub", "file"]
    location: str
    label: str

    def describe(self) -> str:
        """e.g. ``torchvision ResNet50_Weights.IMAGENET1K_V1 (https://...)``."""
        return self.label if self.kind == "file" else f"{self.label} ({self.location})"


def _torchvision_weights(name: str, weights: str) -> BackboneSource:
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    owner, _, member = weights.rpartition(".")
    known = ", ".join(enum.__members__)
    if owner and owner != enum.__name__:
        raise CheckpointError(f"model.backbone.weights={weights!r} are not weights of {name}; "
                              f"it takes {enum.__name__}.<one of {known}>")
    try:
        found = enum[member]
    except KeyError:
        raise CheckpointError(f"model.backbone.weights={weights!r}: torchvision has no such "
                              f"weights for {name}; known: {known}") from None
    return BackboneSource("url", found.url, f"torchvision {enum.__name__}.{found.name}")


def resolve_backbone_weights(cfg: BackboneConfig) -> BackboneSource | None:
    """Where ``cfg.weights`` points (None: random weights). Reads and downloads nothing;
    a name that fits none of the forms of the module docstring is a
    :class:`~dinodet.weights.CheckpointError` listing them."""
    weights = cfg.weights.strip() if cfg.weights is not None else None
    if not weights or weights.lower() == "none":
        return None
    resnet = cfg.name != "swin_l_384"
    if weights.lower() == "imagenet":
        if resnet:
            return _torchvision_weights(cfg.name, "IMAGENET1K_V1")
        return BackboneSource("url", SWIN_L_22K_URL, "Swin-L ImageNet-22k (the Swin release)")
    if weights.startswith("hf-hub:"):
        return BackboneSource("hf-hub", weights[len("hf-hub:"):], f"Hugging Face Hub {weights}")
    path = Path(weights).expanduser()
    if path.exists() or path.suffix.lower() in _LOCAL_SUFFIXES:
        return BackboneSource("file", str(path), f"backbone weights {path}")
    if _TORCHVISION_NAME.match(weights):
        if not resnet:
            raise CheckpointError(
                f"model.backbone.weights={weights!r}: torchvision has no Swin-L 384 weights; "
                f"use 'imagenet' (ImageNet-22k), {SWIN_L_22K_HF!r} or a local file")
        return _torchvision_weights(cfg.name, weights)
    if _HUB_REPO.match(weights):
        return BackboneSource("hf-hub", weights, f"Hugging Face Hub {weights}")
    raise CheckpointError(
        f"model.backbone.weights={weights!r} is not a file, and not a known name: give "
        "'imagenet', a torchvision weights name (e.g. IMAGENET1K_V2 for a ResNet), a Hugging "
        f"Face Hub repository (e.g. {SWIN_L_22K_HF}), a local .pth/.pt/.safetensors file, or "
        "'none' for random weights")


def hub_cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url(url)`` keeps its file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _from_torch_hub(source: BackboneSource) -> Any:
    from dinodet.weights import _SAFE_GLOBALS

    path = hub_cache_path(source.location)
    cached = path.is_file()
    try:
        # A cached file is read without touching the network; else it is downloaded
        # (progress bar on stderr, checked against the hash in torchvision's file names).
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.hub.load_state_dict_from_url(
                source.location, map_location="cpu", progress=True, check_hash=True,
                weights_only=True)
    except Exception as e:
        if cached or path.is_file():
            raise CheckpointError(
                f"{source.label}: the cached file {path} cannot be read ({_first_line(e)}); "
                "delete it to download it again") from e
        raise BackboneWeightsUnavailableError(
            f"{source.label} are not cached and could not be downloaded ({_first_line(e)}). "
            f"Put {source.location} at {path} (torch.hub's cache; TORCH_HOME moves it), or "
            "give a local file: --set model.backbone.weights=/path/to/weights.pth, "
            f"{_OPT_OUT}") from e


def _hub_module() -> Any:
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError:
        raise CheckpointError(
            "backbone weights from the Hugging Face Hub need the huggingface_hub package: "
            "pip install 'dinodet[hub]' (or download the weights file and give its path: "
            "--set model.backbone.weights=/path/to/model.safetensors)") from None


def _from_hf_hub(source: BackboneSource) -> Any:
    hub = _hub_module()
    repo = source.location
    offline: BaseException | None = None
    absent = []
    for filename in _HUB_FILES:
        try:
            # once the Hub proved unreachable, the next file is only looked for in the cache
            path = Path(hub.hf_hub_download(repo, filename, local_files_only=offline is not None))
        except Exception as e:
            kinds = {c.__name__ for c in type(e).__mro__}
            if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
                offline = offline or e  # not cached and no network: maybe the other file is
                continue
            if "EntryNotFoundError" in kinds:  # the repository has no such file
                absent.append(filename)
                continue
            raise CheckpointError(f"{source.label}: {_first_line(e)}") from e
        if path.suffix == ".safetensors":
            return read_backbone_file(path)
        return read_torch_file(path, "backbone weights")
    if offline is None:
        raise CheckpointError(f"{source.label} holds neither {' nor '.join(absent)}")
    constants = importlib.import_module("huggingface_hub.constants")
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise BackboneWeightsUnavailableError(
        f"{source.label}: {_HUB_FILES[0]} is not cached and could not be downloaded "
        f"({_first_line(offline)}). Download https://huggingface.co/{repo}/resolve/main/"
        f"{_HUB_FILES[0]} and either put it in huggingface_hub's cache as "
        f"{cache}/snapshots/<commit>/{_HUB_FILES[0]} (with {cache}/refs/main holding "
        "<commit>) or give its path: --set model.backbone.weights=/path/to/model.safetensors, "
        f"{_OPT_OUT}") from offline


def read_pretrained_backbone(source: BackboneSource) -> Any:
    """What ``source`` holds (a state dict, or a checkpoint holding one), downloaded into
    torch.hub's or huggingface_hub's cache when it is not there yet."""
    if source.kind == "url":
        return _from_torch_hub(source)
    if source.kind == "hf-hub":
        return _from_hf_hub(source)
    return read_backbone_file(source.location)


def load_pretrained_backbone(target: nn.Module, cfg: BackboneConfig) -> BackboneSource | None:
    """Load ``cfg.weights`` into a backbone body, or into ``target.backbone`` of a model
    (call it once, on a fresh model, before any checkpoint's weights). Returns where they
    came from; None (nothing done) for random weights. The parameters that train are
    :func:`dinodet.model.backbone.frozen_modules`' business, settled when the model is built.
    """
    source = resolve_backbone_weights(cfg)
    if source is None:
        return None
    inner = getattr(target, "backbone", None)
    body = inner if isinstance(inner, nn.Module) else target
    load_backbone_state_dict(body, read_pretrained_backbone(source), source.describe())
    return source


def timm_swin_to_original(state_dict: Mapping[str, Tensor],
                          num_stages: int = 4) -> dict[str, Tensor]:
    """Swin weights in timm's layout (timm >= 0.9) renamed to the original's, which is
    dinodet's; weights already in the original's layout come back unchanged.

    The two differ only in where patch merging sits: the original ends stage ``i`` with it
    (``layers.{i}.downsample``, stages 0..n-2), timm begins stage ``i + 1`` with it
    (``layers.{i+1}.downsample``, stages 1..n-1), with the same tensors (timm concatenates
    the 2x2 neighbours in the original's order). Blocks, patch embedding and the final
    ``norm`` have the same names; timm's classifier is ``head.fc.*`` (dropped with the
    original's ``head.*`` by the loader), and the derived buffers ``relative_position_index``
    and ``attn_mask`` are not in timm's state dict.
    """
    sd = dict(state_dict)

    def stage_of(key: str) -> int | None:
        m = re.match(r"layers\.(\d+)\.downsample\.", key)
        return int(m.group(1)) if m else None

    stages = {s for s in map(stage_of, sd) if s is not None}
    if not stages or 0 in stages or max(stages) != num_stages - 1:
        return sd  # the original's layout (stage 0 merges), or no merging to place
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        stage = stage_of(key)
        if stage is not None:
            key = f"layers.{stage - 1}.downsample." + key.split(".downsample.", 1)[1]
        out[key] = value
    return out
