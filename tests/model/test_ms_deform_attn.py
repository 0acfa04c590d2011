"""Multi-scale deformable attention: the embedding_bag kernel against grid_sample and an
explicit per-point bilinear reference, its gradients, low precision, and the module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dinodet.model.ms_deform_attn as msda
from dinodet.model.ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_grid_sample
from dinodet.model.transformer import FFN

F64 = torch.float64


def slow_reference(value, spatial_shapes, locations, weights):
    """Bilinear sampling written out point by point (align_corners=False, zeros outside)."""
    n, _, m, d = value.shape
    lq, num_points = locations.shape[1], locations.shape[4]
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m, d, dtype=F64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(spatial_shapes):
                    for p in range(num_points):
                        x = float(locations[b, q, head, lvl, p, 0]) * w - 0.5
                        y = float(locations[b, q, head, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        a = float(weights[b, q, head, lvl, p])
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= xx < w and 0 <= yy < h:
                                    row = starts[lvl] + yy * w + xx
                                    out[b, q, head] += a * wy * wx * value[b, row, head].double()
    return out.reshape(n, lq, m * d)


SHAPES = [(3, 5), (2, 7), (1, 1), (4, 2)]  # non-square, a 1×1 level, tall and wide


def make_inputs(num_levels, num_heads, num_points, n=2, lq=6, d=4, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES[:num_levels]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, num_heads, d, generator=g, dtype=F64)
    loc = torch.rand(n, lq, num_heads, num_levels, num_points, 2, generator=g, dtype=F64)
    loc = loc * 1.6 - 0.3  # about a quarter of the samples fall (partly) outside
    # Special locations for the first query: exact borders and pixel boundaries, pixel
    # centres, and points far outside.
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=F64)  # [L, 2]
    special = [
        torch.zeros(num_levels, 2),  # top-left border: half a pixel outside the first centre
        torch.ones(num_levels, 2),  # bottom-right border
        0.5 / sizes,  # first pixel centre
        1 / sizes,  # boundary between the first two pixels
        torch.full((num_levels, 2), -5.0),  # far outside
        torch.full((num_levels, 2), 7.0),
        torch.tensor([0.0, 1.0]).expand(num_levels, 2),
        (sizes - 0.5) / sizes,  # last pixel centre
    ]
    k = 0
    for head in range(num_heads):
        for p in range(num_points):
            loc[0, 0, head, :, p] = special[k % len(special)]
            k += 1
    w = torch.rand(n, lq, num_heads, num_levels, num_points, generator=g, dtype=F64)
    w = w / w.sum((-1, -2), keepdim=True)
    return value.to(dtype), shapes, loc.to(dtype), w.to(dtype)


CONFIGS = [(1, 1, 1), (1, 3, 4), (2, 3, 2), (3, 3, 3), (4, 3, 4), (4, 2, 1)]  # (L, M, P)


@pytest.mark.parametrize(("levels", "heads", "points"), CONFIGS)
def test_matches_grid_sample_and_explicit_bilinear(levels, heads, points):
    value, shapes, loc, w = make_inputs(levels, heads, points)
    want = slow_reference(value, shapes, loc, w)
    got = ms_deform_attn(value, shapes, loc, w)
    assert got.shape == (2, 6, heads * 4) and got.dtype == F64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        ms_deform_attn_grid_sample(value, shapes, loc, w), want, atol=1e-12, rtol=0
    )


def test_chunks_give_the_same_result(monkeypatch):
    value, shapes, loc, w = make_inputs(4, 3, 4, lq=11)
    whole = ms_deform_attn(value, shapes, loc, w)
    # 3·16·4 corners per query: chunks of 2 queries, the last one of 1.
    monkeypatch.setattr(msda, "_CPU_CHUNK_CORNERS", 2 * 2 * 3 * 16 * 4)
    chunked = ms_deform_attn(value, shapes, loc, w)
    torch.testing.assert_close(chunked, whole, atol=1e-14, rtol=0)
    torch.testing.assert_close(chunked, slow_reference(value, shapes, loc, w), atol=1e-12, rtol=0)


def test_non_finite_locations():
    value, shapes, loc, w = make_inputs(2, 3, 2, lq=3)
    loc[1, 1, 0, 0, 0, 0] = float("nan")
    loc[1, 2, 1, 1, 1, 1] = 1e30
    out = ms_deform_attn(value, shapes, loc, w)
    assert out[1, 1, :4].isnan().all()  # NaN in, NaN out (as grid_sample), no crash
    assert out.isnan().sum() == 4
    loc[1, 1, 0, 0, 0, 0] = 0.5
    want = slow_reference(value, shapes, loc, w)
    fine = torch.ones_like(out, dtype=torch.bool)
    fine[1, 1, :4] = False
    torch.testing.assert_close(out[fine], want[fine], atol=1e-12, rtol=0)


def off_boundary_inputs(seed=1):
    """Small inputs whose sampling points sit at least 0.1 pixel off any pixel-centre line,
    where bilinear sampling is not differentiable; some are partly or wholly outside."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (2, 3)]
    n, lq, m, num_points, d = 1, 3, 2, 2, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=F64)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=F64)[:, None]  # [L, 1, 2]
    # pixel coordinate (centre of pixel i at i) = integer in [-2, size] + [0.1, 0.9)
    cells = torch.randint(-2, 5, (n, lq, m, 2, num_points, 2), generator=g).to(F64)
    frac = 0.1 + 0.8 * torch.rand(n, lq, m, 2, num_points, 2, generator=g, dtype=F64)
    loc = (cells + frac + 0.5) / sizes
    w = torch.rand(n, lq, m, 2, num_points, generator=g, dtype=F64)
    return value, shapes, loc, w


