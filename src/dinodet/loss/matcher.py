"""Hungarian matching between DINO's queries and the ground truth.

The cost is the original's: a focal-style class cost, the L1 distance of the
normalised ``cxcywh`` boxes and the negative GIoU, weighted 2 / 5 / 2 by
default. One optimal one-to-one assignment is solved per image with
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["HungarianMatcher", "MatchIndices", "upcast"]

#: ``(query_idx, target_idx)`` of one image, both int64 on the CPU and equally long.
MatchIndices = tuple[Tensor, Tensor]


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in float32 when it is a half-precision float, else unchanged.

    Costs and losses are sums of many small terms; in bf16/fp16 they lose too
    many bits (and ``log`` of a rounded probability can hit 0), so they are
    always computed in at least float32. float64 stays float64.
    """
    if x.is_floating_point() and torch.finfo(x.dtype).bits < 32:
        return x.float()
    return x


def _empty_match() -> MatchIndices:
    empty = torch.empty(0, dtype=torch.int64)
    return empty, empty.clone()


class HungarianMatcher:
    """Optimal one-to-one assignment of queries to ground-truth boxes.

    Args:
        cost_class: weight of the focal class cost.
        cost_bbox: weight of the L1 cost between ``cxcywh`` boxes.
        cost_giou: weight of the ``-GIoU`` cost (boxes compared as ``xyxy``).
        focal_alpha: ``α`` of the focal class cost.
        focal_gamma: ``γ`` of the focal class cost.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma})"
        )

    def __call__(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
    ) -> list[MatchIndices]:
        """Match one set of predictions.

        Args:
            pred_logits: ``[B, Q, C]`` class logits.
            pred_boxes: ``[B, Q, 4]`` boxes, normalised ``cxcywh``.
            targets: ``B`` dicts with ``labels`` ``[n_i]`` int64 and ``boxes``
                ``[n_i, 4]`` normalised ``cxcywh``.

        Returns:
            ``B`` pairs ``(query_idx, target_idx)``, int64 CPU tensors of length
            ``min(Q, n_i)``; ``query_idx`` is sorted ascending.
        """
        return self.match_many([(pred_logits, pred_boxes)], targets)[0]

    @torch.no_grad()
    def match_many(
        self,
        predictions: Sequence[tuple[Tensor, Tensor]],
        targets: Sequence[Mapping[str, Tensor]],
    ) -> list[list[MatchIndices]]:
        """Match several prediction sets (e.g. every decoder layer) against the same targets.

        All cost matrices are computed on the predictions' device and copied to
        the host in a single transfer, so matching a whole decoder costs one
        device synchronisation instead of one per layer.

        Args:
            predictions: pairs ``(pred_logits [B, Q_k, C], pred_boxes [B, Q_k, 4])``.
            targets: ``B`` target dicts as in :meth:`__call__`.

        Returns:
            One list of ``B`` index pairs per prediction set, in input order.
        """
        sizes = [len(t["labels"]) for t in targets]
        for logits, _ in predictions:
            if logits.shape[0] != len(sizes):
                raise ValueError(f"{logits.shape[0]} predictions but {len(sizes)} targets")
        if sum(sizes) == 0:
            return [[_empty_match() for _ in sizes] for _ in predictions]

        costs = [self._cost_matrix(logits, boxes, targets) for logits, boxes in predictions]
        # One device -> host copy for every set. float64 so that scipy sees
        # exactly the values computed on the device, whatever their dtype.
        host = torch.cat([c.flatten() for c in costs]).to("cpu", torch.float64)
        chunks = host.split([c.numel() for c in costs])

        results: list[list[MatchIndices]] = []
        for (logits, _), flat in zip(predictions, chunks, strict=True):
            batch, num_queries = logits.shape[:2]
            # [B, Q, T_total] -> per image its own block of columns.
            blocks = flat.view(batch, num_queries, -1).split(sizes, dim=-1)
            per_image: list[MatchIndices] = []
            for i, block in enumerate(blocks):
                if sizes[i] == 0:
                    per_image.append(_empty_match())
                    continue
                rows, cols = linear_sum_assignment(block[i].numpy())
                per_image.append(
                    (
                        torch.as_tensor(rows, dtype=torch.int64),
                        torch.as_tensor(cols, dtype=torch.int64),
                    )
                )
            results.append(per_image)
        return results

    def _cost_matrix(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
    ) -> Tensor:
        """Matching cost of every query against every GT box of the batch.

        Like the original, the cost is built for all ``B·Q`` queries against all
        ``T`` targets of the batch in one go (one GIoU call, no Python loop
        over images); only the diagonal blocks are used afterwards.

        Returns:
            ``[B·Q, T]`` cost matrix in the (upcast) dtype of the predictions.
        """
        logits = upcast(pred_logits.detach()).flatten(0, 1)  # [B·Q, C]
        boxes = upcast(pred_boxes.detach()).flatten(0, 1)  # [B·Q, 4]
        dtype, device = logits.dtype, logits.device
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device, dtype)

        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        # The 1e-8 inside the logs is the original's; it keeps the cost finite
        # for saturated probabilities.
        neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
        cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]  # [B·Q, T]

        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # [B·Q, T]
        cost_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return (
            self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        )
