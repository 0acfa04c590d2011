"""Contrastive denoising (CDN) queries, built from the ground truth during training.

Layout of the ``P = G · S`` denoising slots of every image (``M`` = the largest
GT count in the batch, ``S`` = the group size):

* CDN (default): ``S = 2M``. Group ``g`` holds the positive copy of GT ``j`` at
  slot ``g·S + j`` and its negative copy at ``g·S + M + j``.
* ``positives_only`` (DN-DETR-style ablation): ``S = M``, positives only.

Slots ``j ≥ n_i`` of an image with fewer GT are padding: zero content, zero
anchor logits, noised label −1. Either way the positive of GT ``j`` in group
``g`` sits at ``g·S + j``, which is all the criterion needs to know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from dinodet.model.boxes import inverse_sigmoid
from dinodet.structures import to_device

__all__ = ["DenoisingQueries", "build_denoising_queries", "denoising_attn_mask"]


@dataclass(frozen=True)
class DenoisingQueries:
    """Denoising queries to prepend to the ``Q`` matching queries of the decoder.

    Attributes:
        content: ``[B, P, D]`` label embeddings of the noised labels.
        anchor_logits: ``[B, P, 4]`` inverse-sigmoid of the noised ``cxcywh`` boxes.
        attn_mask: ``[P + Q, P + Q]`` bool self-attention mask, True = may not attend.
            Rows/columns ``[0, P)`` are denoising queries, ``[P, P + Q)`` matching ones.
        num_groups: ``G``.
        pad_size: ``P = G · group_size`` (0 when the batch has no GT).
        noised_labels: ``[B, P]`` int64 noised class ids, −1 on padding slots.
        positives_only: True when groups hold no negative copies.
    """

    content: Tensor
    anchor_logits: Tensor
    attn_mask: Tensor
    num_groups: int
    pad_size: int
    noised_labels: Tensor
    positives_only: bool = False

    @property
    def group_size(self) -> int:
        """Slots per group: ``2·max_gt`` (``max_gt`` with ``positives_only``)."""
        return self.pad_size // self.num_groups

    @property
    def dn_meta(self) -> dict[str, int | bool]:
        """The ``dn_meta`` dict that :class:`dinodet.loss.criterion.SetCriterion` reads."""
        return {
            "num_groups": self.num_groups,
            "pad_size": self.pad_size,
            "group_size": self.group_size,
            "positives_only": self.positives_only,
        }


def denoising_attn_mask(
    num_groups: int, group_size: int, num_queries: int, device: torch.device | None = None
) -> Tensor:
    """Self-attention mask for ``P = num_groups · group_size`` denoising + ``Q`` matching queries.

    Matching queries must not see any denoising query (they would read the
    answer); denoising groups must not see each other (each group is an
    independent noisy copy of the GT). Denoising queries may see the matching
    ones.

    Returns:
        ``[P + Q, P + Q]`` bool, True = may not attend.
    """
    pad_size = num_groups * group_size
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    if pad_size > 0:
        group = torch.arange(pad_size, device=device) // group_size
        mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def build_denoising_queries(
    targets: Sequence[Mapping[str, Tensor]],
    label_embed: nn.Embedding,
    num_queries: int,
    num_classes: int,
    num_dn: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    positives_only: bool = False,
    generator: torch.Generator | None = None,
) -> DenoisingQueries:
    """Draw DINO's contrastive denoising queries for a batch (the original's ``prepare_for_cdn``).

    Args:
        targets: ``B`` dicts with ``labels`` ``[n_i]`` int64 and ``boxes``
            ``[n_i, 4]`` normalised ``cxcywh``.
        label_embed: label table (the original's has ``num_classes + 1`` rows);
            the content of a query is its noised label's row.
        num_queries: ``Q``, the number of matching queries (for the mask).
        num_classes: noised labels are drawn uniformly from ``[0, num_classes)``.
        num_dn: the original's ``dn_number``; ``G = max(1, 2·num_dn // (2·max_gt))``.
        label_noise_ratio: each copy's label is redrawn with probability
            ``label_noise_ratio / 2`` (a redraw may give the same class back).
        box_noise_scale: ``λ``; each corner moves by ``r · λ`` times half the
            box width (x) or height (y) with a random sign, ``r ∈ [0, 1)`` for
            positives and ``[1, 2)`` for negatives, then boxes are clipped to
            ``[0, 1]``. ``λ ≤ 0`` leaves the boxes untouched.
        positives_only: build groups of positives only (DN-DETR style).
        generator: source of all randomness. Draws happen on the generator's
            device (the default generator of the targets' device when None)
            and are moved to the targets' device.

    Returns:
        :class:`DenoisingQueries` on the targets' device; ``content`` and
        ``anchor_logits`` in ``label_embed``'s dtype.
    """
    weight = label_embed.weight
    device = targets[0]["labels"].device if len(targets) else weight.device
    dtype = weight.dtype
    # Noise maths in at least float32 (float64 stays float64), cast at the end.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    sizes = [len(t["labels"]) for t in targets]
    batch = len(sizes)
    max_gt = max(sizes, default=0)

    if max_gt == 0:
        # The original keeps one (empty) group so that downstream code never
        # divides by zero; nothing is prepended to the decoder.
        return DenoisingQueries(
            content=torch.zeros(batch, 0, weight.shape[1], device=device, dtype=dtype),
            anchor_logits=torch.zeros(batch, 0, 4, device=device, dtype=dtype),
            attn_mask=denoising_attn_mask(1, 0, num_queries, device),
            num_groups=1,
            pad_size=0,
            noised_labels=torch.full((batch, 0), -1, device=device, dtype=torch.int64),
            positives_only=positives_only,
        )

    num_groups = max(1, (2 * num_dn) // (2 * max_gt))
    copies_per_group = 1 if positives_only else 2
    num_copies = num_groups * copies_per_group  # K copies of every GT box
    group_size = copies_per_group * max_gt
    pad_size = num_groups * group_size

    labels = torch.cat([t["labels"] for t in targets]).to(device, torch.int64)  # [T]
    boxes = torch.cat([t["boxes"] for t in targets]).to(device, work)  # [T, 4]
    total = labels.shape[0]
    # Image and within-image index of every GT: built on the host, where the
    # sizes already are, and copied once without blocking (see to_device): no
    # device sync, neither for output sizes nor for the copy.
    image_idx = torch.repeat_interleave(torch.arange(batch), torch.tensor(sizes))
    within = torch.cat([torch.arange(n) for n in sizes])
    image_idx, within = to_device(torch.stack([image_idx, within]), device)  # [T] each

    def rand(*shape: int) -> Tensor:
        return _uniform(shape, work, device, generator)

    # Copy k of GT j lives at slot k·max_gt + j; with negatives, odd k are negatives.
    noised_labels = labels.expand(num_copies, total)
    if label_noise_ratio > 0:
        flip = rand(num_copies, total) < label_noise_ratio * 0.5
        new = _randint(num_classes, (num_copies, total), device, generator)
        noised_labels = torch.where(flip, new, noised_labels)

    noised_boxes = boxes.expand(num_copies, total, 4)
    if box_noise_scale > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")  # [T, 4]
        half = boxes[:, 2:] / 2
        half_extent = torch.cat([half, half], dim=-1)  # (w/2, h/2, w/2, h/2)
        magnitude = rand(num_copies, total, 4)
        if not positives_only:
            is_negative = (torch.arange(num_copies, device=device) % 2 == 1).to(work)
            magnitude = magnitude + is_negative[:, None, None]  # [1, 2) for negatives
        sign = _randint(2, (num_copies, total, 4), device, generator).to(work) * 2 - 1
        moved = corners + magnitude * sign * half_extent * box_noise_scale
        # A corner may cross its partner: w/h then go negative, and
        # inverse_sigmoid maps them to log(eps), exactly as the original.
        noised_boxes = box_convert(moved.clamp(min=0.0, max=1.0), "xyxy", "cxcywh")

    copy_idx = torch.arange(num_copies, device=device)
    slots = (copy_idx[:, None] * max_gt + within[None, :]).flatten()  # [K·T]
    rows = image_idx.repeat(num_copies)  # [K·T]
    flat_labels = noised_labels.reshape(-1)

    content = torch.zeros(batch, pad_size, weight.shape[1], device=device, dtype=dtype)
    content[rows, slots] = label_embed(flat_labels.to(weight.device)).to(device)
    anchor_logits = torch.zeros(batch, pad_size, 4, device=device, dtype=dtype)
    anchor_logits[rows, slots] = inverse_sigmoid(noised_boxes.reshape(-1, 4)).to(dtype)
    slot_labels = torch.full((batch, pad_size), -1, device=device, dtype=torch.int64)
    slot_labels[rows, slots] = flat_labels

    return DenoisingQueries(
        content=content,
        anchor_logits=anchor_logits,
        attn_mask=denoising_attn_mask(num_groups, group_size, num_queries, device),
        num_groups=num_groups,
        pad_size=pad_size,
        noised_labels=slot_labels,
        positives_only=positives_only,
    )


def _uniform(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """``U[0, 1)`` draws from ``generator`` (on its own device), returned on ``device``."""
    source = generator.device if generator is not None else device
    return to_device(torch.rand(shape, generator=generator, device=source, dtype=dtype), device)


def _randint(
    high: int,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    """Uniform int64 draws in ``[0, high)`` from ``generator``, returned on ``device``."""
    source = generator.device if generator is not None else device
    return to_device(torch.randint(0, high, shape, generator=generator, device=source), device)
