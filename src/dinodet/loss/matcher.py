"""Hungarian matching between DINO's queries and the ground truth.

The cost is the original's: a focal-style class cost, the L1 distance of the
normalised ``cxcywh`` boxes and the negative GIoU, weighted 2 / 5 / 2 by
default. One optimal one-to-one assignment is solved per image with
``scipy.optimize.linear_sum_assignment``.

The costs are computed on the predictions' device, for each image against its own GT
boxes, in at least float32 with autocast off; those of every prediction set of a call
(all decoder layers, the encoder proposals) reach the host in one copy, the one point
where a training step waits for the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert, generalized_box_iou

from dinodet.structures import to_device

__all__ = ["HungarianMatcher", "MatchIndices", "autocast_off", "upcast"]

_UNUSABLE = 1e12  # the cost given to NaN / inf entries (real costs are about 1-10)

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


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast is disabled for ``device``'s type (a no-op where it has none)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


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

        The costs of all sets are computed together on the predictions' device, for each
        image against its own GT boxes only (:meth:`cost_matrix`), and copied to the host
        in a single transfer: matching a whole decoder costs one device synchronisation,
        whatever the number of layers and images.

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
        if sum(sizes) == 0 or not predictions:
            return [[_empty_match() for _ in sizes] for _ in predictions]

        queries = [logits.shape[1] for logits, _ in predictions]
        if len(predictions) == 1:
            logits, boxes = predictions[0]
        else:  # the sets side by side along the queries: [B, ΣQ_k, ·]
            logits = torch.cat([upcast(lg.detach()) for lg, _ in predictions], 1)
            boxes = torch.cat([upcast(bx.detach()) for _, bx in predictions], 1)
        cost = self.cost_matrix(logits, boxes, targets)  # [B, ΣQ_k, max n_i]
        # The one device -> host copy. float64 so that scipy sees exactly the values
        # computed on the device, whatever their dtype.
        host = cost.to("cpu", torch.float64)
        if not bool(torch.isfinite(host).all()):
            # Diverged predictions (NaN / inf) still get a matching, so that the loss comes
            # out non-finite and the training loop skips the step, instead of scipy raising.
            host = torch.nan_to_num(host, nan=_UNUSABLE, posinf=_UNUSABLE, neginf=-_UNUSABLE)

        results: list[list[MatchIndices]] = [[] for _ in predictions]
        for i, n in enumerate(sizes):
            start = 0
            for k, q in enumerate(queries):
                if n == 0:
                    results[k].append(_empty_match())
                else:
                    rows, cols = linear_sum_assignment(host[i, start : start + q, :n].numpy())
                    results[k].append(
                        (
                            torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64),
                        )
                    )
                start += q
        return results

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
    ) -> Tensor:
        """Matching cost of every query against every GT box of its own image.

        Images are batched by padding their targets to the batch's largest GT count
        ``T``: no Python loop over images, and no costs against other images' boxes
        (the original computes all ``B·Q × Σn_i`` and keeps the diagonal blocks). Only
        the first ``n_i`` columns of image ``i`` are meaningful.

        The costs are computed in at least float32 (bf16/fp16 predictions are upcast,
        float64 stays float64), with autocast disabled: they are differences of sums of
        many small terms, too fine for 8 bits of mantissa.

        Args:
            pred_logits: ``[B, Q, C]``; ``pred_boxes``: ``[B, Q, 4]`` normalised ``cxcywh``.
            targets: ``B`` target dicts as in :meth:`__call__`.

        Returns:
            ``[B, Q, T]`` costs in the (upcast) dtype of the predictions.
        """
        logits = upcast(pred_logits.detach())
        boxes = upcast(pred_boxes.detach())
        dtype, device = logits.dtype, logits.device
        batch, num_queries = logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"{batch} predictions but {len(targets)} targets")
        with autocast_off(device):
            # [B, T]: padding columns get class 0 and a valid box; they are never read.
            # Padded where the targets are, then moved without a sync (see to_device).
            tgt_ids = pad_sequence([t["labels"] for t in targets], batch_first=True)
            tgt_ids = to_device(tgt_ids, device).to(torch.int64)
            tgt_boxes = pad_sequence(
                [t["boxes"] for t in targets], batch_first=True, padding_value=0.5
            )
            tgt_boxes = to_device(tgt_boxes, device).to(dtype)
            boxes = boxes.to(dtype)
            num_targets = tgt_ids.shape[1]

            prob = logits.sigmoid()
            alpha, gamma = self.focal_alpha, self.focal_gamma
            # The 1e-8 inside the logs is the original's; it keeps the cost finite
            # for saturated probabilities.
            neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
            pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
            index = tgt_ids[:, None, :].expand(batch, num_queries, num_targets)
            cost_class = (pos - neg).gather(2, index)  # [B, Q, T]

            # L1 distance |Δcx| + |Δcy| + |Δw| + |Δh|, summed in that order, one [B, Q, T]
            # term at a time (exact; torch.cdist is slow on GPUs and not needed here).
            cost_bbox = (boxes[:, :, None, 0] - tgt_boxes[:, None, :, 0]).abs()
            for c in range(1, 4):
                cost_bbox += (boxes[:, :, None, c] - tgt_boxes[:, None, :, c]).abs()
            cost_giou = -generalized_box_iou(
                box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
            )  # [B, Q, T]
            return (
                self.cost_bbox * cost_bbox
                + self.cost_class * cost_class
                + self.cost_giou * cost_giou
            )

