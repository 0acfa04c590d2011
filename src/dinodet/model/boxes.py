"""Small box helpers shared by the model and the denoising builder.

Everything else (format conversion, IoU, GIoU) comes from ``torchvision.ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Logit of ``x`` exactly as the original DINO computes it.

    ``x`` is first clamped to ``[0, 1]``; numerator and denominator are then
    floored at ``eps`` so that 0 and 1 map to ``±log(1/eps)`` instead of
    ``±inf``. The floor (1e-3, not machine epsilon) matters: it bounds the
    anchors of boxes touching the image border and is part of what the
    released checkpoints were trained with.

    Args:
        x: any shape, values nominally in ``[0, 1]``.
        eps: floor applied to ``x`` and ``1 - x``.

    Returns:
        Tensor of the same shape, dtype and device as ``x``.
    """
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))
