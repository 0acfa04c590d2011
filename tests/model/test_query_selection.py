"""Encoder proposals and query selection in the "mixed", "pure" and "static" modes."""

from __future__ import annotations

import math

import pytest
import torch

from dinodet.model.query_selection import QuerySelection, SelectedQueries, encoder_proposals

DIM, C, Q = 8, 3, 5
SHAPES = [(3, 4), (2, 2)]
S = sum(h * w for h, w in SHAPES)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _hand_proposals(shapes: list[tuple[int, int]], valid: list[tuple[int, int]] | None = None
                    ) -> torch.Tensor:
    """[S, 4] proposal logits of one image, token by token; valid: (h, w) per level."""
    rows = []
    for lvl, (h, w) in enumerate(shapes):
        vh, vw = valid[lvl] if valid is not None else (h, w)
        for y in range(h):
            for x in range(w):
                box = [(x + 0.5) / vw, (y + 0.5) / vh, 0.05 * 2**lvl, 0.05 * 2**lvl]
                ok = y < vh and x < vw and all(0.01 < v < 0.99 for v in box)
                rows.append([_logit(v) for v in box] if ok else [math.inf] * 4)
    return torch.tensor(rows)


def _module(mode: str, mask_padded: bool = False, num_queries: int = Q) -> QuerySelection:
    torch.manual_seed(0)
    qs = QuerySelection(DIM, C, num_queries, mode=mode, mask_padded=mask_padded)
    with torch.no_grad():  # a non-zero box delta, so anchors differ from the raw proposals
        qs.box_head.layers[-1].weight.normal_(0, 0.1)
        qs.box_head.layers[-1].bias.normal_(0, 0.1)
    return qs


def _memory(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, S, DIM, generator=torch.Generator().manual_seed(seed))


def _expected(qs: QuerySelection, memory: torch.Tensor, mask: torch.Tensor, k: int,
              valid: list[list[tuple[int, int]] | None] | None = None,
              exclude_padding: bool = False):
    """Top-k tokens by best class score, computed without the module's forward.

    valid: per image, the unpadded (h, w) of every level (None: no padding)."""
    valid = valid if valid is not None else [None] * memory.shape[0]
    proposals = torch.stack([_hand_proposals(SHAPES, v) for v in valid])
    invalid = torch.isinf(proposals).any(-1, keepdim=True)
    with torch.no_grad():
        out = qs.enc_output_norm(qs.enc_output(memory.masked_fill(invalid, 0.0)))
        logits = qs.class_head(out)
        boxes = qs.box_head(out) + proposals
    scores = logits.max(-1).values.clone()
    if exclude_padding:
        scores[mask] = -math.inf
    index = scores.argsort(dim=1, descending=True)[:, :k]
    return index, out, logits, boxes, proposals


def test_encoder_proposals_hand_computed_with_padding_and_out_of_range_cells():
    # Level 0: image 1 has its two right columns padded; level 1 is 64 wide, so its first
    # and last centres (0.5/64, 63.5/64) fall outside (0.01, 0.99).
    shapes = [(2, 4), (1, 64)]
    s = 8 + 64
    memory = torch.randn(2, s, 4, generator=torch.Generator().manual_seed(0)) + 5.0
    mask = torch.zeros(2, s, dtype=torch.bool)
    mask[1, [2, 3, 6, 7]] = True
    out_memory, logits = encoder_proposals(memory, mask, shapes)
    assert out_memory.shape == (2, s, 4) and logits.shape == (2, s, 4)
    torch.testing.assert_close(logits[0], _hand_proposals(shapes))
    torch.testing.assert_close(logits[1], _hand_proposals(shapes, valid=[(2, 2), (1, 64)]))
    invalid = torch.isinf(logits).all(-1)
    assert torch.equal(torch.isinf(logits).any(-1), invalid)
    assert (logits[invalid] > 0).all()  # +inf, never -inf
    assert invalid[0].tolist() == [False] * 8 + [True] + [False] * 62 + [True]
    assert invalid[1, [2, 3, 6, 7, 8, 71]].all()
    assert int(invalid[1].sum()) == 6
    # Memory of invalid tokens is zeroed, the rest passes through unchanged.
    assert (out_memory[invalid] == 0).all()
    torch.testing.assert_close(out_memory[~invalid], memory[~invalid], rtol=0, atol=0)


