"""Multi-scale deformable attention for export (``torch.export``, ONNX): what
:func:`dinodet.model.ms_deform_attn.ms_deform_attn` does with ``embedding_bag``, as one
Gather of corner rows and a batched MatMul by their weights, ops that ONNX has.

Every level's [H, W] map of ``value`` gets a border of zero pixels (one before, two after,
on both axes) and the padded maps make one table of D-value rows, one per (batch, padded
pixel, head). Pixel coordinates clamped into [0, size + 1] of the padded map put all 4
corners of a point on it, and a corner off the original map on the zero border: that is
``grid_sample``'s ``padding_mode="zeros"`` (``align_corners=False``) with no in-range test
and no clamped index. The 4·L·P corner rows of each (batch, query, head) are gathered
(``index_select``, ONNX Gather) and summed by a matmul [.., 1, 4·L·P] × [.., 4·L·P, D]
with the bilinear × attention weights (onnxruntime runs that several times faster than a
Mul and a ReduceSum, which write the gathered rows once more).

On 2 CPU threads under onnxruntime, the encoder attention of an 800×1088 image (18k queries,
8 heads, 4 levels, 4 points) takes less than half the time of one GridSample per level
(:func:`~dinodet.model.ms_deform_attn.ms_deform_attn_grid_sample`). Most of it is the
Gather: unlike ``embedding_bag`` it writes the gathered rows (N·Lq·M·4·L·P·D values, 1.2 GB
for that image) before the matmul reads them, so the rows are gathered and summed in
:data:`PIECES` slices of the (batch, query, head) rows, onnxruntime then holding one slice
at a time. Four corners per gathered row (a table of 2×2 patches) halve the Gather's time
but building the table costs as much, and more than the decoder's few queries save.

Coordinates are "planar", [N, Lq, M, axis (x, y), L·P], with per-level constants
materialised at [M, axis, L·P]: onnxruntime's elementwise ops, Split and Transpose are slow
on a trailing size-2 axis. The interleaved locations are made planar by a matmul with a
permutation matrix, exact for finite values: they are clamped to [-1, 2] first (which
keeps every point outside a map outside it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The gathered rows are summed in this many slices of the (batch, query, head) rows. Under
# onnxruntime (2 threads, the encoder attention of an 800×1088 image) one slice peaks at
# 1.4 GB over the inputs, 4 at 0.55 GB, 8 at 0.35 GB (GridSample per level: 0.3 GB); each
# doubling of the slices cost 3 to 5 % of the time.
PIECES = 4


def _planar(sampling_locations: Tensor, compute: torch.dtype) -> Tensor:
    """[N, Lq, M, L, P, 2] interleaved (x, y) -> [N, Lq, M, 2, L·P], clamped to [-1, 2]."""
    n, lq, m, num_levels, num_points, _ = sampling_locations.shape
    lp = num_levels * num_points
    xy = sampling_locations.to(compute).reshape(n, lq, m, 2 * lp).clamp(-1.0, 2.0)
    # perm[i, j] = 1 where input i = (point p, axis a) = 2p + a goes to output j = a·LP + p.
    i = torch.arange(2 * lp, device=xy.device)
    perm = ((i % 2) * lp + i // 2)[:, None] == i[None, :]
    return torch.matmul(xy, perm.to(compute)).view(n, lq, m, 2, lp)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level at its locations and sum with the attention weights; same
    arguments and result (up to rounding) as
    :func:`dinodet.model.ms_deform_attn.ms_deform_attn`, in ops that export to ONNX.

    Args:
        value: [N, S, M, D] values of all levels flattened (S = Σ H_l·W_l), M heads of D.
        spatial_shapes: (H_l, W_l) of each of the L levels, in the order of ``value``; they
            may be symbolic sizes while exporting.
        sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y); pixel centres sit at
            (i + 0.5) / W (``align_corners=False``); outside samples read zeros.
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M·D] in the dtype of ``value``.
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} levels")
    lp = num_levels * num_points
    compute = torch.promote_types(value.dtype, torch.float32)
    device = value.device

    # Table [N·S'·M, D]: each level [N, H+3, W+3, M·D] with zeros around (1 before, 2 after).
    maps = []
    levels = value.to(compute).split([h * w for h, w in spatial_shapes], 1)
    for v, (h, w) in zip(levels, spatial_shapes):
        v = F.pad(v.reshape(n, h, w, m * d), (0, 0, 1, 2, 1, 2))
        maps.append(v.reshape(n, (h + 3) * (w + 3), m, d))
    padded = torch.cat(maps, 1) if len(maps) > 1 else maps[0]
    table = padded.reshape(-1, d)
    starts = [0]
    for h, w in spatial_shapes[:-1]:
        starts.append(starts[-1] + (h + 3) * (w + 3))

    def per_point(per_level: list[list[int]], dtype: torch.dtype) -> Tensor:
        # per_level[l] = [a, b, ..] -> [M, k, L·P], level l's values repeated over its points
        t = torch.tensor(per_level, dtype=dtype, device=device).t()
        t = t[:, :, None].expand(-1, num_levels, num_points).reshape(-1, lp)
        return t.expand(m, -1, lp)

    sizes = per_point([[w, h] for h, w in spatial_shapes], compute)  # (W, H)
    # Table-row steps of one padded pixel along x and along y.
    steps = per_point([[m, (w + 3) * m] for _, w in spatial_shapes], torch.int64)
    # Row of padded pixel (0, 0) of level l, batch b, head h: (b·S' + start_l)·M + h.
    base = (per_point([[start * m] for start in starts], torch.int64)
            + torch.arange(m, device=device).view(m, 1, 1)
            + torch.arange(n, device=device).view(n, 1, 1, 1) * (padded.shape[1] * m))
    base = base.view(n, 1, m, lp)

    # Padded pixel coordinates (the centre of pixel i at i + 1), clamped into [0, size + 1]:
    # the corners p0 and p0 + 1 then lie in the padded map, and a point clamped from
    # further out (or infinite) falls on its zero border.
    pix = _planar(sampling_locations, compute) * sizes + 0.5
    pix = torch.minimum(pix.clamp(min=0.0), sizes + 1)
    p0 = pix.floor()
    frac = pix - p0  # NaN for a NaN location: NaN weights, NaN out (as grid_sample)
    # A NaN location would make an invalid row: it reads row 0 instead, with NaN weights.
    p0 = torch.where(p0 == p0, p0, torch.zeros_like(p0))
    rows = (p0.to(torch.int64) * steps).sum(3) + base  # [N, Lq, M, L·P], top-left corners
    # Corners (y, x) in {0, 1}²: rows + y·(step y) + x·(step x): [N, Lq, M, 2 y, 2 x, L·P]
    zero = torch.zeros_like(steps[:, 0])
    offsets = torch.stack([zero, steps[:, 0], steps[:, 1], steps[:, 1] + steps[:, 0]], 1)
    index = rows[:, :, :, None, None, :] + offsets.view(m, 2, 2, lp)

    attn = attention_weights.to(compute).reshape(n, lq, m, 1, lp)
    fx, fy = frac[:, :, :, 0:1], frac[:, :, :, 1:2]
    fy = fy * attn
    wx = torch.cat((1 - fx, fx), 3)  # [N, Lq, M, 2 x, L·P]
    wy = torch.cat((attn - fy, fy), 3)  # [N, Lq, M, 2 y, L·P], attention included
    weights = wy[:, :, :, :, None] * wx[:, :, :, None]  # [N, Lq, M, 2 y, 2 x, L·P]

    k = 4 * lp
    index, weights = index.reshape(-1, k), weights.reshape(-1, k)
    total = n * lq * m
    outs = []
    for i in range(PIECES):
        # Bounds computed, not tensor_split's, which would fix the rows' remainder modulo
        # PIECES while exporting.
        lo, hi = i * total // PIECES, (i + 1) * total // PIECES
        gathered = table.index_select(0, index[lo:hi].reshape(-1)).view(-1, k, d)
        outs.append(torch.matmul(weights[lo:hi, None], gathered))  # [rows, 1, D]
    return torch.cat(outs).view(n, lq, m * d).to(value.dtype)
