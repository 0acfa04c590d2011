"""A fresh detector is initialised by the original DINO's rules (DINO.reset_parameters).

Every parameter outside the backbone must match exactly one rule below, so that a tensor
added later cannot go unchecked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from dinodet.config import get_preset
from dinodet.convert import rename_key
from dinodet.model.dino import DINO

from reference_weights import load_manifest

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
HEADS, LEVELS, POINTS = 8, 4, 4


def _build(**changes) -> DINO:
    torch.manual_seed(0)
    cfg = get_preset("r50-4scale").replace(num_classes=91, backbone={"weights": None}, **changes)
    return DINO(cfg)


@pytest.fixture(scope="module")
def model() -> DINO:
    return _build()


def _fans(t: Tensor) -> tuple[int, int]:
    receptive = math.prod(t.shape[2:])
    return t.shape[1] * receptive, t.shape[0] * receptive


def _check_uniform(t: Tensor, bound: float, what: str) -> None:
    """Samples of U(−bound, bound): inside the bound, reaching near it, with its std."""
    t = t.detach().flatten()
    n = t.numel()
    assert n >= 64, f"{what}: too few values ({n}) for a statistical check"
    largest = float(t.abs().max())
    assert largest <= bound * (1 + 1e-6), f"{what}: exceeds ±{bound:.4g}"
    # P(max |x| < bound·(1 − eps)) = (1 − eps)^n: negligible for eps = min(0.05, 20/n).
    assert largest >= bound * (1 - min(0.05, 20 / n)), f"{what}: does not reach ±{bound:.4g}"
    want = bound / math.sqrt(3)
    # The sample std of a uniform law has a relative spread of about 0.45/sqrt(n).
    tol = max(0.02, 5 * 0.45 / math.sqrt(n))
    assert float(t.std()) == pytest.approx(want, rel=tol), f"{what}: std"
    assert abs(float(t.mean())) <= 5 * want / math.sqrt(n), f"{what}: mean"


def xavier(name: str, t: Tensor, _: DINO) -> None:
    fan_in, fan_out = _fans(t)
    _check_uniform(t, math.sqrt(6 / (fan_in + fan_out)), f"{name} (xavier-uniform)")


def default_weight(name: str, t: Tensor, _: DINO) -> None:
    """PyTorch's Linear weight: kaiming-uniform with a = √5, i.e. U(±1/sqrt(fan_in))."""
    _check_uniform(t, 1 / math.sqrt(_fans(t)[0]), f"{name} (default Linear weight)")


def default_bias(name: str, t: Tensor, model: DINO) -> None:
    """PyTorch's Linear bias: U(±1/sqrt(fan_in)) of the layer's weight."""
    weight = model.get_parameter(name.removesuffix("bias") + "weight")
    _check_uniform(t, 1 / math.sqrt(_fans(weight)[0]), f"{name} (default Linear bias)")


def standard_normal(name: str, t: Tensor, _: DINO) -> None:
    t = t.detach().flatten()
    n = t.numel()
    assert float(t.std()) == pytest.approx(1.0, rel=max(0.02, 5 * 0.71 / math.sqrt(n))), name
    assert abs(float(t.mean())) <= 5 / math.sqrt(n), name


def zeros(name: str, t: Tensor, _: DINO) -> None:
    assert torch.count_nonzero(t) == 0, f"{name} should be zero"


def ones(name: str, t: Tensor, _: DINO) -> None:
    assert torch.equal(t, torch.ones_like(t)), f"{name} should be one"


def prior(name: str, t: Tensor, _: DINO) -> None:
    assert torch.equal(t, torch.full_like(t, PRIOR_BIAS)), f"{name} should be the focal prior"


def offset_grid(name: str, t: Tensor, _: DINO) -> None:
    """Head h points along angle 2πh/heads, scaled so that its larger coordinate is ±1;
    point k of every level reaches k + 1 times that (as computed in float32: the ratio of
    float32 sine and cosine is off by up to a few 1e-7, times up to 4 points)."""
    want = torch.empty(HEADS, LEVELS, POINTS, 2)
    for h in range(HEADS):
        angle = 2 * math.pi * h / HEADS
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for k in range(POINTS):
            want[h, :, k] = (k + 1) * direction
    torch.testing.assert_close(t.detach(), want.flatten(), rtol=0, atol=1e-5, msg=name)


Rule = Callable[[str, Tensor, DINO], None]
LAYER = r"(encoder|decoder)\.layers\.\d+"
DEFORM = rf"{LAYER}\.(self_attn|cross_attn)"
NORM = (rf"{LAYER}\.(self_attn_norm|cross_attn_norm|ffn\.norm)|decoder\.norm"
        r"|query_selection\.enc_output_norm|input_proj\.\d+\.1")
HEAD = r"(query_selection\.)?"

