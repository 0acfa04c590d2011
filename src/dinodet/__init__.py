"""dinodet: DINO object detection in pure PyTorch.

``build_model(preset)``, ``from_original(pth, variant)``, ``load_model(path)`` (any model
file), ``Detector.from_pretrained(path)`` (a Hugging Face Hub repo id too, ``"owner/name"``),
``save_pretrained`` / ``push_to_hub``, ``EvalTransform``, ``postprocess``,
``build_criterion``; imported lazily, so ``import dinodet`` costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["PRESETS", "CheckpointError", "DINOConfig", "Detections", "Detector", "EvalTransform",
           "__version__", "build_criterion", "build_model", "from_original", "get_preset",
           "load_model", "load_pretrained", "postprocess", "push_to_hub", "save_pretrained"]

if TYPE_CHECKING:
    from dinodet.config import PRESETS, DINOConfig, get_preset
    from dinodet.data.transforms import EvalTransform
    from dinodet.hub import push_to_hub
    from dinodet.loss.criterion import build_criterion
    from dinodet.model.dino import DINO
    from dinodet.model.postprocess import postprocess
    from dinodet.predict import Detections, Detector
    from dinodet.weights import (
        CheckpointError,
        from_original,
        load_model,
        load_pretrained,
        save_pretrained,
    )

# name -> module, imported on first use: `import dinodet` stays free of torch start-up cost.
_LAZY = {name: module for module, names in {
    "dinodet.config": ("PRESETS", "DINOConfig", "get_preset"),
    "dinodet.weights": ("CheckpointError", "from_original", "load_model", "load_pretrained",
                        "save_pretrained"),
    "dinodet.data.transforms": ("EvalTransform",),
    "dinodet.hub": ("push_to_hub",),
    "dinodet.loss.criterion": ("build_criterion",),
    "dinodet.model.postprocess": ("postprocess",),
    "dinodet.model.dino": ("DINO",),
    "dinodet.predict": ("Detector", "Detections"),
}.items() for name in names}

def build_model(config: str | DINOConfig) -> DINO:
    """A randomly initialised model from a preset name or a config."""
    from dinodet.config import DINOConfig, get_preset
    from dinodet.model.dino import DINO

    cfg = get_preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, DINOConfig):
        raise TypeError(f"expected a preset name or DINOConfig, got {type(config).__name__}")
    return DINO(cfg)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dinodet' has no attribute {name!r}")
