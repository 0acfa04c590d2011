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

Unlike ``embedding_bag``, the Gather writes the gathered rows (N·Lq·M·4·L·P·D values, 1.2 GB
for the encoder of an 800×1088 image) before the matmul reads them, so the (batch, query,
head) rows are taken in :data:`PIECES` slices, onnxruntime then holding one slice's gathered
rows at a time. A slice's corner indices and weights are computed from its own top-left rows
and fractions (slicing full-size index and weight tensors instead copies them once more).
``dinodet export`` does better (:func:`corner_sum_op`): all the rows' indices and weights
go to one op, ``dinodet::corner_sum``, which the ONNX export makes a Scan over steps of
2 MB of gathered rows (:func:`dinodet.export.chunk_corner_sums`); onnxruntime keeps a
step's rows in cache between its Gather and its MatMul.

onnxruntime's elementwise ops cost about as much per element as the Gather, and more on a
trailing size-2 axis or a broadcast: coordinates are "planar", [N, Lq, M, axis (x, y), L·P],
per-level constants materialised at [M, axis, L·P], and the few products that need no
broadcast are matmuls. The top-left corner's table row, Σ over the axes of corner · step,
is one (exact) matmul of the floored coordinates by a [2·L·P, L·P] matrix of the steps.
:class:`~dinodet.model.ms_deform_attn.MSDeformAttn` gives :func:`sample` the pixel
coordinates straight from its offsets (no normalised locations in between);
:func:`ms_deform_attn` takes the locations, for tests and other callers.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# The (batch, query, head) rows are sampled in this many slices. Under onnxruntime (2
# threads, the encoder attention of an 800×1088 image) one slice peaks at 1.4 GB over the
# inputs, 4 at 0.55 GB, 8 at 0.35 GB (GridSample per level: 0.3 GB); each doubling of the
# slices cost 3 to 5 % of the time.
PIECES = 4

_CORNER_SUM_OP = contextvars.ContextVar("dinodet_corner_sum_op", default=False)


@contextlib.contextmanager
def corner_sum_op() -> Iterator[None]:
    """Within it, :func:`sample` sums all its corner rows with one :func:`corner_sum` (the
    op ``dinodet::corner_sum``) instead of :data:`PIECES` Gathers and MatMuls: the ONNX
    export (:func:`dinodet.export.to_onnx`) makes that op a Scan over small steps of rows
    (:func:`dinodet.export.chunk_corner_sums`), whose gathered rows onnxruntime keeps in
    cache."""
    token = _CORNER_SUM_OP.set(True)
    try:
        yield
    finally:
        _CORNER_SUM_OP.reset(token)


@torch.library.custom_op("dinodet::corner_sum", mutates_args=())
def corner_sum(table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """Weighted sums of table rows: ``out[r] = Σ_k weights[r, k] · table[index[r, k]]``.

    Args:
        table: [T, D].
        index: [R, K] int64 rows of ``table``.
        weights: [R, K] in the dtype of ``table``.

    Returns:
        [R, D].
    """
    return F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)


@corner_sum.register_fake
def _corner_sum_shape(table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    return table.new_empty((index.shape[0], table.shape[1]))


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
    n, _, m, _ = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} levels")
    lp = num_levels * num_points
    compute = torch.promote_types(value.dtype, torch.float32)
    sizes = level_sizes(spatial_shapes, num_points, m, compute, value.device)
    # Clamped to [-1, 2] first, which keeps every point outside a map outside it.
    pix = _planar(sampling_locations, compute) * sizes + 0.5
    return sample(value, spatial_shapes, pix, attention_weights.reshape(n, lq, m, lp))


def _per_point(per_level: list[list[int]], num_points: int, num_heads: int,
               dtype: torch.dtype, device: torch.device) -> Tensor:
    """per_level[l] = [a, b, ..] -> [M, k, L·P]: level l's values repeated over its points."""
    num_levels = len(per_level)
    t = torch.tensor(per_level, dtype=dtype, device=device).t()
    t = t[:, :, None].expand(-1, num_levels, num_points).reshape(-1, num_levels * num_points)
    return t.expand(num_heads, -1, num_levels * num_points)


def level_sizes(spatial_shapes: list[tuple[int, int]], num_points: int, num_heads: int,
                dtype: torch.dtype, device: torch.device) -> Tensor:
    """Each level's (W, H) as [M, axis, L·P] (repeated over the points and heads)."""
    return _per_point([[w, h] for h, w in spatial_shapes], num_points, num_heads, dtype,
                      device)


