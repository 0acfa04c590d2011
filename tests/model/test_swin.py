"""Tests for the Swin backbone: layout vs the DINO Swin-L checkpoint manifest, padding rules,
dtype handling and an independent slow reference for (shifted-)window attention."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinodet.model import swin
from dinodet.model.swin import (
    PatchMerging,
    SwinStage,
    SwinTransformer,
    check_relative_position_index,
    drop_relative_position_index,
    make_relative_position_index,
    swin_large_384,
    swin_toy,
)

MANIFEST = Path(__file__).resolve().parents[1] / "fixtures" / "dino_swinl_4scale.manifest.json"
PREFIX = "backbone.0."


def _manifest_backbone() -> dict[str, dict]:
    tensors = json.loads(MANIFEST.read_text())["tensors"]
    return {t["name"][len(PREFIX) :]: t for t in tensors if t["name"].startswith(PREFIX)}


# ---------------------------------------------------------------------------------------------
# (1) layout
# ---------------------------------------------------------------------------------------------


def test_swin_large_state_dict_matches_manifest():
    with torch.device("meta"):  # ~197M parameters: shapes only, no memory, fast
        model = swin_large_384(out_indices=(1, 2, 3))
    ours = {
        k: (list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }
    ref = _manifest_backbone()
    rpi = {k: v for k, v in ref.items() if k.endswith("relative_position_index")}
    ref = {k: (v["shape"], v["dtype"]) for k, v in ref.items() if k not in rpi}
    assert ours == ref
    # the index buffer exists on exactly the blocks the checkpoint has it for, same shape/dtype
    buffers = {k: v for k, v in model.named_buffers() if k.endswith("relative_position_index")}
    assert set(buffers) == set(rpi)
    for k, v in buffers.items():
        assert list(v.shape) == rpi[k]["shape"] == [144, 144]
        assert v.dtype == torch.int64 and rpi[k]["dtype"] == "int64"
    assert model.out_channels == [384, 768, 1536]
    assert model.strides == [8, 16, 32]
    assert model.num_features == [192, 384, 768, 1536]
    # stochastic depth: linear 0 .. 0.2 over the 24 blocks
    rates = [b.drop_path.p for stage in model.layers for b in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 24).tolist(), abs=0)
    assert [b.shift_size for b in model.layers[2].blocks[:4]] == [0, 6, 0, 6]


# ---------------------------------------------------------------------------------------------
# (2) relative position index
# ---------------------------------------------------------------------------------------------


def test_relative_position_index_independent_derivation():
    ws = 12
    expected = torch.empty(ws * ws, ws * ws, dtype=torch.int64)
    for i in range(ws * ws):
        ri, ci = divmod(i, ws)
        for j in range(ws * ws):
            rj, cj = divmod(j, ws)
            # offsets shifted to be >= 0, row offset major in a (2ws-1) x (2ws-1) table
            expected[i, j] = (ri - rj + ws - 1) * (2 * ws - 1) + (ci - cj + ws - 1)
    got = make_relative_position_index(ws)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    assert int(got.max()) == (2 * ws - 1) ** 2 - 1
    with torch.device("meta"):
        model = swin_large_384()
    assert torch.equal(
        swin_toy(window_size=12).layers[0].blocks[1].attn.relative_position_index, expected
    )
    assert model.layers[0].blocks[0].attn.relative_position_index.shape == (144, 144)


def test_load_with_and_without_relative_position_index():
    torch.manual_seed(0)
    src, dst = swin_toy(), swin_toy()
    sd = src.state_dict()
    assert not any(k.endswith("relative_position_index") for k in sd)
    dst.load_state_dict(sd)  # without the index
    full = dict(sd)
    for name, buf in src.named_buffers():
        full[name] = buf.clone()
    dst.load_state_dict(full)  # with the (correct) index, strict
    x = torch.randn(1, 3, 40, 44)
    src.eval(), dst.eval()
    for a, b in zip(src(x), dst(x), strict=True):
        assert torch.equal(a, b)

    bad_key = "layers.1.blocks.1.attn.relative_position_index"
    wrong = dict(full)
    wrong[bad_key] = full[bad_key].flip(0)
    with pytest.raises(ValueError, match=re.escape(bad_key)):
        dst.load_state_dict(wrong)
    with pytest.raises(ValueError, match=re.escape(bad_key)):
        check_relative_position_index(wrong)
    with pytest.raises(ValueError, match=re.escape(bad_key)):
        drop_relative_position_index(wrong)
    # a shape that does not belong to this window size is also refused
    wrong[bad_key] = make_relative_position_index(6)
    with pytest.raises(ValueError, match=re.escape(bad_key)):
        dst.load_state_dict(wrong)
    # converter path: checked, then dropped
    assert drop_relative_position_index(full) == sd
    prefixed = {PREFIX + k: v for k, v in full.items()}
    check_relative_position_index(prefixed, window_size=7)


# ---------------------------------------------------------------------------------------------
# (3) arbitrary input sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(61, 75), (64, 64), (5, 9), (97, 33)])
def test_odd_input_sizes(hw):
    torch.manual_seed(0)
    model = swin_toy().eval()
    H, W = hw
    with torch.no_grad():
        outs = model(torch.randn(2, 3, H, W))
    h, w = math.ceil(H / 4), math.ceil(W / 4)  # patch embed pads to a multiple of 4
    assert len(outs) == 4
    for i, out in enumerate(outs):
        assert out.shape == (2, 32 * 2**i, h, w)
        assert torch.isfinite(out).all()
        h, w = (h + 1) // 2, (w + 1) // 2  # patch merging pads odd sizes
    if hw == (61, 75):
        assert [tuple(o.shape[-2:]) for o in outs] == [(16, 19), (8, 10), (4, 5), (2, 3)]


def test_out_indices_subset():
    torch.manual_seed(0)
    full = swin_toy().eval()
    part = swin_toy(out_indices=(1, 2)).eval()
    part.load_state_dict(
        {k: v for k, v in full.state_dict().items() if not k.startswith(("norm0", "norm3"))}
    )
    assert part.out_channels == [64, 128] and part.strides == [8, 16]
    x = torch.randn(1, 3, 50, 38)
    with torch.no_grad():
        a, b = full(x), part(x)
    assert torch.equal(a[1], b[0]) and torch.equal(a[2], b[1])


def test_patch_embed_pads_bottom_right_with_zeros():
    torch.manual_seed(0)
    model = swin_toy().eval()
    x = torch.randn(1, 3, 61, 75)
    padded = F.pad(x, (0, 1, 0, 3))  # to 64 x 76
    with torch.no_grad():
        for a, b in zip(model(x), model(padded), strict=True):
            assert torch.equal(a, b)


def test_patch_merging_order_and_padding():
    torch.manual_seed(0)
    C, H, W = 3, 5, 7
    pm = PatchMerging(C).double()
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    grid = torch.zeros(2, H + 1, W + 1, C, dtype=torch.float64)
    grid[:, :H, :W] = x.view(2, H, W, C)
    rows = []
    for i in range((H + 1) // 2):
        for j in range((W + 1) // 2):
            r, c = 2 * i, 2 * j
            rows.append(
                torch.cat(
                    [grid[:, r, c], grid[:, r + 1, c], grid[:, r, c + 1], grid[:, r + 1, c + 1]],
                    dim=-1,
                )
            )
    ref = pm.reduction(pm.norm(torch.stack(rows, dim=1)))
    torch.testing.assert_close(pm(x, H, W), ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (4) dtype
# ---------------------------------------------------------------------------------------------


def test_float64_matches_float32(monkeypatch):
    torch.manual_seed(0)
    model = swin_toy().eval()
    model64 = copy.deepcopy(model).double()
    seen = []
    real = swin.shifted_window_mask

    def spy(*args, **kwargs):
        mask = real(*args, **kwargs)
        seen.append(mask.dtype)
        return mask

    monkeypatch.setattr(swin, "shifted_window_mask", spy)
    x = torch.randn(2, 3, 61, 75)
    with torch.no_grad():
        o32 = model(x)
        seen.clear()
        o64 = model64(x.double())
    assert seen and all(d == torch.float64 for d in seen)
    for a, b in zip(o32, o64, strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.float64
        torch.testing.assert_close(b.float(), a, rtol=1e-4, atol=1e-4)
    buf = model64.layers[0].blocks[0].attn.relative_position_index
    assert buf.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# (5) independent slow reference for plain and shifted window attention
# ---------------------------------------------------------------------------------------------


def _reference_block(blk, x, H, W, use_mask=True):
    """One Swin block computed directly in unshifted coordinates, one query at a time.

    No roll and no window partition: a token at padded position (r, c) sits in the shifted
    window ((r - s) mod Hp) // ws and ((c - s) mod Wp) // ws. Two tokens of one window that
    were not adjacent before the shift (one wrapped around, r < s, the other did not) get -100.
    Padded tokens are zeros after norm1 and are attended to.
    """
    ws, s = blk.window_size, blk.shift_size
    B, L, C = x.shape
    att = blk.attn
    nh = att.num_heads
    d = C // nh
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    grid = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    grid[:, :H, :W] = blk.norm1(x).view(B, H, W, C)
    tokens = grid.reshape(B, Hp * Wp, C)
    qkv = F.linear(tokens, att.qkv.weight, att.qkv.bias).view(B, Hp * Wp, 3, nh, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    pos = [(r, c) for r in range(Hp) for c in range(Wp)]
    win = [(((r - s) % Hp) // ws, ((c - s) % Wp) // ws) for r, c in pos]
    loc = [(((r - s) % Hp) % ws, ((c - s) % Wp) % ws) for r, c in pos]
    wrapped = [(r < s, c < s) for r, c in pos]
    out = torch.zeros(B, Hp * Wp, nh, d, dtype=x.dtype)
    for p in range(len(pos)):
        keys = [j for j in range(len(pos)) if win[j] == win[p]]
        assert len(keys) == ws * ws
        logits = torch.einsum("bhd,bkhd->bhk", q[:, p], k[:, keys]) * d**-0.5
        table_rows = [
            (loc[p][0] - loc[j][0] + ws - 1) * (2 * ws - 1) + (loc[p][1] - loc[j][1] + ws - 1)
            for j in keys
        ]
        logits = logits + att.relative_position_bias_table[table_rows].T[None]
        if s and use_mask:
            penalty = torch.tensor(
                [-100.0 if wrapped[j] != wrapped[p] else 0.0 for j in keys], dtype=x.dtype
            )
            logits = logits + penalty
        out[:, p] = torch.einsum("bhk,bkhd->bhd", logits.softmax(-1), v[:, keys])
    y = F.linear(out.reshape(B, Hp * Wp, C), att.proj.weight, att.proj.bias)
    y = y.view(B, Hp, Wp, C)[:, :H, :W].reshape(B, L, C)
    x = x + y
    return x + blk.mlp(blk.norm2(x))


def _random_stage(seed=0, dim=8, heads=2, ws=4):
    torch.manual_seed(seed)
    stage = (
        SwinStage(
            dim,
            depth=2,
            num_heads=heads,
            window_size=ws,
            mlp_ratio=2.0,
            drop_paths=[0.0, 0.0],
            downsample=False,
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for p in stage.parameters():  # large, varied values so every term matters
            p.normal_(0.0, 0.5)
    return stage


@pytest.mark.parametrize("hw", [(10, 13), (3, 5), (8, 8)])
def test_window_attention_against_slow_reference(hw):
    H, W = hw
    stage = _random_stage()
    x = torch.randn(2, H * W, 8, dtype=torch.float64)
    with torch.no_grad():
        out, nxt, Hn, Wn = stage(x, H, W)
        b0, b1 = stage.blocks
        assert (b0.shift_size, b1.shift_size) == (0, 2)
        mid = _reference_block(b0, x, H, W)
        torch.testing.assert_close(b0(x, (H, W), None), mid, rtol=1e-10, atol=1e-10)
        ref = _reference_block(b1, mid, H, W)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        assert nxt is out and (Hn, Wn) == (H, W)
        # the check is sensitive: without the mask, or without the shift, results differ
        assert (out - _reference_block(b1, mid, H, W, use_mask=False)).abs().max() > 1e-3
        b1.shift_size = 0
        assert (b1(mid, (H, W), None) - ref).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# (6) determinism, drop path, checkpointing
# ---------------------------------------------------------------------------------------------


def test_eval_is_deterministic_and_drop_path_only_in_training():
    torch.manual_seed(0)
    model = swin_toy(drop_path_rate=0.5)
    x = torch.randn(2, 3, 40, 36)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert any(not torch.equal(u, v) for u, v in zip(c, d, strict=True))


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = swin_toy(drop_path_rate=0.0).train()
    ckpt = copy.deepcopy(model)
    ckpt.use_checkpoint = True
    x = torch.randn(1, 3, 33, 29)
    outs_a, outs_b = model(x), ckpt(x)
    sum(o.square().sum() for o in outs_a).backward()
    sum(o.square().sum() for o in outs_b).backward()
    for a, b in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_constructor_validation():
    with pytest.raises(ValueError):
        SwinTransformer(out_indices=(4,))
    with pytest.raises(ValueError):
        SwinTransformer(depths=(2, 2), num_heads=(1, 2, 4))
    with pytest.raises(ValueError):
        swin.build_swin("swin_X")
    with pytest.raises(ValueError):
        swin_toy()(torch.randn(3, 32, 32))
