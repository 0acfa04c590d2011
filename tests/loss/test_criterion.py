"""SetCriterion against the original's recorded losses, plus edge cases."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dinodet.loss import criterion as criterion_module
from dinodet.loss.criterion import SetCriterion, build_criterion
from dinodet.model.denoising import build_denoising_queries

NUM_CLASSES = 91

# ``case``: the recorded reference case, a session fixture of tests/conftest.py.


def _pair(logits: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pred_logits": logits, "pred_boxes": boxes}


def _matching_outputs(case: dict[str, Any], logits: torch.Tensor, boxes: torch.Tensor) -> dict:
    return {
        **_pair(logits, boxes),
        "aux_outputs": [
            _pair(lg, bx) for lg, bx in zip(case["aux_logits"], case["aux_boxes"], strict=True)
        ],
        "interm_outputs": _pair(case["interm_logits"], case["interm_boxes"]),
    }


def _dn_outputs(dn: dict[str, Any]) -> dict:
    return {
        **_pair(dn["dn_logits"][-1], dn["dn_boxes"][-1]),
        "aux_outputs": [
            _pair(lg, bx) for lg, bx in zip(dn["dn_logits"][:-1], dn["dn_boxes"][:-1], strict=True)
        ],
        "dn_meta": {"num_groups": dn["num_groups"], "pad_size": dn["pad_size"]},
    }


def _assert_matches_recorded(losses: dict[str, torch.Tensor], recorded: dict[str, float]) -> None:
    for name, value in recorded.items():
        is_dn = name.endswith("_dn") or "_dn_" in name
        if is_dn and value == 0.0 and name not in losses:
            continue  # the original logs zero dn terms when there are no dn outputs
        assert name in losses, name
        assert losses[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_recorded_matching_losses(case: dict[str, Any]) -> None:
    outputs = _matching_outputs(case, case["pred_logits"], case["pred_boxes"])
    losses = build_criterion(NUM_CLASSES)(outputs, case["targets"])
    _assert_matches_recorded(losses, case["losses"])
    for suffix in ["", "_0", "_1", "_2", "_3", "_4", "_interm"]:
        for term in ["loss_ce", "loss_bbox", "loss_giou"]:
            assert term + suffix in losses
    assert losses["loss"].dtype == torch.float64
    assert losses["loss"].item() == pytest.approx(case["weighted_loss_total"], rel=1e-4)
    # Outputs without dn_outputs produce no dn entries at all.
    assert not [k for k in losses if "_dn" in k]


def test_recorded_denoising_losses(case: dict[str, Any]) -> None:
    dn = case["dn"]
    outputs = _matching_outputs(case, dn["pred_logits"], dn["pred_boxes"])
    outputs["dn_outputs"] = _dn_outputs(dn)
    losses = build_criterion(NUM_CLASSES)(outputs, case["targets"])
    _assert_matches_recorded(losses, dn["losses"])
    for suffix in ["_dn", "_dn_0", "_dn_1", "_dn_2", "_dn_3", "_dn_4"]:
        for term in ["loss_ce", "loss_bbox", "loss_giou"]:
            assert term + suffix in losses
    assert losses["loss"].item() == pytest.approx(dn["weighted_loss_total"], rel=1e-4)


def test_total_is_weighted_sum_and_overridable(case: dict[str, Any]) -> None:
    outputs = {**_pair(case["pred_logits"], case["pred_boxes"])}
    base = build_criterion(NUM_CLASSES)(outputs, case["targets"])
    custom = build_criterion(NUM_CLASSES, cls_loss_coef=2.0, bbox_loss_coef=0.0, giou_loss_coef=1.0)
    losses = custom(outputs, case["targets"])
    expected = 2.0 * base["loss_ce"] + 1.0 * base["loss_giou"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(TypeError):
        build_criterion(NUM_CLASSES, not_a_weight=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        SetCriterion(NUM_CLASSES, weight_dict={"loss_mask": 1.0})


def _random_outputs(b: int, q: int, c: int, seed: int, dtype=torch.float64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, c, generator=gen, dtype=torch.float64).to(dtype)
    boxes = (torch.rand(b, q, 4, generator=gen, dtype=torch.float64) * 0.4 + 0.2).to(dtype)
    return _pair(logits.requires_grad_(), boxes.requires_grad_())


def _random_targets(sizes: list[int], c: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, c, (n,), generator=gen),
            "boxes": torch.rand(n, 4, generator=gen, dtype=torch.float64) * 0.3 + 0.2,
        }
        for n in sizes
    ]


def test_images_without_ground_truth() -> None:
    criterion = build_criterion(7)
    outputs = _random_outputs(3, 12, 7, seed=0)
    outputs["aux_outputs"] = [_random_outputs(3, 12, 7, seed=1)]
    targets = _random_targets([2, 0, 3], 7, seed=0)
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()
    assert torch.isfinite(outputs["pred_boxes"].grad).all()


def test_batch_without_any_ground_truth() -> None:
    criterion = build_criterion(7)
    outputs = _random_outputs(2, 12, 7, seed=2)
    targets = _random_targets([0, 0], 7, seed=0)
    queries = build_denoising_queries(targets, torch.nn.Embedding(8, 16), 12, 7)
    assert queries.pad_size == 0
    outputs["dn_outputs"] = {
        **_pair(torch.zeros(2, 0, 7).double(), torch.zeros(2, 0, 4).double()),
        "aux_outputs": [],
        "dn_meta": queries.dn_meta,
    }
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() > 0.0  # every query is background: focal still acts
    assert losses["class_error"].item() == 100.0
    assert losses["loss_ce_dn"].item() == 0.0
    losses["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_bf16_inputs_are_upcast() -> None:
    outputs = _random_outputs(2, 20, 5, seed=3, dtype=torch.bfloat16)
    targets = _random_targets([3, 1], 5, seed=1)
    losses = build_criterion(5)(outputs, targets)
    assert losses["loss"].dtype == torch.float32
    ref = build_criterion(5)({k: v.detach().float() for k, v in outputs.items()}, targets)
    assert losses["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    losses["loss"].backward()
    assert outputs["pred_boxes"].grad.dtype == torch.bfloat16


def _perfect_dn_outputs(targets: list[dict], num_groups: int, group_size: int, c: int) -> dict:
    """Denoising outputs whose positives reproduce their GT exactly."""
    b, pad = len(targets), num_groups * group_size
    logits = torch.full((b, pad, c), -30.0, dtype=torch.float64)
    boxes = torch.full((b, pad, 4), 0.5, dtype=torch.float64)
    for i, t in enumerate(targets):
        for g in range(num_groups):
            for j, (label, box) in enumerate(zip(t["labels"], t["boxes"], strict=True)):
                logits[i, g * group_size + j, label] = 30.0
                boxes[i, g * group_size + j] = box
    return _pair(logits, boxes)


@pytest.mark.parametrize("positives_only", [False, True])
def test_denoising_layout_from_builder(positives_only: bool) -> None:
    targets = _random_targets([3, 5, 0], 6, seed=4)
    queries = build_denoising_queries(
        targets, torch.nn.Embedding(7, 8), 10, 6, positives_only=positives_only
    )
    meta = queries.dn_meta
    assert meta["group_size"] == (5 if positives_only else 10)
    dn = _perfect_dn_outputs(targets, queries.num_groups, queries.group_size, 6)
    outputs = {**_random_outputs(3, 10, 6, seed=5), "dn_outputs": {**dn, "dn_meta": meta}}
    losses = build_criterion(6)(outputs, targets)
    assert losses["loss_bbox_dn"].item() == pytest.approx(0.0, abs=1e-12)
    # Not exactly 0: the original's GIoU adds 1e-6 to union and hull.
    assert losses["loss_giou_dn"].item() == pytest.approx(0.0, abs=1e-3)
    assert losses["loss_ce_dn"].item() < 1e-10
    # A dn_meta whose group size disagrees with pad_size / num_groups is rejected.
    with pytest.raises(ValueError):
        bad = {**meta, "group_size": meta["group_size"] + 1}
        build_criterion(6)({**outputs, "dn_outputs": {**dn, "dn_meta": bad}}, targets)


def test_denoising_normalised_per_group() -> None:
    # Two identical groups must give the same per-term values as one group.
    targets = _random_targets([2, 4], 5, seed=6)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    boxes = torch.rand(2, 8, 4, generator=gen, dtype=torch.float64) * 0.4 + 0.3
    one = {**_pair(logits, boxes), "dn_meta": {"num_groups": 1, "pad_size": 8}}
    two = {
        **_pair(logits.repeat(1, 2, 1), boxes.repeat(1, 2, 1)),
        "dn_meta": {"num_groups": 2, "pad_size": 16},
    }
    base = _random_outputs(2, 6, 5, seed=8)
    criterion = build_criterion(5)
    l1 = criterion({**base, "dn_outputs": one}, targets)
    l2 = criterion({**base, "dn_outputs": two}, targets)
    for term in ["loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_xy_dn", "loss_hw_dn"]:
        assert l2[term].item() == pytest.approx(l1[term].item(), rel=1e-12), term


def test_num_boxes_averaged_over_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = _random_outputs(2, 10, 4, seed=9)
    targets = _random_targets([2, 2], 4, seed=2)
    local = build_criterion(4)(outputs, targets)

    def all_reduce(tensor: torch.Tensor) -> None:
        tensor += 12.0  # the other process holds 12 GT boxes: mean (4 + 12) / 2 = 8

    dist = criterion_module.dist
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    shared = build_criterion(4)(outputs, targets)
    for term in ["loss_ce", "loss_bbox", "loss_giou"]:
        assert shared[term].item() == pytest.approx(local[term].item() / 2, rel=1e-12)


def test_rejects_mismatched_inputs() -> None:
    outputs = _random_outputs(2, 10, 4, seed=10)
    with pytest.raises(ValueError):
        build_criterion(4)(outputs, _random_targets([1], 4, seed=0))
    with pytest.raises(ValueError):
        build_criterion(5)(outputs, _random_targets([1, 1], 4, seed=0))


def _tiny_model() -> torch.nn.Module:
    from dinodet.config import BackboneConfig, DINOConfig
    from dinodet.model.dino import DINO

    torch.manual_seed(0)
    cfg = DINOConfig(
        num_classes=5, backbone=BackboneConfig(name="resnet18", frozen_batchnorm=False,
                                               freeze_stem=False),
        hidden_dim=64, num_heads=4, enc_layers=1, dec_layers=2, dim_feedforward=128,
        num_queries=20, dn_number=10, num_select=20)
    return DINO(cfg).train()


def test_losses_are_float32_under_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 autocast training forward, and the criterion called inside autocast too:
    every loss is float32, computed with autocast off, and equal to the losses of the
    same outputs cast to float32 by hand outside autocast."""
    model = _tiny_model()
    targets = [{k: v.float() if v.is_floating_point() else v for k, v in t.items()}
               for t in _random_targets([3, 1], 5, seed=4)]
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 48, 80, generator=g)]
    focal_calls: list[tuple[bool, torch.dtype]] = []
    focal = criterion_module.sigmoid_focal_loss

    def spy(inputs: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        focal_calls.append((torch.is_autocast_enabled("cpu"), inputs.dtype))
        return focal(inputs, targets, **kwargs)

    monkeypatch.setattr(criterion_module, "sigmoid_focal_loss", spy)
    criterion = build_criterion(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, targets)
        assert outputs["pred_logits"].dtype == torch.bfloat16  # autocast is in force
        losses = criterion(outputs, targets)
    assert "loss_ce_dn" in losses and "loss_giou_interm" in losses
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
    assert focal_calls and all(call == (False, torch.float32) for call in focal_calls)

    def upcast(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().float() if x.dtype == torch.bfloat16 else x
        if isinstance(x, dict):
            return {k: upcast(v) for k, v in x.items()}
        if isinstance(x, list):
            return [upcast(v) for v in x]
        return x

    ref = criterion(upcast(outputs), targets)
    for name, value in losses.items():
        assert value.item() == pytest.approx(ref[name].item(), rel=1e-6, abs=1e-7), name
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)


def test_criterion_does_not_call_cdist(monkeypatch: pytest.MonkeyPatch) -> None:
    def cdist(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("no torch.cdist in the criterion")

    monkeypatch.setattr(torch, "cdist", cdist)
    outputs = _random_outputs(2, 15, 6, seed=11)
    outputs["aux_outputs"] = [_random_outputs(2, 15, 6, seed=12)]
    losses = build_criterion(6)(outputs, _random_targets([2, 3], 6, seed=5))
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_giou_loss_is_torchvisions(dtype: torch.dtype) -> None:
    """Same values and gradients as torchvision's generalized_box_iou_loss (which uses
    boolean-mask indexing, a device sync), on overlapping, disjoint, touching and
    identical pairs."""
    from torchvision.ops import box_convert, generalized_box_iou_loss

    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(400, 2, generator=g), 0.5 * torch.rand(400, 2, generator=g)], 1)
    b = torch.cat([torch.rand(400, 2, generator=g), 0.5 * torch.rand(400, 2, generator=g)], 1)
    b[:20] = a[:20]  # identical
    b[20:40, 0] = a[20:40, 0] + (a[20:40, 2] + b[20:40, 2]) / 2  # touching along x
    a, b = a.to(dtype), b.to(dtype)
    xyxy_b = box_convert(b, "cxcywh", "xyxy")
    weights = torch.rand(400, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for loss_fn in (
        lambda x: generalized_box_iou_loss(x, xyxy_b, reduction="none", eps=1e-6),
        lambda x: criterion_module._generalized_box_iou_loss(x, xyxy_b, 1e-6),
    ):
        leaf = a.clone().requires_grad_()
        loss = loss_fn(box_convert(leaf, "cxcywh", "xyxy"))
        (loss * weights).sum().backward()
        results.append((loss.detach(), leaf.grad))
    (l0, g0), (l1, g1) = results
    assert (l0 > 1).any() and (l0 < 1).any()  # both disjoint and overlapping pairs
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
