"""Contrastive denoising query builder: layout, noise, mask, edge cases."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from dinodet.model.boxes import inverse_sigmoid
from dinodet.model.denoising import (
    DenoisingQueries,
    build_denoising_queries,
    denoising_attn_mask,
)

# ``case``: the recorded reference case, a session fixture of tests/conftest.py.


def _targets(sizes: list[int], num_classes: int = 91, seed: int = 0, central: bool = True) -> list:
    """Random targets; ``central`` keeps every noised corner inside (0, 1) for λ ≤ 0.4."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        if central:
            centre = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.2 + 0.4
            size = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.2 + 0.1
        else:
            centre = torch.rand(n, 2, generator=gen, dtype=torch.float64)
            size = torch.rand(n, 2, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        out.append({"labels": labels, "boxes": torch.cat([centre, size], -1)})
    return out


def _embed(num_rows: int = 92, dim: int = 16, dtype: torch.dtype = torch.float64) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(num_rows, dim).to(dtype)


def _build(targets: list, **kwargs: Any) -> DenoisingQueries:
    kwargs.setdefault("generator", torch.Generator().manual_seed(1))
    return build_denoising_queries(targets, _embed(), 900, 91, **kwargs)


@pytest.mark.parametrize("max_gt", [1, 3, 5, 7, 40, 100, 150])
def test_group_count_and_sizes(max_gt: int) -> None:
    q = _build(_targets([max_gt, max(0, max_gt - 2)]))
    groups = max(1, 200 // (2 * max_gt))
    assert q.num_groups == groups
    assert q.pad_size == q.num_groups * 2 * max_gt == q.group_size * q.num_groups
    assert q.content.shape == (2, q.pad_size, 16)
    assert q.anchor_logits.shape == (2, q.pad_size, 4)
    assert q.noised_labels.shape == (2, q.pad_size)
    assert q.attn_mask.shape == (q.pad_size + 900, q.pad_size + 900)
    assert q.dn_meta == {
        "num_groups": groups,
        "pad_size": q.pad_size,
        "group_size": 2 * max_gt,
        "positives_only": False,
    }


def test_layout_and_content() -> None:
    targets = _targets([3, 5, 0])
    embed = _embed()
    q = build_denoising_queries(targets, embed, 900, 91, generator=torch.Generator().manual_seed(2))
    assert (q.num_groups, q.pad_size) == (20, 200)
    used = q.noised_labels >= 0
    slot = torch.arange(200) % 10
    for i, n in enumerate([3, 5, 0]):
        # Slots j < n of the positive and negative halves are used, the rest is padding.
        assert torch.equal(used[i], (slot < n) | ((slot >= 5) & (slot < 5 + n)))
    assert torch.equal(q.content[used], embed(q.noised_labels[used]))
    assert (q.content[~used] == 0).all() and (q.anchor_logits[~used] == 0).all()
    assert not (q.anchor_logits[used] == 0).all(-1).any()


def _corner_ratios(q: DenoisingQueries, targets: list, scale: float) -> tuple[list, list]:
    """|corner shift| / (λ · half size) for every positive and negative copy."""
    pos, neg = [], []
    half_size = q.group_size // 2
    for i, t in enumerate(targets):
        n = len(t["labels"])
        gt = box_convert(t["boxes"], "cxcywh", "xyxy")
        half = torch.cat([t["boxes"][:, 2:] / 2] * 2, -1)
        for g in range(q.num_groups):
            start = g * q.group_size
            for kind, offset in ((pos, 0), (neg, half_size)):
                noised = q.anchor_logits[i, start + offset : start + offset + n].sigmoid()
                shift = box_convert(noised, "cxcywh", "xyxy") - gt
                kind.append(shift / (half * scale))
    return pos, neg


@pytest.mark.parametrize("scale", [0.4, 0.25])
def test_box_noise_bounds(scale: float) -> None:
    targets = _targets([6, 9, 4], seed=3)
    q = _build(targets, box_noise_scale=scale)
    pos, neg = _corner_ratios(q, targets, scale)
    pos, neg = torch.cat(pos), torch.cat(neg)
    tol = 1e-9
    assert (pos.abs() < 1 + tol).all()
    assert (neg.abs() >= 1 - tol).all() and (neg.abs() < 2 + tol).all()
    # Uniform magnitude and random sign: the draws fill their ranges both ways.
    assert pos.abs().min() < 0.05 and pos.abs().max() > 0.95
    assert neg.abs().min() < 1.05 and neg.abs().max() > 1.95
    for ratios in (pos, neg):
        assert 0.4 < (ratios > 0).double().mean() < 0.6


def test_boxes_are_clipped_and_match_the_original_formula() -> None:
    targets = _targets([8], seed=4, central=False)
    q = _build(targets, box_noise_scale=1.0)
    boxes = box_convert(q.anchor_logits[0].sigmoid(), "cxcywh", "xyxy")
    used = q.noised_labels[0] >= 0
    assert (boxes[used] > -1e-9).all() and (boxes[used] < 1 + 1e-9).all()
    # Logits are bounded by the inverse sigmoid's 1e-3 floor.
    bound = inverse_sigmoid(torch.tensor(1.0, dtype=torch.float64)).item()
    assert q.anchor_logits.abs().max().item() <= bound + 1e-12


def test_no_noise_reproduces_ground_truth() -> None:
    targets = _targets([2, 3], seed=5)
    q = _build(targets, label_noise_ratio=0.0, box_noise_scale=0.0)
    for i, t in enumerate(targets):
        for g in range(q.num_groups):
            for offset in (0, 3):
                start = g * q.group_size + offset
                sl = slice(start, start + len(t["labels"]))
                assert torch.equal(q.noised_labels[i, sl], t["labels"])
                assert torch.equal(q.anchor_logits[i, sl], inverse_sigmoid(t["boxes"]))


def test_label_flip_rate() -> None:
    # 100 images × 10 GT × 20 copies = 20 000 labels in one call.
    num_classes = 91
    targets = _targets([10] * 100, num_classes, seed=6)
    q = _build(targets)
    assert q.num_groups == 10
    original = torch.stack([t["labels"] for t in targets])  # [100, 10]
    expected_labels = original.repeat(1, 20)  # the padded layout has no gaps here
    flipped = (q.noised_labels != expected_labels).double().mean().item()
    # A redraw to the same class is no flip: 0.25 · (1 − 1/C) ≈ 0.247.
    assert 0.22 < flipped < 0.28
    assert flipped == pytest.approx(0.25 * (1 - 1 / num_classes), abs=0.01)
    assert q.noised_labels.min() >= 0 and q.noised_labels.max() < num_classes


def test_attention_mask_rules() -> None:
    mask = denoising_attn_mask(num_groups=4, group_size=6, num_queries=10)
    pad = 24
    assert mask[pad:, :pad].all()  # matching queries never see dn queries
    assert not mask[pad:, pad:].any()  # ... but see each other
    assert not mask[:pad, pad:].any()  # dn queries see the matching ones
    for g in range(4):
        rows = slice(6 * g, 6 * g + 6)
        block = mask[rows, :pad]
        assert not block[:, 6 * g : 6 * g + 6].any()
        assert block.sum() == 6 * (pad - 6)


def test_attention_mask_matches_recorded(case: dict[str, Any]) -> None:
    dn = case["dn"]
    q = _build(case["targets"], box_noise_scale=0.4)
    assert (q.num_groups, q.pad_size) == (dn["num_groups"], dn["pad_size"]) == (20, 200)
    assert torch.equal(q.attn_mask, dn["attn_mask"])
    assert torch.equal(q.noised_labels < 0, dn["noised_labels"] < 0)
    assert torch.equal(q.anchor_logits == 0, dn["query_anchor_logits"] == 0)


def test_recorded_queries_follow_the_same_layout(case: dict[str, Any]) -> None:
    """The original's draw (λ = 0.4) obeys the bounds this builder is tested for."""
    dn = case["dn"]
    recorded = DenoisingQueries(
        content=dn["query_content"],
        anchor_logits=dn["query_anchor_logits"],
        attn_mask=dn["attn_mask"],
        num_groups=dn["num_groups"],
        pad_size=dn["pad_size"],
        noised_labels=dn["noised_labels"],
    )
    pos, _ = _corner_ratios(recorded, case["targets"], 0.4)
    assert (torch.cat(pos).abs() < 1 + 1e-9).all()


def test_empty_images_and_empty_batch() -> None:
    q = _build(_targets([0, 4, 0]))
    assert (q.noised_labels[0] == -1).all() and (q.noised_labels[2] == -1).all()
    assert (q.content[0] == 0).all() and (q.anchor_logits[2] == 0).all()

    q = _build(_targets([0, 0]))
    assert q.pad_size == 0 and q.num_groups == 1
    assert q.content.shape == (2, 0, 16) and q.anchor_logits.shape == (2, 0, 4)
    assert q.noised_labels.shape == (2, 0)
    assert q.attn_mask.shape == (900, 900) and not q.attn_mask.any()


def test_positives_only() -> None:
    targets = _targets([3, 5], seed=7)
    q = _build(targets, positives_only=True, box_noise_scale=0.4)
    assert q.positives_only and q.dn_meta["positives_only"] is True
    assert (q.num_groups, q.group_size, q.pad_size) == (20, 5, 100)
    used = q.noised_labels >= 0
    assert torch.equal(used[0], torch.arange(100) % 5 < 3) and used[1].all()
    for g in range(20):
        for i, t in enumerate(targets):
            n = len(t["labels"])
            noised = q.anchor_logits[i, 5 * g : 5 * g + n].sigmoid()
            gt = box_convert(t["boxes"], "cxcywh", "xyxy")
            shift = box_convert(noised, "cxcywh", "xyxy") - gt
            half = torch.cat([t["boxes"][:, 2:] / 2] * 2, -1)
            assert (shift.abs() < 0.4 * half + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_device_and_gradient(dtype: torch.dtype) -> None:
    embed = _embed(dtype=dtype)
    targets = _targets([2, 3])
    q = build_denoising_queries(targets, embed, 30, 91, generator=torch.Generator().manual_seed(0))
    assert q.content.dtype == q.anchor_logits.dtype == dtype
    device = targets[0]["labels"].device
    for t in (q.content, q.anchor_logits, q.attn_mask, q.noised_labels):
        assert t.device == device
    assert q.noised_labels.dtype == torch.int64 and q.attn_mask.dtype == torch.bool
    q.content.sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


def test_generator_makes_draws_reproducible() -> None:
    targets = _targets([4, 2])
    a = _build(targets, generator=torch.Generator().manual_seed(11))
    b = _build(targets, generator=torch.Generator().manual_seed(11))
    c = _build(targets, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a.anchor_logits, b.anchor_logits)
    assert torch.equal(a.noised_labels, b.noised_labels)
    assert not torch.equal(a.anchor_logits, c.anchor_logits)
    with pytest.raises(AttributeError):
        a.pad_size = 3  # type: ignore[misc]
