"""Sine position encodings: of feature maps (2-d) and of query anchors (4-d)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _frequencies(num_feats: int, temperature: float, like: Tensor) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=like.dtype, device=like.device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """[..., F] angles -> [..., F] with sin on even and cos on odd features (paired)."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_feature_embedding(mask: Tensor, num_feats: int = 128, temperature: float = 20.0,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """Position encoding of a padded feature map (the original's PositionEmbeddingSineHW).

    Coordinates are cumulative counts of valid cells, normalised by the valid extent
    (eps 1e-6) and scaled to 2π, so padding does not stretch the image's encoding.

    Args:
        mask: [B, H, W] bool, True on padding.
    Returns:
        [B, 2·num_feats, H, W] in ``dtype``: y-features first, then x-features.
    """
    not_mask = (~mask).to(dtype)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    freqs = _frequencies(num_feats, temperature, not_mask)
    pos_x = _interleave_sin_cos(x[..., None] / freqs)
    pos_y = _interleave_sin_cos(y[..., None] / freqs)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_box_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0
                       ) -> Tensor:
    """Encode normalised (cx, cy, w, h) anchors, as DAB-DETR / DINO query positions.

    Args:
        boxes: [..., 4] or [..., 2].
    Returns:
        [..., num_feats · 4] (or · 2) in the order y, x, w, h.
    """
    freqs = _frequencies(num_feats, temperature, boxes)
    emb = [_interleave_sin_cos(boxes[..., i, None] * (2 * math.pi) / freqs)
           for i in range(boxes.shape[-1])]
    order = [1, 0, 2, 3][: boxes.shape[-1]]
    return torch.cat([emb[i] for i in order], dim=-1)
