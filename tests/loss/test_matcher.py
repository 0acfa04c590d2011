"""HungarianMatcher: optimal, per image, batched like the original, robust to empty targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from dinodet.loss import matcher as matcher_module
from dinodet.loss.matcher import HungarianMatcher


def _random_targets(sizes: list[int], num_classes: int, gen: torch.Generator) -> list[dict]:
    targets = []
    for n in sizes:
        centre = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], -1)})
    return targets


def _random_predictions(b: int, q: int, c: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    logits = torch.randn(b, q, c, generator=gen, dtype=torch.float64) * 2
    boxes = torch.rand(b, q, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    return logits, boxes


def _naive_cost(logit: Tensor, box: Tensor, label: int, tgt: Tensor) -> float:
    """The original's cost of one query against one GT, written out scalar by scalar."""
    alpha, gamma = 0.25, 2.0
    p = torch.sigmoid(logit[label]).item()
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    l1 = (box - tgt).abs().sum().item()

    def xyxy(b: Tensor) -> list[float]:
        cx, cy, w, h = b.tolist()
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    a, g = xyxy(box), xyxy(tgt)
    iw = max(0.0, min(a[2], g[2]) - max(a[0], g[0]))
    ih = max(0.0, min(a[3], g[3]) - max(a[1], g[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    hull = (max(a[2], g[2]) - min(a[0], g[0])) * (max(a[3], g[3]) - min(a[1], g[1]))
    giou = inter / union - (hull - union) / hull
    return 5 * l1 + 2 * (pos - neg) + 2 * -giou


def test_optimal_against_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, boxes = _random_predictions(1, 5, 7, gen)
    targets = _random_targets([3], 7, gen)
    labels, tgt_boxes = targets[0]["labels"].tolist(), targets[0]["boxes"]
    cost = [
        [_naive_cost(logits[0, qi], boxes[0, qi], labels[t], tgt_boxes[t]) for t in range(3)]
        for qi in range(5)
    ]
    best = min(
        sum(cost[q][t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3)
    )
    ((rows, cols),) = HungarianMatcher()(logits, boxes, targets)
    assert rows.dtype == cols.dtype == torch.int64
    assert len(rows) == len(cols) == 3
    assert sorted(cols.tolist()) == [0, 1, 2]
    assert sum(cost[q][t] for q, t in zip(rows.tolist(), cols.tolist(), strict=True)) == (
        pytest.approx(best, rel=1e-12)
    )


def test_batched_equals_per_image() -> None:
    gen = torch.Generator().manual_seed(1)
    sizes = [4, 0, 7, 1]
    logits, boxes = _random_predictions(len(sizes), 30, 11, gen)
    targets = _random_targets(sizes, 11, gen)
    matcher = HungarianMatcher()
    batched = matcher(logits, boxes, targets)
    assert len(batched) == len(sizes)
    for i, (rows, cols) in enumerate(batched):
        ((r1, c1),) = matcher(logits[i : i + 1], boxes[i : i + 1], targets[i : i + 1])
        assert torch.equal(rows, r1) and torch.equal(cols, c1)
        assert len(rows) == sizes[i]
        assert torch.equal(rows, rows.sort().values)


def test_match_many_equals_single_calls() -> None:
    gen = torch.Generator().manual_seed(2)
    targets = _random_targets([3, 5], 9, gen)
    sets = [_random_predictions(2, 20, 9, gen) for _ in range(3)]
    matcher = HungarianMatcher()
    many = matcher.match_many(sets, targets)
    for (logits, boxes), result in zip(sets, many, strict=True):
        single = matcher(logits, boxes, targets)
        for (r0, c0), (r1, c1) in zip(result, single, strict=True):
            assert torch.equal(r0, r1) and torch.equal(c0, c1)


def test_more_targets_than_queries() -> None:
    gen = torch.Generator().manual_seed(3)
    logits, boxes = _random_predictions(1, 3, 5, gen)
    targets = _random_targets([6], 5, gen)
    ((rows, cols),) = HungarianMatcher()(logits, boxes, targets)
    assert len(rows) == len(cols) == 3
    assert len(set(cols.tolist())) == 3


def test_empty_targets() -> None:
    gen = torch.Generator().manual_seed(4)
    logits, boxes = _random_predictions(3, 10, 5, gen)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    result = HungarianMatcher()(logits, boxes, [empty, empty, empty])
    assert len(result) == 3
    for rows, cols in result:
        assert rows.shape == cols.shape == (0,)
        assert rows.dtype == cols.dtype == torch.int64
    mixed = [empty, *_random_targets([2], 5, gen), empty]
    result = HungarianMatcher()(logits, boxes, mixed)
    assert [len(r) for r, _ in result] == [0, 2, 0]


def test_weights_change_the_assignment() -> None:
    # A query with the right box but wrong class vs one with the right class far away.
    logits = torch.full((1, 2, 3), -5.0, dtype=torch.float64)
    logits[0, 1, 2] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]], dtype=torch.float64)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    ((rows, _),) = HungarianMatcher()(logits, boxes, targets)
    assert rows.tolist() == [0]
    ((rows, _),) = HungarianMatcher(cost_class=100.0)(logits, boxes, targets)
    assert rows.tolist() == [1]
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


def test_low_precision_inputs_are_upcast() -> None:
    gen = torch.Generator().manual_seed(5)
    logits, boxes = _random_predictions(2, 25, 6, gen)
    targets = _random_targets([3, 4], 6, gen)
    logits16, boxes16 = logits.bfloat16(), boxes.bfloat16()
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits16, boxes16, targets)
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()
    low = matcher(logits16, boxes16, targets)
    ref = matcher(logits16.float(), boxes16.float(), targets)
    for (r0, c0), (r1, c1) in zip(low, ref, strict=True):
        assert torch.equal(r0, r1) and torch.equal(c0, c1)


