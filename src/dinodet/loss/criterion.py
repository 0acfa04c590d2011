"""DINO's set criterion: matched losses for every decoder layer plus denoising losses.

Term names follow the original so that logs and recorded values compare
one-to-one: ``loss_ce`` (sigmoid focal), ``loss_bbox`` (L1), ``loss_giou``
(1 - GIoU), and the unweighted diagnostics ``loss_xy``, ``loss_hw``,
``cardinality_error`` and (final layer only) ``class_error``. Suffixes:
``_0`` … for auxiliary decoder layers, ``_interm`` for the encoder proposals,
``_dn`` / ``_dn_0`` … for the denoising queries of the final / auxiliary layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from dinodet.loss.matcher import HungarianMatcher, MatchIndices, autocast_off, upcast
from dinodet.structures import to_device

__all__ = ["WEIGHTED_TERMS", "SetCriterion", "build_criterion"]

#: The terms that enter the total; every suffixed copy uses the same weight.
WEIGHTED_TERMS = ("loss_ce", "loss_bbox", "loss_giou")

# The original's GIoU adds 1e-6 to the union and to the enclosing area.
_GIOU_EPS = 1e-6


@dataclass(frozen=True)
class _Supervision:
    """Which prediction supervises which GT box, as flat index tensors on the loss device.

    ``batch_idx``/``query_idx`` ``[M]`` address predictions ``[B, Q, …]``;
    ``target_idx`` ``[M]`` addresses the batch's concatenated targets.
    """

    batch_idx: Tensor
    query_idx: Tensor
    target_idx: Tensor


class SetCriterion(nn.Module):
    """Loss of DINO's outputs against a batch of targets.

    Args:
        num_classes: ``C``, the width of the class logits (91 for COCO ids).
        matcher: assignment used for the matching (non-denoising) outputs.
        weight_dict: weight per base term name (``loss_ce``, ``loss_bbox``,
            ``loss_giou``); applied to every suffixed copy.
        focal_alpha: ``α`` of the focal classification loss.
        focal_gamma: ``γ`` of the focal classification loss.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_dict: Mapping[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        if weight_dict is not None:
            unknown = set(weight_dict) - set(WEIGHTED_TERMS)
            if unknown:
                raise ValueError(f"unknown loss terms in weight_dict: {sorted(unknown)}")
            weights.update(weight_dict)
        self.weight_dict = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]],
        num_boxes: float | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute every loss term and their weighted total.

        Args:
            outputs: ``pred_logits`` ``[B, Q, C]``, ``pred_boxes`` ``[B, Q, 4]``
                (normalised ``cxcywh``); optionally ``aux_outputs`` (list of dicts
                with the same two keys, one per earlier decoder layer),
                ``interm_outputs`` (dict with the two keys) and ``dn_outputs``
                (``pred_logits`` ``[B, P, C]``, ``pred_boxes`` ``[B, P, 4]``,
                ``aux_outputs`` and ``dn_meta`` with ``num_groups`` and
                ``pad_size``, optionally ``group_size``, checked against
                ``pad_size / num_groups``; a ``positives_only`` flag needs no
                handling since positives sit at the same slots either way).
            targets: ``B`` dicts with ``labels`` ``[n_i]`` int64 in ``[0, C)`` and
                ``boxes`` ``[n_i, 4]`` normalised ``cxcywh``.
            num_boxes: the normaliser of the box terms; None: this batch's GT count,
                averaged over processes (at least 1). Gradient accumulation passes the
                mean per batch and process of its whole window.

        Returns:
            Scalar tensors keyed by term name, plus ``loss``: Σ weight × term; in
            float32 for half-precision outputs (float64 stays float64), also when
            called under autocast, which is disabled for the loss computation.

        Host-device synchronisations: one, the matcher's copy of the costs to the
        host (the assignment is solved there). The supervision indices go back in
        one non-blocking copy and no loss term reads a value on the host, so the
        rest only queues kernels (with ``torch.distributed`` the GT count is
        averaged by an all-reduce that stays on the device too).
        """
        with autocast_off(outputs["pred_logits"].device):
            return self._forward(outputs, targets, num_boxes)

    def _forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]],
        num_boxes: float | Tensor | None,
    ) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        device = logits.device
        dtype = upcast(logits).dtype
        sizes = [len(t["labels"]) for t in targets]
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} predictions but {len(sizes)} targets")
        tgt_labels = to_device(torch.cat([t["labels"] for t in targets]), device)
        tgt_labels = tgt_labels.to(torch.int64)
        tgt_boxes = to_device(torch.cat([t["boxes"] for t in targets]), device).to(dtype)
        if num_boxes is None:
            num_boxes = _average_num_boxes(sum(sizes), device, dtype)

        # Every matched set is solved in one call, i.e. one device -> host copy.
        matched: list[tuple[str, Mapping[str, Tensor]]] = [("", outputs)]
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            matched.append((f"_{i}", aux))
        if outputs.get("interm_outputs") is not None:
            matched.append(("_interm", outputs["interm_outputs"]))
        matches = self.matcher.match_many(
            [(o["pred_logits"], o["pred_boxes"]) for _, o in matched], targets
        )
        host = [_from_matches(indices, sizes) for indices in matches]

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs is not None:
            num_groups, group_size = _denoising_layout(dn_outputs, sizes)
            host.append(_denoising_supervision(sizes, num_groups, group_size))
        # All index tensors and the GT counts in one host -> device copy.
        tgt_counts, sups = _to_device(sizes, host, device)
        tgt_counts = tgt_counts.to(dtype)

        losses: dict[str, Tensor] = {}
        for (suffix, out), sup in zip(matched, sups[: len(matched)], strict=True):
            terms = self._set_losses(out, sup, tgt_labels, tgt_boxes, tgt_counts, num_boxes)
            if suffix == "":
                # Logged for the final layer only, as in the original.
                terms["class_error"] = _class_error(out["pred_logits"], sup, tgt_labels)
            losses.update({k + suffix: v for k, v in terms.items()})

        if dn_outputs is not None:
            losses.update(
                self._denoising_losses(
                    dn_outputs, sups[-1], num_groups, tgt_labels, tgt_boxes, tgt_counts,
                    num_boxes,
                )
            )

        total = torch.zeros((), device=device, dtype=dtype)
        for name, value in losses.items():
            weight = self.weight_dict.get(_base_name(name), 0.0)
            if weight != 0.0:
                total = total + weight * value
        losses["loss"] = total
        return losses

    def _denoising_losses(
        self,
        dn_outputs: Mapping[str, Any],
        sup: _Supervision,
        num_groups: int,
        tgt_labels: Tensor,
        tgt_boxes: Tensor,
        tgt_counts: Tensor,
        num_boxes: float | Tensor,
    ) -> dict[str, Tensor]:
        """Losses of the denoising queries: no matching, the layout says who is who.

        Group ``g`` occupies slots ``[g·S, (g+1)·S)`` with ``S = pad_size / num_groups``;
        its slot ``g·S + j`` is the positive copy of GT ``j`` of its image (``sup``,
        from :func:`_denoising_supervision`). Every other slot (negatives, padding of
        images with fewer GT) is background. The normaliser is ``num_boxes · num_groups``
        since every GT appears once per group.
        """
        pad_size = int(dn_outputs["dn_meta"]["pad_size"])
        norm = num_boxes * num_groups
        losses: dict[str, Tensor] = {}
        layers = [("_dn", dn_outputs)]
        layers += [(f"_dn_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs") or [])]
        for suffix, out in layers:
            if out["pred_logits"].shape[1] != pad_size:
                raise ValueError(
                    f"{out['pred_logits'].shape[1]} dn queries but pad_size {pad_size}"
                )
            terms = self._set_losses(out, sup, tgt_labels, tgt_boxes, tgt_counts, norm)
            losses.update({k + suffix: v for k, v in terms.items()})
        return losses

    def _set_losses(
        self,
        out: Mapping[str, Tensor],
        sup: _Supervision,
        tgt_labels: Tensor,
        tgt_boxes: Tensor,
        tgt_counts: Tensor,
        norm: float | Tensor,
    ) -> dict[str, Tensor]:
        """Focal, L1, GIoU and logged terms for one prediction set.

        Args:
            out: ``pred_logits`` ``[B, N, C]`` and ``pred_boxes`` ``[B, N, 4]``.
            sup: which predictions supervise which concatenated targets.
            tgt_labels: ``[T]`` concatenated labels; ``tgt_boxes`` ``[T, 4]`` boxes.
            tgt_counts: ``[B]`` GT count per image (for the cardinality error).
            norm: the normaliser (number of GT boxes, at least 1; a 0-dim tensor
                when averaged over processes).
        """
        logits = upcast(out["pred_logits"])
        boxes = upcast(out["pred_boxes"])
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"{logits.shape[-1]} class logits, expected {self.num_classes}")

        # One-hot over the C classes; unsupervised queries stay all-zero
        # (background), which is what the original's extra column amounts to.
        onehot = torch.zeros_like(logits)
        onehot[sup.batch_idx, sup.query_idx, tgt_labels[sup.target_idx]] = 1.0
        focal = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        # The original writes this as focal.mean(1).sum() / norm * N: the same value.
        terms = {"loss_ce": focal / norm}

        src = boxes[sup.batch_idx, sup.query_idx]  # [M, 4]
        dst = tgt_boxes[sup.target_idx]  # [M, 4]
        l1 = F.l1_loss(src, dst, reduction="none")
        terms["loss_bbox"] = l1.sum() / norm
        giou = _generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"), box_convert(dst, "cxcywh", "xyxy"), _GIOU_EPS
        )
        terms["loss_giou"] = giou.sum() / norm
        with torch.no_grad():
            terms["loss_xy"] = l1[:, :2].sum() / norm
            terms["loss_hw"] = l1[:, 2:].sum() / norm
            terms["cardinality_error"] = _cardinality_error(logits, tgt_counts)
        return terms


def build_criterion(
    num_classes: int,
    *,
    cls_loss_coef: float = 1.0,
    bbox_loss_coef: float = 5.0,
    giou_loss_coef: float = 2.0,
    set_cost_class: float = 2.0,
    set_cost_bbox: float = 5.0,
    set_cost_giou: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> SetCriterion:
    """Build DINO's criterion with the original's defaults.

    Keyword names are the original's config names, so a config dict can be
    splatted in. Loss weights apply to every layer, the encoder proposals and
    the denoising queries alike; the ``set_cost_*`` weights go to the matcher.
    """
    matcher = HungarianMatcher(
        cost_class=set_cost_class,
        cost_bbox=set_cost_bbox,
        cost_giou=set_cost_giou,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
    )
    weights = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    return SetCriterion(num_classes, matcher, weights, focal_alpha, focal_gamma)


def _base_name(name: str) -> str:
    """``loss_bbox_dn_3`` -> ``loss_bbox``: strip layer / interm / dn suffixes."""
    for term in WEIGHTED_TERMS:
        if name == term or name.startswith(term + "_"):
            return term
    return name


def _average_num_boxes(local: int, device: torch.device, dtype: torch.dtype) -> float | Tensor:
    """GT count used as normaliser: averaged over processes, at least 1.

    The single-process value is known on the host already. With several processes it
    is all-reduced and kept on the device as a 0-dim tensor (filled there, not copied
    from the host): dividing the losses by it queues kernels instead of waiting for the
    collective, so this costs no host-device synchronisation either.
    """
    if dist.is_available() and dist.is_initialized():
        count = torch.full((1,), float(local), device=device, dtype=dtype)
        dist.all_reduce(count)
        return (count[0] / dist.get_world_size()).clamp(min=1.0)
    return max(float(local), 1.0)


def _denoising_layout(dn_outputs: Mapping[str, Any], sizes: list[int]) -> tuple[int, int]:
    """``(num_groups, group_size)`` of the denoising queries, checked against ``dn_meta``."""
    meta = dn_outputs["dn_meta"]
    num_groups, pad_size = int(meta["num_groups"]), int(meta["pad_size"])
    group_size = pad_size // num_groups
    if group_size * num_groups != pad_size:
        raise ValueError(f"pad_size {pad_size} is not a multiple of num_groups {num_groups}")
    if int(meta.get("group_size", group_size)) != group_size:
        raise ValueError(f"dn_meta group_size {meta['group_size']} != {group_size}")
    if sizes and max(sizes) > group_size:
        raise ValueError(f"{max(sizes)} GT in one image but denoising groups of {group_size}")
    return num_groups, group_size


def _from_matches(indices: list[MatchIndices], sizes: list[int]) -> Tensor:
    """Per-image matcher output -> ``[3, M]`` int64 on the host: rows batch index,
    query index and index into the batch's concatenated targets."""
    if not indices:
        return torch.empty(3, 0, dtype=torch.int64)
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    batch = [torch.full_like(q, i) for i, (q, _) in enumerate(indices)]
    flat_tgt = [t + offsets[i] for i, (_, t) in enumerate(indices)]
    queries = [q for q, _ in indices]
    return torch.stack([torch.cat(batch), torch.cat(queries), torch.cat(flat_tgt)])