RULES: list[tuple[str, Rule]] = [
    # The transformer: xavier-uniform for every tensor with more than one dimension ...
    (rf"{LAYER}\.ffn\.linear[12]\.weight", xavier),
    (r"decoder\.layers\.\d+\.self_attn\.(in_proj_weight|out_proj\.weight)", xavier),
    (r"decoder\.ref_point_head\.layers\.[01]\.weight", xavier),
    (r"query_selection\.enc_output\.weight", xavier),
    (r"query_selection\.(content|anchors)\.weight", xavier),
    # ... then the deformable attention's own reset ...
    (rf"{DEFORM}\.sampling_offsets\.weight", zeros),
    (rf"{DEFORM}\.sampling_offsets\.bias", offset_grid),
    (rf"{DEFORM}\.attention_weights\.(weight|bias)", zeros),
    (rf"{DEFORM}\.(value_proj|output_proj)\.weight", xavier),
    (rf"{DEFORM}\.(value_proj|output_proj)\.bias", zeros),
    # ... and level_embed N(0, 1). Biases keep their defaults (MultiheadAttention's are 0).
    (r"level_embed", standard_normal),
    (rf"{LAYER}\.ffn\.linear[12]\.bias", default_bias),
    (r"decoder\.ref_point_head\.layers\.[01]\.bias", default_bias),
    (r"query_selection\.enc_output\.bias", default_bias),
    (r"decoder\.layers\.\d+\.self_attn\.(in_proj_bias|out_proj\.bias)", zeros),
    (rf"({NORM})\.weight", ones),
    (rf"({NORM})\.bias", zeros),
    # Heads (the encoder's are copies): default Linear, prior bias, zero last box layer.
    (rf"{HEAD}class_head\.weight", default_weight),
    (rf"{HEAD}class_head\.bias", prior),
    (rf"{HEAD}box_head\.layers\.[01]\.weight", default_weight),
    (rf"{HEAD}box_head\.layers\.[01]\.bias", default_bias),
    (rf"{HEAD}box_head\.layers\.2\.(weight|bias)", zeros),
    # Input projections and the denoising label table.
    (r"input_proj\.\d+\.0\.weight", xavier),
    (r"input_proj\.\d+\.0\.bias", zeros),
    (r"label_embed\.weight", standard_normal),
]


def _non_backbone(model: DINO) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("backbone.")}


def _check_every_parameter(model: DINO) -> dict[str, int]:
    """Apply the one rule of every non-backbone parameter; return how often each applied."""
    used = {pattern: 0 for pattern, _ in RULES}
    uncovered, ambiguous = [], []
    for name, p in _non_backbone(model).items():
        matching = [(pat, rule) for pat, rule in RULES if re.fullmatch(pat, name)]
        if not matching:
            uncovered.append(name)
        elif len(matching) > 1:
            ambiguous.append(name)
        else:
            pattern, rule = matching[0]
            rule(name, p, model)
            used[pattern] += 1
    assert not uncovered, f"parameters without an init rule: {uncovered}"
    assert not ambiguous, f"parameters with more than one rule: {ambiguous}"
    return used


def test_every_parameter_follows_the_original_init(model):
    used = _check_every_parameter(model)
    unused = [pattern for pattern, n in used.items() if n == 0 and "anchors" not in pattern]
    assert not unused, f"rules that match nothing (a renamed tensor?): {unused}"
    assert sum(used.values()) == len(_non_backbone(model)) == 273


def test_content_table_has_the_xavier_spread(model):
    # 900×256 xavier-uniform: bound sqrt(6/1156), std 0.0417 (not N(0, 1)).
    content = model.query_selection.content.weight.detach()
    assert float(content.std()) == pytest.approx(0.0417, rel=0.02)


def test_encoder_heads_start_as_copies_of_the_decoder_heads(model):
    qs = model.query_selection
    for mine, shared in [(qs.class_head, model.class_head), (qs.box_head, model.box_head)]:
        a, b = mine.state_dict(), shared.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
            assert a[key].data_ptr() != b[key].data_ptr(), f"{key} is shared, not copied"


def test_transformer_part_is_the_original_transformer_at_its_reset(model):
    """The xavier pass covers exactly the dinodet names of the original's ``transformer.*``
    keys, less the heads the original assigns into its transformer after the reset."""
    manifest = load_manifest("dino_r50_4scale")
    late = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.",
            "transformer.enc_out_bbox_embed.", "transformer.enc_out_class_embed.")
    expected = {rename_key(e["name"]) for e in manifest["tensors"]
                if e["name"].startswith("transformer.") and not e["name"].startswith(late)}
    assert {n for n, _ in model.named_transformer_parameters()} == expected


def test_pure_query_selection_has_no_table_and_the_same_rules():
    model = _build(query_selection="pure")
    assert model.query_selection.content is None and model.query_selection.anchors is None
    _check_every_parameter(model)


def test_static_query_selection_tables_are_xavier_and_reset_redraws_the_rules():
    """Static mode's content and anchor tables are the original's tgt_embed and
    refpoint_embed (two_stage_type "no"): xavier-uniform like any table of its transformer.
    reset_parameters redraws every rule and leaves the backbone as it was."""
    model = _build(query_selection="static")
    names = {n for n, _ in model.named_transformer_parameters()}
    assert {"query_selection.content.weight", "query_selection.anchors.weight"} <= names
    assert _check_every_parameter(model)[r"query_selection\.(content|anchors)\.weight"] == 2

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.reset_parameters()
    _check_every_parameter(model)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone[key]), key
