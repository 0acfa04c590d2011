"""Turn raw outputs into scored boxes in pixels (top-k over queries × classes, no NMS)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert

from dinodet.structures import to_device


@torch.no_grad()
def postprocess(outputs: dict[str, Any], target_sizes: Tensor | list[tuple[int, int]],
                num_select: int = 300) -> list[dict[str, Tensor]]:
    """Keep the ``num_select`` best (query, class) pairs of every image.

    Args:
        outputs: ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] (normalised cxcywh).
        target_sizes: [B, 2] (height, width) of the images the boxes should be scaled to.
    Returns:
        One dict per image: ``scores`` [K], ``labels`` [K] (class indices), ``boxes`` [K, 4]
        xyxy in pixels, sorted by score.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    b = logits.shape[0]
    # Built on the host when given as a list, and moved without a device sync.
    sizes = to_device(torch.as_tensor(target_sizes), boxes.device)
    if sizes.shape != (b, 2):
        raise ValueError(f"target_sizes must be [{b}, 2] (h, w) for {b} images, "
                         f"got shape {tuple(sizes.shape)}")
    scale = sizes.to(boxes.dtype).flip(1).repeat(1, 2)[:, None, :]  # [B, 1, 4] (w, h, w, h)
    scores, labels, xyxy = select_top(logits, boxes, scale, num_select)
    return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, xyxy)]


def select_top(logits: Tensor, boxes: Tensor, scale: Tensor, num_select: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The batched core of :func:`postprocess`, kept free of per-image Python (the export
    graph calls it with symbolic sizes).

    Args:
        logits: [B, Q, C]; boxes: [B, Q, 4] normalised cxcywh; scale: (w, h, w, h) to
            multiply the xyxy boxes by, broadcastable to [B, K, 4].
    Returns:
        scores [B, K] sorted, labels [B, K] class indices, boxes [B, K, 4] xyxy scaled;
        K = min(num_select, Q·C).
    """
    b, q, c = logits.shape
    scores, index = torch.topk(logits.sigmoid().reshape(b, q * c), min(num_select, q * c),
                               dim=1)
    query = torch.div(index, c, rounding_mode="floor")
    labels = index % c
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    xyxy = torch.gather(xyxy, 1, query[..., None].expand(-1, -1, 4))
    return scores, labels, xyxy * scale