def _denoising_supervision(sizes: list[int], num_groups: int, group_size: int) -> Tensor:
    """Positive denoising slots as ``[3, M]`` int64 on the host (see :func:`_from_matches`):
    slot ``g·group_size + j`` reconstructs GT ``j`` in every group."""
    if not sizes:
        return torch.empty(3, 0, dtype=torch.int64)
    group_start = torch.arange(num_groups, dtype=torch.int64) * group_size  # [G]
    batch, queries, flat_tgt = [], [], []
    offset = 0
    for i, n in enumerate(sizes):
        j = torch.arange(n, dtype=torch.int64)
        queries.append((group_start[:, None] + j[None, :]).flatten())  # [G·n]
        flat_tgt.append((offset + j).repeat(num_groups))
        batch.append(torch.full((num_groups * n,), i, dtype=torch.int64))
        offset += n
    return torch.stack([torch.cat(batch), torch.cat(queries), torch.cat(flat_tgt)])


def _to_device(
    sizes: list[int], host: list[Tensor], device: torch.device
) -> tuple[Tensor, list[_Supervision]]:
    """GT counts ``[B]`` and every ``[3, M_k]`` index set, moved in one copy; on the
    device they are views of that copy."""
    counts = torch.tensor(sizes, dtype=torch.int64)
    packed = to_device(torch.cat([counts, *(h.flatten() for h in host)]), device)
    parts = packed.split([len(sizes), *(h.numel() for h in host)])
    sups = [_Supervision(*p.view(3, h.shape[1])) for p, h in zip(parts[1:], host, strict=True)]
    return parts[0], sups