def test_mixed_mode_selects_top_k_encoder_proposals_with_learned_content():
    qs = _module("mixed")
    memory = _memory()
    mask = torch.zeros(2, S, dtype=torch.bool)
    sel = qs(memory, mask, SHAPES)
    assert isinstance(sel, SelectedQueries)
    assert sel.content.shape == (2, Q, DIM)
    assert sel.anchor_logits.shape == (2, Q, 4)
    assert sel.interm_logits.shape == (2, Q, C)
    assert sel.interm_boxes.shape == (2, Q, 4) and sel.init_boxes.shape == (2, Q, 4)
    index, _, logits, boxes, proposals = _expected(qs, memory, mask, Q)
    for b in range(2):
        torch.testing.assert_close(sel.interm_logits[b], logits[b, index[b]])
        torch.testing.assert_close(sel.anchor_logits[b], boxes[b, index[b]])
        torch.testing.assert_close(sel.interm_boxes[b], boxes[b, index[b]].sigmoid())
        torch.testing.assert_close(sel.init_boxes[b], proposals[b, index[b]].sigmoid())
        torch.testing.assert_close(sel.content[b], qs.content.weight)
    # Selected in descending order of the best class score.
    best = sel.interm_logits.max(-1).values
    assert (best[:, :-1] >= best[:, 1:]).all()
    # Anchors are detached; the two-stage outputs keep their graph.
    assert not sel.anchor_logits.requires_grad
    assert sel.interm_boxes.requires_grad and sel.interm_logits.requires_grad
    assert sel.content.requires_grad


def test_mixed_mode_gradients_reach_the_encoder_heads_not_through_anchors():
    qs = _module("mixed")
    memory = _memory().requires_grad_(True)
    sel = qs(memory, torch.zeros(2, S, dtype=torch.bool), SHAPES)
    (sel.interm_boxes.sum() + sel.interm_logits.sum()).backward()
    assert qs.box_head.layers[0].weight.grad is not None
    assert qs.class_head.weight.grad is not None
    assert memory.grad is not None and memory.grad.abs().sum() > 0
    assert qs.content.weight.grad is None


def test_pure_mode_content_is_the_selected_memory_detached():
    qs = _module("pure")
    assert qs.content is None and qs.anchors is None
    memory = _memory()
    mask = torch.zeros(2, S, dtype=torch.bool)
    sel = qs(memory, mask, SHAPES)
    index, out, logits, boxes, _ = _expected(qs, memory, mask, Q)
    assert sel.content.shape == (2, Q, DIM)
    assert not sel.content.requires_grad
    for b in range(2):
        torch.testing.assert_close(sel.content[b], out[b, index[b]])
        torch.testing.assert_close(sel.anchor_logits[b], boxes[b, index[b]])
        torch.testing.assert_close(sel.interm_logits[b], logits[b, index[b]])
    # Different images, different content (it is not a shared embedding).
    assert not torch.allclose(sel.content[0], sel.content[1])


def test_static_mode_has_learned_anchors_and_no_interm_outputs():
    qs = _module("static")
    memory = _memory(b=3)
    sel = qs(memory, torch.zeros(3, S, dtype=torch.bool), SHAPES)
    assert sel.interm_logits is None and sel.interm_boxes is None and sel.init_boxes is None
    assert sel.content.shape == (3, Q, DIM) and sel.anchor_logits.shape == (3, Q, 4)
    for b in range(3):
        torch.testing.assert_close(sel.content[b], qs.content.weight)
        torch.testing.assert_close(sel.anchor_logits[b], qs.anchors.weight)
    # The memory plays no part: other memory, same queries.
    other = qs(memory * 3 + 1, torch.zeros(3, S, dtype=torch.bool), SHAPES)
    torch.testing.assert_close(other.anchor_logits, sel.anchor_logits, rtol=0, atol=0)
    # (Their initial values are DINO.reset_parameters' business: see test_init.py.)
    # Gradient flows into the learned anchors (nothing is detached in static mode).
    sel.anchor_logits.sum().backward()
    assert qs.anchors.weight.grad is not None


def test_fewer_tokens_than_queries_selects_every_token():
    qs = _module("mixed", num_queries=S + 4)
    memory = _memory(b=1)
    sel = qs(memory, torch.zeros(1, S, dtype=torch.bool), SHAPES)
    assert sel.anchor_logits.shape == (1, S, 4)
    assert sel.content.shape == (1, S, DIM)
    torch.testing.assert_close(sel.content[0], qs.content.weight[:S])
    # Every proposal exactly once.
    init = sel.init_boxes[0]
    expected = _hand_proposals(SHAPES).sigmoid()
    distance = torch.cdist(init.double(), expected.double())  # [S selected, S proposals]
    assert (distance.min(1).values < 1e-6).all() and (distance.min(0).values < 1e-6).all()


