"""Top-k (query, class) selection and pixel boxes of postprocess / select_top."""

from __future__ import annotations

import pytest
import torch

from dinodet.model.postprocess import postprocess, select_top


def _outputs() -> dict[str, torch.Tensor]:
    """Two images, 4 queries, 3 classes, every logit -10 except a few chosen winners."""
    logits = torch.full((2, 4, 3), -10.0)
    # Image 0: (query 2, class 1) > (query 0, class 2) > (query 3, class 0) > (query 2, class 0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 2] = 1.0
    logits[0, 3, 0] = 0.0
    logits[0, 2, 0] = -1.0
    # Image 1: (query 1, class 0) > (query 1, class 2) > (query 0, class 1) > (query 3, class 2)
    logits[1, 1, 0] = 2.5
    logits[1, 1, 2] = 2.0
    logits[1, 0, 1] = -0.5
    logits[1, 3, 2] = -2.0
    boxes = torch.tensor([
        [[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.3, 0.6, 0.2, 0.2], [0.8, 0.1, 0.1, 0.2]],
        [[0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.2, 0.2], [0.6, 0.6, 0.4, 0.4], [0.9, 0.9, 0.2, 0.2]],
    ])
    return {"pred_logits": logits, "pred_boxes": boxes}


def _xyxy(cxcywh: list[float], h: float, w: float) -> list[float]:
    cx, cy, bw, bh = cxcywh
    return [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]


WINNERS = [[(2, 1, 3.0), (0, 2, 1.0), (3, 0, 0.0), (2, 0, -1.0)],
           [(1, 0, 2.5), (1, 2, 2.0), (0, 1, -0.5), (3, 2, -2.0)]]
SIZES = [(100, 200), (50, 80)]  # (h, w)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_postprocess_picks_top_pairs_with_sigmoid_scores_and_pixel_boxes(as_tensor):
    out = _outputs()
    sizes = torch.tensor(SIZES) if as_tensor else list(SIZES)
    results = postprocess(out, sizes, num_select=4)
    assert len(results) == 2
    for img, (res, winners, (h, w)) in enumerate(zip(results, WINNERS, SIZES)):
        assert set(res) == {"scores", "labels", "boxes"}
        assert res["scores"].shape == (4,) and res["labels"].shape == (4,)
        assert res["boxes"].shape == (4, 4)
        expected_scores = torch.sigmoid(torch.tensor([s for _, _, s in winners]))
        torch.testing.assert_close(res["scores"], expected_scores)
        assert res["labels"].tolist() == [c for _, c, _ in winners]
        expected_boxes = torch.tensor(
            [_xyxy(out["pred_boxes"][img, q].tolist(), h, w) for q, _, _ in winners])
        torch.testing.assert_close(res["boxes"], expected_boxes)
    # Hand-checked: image 0, query 2 = cxcywh (0.3, 0.6, 0.2, 0.2) on 200×100 pixels.
    torch.testing.assert_close(results[0]["boxes"][0], torch.tensor([40.0, 50.0, 80.0, 70.0]))


def test_scores_are_sorted_and_labels_are_class_indices():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen)
    boxes = torch.rand(3, 7, 4, generator=gen) * 0.5 + 0.25
    results = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(10, 10)] * 3,
                          num_select=12)
    for b, res in enumerate(results):
        scores = res["scores"]
        assert (scores[:-1] >= scores[1:]).all()
        assert ((res["labels"] >= 0) & (res["labels"] < 5)).all()
        # Independent: the 12 largest sigmoids over all 35 (query, class) pairs.
        flat = logits[b].sigmoid().flatten()
        torch.testing.assert_close(scores, flat.sort(descending=True).values[:12])
        # Each (score, label) pair exists in the logits at some query.
        for s, lab in zip(scores, res["labels"]):
            assert (logits[b, :, lab].sigmoid() == s).any()


def test_num_select_larger_than_queries_times_classes_is_clamped():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, generator=gen)  # distinct values: no ties
    boxes = torch.rand(2, 4, 4, generator=gen) * 0.5 + 0.25
    results = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor(SIZES),
                          num_select=300)
    for b, res in enumerate(results):
        assert res["scores"].shape == (12,)
        assert res["labels"].shape == (12,)
        assert res["boxes"].shape == (12, 4)
        # Every (query, class) pair appears exactly once: all the sigmoids, sorted.
        torch.testing.assert_close(res["scores"],
                                   logits[b].sigmoid().flatten().sort(descending=True).values)
        assert sorted(res["labels"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("sizes", [
    torch.tensor([[100, 200, 3], [50, 80, 3]]),
    torch.tensor([[100, 200]]),
    torch.tensor([100, 200]),
    [(100, 200), (50, 80), (1, 1)],
])
def test_wrong_target_sizes_shape_raises(sizes):
    shape = tuple(torch.as_tensor(sizes).shape)
    with pytest.raises(ValueError, match=r"target_sizes must be \[2, 2\]") as err:
        postprocess(_outputs(), sizes)
    assert str(shape) in str(err.value)


def test_postprocess_makes_no_graph():
    out = _outputs()
    out = {k: v.clone().requires_grad_(True) for k, v in out.items()}
    res = postprocess(out, torch.tensor(SIZES), num_select=3)
    assert not res[0]["scores"].requires_grad and not res[0]["boxes"].requires_grad


def test_select_top_matches_postprocess():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 4, generator=gen)
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.5 + 0.25
    sizes = torch.tensor([[30, 40], [64, 48]])
    scale = sizes.flip(1).repeat(1, 2)[:, None, :].float()  # (w, h, w, h)
    scores, labels, xyxy = select_top(logits, boxes, scale, 5)
    assert scores.shape == (2, 5) and labels.shape == (2, 5) and xyxy.shape == (2, 5, 4)
    results = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, num_select=5)
    for b, res in enumerate(results):
        torch.testing.assert_close(scores[b], res["scores"])
        assert torch.equal(labels[b], res["labels"])
        torch.testing.assert_close(xyxy[b], res["boxes"])
    # A scalar scale broadcasts too: unit scale leaves normalised xyxy.
    _, _, unit = select_top(logits, boxes, torch.tensor(1.0), 5)
    torch.testing.assert_close(unit * scale, xyxy)