def _generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """``1 − GIoU`` of paired ``xyxy`` boxes ``[M, 4]`` -> ``[M]``.

    torchvision's ``generalized_box_iou_loss(..., reduction="none", eps=eps)``, the same
    formula in the same order of operations (same values and gradients), except that
    the intersection of non-overlapping pairs is zeroed with ``torch.where``:
    torchvision writes it through boolean-mask indexing, whose ``nonzero`` makes the
    host wait for the GPU four times per call.
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    xkis1 = torch.max(x1, x1g)
    ykis1 = torch.max(y1, y1g)
    xkis2 = torch.min(x2, x2g)
    ykis2 = torch.min(y2, y2g)
    overlap = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk = torch.where(overlap, (xkis2 - xkis1) * (ykis2 - ykis1), 0.0)
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    # smallest enclosing box
    xc1 = torch.min(x1, x1g)
    yc1 = torch.min(y1, y1g)
    xc2 = torch.max(x2, x2g)
    yc2 = torch.max(y2, y2g)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    miouk = iouk - ((area_c - unionk) / (area_c + eps))
    return 1 - miouk


@torch.no_grad()
def _class_error(pred_logits: Tensor, sup: _Supervision, tgt_labels: Tensor) -> Tensor:
    """100 − top-1 accuracy (%) of the matched queries; 100 when nothing is matched."""
    dtype = upcast(pred_logits).dtype
    if sup.query_idx.numel() == 0:
        return torch.full((), 100.0, device=pred_logits.device, dtype=dtype)
    top1 = pred_logits[sup.batch_idx, sup.query_idx].argmax(-1)
    correct = (top1 == tgt_labels[sup.target_idx]).to(dtype).mean()
    return 100.0 - 100.0 * correct


@torch.no_grad()
def _cardinality_error(logits: Tensor, tgt_counts: Tensor) -> Tensor:
    """Mean |#predicted objects − #GT| per image (logging only).

    Kept as the original defines it, which treats the *last* class as
    "no object": a query counts as a detection when its argmax is not ``C − 1``.
    """
    card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
    return F.l1_loss(card_pred.to(tgt_counts.dtype), tgt_counts)
