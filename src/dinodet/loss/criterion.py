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
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from dinodet.loss.matcher import HungarianMatcher, MatchIndices, upcast

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
        self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]
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

        Returns:
            Scalar tensors keyed by term name, plus ``loss``: Σ weight × term.
        """
        logits = outputs["pred_logits"]
        device = logits.device
        dtype = upcast(logits).dtype
        sizes = [len(t["labels"]) for t in targets]
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} predictions but {len(sizes)} targets")
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device, torch.int64)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device, dtype)
        tgt_counts = torch.tensor(sizes, device=device, dtype=dtype)
        num_boxes = _average_num_boxes(sum(sizes), device)

        # Every matched set is solved in one call, i.e. one device -> host copy.
        matched: list[tuple[str, Mapping[str, Tensor]]] = [("", outputs)]
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            matched.append((f"_{i}", aux))
        if outputs.get("interm_outputs") is not None:
            matched.append(("_interm", outputs["interm_outputs"]))
        matches = self.matcher.match_many(
            [(o["pred_logits"], o["pred_boxes"]) for _, o in matched], targets
        )

        losses: dict[str, Tensor] = {}
        for (suffix, out), indices in zip(matched, matches, strict=True):
            sup = _from_matches(indices, sizes, device)
            terms = self._set_losses(out, sup, tgt_labels, tgt_boxes, tgt_counts, num_boxes)
            if suffix == "":
                # Logged for the final layer only, as in the original.
                terms["class_error"] = _class_error(out["pred_logits"], sup, tgt_labels)
            losses.update({k + suffix: v for k, v in terms.items()})

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs is not None:
            losses.update(
                self._denoising_losses(
                    dn_outputs, sizes, tgt_labels, tgt_boxes, tgt_counts, num_boxes
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
        sizes: list[int],
        tgt_labels: Tensor,
        tgt_boxes: Tensor,
        tgt_counts: Tensor,
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """Losses of the denoising queries: no matching, the layout says who is who.

        Group ``g`` occupies slots ``[g·S, (g+1)·S)`` with ``S = pad_size / num_groups``;
        its slot ``g·S + j`` is the positive copy of GT ``j`` of its image. Every
        other slot (negatives, padding of images with fewer GT) is background.
        The normaliser is ``num_boxes · num_groups`` since every GT appears once
        per group.
        """
        meta = dn_outputs["dn_meta"]
        num_groups, pad_size = int(meta["num_groups"]), int(meta["pad_size"])
        group_size = pad_size // num_groups
        if group_size * num_groups != pad_size:
            raise ValueError(f"pad_size {pad_size} is not a multiple of num_groups {num_groups}")
        if int(meta.get("group_size", group_size)) != group_size:
            raise ValueError(f"dn_meta group_size {meta['group_size']} != {group_size}")
        if sizes and max(sizes) > group_size:
            raise ValueError(f"{max(sizes)} GT in one image but denoising groups of {group_size}")

        device = tgt_labels.device
        sup = _denoising_supervision(sizes, num_groups, group_size, device)
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
        norm: float,
    ) -> dict[str, Tensor]:
        """Focal, L1, GIoU and logged terms for one prediction set.

        Args:
            out: ``pred_logits`` ``[B, N, C]`` and ``pred_boxes`` ``[B, N, 4]``.
            sup: which predictions supervise which concatenated targets.
            tgt_labels: ``[T]`` concatenated labels; ``tgt_boxes`` ``[T, 4]`` boxes.
            tgt_counts: ``[B]`` GT count per image (for the cardinality error).
            norm: the normaliser (number of GT boxes, at least 1).
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
        giou = generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"),
            box_convert(dst, "cxcywh", "xyxy"),
            reduction="none",
            eps=_GIOU_EPS,
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


def _average_num_boxes(local: int, device: torch.device) -> float:
    """GT count used as normaliser: averaged over processes, at least 1.

    Only the distributed case needs a tensor (and a sync); the single-process
    value is known on the host already.
    """
    if dist.is_available() and dist.is_initialized():
        count = torch.tensor([float(local)], device=device)
        dist.all_reduce(count)
        return max(count.item() / dist.get_world_size(), 1.0)
    return max(float(local), 1.0)


def _from_matches(
    indices: list[MatchIndices], sizes: list[int], device: torch.device
) -> _Supervision:
    """Flatten per-image matcher output into batch-level index tensors on ``device``."""
    if not indices:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return _Supervision(empty, empty, empty)
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    batch = [torch.full_like(q, i) for i, (q, _) in enumerate(indices)]
    flat_tgt = [t + offsets[i] for i, (_, t) in enumerate(indices)]
    queries = [q for q, _ in indices]
    # Stack on the host and copy once.
    packed = torch.stack([torch.cat(batch), torch.cat(queries), torch.cat(flat_tgt)]).to(device)
    return _Supervision(packed[0], packed[1], packed[2])


def _denoising_supervision(
    sizes: list[int], num_groups: int, group_size: int, device: torch.device
) -> _Supervision:
    """Positive denoising slots: slot ``g·group_size + j`` reconstructs GT ``j`` in every group."""
    group_start = torch.arange(num_groups, dtype=torch.int64) * group_size  # [G]
    batch, queries, flat_tgt = [], [], []
    offset = 0
    for i, n in enumerate(sizes):
        j = torch.arange(n, dtype=torch.int64)
        queries.append((group_start[:, None] + j[None, :]).flatten())  # [G·n]
        flat_tgt.append((offset + j).repeat(num_groups))
        batch.append(torch.full((num_groups * n,), i, dtype=torch.int64))
        offset += n
    if not sizes:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return _Supervision(empty, empty, empty)
    packed = torch.stack([torch.cat(batch), torch.cat(queries), torch.cat(flat_tgt)]).to(device)
    return _Supervision(packed[0], packed[1], packed[2])


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
