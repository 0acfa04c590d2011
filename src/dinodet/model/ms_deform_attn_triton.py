"""Multi-scale deformable attention as Triton kernels behind a ``torch.library`` custom op.

``torch.ops.dinodet.ms_deform_attn(value, spatial_shapes, sampling_locations,
attention_weights)`` computes what :func:`dinodet.model.ms_deform_attn.ms_deform_attn`
does (same layouts, bilinear, ``align_corners=False``, zeros outside), with
``spatial_shapes`` flattened to ``[H_0, W_0, H_1, W_1, ...]`` so that the schema holds it.
It has a fake (meta) implementation and an autograd formula whose backward is a second
op, ``dinodet::ms_deform_attn_backward``, so ``torch.compile(fullgraph=True)`` traces
through both without a graph break.

Kernels. One program takes BLOCK_R rows of the flattened (batch, query, head) index and
all D channels of a head (D rounded up to a power of two and masked), and loops over the
levels and points: per point, four gathers of D contiguous values (one per bilinear
corner, masked off the map) into a float32 [BLOCK_R, D] accumulator. The backward
recomputes the corners, reduces gradient·value over D for the attention weight and the
location gradients (each (query, head, level, point) belongs to one program, so plain
stores), and scatters the value gradient with atomic adds into a float32 buffer. Inputs
may be float32, bfloat16 or float16 (each its own); float64 is refused: the kernels
compute in float32.

Devices. CUDA tensors run the compiled kernels. CPU tensors run the same kernels under
Triton's interpreter (slow; for tests): the interpreter is chosen when a kernel is
decorated (``triton.knobs.runtime.interpret``, i.e. ``TRITON_INTERPRET``), so each kernel
is decorated twice, lazily, once per mode, and the mode is picked from the tensors'
device. Triton is optional: without it this module imports and registers the ops, and
calling them raises.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the ops stay registered; running them raises
    triton = None
    tl = None

AVAILABLE = triton is not None
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Values gathered per program, BLOCK_R (batch, query, head) rows × BLOCK_D channels, with
# 4 warps: 8 and 4 per thread. Not tuned on a GPU; chosen from ptxas's report for sm_80 and
# sm_90 at D = 32: about 110 registers forward, 128 backward, no spills (twice the tile
# nearly doubles them and spills; 64-bit indices do too).
_TILE_FORWARD = 1024
_TILE_BACKWARD = 512
_NUM_WARPS = 4
# Tensors with fewer elements than this are indexed with 32-bit integers.
_INDEX_32_LIMIT = 2**31


# The kernels below are plain functions, decorated on first use by _kernels (once for the
# compiler, once for the interpreter). Their annotations are strings (``from __future__
# import annotations``), which Triton reads, so defining them needs no Triton. They call no
# @triton.jit function (no helpers, no tl.cdiv or tl.zeros): one of those is decorated in
# one mode only (the mode when triton was imported) and cannot run in the other.


def _forward_kernel(
    value_ptr,  # [N, S, M, D]
    levels_ptr,  # [L, 3] int32: H, W, first row of the level in S
    loc_ptr,  # [N, Lq, M, L, P, 2]
    attn_ptr,  # [N, Lq, M, L, P]
    out_ptr,  # [N, Lq, M, D]
    num_rows,  # N·Lq·M
    num_queries,
    num_values,
    num_heads,
    head_dim,
    num_levels,
    num_points,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX: tl.constexpr,  # tl.int32, or tl.int64 for tensors of 2**31 elements or more
):
    # A program takes BLOCK_R consecutive rows of the flattened (batch, query, head) index:
    # the heads of a few neighbouring queries, whose locations, weights and outputs are
    # contiguous.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    r = r.to(INDEX)
    m = r % num_heads
    # Row of (batch, pixel (0, 0) of level 0, head) in the [N·S·M, D] view of the values.
    batch_row = (r // (num_queries * num_heads)) * (num_values * num_heads) + m
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    acc = tl.full((BLOCK_R, BLOCK_D), 0.0, tl.float32)
    for level in range(num_levels):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        level_row = batch_row + tl.load(levels_ptr + 3 * level + 2).to(INDEX) * num_heads
        for point in range(num_points):
            k = r * (num_levels * num_points) + (level * num_points + point)
            a = tl.load(attn_ptr + k, mask=r_ok, other=0.0).to(tl.float32)
            # Pixel coordinates, the centre of pixel i at i. Clamped to [-2, size + 1]:
            # far-away (or infinite) points stay finite and all their corners lie off the
            # map. A NaN stays NaN in the weights (NaN out, as with grid_sample) and is
            # moved off the map for the integer corners.
            x = tl.load(loc_ptr + 2 * k, mask=r_ok, other=0.0).to(tl.float32) * width - 0.5
            y = tl.load(loc_ptr + 2 * k + 1, mask=r_ok, other=0.0).to(tl.float32) * height - 0.5
            x = tl.where(x < -2.0, -2.0, tl.where(x > width + 1.0, width + 1.0, x))
            y = tl.where(y < -2.0, -2.0, tl.where(y > height + 1.0, height + 1.0, y))
            x_floor = tl.floor(tl.where(x == x, x, -2.0))
            y_floor = tl.floor(tl.where(y == y, y, -2.0))
            fx = x - x_floor
            fy = y - y_floor
            x0 = x_floor.to(tl.int32)
            y0 = y_floor.to(tl.int32)
            for cy in tl.static_range(2):
                yc = y0 + cy
                wy = (1.0 - fy) + cy * (2.0 * fy - 1.0)  # 1 − fy, then fy
                y_ok = r_ok & (yc >= 0) & (yc < height)
                for cx in tl.static_range(2):
                    xc = x0 + cx
                    wx = (1.0 - fx) + cx * (2.0 * fx - 1.0)
                    ok = y_ok & (xc >= 0) & (xc < width)
                    row = level_row + (yc * width + xc).to(INDEX) * num_heads
                    v = tl.load(
                        value_ptr + row[:, None] * head_dim + d[None, :],
                        mask=ok[:, None] & d_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    acc += (a * wy * wx)[:, None] * v
    out = out_ptr + r[:, None] * head_dim + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def _backward_kernel(
    value_ptr,  # [N, S, M, D]
    levels_ptr,  # [L, 3] int32
    loc_ptr,  # [N, Lq, M, L, P, 2]
    attn_ptr,  # [N, Lq, M, L, P]
    grad_out_ptr,  # [N, Lq, M, D]
    grad_value_ptr,  # [N, S, M, D] float32, zeroed, accumulated with atomic adds
    grad_loc_ptr,  # like loc
    grad_attn_ptr,  # like attn
    num_rows,
    num_queries,
    num_values,
    num_heads,
    head_dim,
    num_levels,
    num_points,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # The rows and the sampling of _forward_kernel.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    r = r.to(INDEX)
    m = r % num_heads
    batch_row = (r // (num_queries * num_heads)) * (num_values * num_heads) + m
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    g = tl.load(
        grad_out_ptr + r[:, None] * head_dim + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    for level in range(num_levels):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        level_row = batch_row + tl.load(levels_ptr + 3 * level + 2).to(INDEX) * num_heads
        for point in range(num_points):
            k = r * (num_levels * num_points) + (level * num_points + point)
            a = tl.load(attn_ptr + k, mask=r_ok, other=0.0).to(tl.float32)
            x = tl.load(loc_ptr + 2 * k, mask=r_ok, other=0.0).to(tl.float32) * width - 0.5
            y = tl.load(loc_ptr + 2 * k + 1, mask=r_ok, other=0.0).to(tl.float32) * height - 0.5
            x = tl.where(x < -2.0, -2.0, tl.where(x > width + 1.0, width + 1.0, x))
            y = tl.where(y < -2.0, -2.0, tl.where(y > height + 1.0, height + 1.0, y))
            x_floor = tl.floor(tl.where(x == x, x, -2.0))
            y_floor = tl.floor(tl.where(y == y, y, -2.0))
            fx = x - x_floor
            fy = y - y_floor
            x0 = x_floor.to(tl.int32)
            y0 = y_floor.to(tl.int32)
            # out += a · Σ_corners wy·wx·v. With gv = Σ_d grad·v for a corner:
            # d/da = Σ wy·wx·gv, d/dx = a·Σ wy·(∓1)·gv, d/dy = a·Σ wx·(∓1)·gv.
            grad_a = tl.full((BLOCK_R,), 0.0, tl.float32)
            grad_x = tl.full((BLOCK_R,), 0.0, tl.float32)
            grad_y = tl.full((BLOCK_R,), 0.0, tl.float32)
            for cy in tl.static_range(2):
                yc = y0 + cy
                wy = (1.0 - fy) + cy * (2.0 * fy - 1.0)
                y_ok = r_ok & (yc >= 0) & (yc < height)
                for cx in tl.static_range(2):
                    xc = x0 + cx
                    wx = (1.0 - fx) + cx * (2.0 * fx - 1.0)
                    ok = y_ok & (xc >= 0) & (xc < width)
                    row = level_row + (yc * width + xc).to(INDEX) * num_heads
                    offsets = row[:, None] * head_dim + d[None, :]
                    mask = ok[:, None] & d_ok[None, :]
                    v = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                    if INTERPRET:
                        # tl.sum is a @triton.jit function decorated for the compiler (see
                        # above); its combine function is what the interpreter's reduce
                        # recognises and runs as numpy.sum.
                        gv = tl.reduce(g * v, 1, tl.standard._sum_combine)
                    else:
                        gv = tl.sum(g * v, axis=1)
                    grad_a += wy * wx * gv
                    grad_x += (2 * cx - 1) * wy * gv
                    grad_y += (2 * cy - 1) * wx * gv
                    tl.atomic_add(
                        grad_value_ptr + offsets,
                        (a * wy * wx)[:, None] * g,
                        mask=mask,
                        sem="relaxed",
                    )
            # Pixel coordinates are location·size − 0.5.
            grad_x = grad_x * a * width
            grad_y = grad_y * a * height
            tl.store(grad_attn_ptr + k, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=r_ok)
            loc_ty = grad_loc_ptr.dtype.element_ty
            tl.store(grad_loc_ptr + 2 * k, grad_x.to(loc_ty), mask=r_ok)
            tl.store(grad_loc_ptr + 2 * k + 1, grad_y.to(loc_ty), mask=r_ok)


class _Kernels(NamedTuple):
    forward: Any  # triton.JITFunction: launched as kernel[grid](...)
    backward: Any
    interpret: bool


@functools.cache
def _kernels(interpret: bool) -> _Kernels:
    """The kernels decorated for the compiler or, on ``interpret``, for the interpreter.
    ``triton.jit`` reads the mode when it decorates, so each mode gets its own copy."""
    if triton is None:
        raise RuntimeError("the Triton multi-scale deformable attention needs triton installed")
    if not interpret:  # compiled, unless TRITON_INTERPRET=1 is set
        interpreted = triton.knobs.runtime.interpret
        return _Kernels(triton.jit(_forward_kernel), triton.jit(_backward_kernel), interpreted)
    with triton.knobs.runtime.scope():  # restores the knob and TRITON_INTERPRET after
        triton.knobs.runtime.interpret = True
        return _Kernels(triton.jit(_forward_kernel), triton.jit(_backward_kernel), True)


def _kernels_for(device: torch.device) -> _Kernels:
    return _kernels(interpret=device.type == "cpu")


@functools.lru_cache(maxsize=256)
def _level_table(spatial_shapes: tuple[int, ...], device: torch.device) -> Tensor:
    """[L, 3] int32 (H, W, first row) on ``device``, cached: no host-to-device copy per call
    for the few image sizes a run sees."""
    rows, start = [], 0
    for h, w in zip(spatial_shapes[::2], spatial_shapes[1::2]):
        rows.append((h, w, start))
        start += h * w
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 3)


def _launch(value: Tensor, loc: Tensor, tile: int) -> tuple[tuple[int], dict]:
    """Grid and launch options: BLOCK_R, BLOCK_D (D rounded up to a power of two and
    masked), the index type, the number of warps."""
    n, _, m, d = value.shape
    rows = n * loc.shape[1] * m
    block_d = triton.next_power_of_2(d)
    block_r = min(max(1, tile // block_d), max(16, triton.next_power_of_2(rows)))
    largest = max(value.numel(), loc.numel(), rows * d)
    options = {
        "BLOCK_R": block_r,
        "BLOCK_D": block_d,
        # 32-bit offsets take half the registers of 64-bit ones.
        "INDEX": tl.int32 if largest < _INDEX_32_LIMIT else tl.int64,
        "num_warps": _NUM_WARPS,
    }
    return (triton.cdiv(rows, block_r),), options


def _check(value: Tensor, spatial_shapes: list[int], loc: Tensor, attn: Tensor) -> None:
    if value.dim() != 4 or loc.dim() != 6 or loc.shape[-1] != 2 or attn.dim() != 5:
        raise ValueError(
            "expected value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] and "
            f"attention_weights [N, Lq, M, L, P], got {tuple(value.shape)}, "
            f"{tuple(loc.shape)} and {tuple(attn.shape)}"
        )
    n, s, m, _ = value.shape
    if loc.shape[:5] != attn.shape or loc.shape[0] != n or loc.shape[2] != m:
        raise ValueError(
            f"shapes {tuple(value.shape)}, {tuple(loc.shape)} and {tuple(attn.shape)} do not agree"
        )
    if len(spatial_shapes) != 2 * loc.shape[3]:
        raise ValueError(f"spatial_shapes {spatial_shapes} is not (H, W) for {loc.shape[3]} levels")
    if sum(h * w for h, w in zip(spatial_shapes[::2], spatial_shapes[1::2])) != s:
        raise ValueError(f"spatial shapes {spatial_shapes} do not add up to {s} values")
    for t in (value, loc, attn):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the Triton kernels take {SUPPORTED_DTYPES}, got {t.dtype}")
        if t.device != value.device:
            raise ValueError(f"inputs on {value.device} and {t.device}")


@torch.library.custom_op("dinodet::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: list[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the Triton kernels.

    Args:
        value: [N, S, M, D]. spatial_shapes: [H_0, W_0, H_1, W_1, ...] (flat).
        sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y).
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M·D] in the dtype of ``value``.
    """
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    kernels = _kernels_for(value.device)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    out = value.new_empty(n, lq, m * d)
    if out.numel() == 0:
        return out
    grid, options = _launch(value, sampling_locations, _TILE_FORWARD)
    kernels.forward[grid](
        value.contiguous(),
        _level_table(tuple(spatial_shapes), value.device),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        out,
        n * lq * m,
        lq,
        s,
        m,
        d,
        num_levels,
        num_points,
        **options,
    )
    return out


