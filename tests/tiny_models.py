"""The small randomly initialised DINO that tests of the user paths (predict, serve, video,
export, thresholds) build: ResNet-18 with trainable BatchNorm, one encoder layer, 64-wide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import dinodet
from dinodet.config import BackboneConfig, DINOConfig

TINY = {"hidden_dim": 64, "num_heads": 4, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 128, "num_queries": 20, "dn_number": 10, "num_select": 20}


def tiny_config(num_classes: int, **sizes: Any) -> DINOConfig:
    """:data:`TINY` with ``sizes`` replacing any of its entries."""
    return DINOConfig(num_classes=num_classes,
                      backbone=BackboneConfig(name="resnet18", frozen_batchnorm=False,
                                              freeze_stem=False),
                      **{**TINY, **sizes})


def save_tiny_model(out: Path, classes: list[dict], eval_size: int = 64, seed: int = 0,
                    **sizes: Any) -> Path:
    """A model directory (``save_pretrained``) of a tiny model with the class table
    ``classes`` and ``eval_size``, weights from ``seed``."""
    torch.manual_seed(seed)
    model = dinodet.build_model(tiny_config(len(classes), **sizes)).eval()
    dinodet.save_pretrained(model, out, extra={"classes": classes, "eval_size": eval_size})
    return out