def test_gradcheck():
    value, shapes, loc, w = off_boundary_inputs()
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, w))
    assert torch.autograd.gradcheck(lambda v, x, a: ms_deform_attn(v, shapes, x, a), inputs)
    # The gradients are those of the grid_sample formulation.
    torch.autograd.backward(ms_deform_attn(*inputs[:1], shapes, *inputs[1:]).square().sum())
    ours = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    out = ms_deform_attn_grid_sample(inputs[0], shapes, inputs[1], inputs[2])
    out.square().sum().backward()
    for a, b in zip(ours, (t.grad for t in inputs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_bfloat16_forward_close_to_float32():
    value, shapes, loc, w = make_inputs(4, 3, 4, lq=20, d=8, dtype=torch.bfloat16)
    out = ms_deform_attn(value, shapes, loc, w)
    assert out.dtype == torch.bfloat16
    want = ms_deform_attn(value.float(), shapes, loc.float(), w.float())
    rel = (out.float() - want).norm() / want.norm()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_half_precision(dtype):
    torch.manual_seed(0)
    attn = MSDeformAttn(32, 2, 4, 2)
    shapes = [(4, 6), (2, 3)]
    query, value = torch.randn(1, 5, 32), torch.randn(1, 30, 32)
    ref = torch.rand(1, 5, 2, 2)
    want = attn(query, ref, value, shapes)
    got = attn.to(dtype)(query.to(dtype), ref.to(dtype), value.to(dtype), shapes)
    assert got.dtype == dtype
    assert (got.float() - want).norm() / want.norm() < 3e-2


def random_module(dim=12, levels=3, heads=3, points=2, seed=0):
    torch.manual_seed(seed)
    attn = MSDeformAttn(dim, levels, heads, points).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    return attn


def module_reference(attn, query, ref, value, shapes, padding_mask):
    """The module's computation spelled out, with the explicit bilinear reference."""
    n, lq, _ = query.shape
    m, levels, points = attn.num_heads, attn.num_levels, attn.num_points
    v = attn.value_proj(value)
    if padding_mask is not None:
        v = v * (~padding_mask)[..., None]
    v = v.view(n, -1, m, attn.dim // m)
    off = attn.sampling_offsets(query).view(n, lq, m, levels, points, 2)
    w = attn.attention_weights(query).view(n, lq, m, levels * points).softmax(-1)
    w = w.view(n, lq, m, levels, points)
    if ref.shape[-1] == 2:
        wh = torch.tensor([[w_, h_] for h_, w_ in shapes], dtype=F64)  # [L, 2]
        loc = ref[:, :, None, :, None, :] + off / wh[:, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / points * ref[:, :, None, :, None, 2:] / 2
    return attn.output_proj(slow_reference(v, shapes, loc, w))


MODULE_SHAPES = [(3, 4), (2, 5), (1, 2)]  # random_module's 3 levels


def module_inputs(n, lq, ref_dim, seed):
    """query [n, lq, 12], reference points [n, lq, 3, ref_dim], value over MODULE_SHAPES and a
    padding mask (float64), from one generator."""
    s = sum(h * w for h, w in MODULE_SHAPES)
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(n, lq, 12, generator=g, dtype=F64)
    value = torch.randn(n, s, 12, generator=g, dtype=F64)
    ref = torch.rand(n, lq, 3, ref_dim, generator=g, dtype=F64)
    return query, ref, value, torch.rand(n, s, generator=g) < 0.3


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_against_reference(ref_dim, monkeypatch):
    attn = random_module()
    shapes = MODULE_SHAPES
    query, ref, value, mask = module_inputs(2, 7, ref_dim, seed=3)
    with torch.no_grad():
        want = module_reference(attn, query, ref, value, shapes, mask)
        got = attn(query, ref, value, shapes, mask)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        # Padded values are not read: changing them changes nothing.
        noisy = value + 100 * mask[..., None]
        torch.testing.assert_close(attn(query, ref, noisy, shapes, mask), got, atol=1e-12, rtol=0)
        # Small chunks of queries in the fused path.
        monkeypatch.setattr(msda, "_CPU_CHUNK_CORNERS", 2 * 2 * 3 * 6 * 4)
        torch.testing.assert_close(attn(query, ref, value, shapes, mask), want, atol=1e-12, rtol=0)
        # A callable backend replaces the sampling (not fused then).
        for fn in (ms_deform_attn_grid_sample, ms_deform_attn):
            attn.backend = fn
            torch.testing.assert_close(attn(query, ref, value, shapes, mask), want, atol=1e-12,
                                       rtol=0)


def test_offsets_and_logits_are_one_product_unless_a_layer_is_not_linear(monkeypatch):
    attn = random_module()
    shapes = MODULE_SHAPES
    query, ref, value, _ = module_inputs(1, 9, 2, seed=4)
    with torch.no_grad():
        both = attn._offsets_and_logits(query)
        assert both is not None and both.shape == (1, 9, 3 * 3 * 2 * 3)
        torch.testing.assert_close(both, torch.cat([attn.sampling_offsets(query),
                                                    attn.attention_weights(query)], -1))
        want = module_reference(attn, query, ref, value, shapes, None)
        monkeypatch.setattr(msda, "_CPU_CHUNK_CORNERS", 2 * 3 * 6 * 4)  # 2 queries a chunk
        torch.testing.assert_close(attn(query, ref, value, shapes), want, atol=1e-12, rtol=0)
        # Another module (a quantised layer, say) is called as itself, chunk by chunk.
        plain = nn.Linear(12, attn.attention_weights.out_features).double()
        plain.load_state_dict(attn.attention_weights.state_dict())
        attn.attention_weights = plain
        assert attn._offsets_and_logits(query) is None
        torch.testing.assert_close(attn(query, ref, value, shapes), want, atol=1e-12, rtol=0)


def test_callable_backend_gets_the_shapes_and_its_result_is_used(monkeypatch):
    monkeypatch.delenv(msda.ENV_VAR, raising=False)
    attn = random_module()  # dim 12, 3 levels, 3 heads, 2 points
    shapes = [(3, 4), (2, 5), (1, 2)]
    s = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(5)
    query = torch.randn(2, 7, 12, generator=g, dtype=F64)
    value = torch.randn(2, s, 12, generator=g, dtype=F64)
    calls = []

    def backend(v, spatial_shapes, locations, weights):
        calls.append((v.shape, spatial_shapes, locations.shape, weights.shape))
        return torch.full((2, 7, 12), 3.0, dtype=F64)

    for ref_dim in (2, 4):
        ref = torch.rand(2, 7, 3, ref_dim, generator=g, dtype=F64)
        attn.backend = backend
        with torch.no_grad():
            got = attn(query, ref, value, shapes)
            want = attn.output_proj(torch.full((2, 7, 12), 3.0, dtype=F64))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert calls.pop() == ((2, s, 3, 4), shapes, (2, 7, 3, 3, 2, 2), (2, 7, 3, 3, 2))
    # The environment variable is a default read when the module is built, never at call
    # time: a bad value set afterwards changes nothing.
    monkeypatch.setenv(msda.ENV_VAR, "no-such-backend")
    attn(query, ref, value, shapes)
    assert calls and attn.backend is backend
    attn.backend = "torch"
    attn(query, ref, value, shapes)
    assert attn.backend == "torch" and len(calls) == 1
    # A callable that is an nn.Module stays out of the module tree (and the state dict).
    keys = set(attn.state_dict())
    attn.backend = torch.nn.Identity()
    assert set(attn.state_dict()) == keys and isinstance(attn.backend, torch.nn.Identity)
    with pytest.raises(ValueError, match="'fast'"):
        attn.backend = "fast"
    with pytest.raises(ValueError, match="'fast'"):
        MSDeformAttn(12, 3, 3, 2, backend="fast")


def test_module_gradcheck():
    attn = random_module(dim=4, levels=2, heads=2, points=2, seed=1)
    with torch.no_grad():
        attn.sampling_offsets.weight.mul_(0.2)
    shapes = [(3, 4), (2, 3)]
    g = torch.Generator().manual_seed(4)
    query = torch.randn(1, 3, 4, generator=g, dtype=F64, requires_grad=True)
    value = torch.randn(1, 18, 4, generator=g, dtype=F64, requires_grad=True)
    for ref_dim in (2, 4):
        ref = 0.1 + 0.8 * torch.rand(1, 3, 2, ref_dim, generator=g, dtype=F64)
        ref.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda q, r, v: attn(q, r, v, shapes), (query, ref, value), fast_mode=True
        )
    # and the parameters get gradients
    attn(query, ref, value, shapes).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


def test_bad_reference_points():
    attn = MSDeformAttn(16, 2, 2, 2)
    with pytest.raises(ValueError, match="2 or 4"):
        attn(
            torch.randn(1, 3, 16), torch.rand(1, 3, 2, 3), torch.randn(1, 30, 16), [(4, 6), (2, 3)]
        )


def test_ffn_chunks_and_backward():
    torch.manual_seed(0)
    ffn = FFN(4, 8, 0.0).double()
    x = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    whole = ffn(x)
    ffn.CPU_CHUNK_ELEMENTS = 2 * 8  # chunks of 2 tokens
    torch.testing.assert_close(ffn(x), whole, atol=1e-14, rtol=0)
    # In-place ReLU on linear1's output is safe for autograd.
    assert torch.autograd.gradcheck(ffn, (x,), fast_mode=True)


def test_cpu_backward_equals_autograd_through_the_corner_ops():
    # The CPU training path (_SampleCPU's closed-form backward) against autograd through
    # the same corner arithmetic (the CUDA path), with points far outside the maps, on
    # pixel centres and borders, and exactly on the clamp at -1 and size.
    value, shapes, loc, w = off_boundary_inputs()
    loc = loc.clone()
    sizes = torch.tensor([[wd, h] for h, wd in shapes], dtype=F64)[:, None]
    loc[0, 0] = 7.0  # far outside: clamped, no gradient
    loc[0, 1, 0] = (torch.tensor([0.0, 1.0]) + 0.5) / sizes[:, 0]  # pixel centres
    loc[0, 1, 1] = (sizes[:, 0] - 0.5) / sizes[:, 0]  # the last centre
    loc[0, 2, 0, :, 0] = -0.5 / sizes[:, 0]  # on the clamp at -1
    loc[0, 2, 1, :, 1] = (sizes[:, 0] + 0.5) / sizes[:, 0]  # on the clamp at size
    n, lq, m, levels, points, _ = loc.shape
    attn = w.reshape(n, lq, m, 1, levels * points)

    def grads(custom):
        v, x, a = (t.clone().requires_grad_() for t in (value, loc, attn))
        sampler = msda._Sampler(v, shapes, points)
        pix = sampler.pixels(x)
        if custom:
            out = msda._SampleCPU.apply(sampler.table, pix, a, sampler)
        else:
            index, weights, _, _ = sampler.corners(pix, a)
            out = sampler.bag(sampler.table, index, weights)
        out.sin().sum().backward()
        return out.detach(), v.grad, x.grad, a.grad

    for got, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert grads(True)[2][0, 0].abs().max() == 0  # clamped far away: no location gradient


def test_cpu_training_runs_the_closed_form_backward():
    value, shapes, loc, w = make_inputs(2, 2, 2, dtype=torch.float32)
    for t in (value, loc, w):
        t.requires_grad_()
    with torch.profiler.profile() as prof:
        ms_deform_attn(value, shapes, loc, w).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "_SampleCPUBackward" in names
    assert any("sampled_addmm" in name for name in names)
    assert "aten::_embedding_bag_per_sample_weights_backward" not in names