@ms_deform_attn_op.register_fake
def _(
    value: Tensor, spatial_shapes: list[int], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    n, _, m, d = value.shape
    return value.new_empty(n, sampling_locations.shape[1], m * d)


@torch.library.custom_op("dinodet::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: list[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ms_deform_attn_op` for ``grad_output`` [N, Lq, M·D]: those of
    value, sampling_locations and attention_weights, each in its input's dtype."""
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    kernels = _kernels_for(value.device)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.empty_like(sampling_locations, memory_format=torch.contiguous_format)
    grad_attn = torch.empty_like(attention_weights, memory_format=torch.contiguous_format)
    if grad_loc.numel() and value.numel():
        grid, options = _launch(value, sampling_locations, _TILE_BACKWARD)
        kernels.backward[grid](
            value.contiguous(),
            _level_table(tuple(spatial_shapes), value.device),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
            grad_output.contiguous(),
            grad_value,
            grad_loc,
            grad_attn,
            n * lq * m,
            lq,
            s,
            m,
            d,
            num_levels,
            num_points,
            INTERPRET=kernels.interpret,
            **options,
        )
    else:  # nothing sampled: only zeros
        grad_loc.zero_()
        grad_attn.zero_()
    return grad_value.to(value.dtype), grad_loc, grad_attn


@ms_deform_attn_backward_op.register_fake
def _(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: list[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(value, memory_format=torch.contiguous_format),
        torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
        torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes


def _backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grads = ms_deform_attn_backward_op(
        grad_output, value, ctx.spatial_shapes, sampling_locations, attention_weights
    )
    return grads[0], None, grads[1], grads[2]


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """:func:`dinodet.model.ms_deform_attn.ms_deform_attn`'s signature (``spatial_shapes``
    as (H, W) pairs) on the Triton op; [N, Lq, M·D] in the dtype of ``value``."""
    flat = [x for hw in spatial_shapes for x in hw]
    return ms_deform_attn_op(value, flat, sampling_locations, attention_weights)