def _padded_winner_module(mask_padded: bool) -> QuerySelection:
    """Zeroed (padded) memory scores highest: with enc_output the identity plus a bias
    10·v along the class direction v (mean 0), LayerNorm maps zeroed memory exactly onto
    v's direction, the best score a layer-normed token can reach."""
    qs = _module("mixed", mask_padded=mask_padded)
    v = torch.linspace(-1, 1, DIM)
    with torch.no_grad():
        qs.enc_output.weight.copy_(torch.eye(DIM))
        qs.enc_output.bias.copy_(10 * v)
        qs.class_head.weight.copy_(v.expand(C, DIM))
        qs.class_head.bias.zero_()
    return qs


def _right_column_padding() -> torch.Tensor:
    mask = torch.zeros(2, S, dtype=torch.bool)
    lvl0 = torch.zeros(3, 4, dtype=torch.bool)
    lvl0[:, 3] = True
    lvl1 = torch.zeros(2, 2, dtype=torch.bool)
    lvl1[:, 1] = True
    mask[1] = torch.cat([lvl0.flatten(), lvl1.flatten()])  # image 1: 5 padded tokens
    return mask


def test_padded_proposals_win_without_mask_padded_and_get_infinite_anchors():
    qs = _padded_winner_module(mask_padded=False)
    mask = _right_column_padding()
    sel = qs(_memory(), mask, SHAPES)
    # Image 1: the 5 padded tokens (all alike) take the first 5 places, with +inf anchors,
    # boxes at 1 and the zeroed-memory score.
    assert torch.isinf(sel.anchor_logits[1]).all()
    assert (sel.anchor_logits[1] > 0).all()
    torch.testing.assert_close(sel.init_boxes[1], torch.ones(Q, 4))
    torch.testing.assert_close(sel.interm_boxes[1], torch.ones(Q, 4))
    assert torch.isfinite(sel.anchor_logits[0]).all()  # image 0 has no padding


def test_mask_padded_keeps_padding_out_of_the_top_k():
    qs = _padded_winner_module(mask_padded=True)
    mask = _right_column_padding()
    memory = _memory()
    sel = qs(memory, mask, SHAPES)
    assert torch.isfinite(sel.anchor_logits).all()
    index, _, logits, boxes, _ = _expected(qs, memory, mask, Q, valid=[None, [(3, 3), (2, 1)]],
                                           exclude_padding=True)
    assert not mask[1, index[1]].any()
    for b in range(2):
        torch.testing.assert_close(sel.interm_logits[b], logits[b, index[b]])
        torch.testing.assert_close(sel.anchor_logits[b], boxes[b, index[b]])


def test_mask_padded_only_masks_padding_not_out_of_range_proposals():
    """As the code says: mask_padded removes padded tokens from the ranking; a proposal
    that is invalid only for lying outside (0.01, 0.99) still competes (its memory is
    zeroed and its anchor is +inf, as in the original DINO)."""
    shapes = [(1, 64)]
    torch.manual_seed(0)
    qs = QuerySelection(DIM, C, 2, mode="mixed", mask_padded=True)
    v = torch.linspace(-1, 1, DIM)
    with torch.no_grad():
        qs.enc_output.weight.copy_(torch.eye(DIM))
        qs.enc_output.bias.copy_(10 * v)
        qs.class_head.weight.copy_(v.expand(C, DIM))
        qs.class_head.bias.zero_()
    memory = torch.randn(1, 64, DIM, generator=torch.Generator().manual_seed(5))
    sel = qs(memory, torch.zeros(1, 64, dtype=torch.bool), shapes)
    # Tokens 0 and 63 are the out-of-range ones and win: both anchors infinite.
    assert torch.isinf(sel.anchor_logits).all()


@pytest.mark.parametrize("mode", ["mixed", "pure", "static"])
def test_modes_follow_memory_dtype(mode):
    qs = _module(mode).double()
    sel = qs(_memory().double(), torch.zeros(2, S, dtype=torch.bool), SHAPES)
    assert sel.content.dtype == torch.float64 and sel.anchor_logits.dtype == torch.float64