def test_costs_are_float32_under_autocast_and_match_like_float32() -> None:
    gen = torch.Generator().manual_seed(6)
    logits, boxes = _random_predictions(3, 40, 9, gen)
    targets = _random_targets([5, 2, 0], 9, gen)
    logits16, boxes16 = logits.bfloat16(), boxes.bfloat16()
    targets32 = [{"labels": t["labels"], "boxes": t["boxes"].float()} for t in targets]
    matcher = HungarianMatcher()
    ref_cost = matcher.cost_matrix(logits16.float(), boxes16.float(), targets32)
    ref = matcher(logits16.float(), boxes16.float(), targets32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(logits16, boxes16, targets32)
        low = matcher(logits16, boxes16, targets32)
    assert cost.dtype == torch.float32
    assert torch.equal(cost, ref_cost)
    for (r0, c0), (r1, c1) in zip(low, ref, strict=True):
        assert torch.equal(r0, r1) and torch.equal(c0, c1)


def test_cost_computation_runs_without_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bool, torch.dtype]] = []
    giou = matcher_module.generalized_box_iou

    def spy(a: Tensor, b: Tensor) -> Tensor:
        seen.append((torch.is_autocast_enabled("cpu"), a.dtype))
        return giou(a, b)

    monkeypatch.setattr(matcher_module, "generalized_box_iou", spy)
    gen = torch.Generator().manual_seed(7)
    logits, boxes = _random_predictions(2, 10, 4, gen)
    targets = _random_targets([2, 3], 4, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        HungarianMatcher()(logits.bfloat16(), boxes.bfloat16(), targets)
    assert seen == [(False, torch.float32)]


def test_no_cdist(monkeypatch: pytest.MonkeyPatch) -> None:
    def cdist(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("the matcher must not call torch.cdist")

    monkeypatch.setattr(torch, "cdist", cdist)
    gen = torch.Generator().manual_seed(8)
    logits, boxes = _random_predictions(2, 15, 5, gen)
    targets = _random_targets([3, 4], 5, gen)
    result = HungarianMatcher()(logits, boxes, targets)
    assert [len(r) for r, _ in result] == [3, 4]


def test_cost_matrix_is_the_per_image_block_of_the_original_formula() -> None:
    """Per image, each query against its own GT boxes only, with the L1 term exact."""
    gen = torch.Generator().manual_seed(9)
    sizes = [3, 0, 5]
    logits, boxes = _random_predictions(3, 12, 6, gen)
    targets = _random_targets(sizes, 6, gen)
    cost = HungarianMatcher().cost_matrix(logits, boxes, targets)
    assert cost.shape == (3, 12, max(sizes))
    for i, n in enumerate(sizes):
        labels, tgt = targets[i]["labels"].tolist(), targets[i]["boxes"]
        for q in range(12):
            for t in range(n):
                expected = _naive_cost(logits[i, q], boxes[i, q], labels[t], tgt[t])
                assert cost[i, q, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