def sample(value: Tensor, spatial_shapes: list[tuple[int, int]], pix: Tensor,
           attn: Tensor) -> Tensor:
    """Bilinear samples at planar pixel coordinates, summed with the attention weights.

    Args:
        value: [N, S, M, D] values of all levels flattened (S = Σ H_l·W_l).
        spatial_shapes: (H_l, W_l) of each level, in the order of ``value``.
        pix: [N, Lq, M, 2 (x, y), L·P] pixel coordinates in which the centre of pixel i
            lies at i + 1 (normalised location · size + 0.5), points in level order; any
            value (far outside reads zeros, NaN gives NaN).
        attn: [N, Lq, M, L·P] attention weights.

    Returns:
        [N, Lq, M·D] in the dtype of ``value``.
    """
    n, _, m, d = value.shape
    _, lq, _, _, lp = pix.shape
    num_levels = len(spatial_shapes)
    num_points = lp // num_levels
    if num_levels * num_points != lp:
        raise ValueError(f"{lp} points per head for {num_levels} levels")
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
    one_op = _CORNER_SUM_OP.get()

    def per_point(per_level: list[list[int]], dtype: torch.dtype) -> Tensor:
        return _per_point(per_level, num_points, m, dtype, device)

    upper = per_point([[w + 1, h + 1] for h, w in spatial_shapes], compute)  # [M, 2, L·P]
    # steps[a·LP + j, j]: the table-row step of one padded pixel along axis a at point j.
    axis_steps = per_point([[m, (w + 3) * m] for _, w in spatial_shapes], compute)[0]
    steps = torch.eye(lp, dtype=compute, device=device).repeat(2, 1)
    steps = steps * axis_steps.reshape(2 * lp, 1)
    # Row of padded pixel (0, 0) of level l, batch b, head h: (b·S' + start_l)·M + h.
    base = (per_point([[start * m] for start in starts], torch.int64)
            + torch.arange(m, device=device).view(m, 1, 1)
            + torch.arange(n, device=device).view(n, 1, 1, 1) * (padded.shape[1] * m))
    base = base.view(n, 1, m, lp)
    # Corners (y, x) in {0, 1}²: the top-left's row + y·(step y) + x·(step x), [4, L·P].
    step_x, step_y = axis_steps.to(torch.int64)
    corners = torch.stack([torch.zeros_like(step_x), step_x, step_y, step_y + step_x])

    # Clamped into [0, size + 1]: the corners p0 and p0 + 1 then lie in the padded map, and
    # a point clamped from further out (or infinite) falls on its zero border.
    xy = torch.minimum(pix.to(compute).clamp(min=0.0), upper)
    p0 = xy.floor()
    frac = (xy - p0).view(-1, 2, lp)  # NaN for a NaN coordinate: NaN weights, NaN out
    # Top-left rows, Σ_axes p0 · step: exact in float (integers below 2**24). A NaN
    # coordinate makes its (query, head)'s rows NaN: they read row 0 (with NaN weights).
    rows = torch.matmul(p0.view(n, lq, m, 2 * lp), steps)
    rows = (torch.where(rows == rows, rows, 0.0).to(torch.int64) + base).view(-1, lp)
    attn = attn.to(compute).reshape(-1, 1, lp)

    if one_op:
        fx, fy = frac[:, 0:1], frac[:, 1:2] * attn
        weights = (torch.cat((attn - fy, fy), 1)[:, :, None]
                   * torch.cat((1 - fx, fx), 1)[:, None]).view(-1, 4 * lp)  # (y, x, L·P)
        out = corner_sum(table, (rows[:, None] + corners).view(-1, 4 * lp), weights)
        return out.view(n, lq, m * d).to(value.dtype)

    total = n * lq * m
    outs = []
    for i in range(PIECES):
        # Bounds computed, not tensor_split's, which would fix the rows' remainder modulo
        # PIECES while exporting.
        lo, hi = i * total // PIECES, (i + 1) * total // PIECES
        index = rows[lo:hi, None] + corners  # [rows, 4, L·P]
        f, a = frac[lo:hi], attn[lo:hi]
        fx, fy = f[:, 0:1], f[:, 1:2] * a
        wx = torch.cat((1 - fx, fx), 1)  # [rows, 2 x, L·P]
        wy = torch.cat((a - fy, fy), 1)  # [rows, 2 y, L·P], attention included
        weights = wy[:, :, None] * wx[:, None]  # [rows, 2 y, 2 x, L·P]
        gathered = table.index_select(0, index.reshape(-1)).view(-1, 4 * lp, d)
        outs.append(torch.matmul(weights.view(-1, 1, 4 * lp), gathered).view(-1, d))
    return torch.cat(outs).view(n, lq, m * d).to(value.dtype)
