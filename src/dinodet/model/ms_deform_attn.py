"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in pure PyTorch.

Bilinear sampling of all levels and points is one weighted gather,
``F.embedding_bag(mode="sum", per_sample_weights=...)`` over a table of N·S·M rows of D
contiguous values: each (batch, query, head) output sums, over its L·P points and their 4
corners, the corner's row times (bilinear weight × attention weight); corners outside a map
weigh 0 (``grid_sample``'s ``padding_mode="zeros"``, ``align_corners=False``). Unlike one
``F.grid_sample`` per level on a [N·M, D, H, W] map, it reads D contiguous values per corner,
not D values H·W apart, and needs no permuted copy of the values nor a stack of the sampled
points: 74 ms instead of 570 ms on 2 CPU threads for the encoder of an 800×1088 image (18k
queries, 8 heads, 4 levels, 4 points, float32). Autograd differentiates it in the values,
locations and attention weights (``embedding_bag``'s backward gives the dense table and the
per-sample weights, which are smooth in the locations within a pixel cell).

CUDA runs the same ops in large chunks (not timed on a GPU): ``embedding_bag(mode="sum")``
has a deterministic CUDA backward, whereas ``grid_sample``'s raises under
``torch.use_deterministic_algorithms(True)`` (per PyTorch's documentation), and the rows are
contiguous there too. :func:`ms_deform_attn_grid_sample` keeps ``grid_sample`` as a reference.
float64, float32, bfloat16 and float16 work; half precision is sampled in float32 (bf16's 8
mantissa bits cannot address a pixel of a 100-wide map) and cast back.

Each :class:`MSDeformAttn` has a reassignable ``backend`` (``backend=``; for a whole model
``DINOConfig.attention_backend`` and ``DINO.set_attention_backend``): ``"auto"`` takes the
Triton kernels (:mod:`.ms_deform_attn_triton`, the custom op ``torch.ops.dinodet.ms_deform_attn``)
for CUDA values when triton is installed and deterministic algorithms are off, ``"triton"`` on
any device (CPU tensors under Triton's interpreter, for tests), ``"torch"`` never; float64
always stays on the exact PyTorch path. A callable with the signature of
:func:`ms_deform_attn` replaces the sampling (research, benchmark baselines). ``None`` reads
``DINODET_MS_DEFORM_ATTN`` at construction only, else ``"auto"``. :func:`ms_deform_attn`
itself is always the PyTorch path.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinodet.model import ms_deform_attn_triton
from dinodet.model.linear import Linear, linear
from dinodet.model.tracing import exporting
from dinodet.structures import to_device

# Sampled corners (N·q·M·L·P·4) per chunk of queries. On CPU a chunk's index and weight
# temporaries (1 MB each) stay in cache and are recycled by the allocator, where at full
# size (9M corners for the encoder of an 800×1088 image) every op would write fresh
# memory; 2**17 to 2**19 measured alike. On CUDA, chunks only bound the memory; small ones
# would make it launch-bound.
_CPU_CHUNK_CORNERS = 2**18
# When autograd records, every chunk's backward builds a gradient of the whole value table
# (a bag per table row) that autograd then sums over the chunks: the fewer the chunks, the
# less that costs. 2**23 corners (one chunk per encoder layer of a batch of 2 at 512×512)
# ran one attention layer's forward and backward 3.5× faster than 2**20 on 2 threads;
# the extra temporaries (about 40 bytes per corner) are transient.
_CPU_CHUNK_CORNERS_GRAD = 2**23
_CUDA_CHUNK_CORNERS = 2**25
# CPU training through _SampleCPU (closed-form backward) instead of autograd through the
# corner arithmetic.
CLOSED_FORM_BACKWARD = True


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and anything narrower is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


class _Sampler:
    """Bilinear sampling of one value tensor at chunks of queries.

    Coordinates are handled "planar": [N, q, M, axis (x, y), L·P], with per-level constants
    materialised at [M, axis, L·P], so that every elementwise op broadcasts over (N, q)
    with long contiguous inner loops (a trailing size-2 (x, y) dimension or a broadcast
    [L, 1, 2] constant make PyTorch's CPU loops run a few elements at a time).
    """

    def __init__(self, value: Tensor, spatial_shapes: list[tuple[int, int]],
                 num_points: int) -> None:
        n, s, m, d = value.shape
        num_levels = len(spatial_shapes)
        if sum(h * w for h, w in spatial_shapes) != s:
            raise ValueError(f"spatial shapes {spatial_shapes} do not add up to {s} values")
        self.n, self.m, self.d = n, m, d
        self.num_levels, self.num_points = num_levels, num_points
        self.lp = lp = num_levels * num_points
        self.compute = compute = _compute_dtype(value.dtype)
        self.device = device = value.device
        # [N·S·M, D]: a view unless value is half precision or not contiguous.
        self.table = value.to(compute).reshape(n * s * m, d)
        self.idx_dtype = idx = torch.int32 if n * s * m < 2**31 else torch.int64

        def per_level(xy: list[list[int]], dtype: torch.dtype) -> Tensor:
            # xy[l] = [x value, y value] -> [M, 2, L·P], contiguous.
            t = torch.tensor(xy, dtype=dtype, device=device).t()[:, :, None]
            t = t.expand(2, num_levels, num_points).reshape(1, 2, lp)
            return t.expand(m, 2, lp).contiguous()

        # Per level (W, H) as [M, axis, L·P].
        self.sizes = per_level([[w, h] for h, w in spatial_shapes], compute)
        # Last pixel and table-row step (one pixel along x, along y) as [M, corner, 2, L·P].
        self.last = (self.sizes - 1)[:, None].expand(m, 2, 2, lp).contiguous()
        self.steps = per_level([[m, w * m] for _, w in spatial_shapes], idx)
        self.steps = self.steps[:, None].expand(m, 2, 2, lp).contiguous()
        # Table row of pixel (0, 0) of level l for batch b and head h: (b·S + start_l)·M + h.
        starts = [0]
        for h, w in spatial_shapes[:-1]:
            starts.append(starts[-1] + h * w)
        base = (torch.arange(n, dtype=idx, device=device).view(n, 1, 1) * (s * m)
                + torch.tensor(starts, dtype=idx, device=device).view(1, 1, num_levels) * m
                + torch.arange(m, dtype=idx, device=device).view(1, m, 1))
        base = base[..., None].expand(n, m, num_levels, num_points).reshape(n, 1, m, 1, lp)
        # Added to the y row offsets only: [N, 1, M, corner, axis, L·P], 0 for x.
        self.base = torch.stack((torch.zeros_like(base), base), 4).expand(n, 1, m, 2, 2, lp)
        self.base = self.base.contiguous()
        self.neg_half = torch.full((), -0.5, dtype=compute, device=device)
        self.minus_one = torch.full((), -1.0, dtype=compute, device=device)
        self.zero = torch.zeros((), dtype=compute, device=device)
        if device.type == "cuda":
            budget = _CUDA_CHUNK_CORNERS
        elif torch.is_grad_enabled() and value.requires_grad:
            budget = _CPU_CHUNK_CORNERS_GRAD
        else:
            budget = _CPU_CHUNK_CORNERS
        self.chunk = max(1, budget // (n * m * lp * 4))  # queries per chunk

    def pixels(self, locations: Tensor) -> Tensor:
        """[N, q, M, L, P, 2] normalised locations -> planar pixel coordinates [N, q, M, 2, L·P]
        in which pixel (i, j) of a level has its centre at (i, j)."""
        n, q = locations.shape[:2]
        xy = locations.reshape(n, q, self.m, self.lp, 2).transpose(3, 4)
        xy = xy.to(self.compute).contiguous()
        return torch.addcmul(self.neg_half, xy, self.sizes)

    def corners(self, pix: Tensor, attn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Table rows and weights of the 4 corners of every point.

        Args: planar pixel coordinates [N, q, M, 2, L·P] and attention weights
            [N, q, M, 1, L·P] (compute dtype).
        Returns: ``index`` [N·q·M, 4·L·P] table rows, ``weights`` [N, q, M, y, x, L·P]
            (bilinear × attention), ``corner_w`` [N, q, M, corner, axis, L·P] (the bilinear
            weight of each corner along each axis, 0 off the map) and ``inside``
            (same shape: 1 where that corner lies on the map along that axis, else 0).
        """
        n, q, m = pix.shape[:3]
        # Clamping to [-1, size] keeps far-away (or infinite) points finite, with weight 0. A
        # NaN coordinate reads corner -1 (a valid row) with NaN weights: NaN out, as with
        # grid_sample. p0 is piecewise constant: no gradient, so no autograd either.
        pix = torch.clamp(pix, min=self.minus_one, max=self.sizes)
        p0 = pix.detach().floor().nan_to_num_(nan=-1.0)
        frac = pix - p0
        # Corners p0 and p0 + 1 per axis, [N, q, M, corner, axis, L·P], weights 1 − frac and
        # frac. A corner outside the map (all lie in [-1, size + 1]) is clamped onto it (a
        # valid row) and is 1 or 2 off its clamp, so max(0, 1 − |corner − clamped|) zeroes
        # its weight. Floating point on purpose: comparisons make bool tensors, whose
        # conversions cost several times the arithmetic on CPU.
        corner = torch.stack((p0, p0 + 1), 3)
        corner_w = torch.stack((1 - frac, frac), 3)
        clamped = torch.clamp(corner, min=self.zero, max=self.last)
        inside = (corner - clamped).abs_().neg_().add_(1).clamp_(min=0)
        corner_w = corner_w * inside
        wy = corner_w[:, :, :, :, 1] * attn  # [N, q, M, y corner, L·P]
        weights = wy[:, :, :, :, None] * corner_w[:, :, :, None, :, 0]  # [.., y, x, L·P]
        # Table rows: x·M and base + y·W·M (base: batch, level start and head).
        rows = clamped.to(self.idx_dtype).mul_(self.steps).add_(self.base)
        index = rows[:, :, :, :, None, 1] + rows[:, :, :, None, :, 0]  # [.., y, x, L·P]
        return index.view(n * q * m, -1), weights, corner_w, inside

    def bag(self, table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        """Σ over each row of ``index`` of weight × table row: [N·q·M, D]."""
        return F.embedding_bag(index, table, mode="sum",
                               per_sample_weights=weights.reshape(index.shape))

    def sample(self, pix: Tensor, attn: Tensor) -> Tensor:
        """Planar pixel coordinates [N, q, M, 2, L·P] and attention weights [N, q, M, 1, L·P]
        (compute dtype) -> [N, q, M·D] (compute dtype)."""
        n, q = pix.shape[:2]
        if (CLOSED_FORM_BACKWARD and self.device.type == "cpu" and torch.is_grad_enabled()
                and (self.table.requires_grad or pix.requires_grad or attn.requires_grad)):
            out = _SampleCPU.apply(self.table, pix, attn, self)
        else:  # no gradient, or autograd through the ops (CUDA)
            index, weights, _, _ = self.corners(pix, attn)
            out = self.bag(self.table, index, weights)
        return out.view(n, q, self.m * self.d)


class _SampleCPU(torch.autograd.Function):
    """:meth:`_Sampler.sample` with a hand-written backward, for CPU training.

    Autograd through the corner arithmetic would keep and differentiate a dozen
    [N, q, M, 2, 2, L·P] temporaries, and ``embedding_bag``'s gradient in its per-sample
    weights gathers every corner's row; here the weights' gradient is one sampled product
    (``torch.sparse.sampled_addmm``: grad_out · table rowᵀ at each corner), from which the
    coordinates' and attention's gradients follow in closed form: with
    ``weight[y, x] = attn · w_y[y] · w_x[x]``, ``w[0] = (1 − frac)·inside[0]``,
    ``w[1] = frac·inside[1]``, ``∂/∂frac_x = Σ_y G[y, x]·attn·w_y[y]·(±inside[x])``
    (and alike for y), ``∂/∂attn = Σ G·w_y·w_x``; the clamp of the coordinates to
    [-1, size] passes the gradient inside that range only, as ``torch.clamp`` does. The
    values' gradient is an ``embedding_bag`` too, over the corners sorted by table row.
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, pix: Tensor, attn: Tensor,
                sampler: _Sampler) -> Tensor:
        index, weights, corner_w, inside = sampler.corners(pix, attn)
        passes = (pix >= sampler.minus_one) & (pix <= sampler.sizes)
        ctx.save_for_backward(table, attn, index, weights, corner_w, inside, passes)
        return sampler.bag(table, index, weights)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        table, attn, index, weights, corner_w, inside, passes = ctx.saved_tensors
        grad = grad.contiguous()
        grad_table = grad_pix = grad_attn = None
        if ctx.needs_input_grad[0]:
            # Each table row sums weight × grad over the corners that read it: the corners
            # sorted by row (a stable sort of the int32 rows, about twice as fast here as
            # embedding_bag's own backward, which sorts them as int64) make that one
            # embedding_bag over grad's rows, a bag per table row.
            per_row = index.shape[1]
            flat = index.view(-1)
            order = flat.sort(stable=True).indices
            counts = torch.bincount(flat, minlength=table.shape[0])
            grad_table = F.embedding_bag(
                order // per_row, grad, counts.cumsum(0) - counts, mode="sum",
                per_sample_weights=weights.reshape(-1)[order])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            rows, per_row = index.shape
            crow = torch.arange(0, rows * per_row + 1, per_row, dtype=index.dtype,
                                device=index.device)
            # The pattern's values must be zeros, not empty: beta=0 still multiplies them
            # (0 × a NaN of uninitialised memory is NaN).
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(
                    crow, index.view(-1), weights.new_zeros(rows * per_row),
                    (rows, table.shape[0]), check_invariants=False)
                g = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0)
            g = g.values().view(weights.shape)  # [N, q, M, y, x, L·P]
            w_x, w_y = corner_w[:, :, :, :, 0], corner_w[:, :, :, :, 1]  # [.., corner, L·P]
            t_y = (g * w_x[:, :, :, None]).sum(4)  # Σ_x G·w_x: [N, q, M, y, L·P]
            if ctx.needs_input_grad[2]:
                grad_attn = (t_y * w_y).sum(3, keepdim=True)
            if ctx.needs_input_grad[1]:
                u_x = (g * (w_y * attn)[:, :, :, :, None]).sum(3)  # Σ_y G·attn·w_y
                h_y = t_y * attn
                # ∂w[0]/∂frac = −inside[0], ∂w[1]/∂frac = inside[1], per axis.
                gx = (u_x[:, :, :, 1] * inside[:, :, :, 1, 0]
                      - u_x[:, :, :, 0] * inside[:, :, :, 0, 0])
                gy = (h_y[:, :, :, 1] * inside[:, :, :, 1, 1]
                      - h_y[:, :, :, 0] * inside[:, :, :, 0, 1])
                grad_pix = torch.stack((gx, gy), 3) * passes
        return grad_table, grad_pix, grad_attn, None


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level at its locations and sum with the attention weights.

    Args:
        value: [N, S, M, D] values of all levels flattened (S = Σ H_l·W_l), M heads of D.
        spatial_shapes: (H_l, W_l) of each of the L levels, in the order of ``value``.
        sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y) in [0, 1]; pixel centres
            sit at (i + 0.5) / W (``align_corners=False``); outside samples read zeros.
        attention_weights: [N, Lq, M, L, P], already normalised over L·P.

    Returns:
        [N, Lq, M·D] in the dtype of ``value``.
    """
    n, lq, m, num_levels, num_points, _ = sampling_locations.shape
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} levels")
    sampler = _Sampler(value, spatial_shapes, num_points)
    outs = []
    for q0 in range(0, lq, sampler.chunk):
        q1 = q0 + sampler.chunk
        attn = attention_weights[:, q0:q1].reshape(n, -1, m, 1, sampler.lp)
        pix = sampler.pixels(sampling_locations[:, q0:q1])
        outs.append(sampler.sample(pix, attn.to(sampler.compute)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.to(value.dtype)


BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "DINODET_MS_DEFORM_ATTN"
# ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights) -> [N, Lq, M·D]
AttentionFn = Callable[[Tensor, list[tuple[int, int]], Tensor, Tensor], Tensor]
Backend = str | AttentionFn


def resolve_backend(backend: Backend | None) -> Backend:
    """Validate a backend: one of :data:`BACKENDS` or a callable (returned as is); ``None``
    is ``DINODET_MS_DEFORM_ATTN``'s value if set, else ``"auto"``. Raises ValueError for an
    unknown name and RuntimeError for ``"triton"`` without triton."""
    source = ""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"
        source = f" (from the environment variable {ENV_VAR})"
    if callable(backend):
        return backend
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown deformable-attention backend {backend!r}{source}; expected "
                         f"one of {BACKENDS} or a callable like ms_deform_attn(value, "
                         "spatial_shapes, sampling_locations, attention_weights)")
    if backend == "triton" and not ms_deform_attn_triton.AVAILABLE:
        raise RuntimeError("the 'triton' deformable-attention backend needs triton installed "
                           "(pip install triton), or choose 'auto' or 'torch'")
    return backend


def uses_triton(value: Tensor, backend: Backend) -> bool:
    """Whether an :class:`MSDeformAttn` whose backend is ``backend`` (a resolved name or a
    callable) runs the Triton op for these [N, S, M, D] values (when not exporting)."""
    if callable(backend):
        return False  # the callable replaces both paths
    if value.dtype not in ms_deform_attn_triton.SUPPORTED_DTYPES:
        return False  # float64: the kernels compute in float32
    if backend == "auto":
        # The kernels' value gradient adds with atomics, in no fixed order: deterministic
        # runs keep the PyTorch path (embedding_bag's CUDA backward is deterministic).
        return (value.is_cuda and ms_deform_attn_triton.AVAILABLE
                and not torch.are_deterministic_algorithms_enabled())
    return backend == "triton"


def ms_deform_attn_grid_sample(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference implementation of :func:`ms_deform_attn` with one ``F.grid_sample`` per
    level; same arguments, same result up to rounding."""
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    compute = _compute_dtype(value.dtype)
    # grid_sample wants [-1, 1] coordinates and a (batch·head) leading dim: [N·M, Lq, L, P, 2].
    grids = (2 * sampling_locations.to(compute) - 1).transpose(1, 2).flatten(0, 1)
    weights = attention_weights.to(compute).transpose(1, 2).flatten(0, 1)  # [N·M, Lq, L, P]
    sizes = [h * w for h, w in spatial_shapes]
    out = None
    for level, (v, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        # v: [N, H·W, M, D] -> [N·M, D, H, W]
        v = v.to(compute).permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        sampled = F.grid_sample(
            v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # sampled: [N·M, D, Lq, P]; summed on the fly: no [N·M, D, Lq, L·P] stack.
        contrib = torch.einsum("bdqp,bqp->bdq", sampled, weights[:, :, level])
        out = contrib if out is None else out + contrib
    assert out is not None
    # out: [N·M, D, Lq] -> [N, Lq, M·D]
    out = out.reshape(n, m * d, lq).transpose(1, 2)
    return out.to(value.dtype).contiguous()


def _level_wh(spatial_shapes: list[tuple[int, int]], dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """[L, 2] (W, H) of every level, built on the host and moved without a device sync
    (:func:`~dinodet.structures.to_device`); while exporting, in the graph (the sizes are
    symbols there)."""
    wh = [[w, h] for h, w in spatial_shapes]
    if exporting():
        return torch.tensor(wh, dtype=dtype, device=device)
    return to_device(torch.tensor(wh, dtype=dtype), device)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the original's parameter names.

    Args:
        dim: model width. num_heads: attention heads (dim must divide).
        num_levels: feature levels. num_points: sampling points per head and level.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or a callable like :func:`ms_deform_attn`
            (see the module docstring); ``None``: ``DINODET_MS_DEFORM_ATTN``, else ``"auto"``.
            Kept, resolved, as the reassignable (and revalidated) ``backend`` attribute; a
            callable is never a submodule, even an ``nn.Module``.
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, num_heads: int = 8,
                 num_points: int = 4, backend: Backend | None = None) -> None:
        super().__init__()
        self.backend = backend
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_levels, self.num_heads, self.num_points = (
            dim, num_levels, num_heads, num_points)
        self.sampling_offsets = Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = Linear(dim, dim)
        self.output_proj = Linear(dim, dim)
        self.reset_parameters()

    _backend: Backend  # kept in __dict__ (see the setter): never a registered submodule

    @property
    def backend(self) -> Backend:
        """The resolved backend: a name of :data:`BACKENDS` or a callable."""
        return self._backend

    @backend.setter
    def backend(self, backend: Backend | None) -> None:
        # Not through nn.Module.__setattr__, so the state dict's keys never depend on it.
        self.__dict__["_backend"] = resolve_backend(backend)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ would register a Module backend as a submodule, bypassing
        # the property.
        if name == "backend":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        backend = self._backend
        name = backend if isinstance(backend, str) else getattr(backend, "__qualname__",
                                                                  repr(backend))
        return (f"dim={self.dim}, num_levels={self.num_levels}, num_heads={self.num_heads}, "
                f"num_points={self.num_points}, backend={name}")

    def reset_parameters(self) -> None:
        """Deformable DETR's init, which the original runs after its transformer-wide
        xavier pass: sampling offsets weight 0 and bias a fan of head directions (head h
        along (cos, sin)(2πh/heads) scaled to a max-norm of 1, point k reaching k+1 cells
        away, at every level); attention weights 0 (uniform attention); value and output
        projections xavier-uniform with bias 0."""
        # Offsets start as a fan of directions, point k reaching k+1 cells away.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from every query to points around its reference.

        Args:
            query: [N, Lq, dim] (position embedding already added).
            reference_points: [N, Lq, L, 2] normalised points, or [N, Lq, L, 4] boxes
                (cx, cy, w, h); offsets scale with the box size for boxes.
            value: [N, S, dim] flattened memory of all levels.
            spatial_shapes: (H_l, W_l) per level.
            padding_mask: [N, S] True on padding; those values are zeroed.

        Returns:
            [N, Lq, dim].
        """
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape}")
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(
                f"{len(spatial_shapes)} spatial shapes for {self.num_levels} levels")
        n, s = value.shape[:2]
        value = self.value_proj(value)
        if padding_mask is not None:
            # In place is safe for autograd: linear's backward does not need its output.
            value = value.masked_fill_(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.num_heads, self.dim // self.num_heads)
        if exporting():
            # torch.export / ONNX: one traceable graph without data-sized chunk loops or
            # embedding_bag (which ONNX lacks): one Gather of corner rows and a MatMul by
            # their weights (see ms_deform_attn_onnx), cheaper than GridSample per level.
            out = self._export_sample(query, reference_points, value, spatial_shapes)
        elif callable(self._backend):
            out = self._backend(value, spatial_shapes,
                                *self._locations_and_weights(query, reference_points,
                                                             spatial_shapes))
        elif uses_triton(value, self._backend):
            out = ms_deform_attn_triton.ms_deform_attn_triton(
                value, spatial_shapes,
                *self._locations_and_weights(query, reference_points, spatial_shapes))
        else:
            out = self._fused(query, reference_points, value, spatial_shapes)
        return self.output_proj(out)

    def _locations_and_weights(self, query: Tensor, reference_points: Tensor,
                               spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """[N, Lq, M, L, P, 2] sampling locations and [N, Lq, M, L, P] attention weights."""
        n, lq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points)
        weights = weights.to(_compute_dtype(weights.dtype)).softmax(-1)
        weights = weights.view(n, lq, heads, levels, points)
        compute = _compute_dtype(reference_points.dtype)
        offsets = offsets.to(compute)
        reference_points = reference_points.to(compute)
        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (W_l, H_l).
            normalizer = _level_wh(spatial_shapes, compute, query.device)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        else:
            # Offsets are fractions of half the box, spread over the points.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        return locations, weights

    def _export_sample(self, query: Tensor, reference_points: Tensor, value: Tensor,
                       spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """:func:`ms_deform_attn_onnx.sample` at pixel coordinates computed as
        :meth:`_fused` does, with the offsets' rows reordered so that their product comes
        out planar (onnxruntime folds the reordering into the weights). Returns
        [N, Lq, M·D]."""
        from dinodet.model import ms_deform_attn_onnx

        offsets_layer = self.sampling_offsets
        if not isinstance(offsets_layer, nn.Linear):  # e.g. quantised: through locations
            return ms_deform_attn_onnx.ms_deform_attn(
                value, spatial_shapes,
                *self._locations_and_weights(query, reference_points, spatial_shapes))
        n, lq, _ = query.shape
        m, levels, points = self.num_heads, self.num_levels, self.num_points
        lp = levels * points
        compute = _compute_dtype(value.dtype)
        weight = offsets_layer.weight.view(m, lp, 2, -1).transpose(1, 2).reshape(m * 2 * lp, -1)
        bias: Tensor | None = offsets_layer.bias
        if bias is not None:
            bias = bias.view(m, lp, 2).transpose(1, 2).reshape(-1)
        offsets = linear(query, weight, bias).view(n, lq, m, 2, lp).to(compute)
        weights = self.attention_weights(query).view(n, lq, m, lp).to(compute).softmax(-1)
        # Padded pixel coordinates (centre of pixel i at i + 1): location·size + 0.5, so
        #   2-d references: ref·size + 0.5 + offset;
        #   boxes: ref_xy·size + 0.5 + offset · ref_wh·size / (2P).
        # The references [N, Lq, L, c] go planar, [N, Lq, 1, c, L·P] (repeated over the
        # points), by an exact matmul with a 0/1 matrix: onnxruntime's Transpose of their
        # trailing (L, c) axes costs more than the whole attention's elementwise ops.
        c = reference_points.shape[-1]
        i = torch.arange(levels * c, device=query.device)
        j = torch.arange(c * lp, device=query.device)
        spread = ((i % c)[:, None] == j // lp) & ((i // c)[:, None] == (j % lp) // points)
        ref = torch.matmul(reference_points.to(compute).reshape(n, lq, levels * c),
                           spread.to(compute)).view(n, lq, 1, c, lp)
        sizes = ms_deform_attn_onnx.level_sizes(spatial_shapes, points, 1, compute,
                                                query.device)  # [1, 2, L·P]
        start = ref[:, :, :, :2] * sizes + 0.5
        if c == 2:
            pix = offsets + start
        else:
            pix = start + offsets * (ref[:, :, :, 2:] * (sizes * (0.5 / points)))
        return ms_deform_attn_onnx.sample(value, spatial_shapes, pix, weights)

    def _offsets_and_logits(self, query: Tensor) -> Tensor | None:
        """[N, Lq, M·L·P·2 + M·L·P]: the sampling offsets' and the attention logits' products
        as one product over all the queries, which the chunks then slice (on the 2-core Zen 3
        CPU, r50-4scale's 800x1088 inference took 7 % less time than with two products per
        chunk of queries, the same values), or None unless both layers are float
        :class:`Linear` layers of the same dtype (a quantised one, say, runs as itself)."""
        a, b = self.sampling_offsets, self.attention_weights
        if not (type(a) is Linear and type(b) is Linear and a.weight.dtype == b.weight.dtype
                and (a.bias is None) == (b.bias is None)):
            return None
        bias = None if a.bias is None else torch.cat([a.bias, b.bias])
        return linear(query, torch.cat([a.weight, b.weight]), bias)

    def _fused(self, query: Tensor, reference_points: Tensor, value: Tensor,
               spatial_shapes: list[tuple[int, int]]) -> Tensor:
        """:meth:`_locations_and_weights` and :func:`ms_deform_attn` per chunk of queries, from
        offsets straight to pixel coordinates (no full-size tensors). Returns [N, Lq, M·D]."""
        n, lq, _ = query.shape
        m, levels, points = self.num_heads, self.num_levels, self.num_points
        sampler = _Sampler(value, spatial_shapes, points)
        compute = sampler.compute
        # Pixel coordinates (centre of pixel i at i) are location·size − 0.5 with
        #   2-d references: location = ref + offset / size, so ref·size − 0.5 + offset;
        #   boxes: location = ref_xy + offset / P · ref_wh / 2,
        #          so ref_xy·size − 0.5 + offset · ref_wh·size / (2P).
        level_sizes = _level_wh(spatial_shapes, compute, query.device).t()  # [2, L]
        projected = self._offsets_and_logits(query)
        split = m * levels * points * 2
        outs = []
        for q0 in range(0, lq, sampler.chunk):
            q1 = q0 + sampler.chunk
            if projected is not None:
                both = projected[:, q0:q1]
                offsets, logits = both[..., :split], both[..., split:]
            else:
                part = query[:, q0:q1]
                offsets, logits = self.sampling_offsets(part), self.attention_weights(part)
            q = offsets.shape[1]
            offsets = offsets.reshape(n, q, m, levels * points, 2)
            offsets = offsets.transpose(3, 4).to(compute).contiguous()  # planar
            weights = logits.reshape(n, q, m, 1, levels * points).to(compute).softmax(-1)
            ref = reference_points[:, q0:q1].to(compute).transpose(2, 3)  # [N, q, 2|4, L]
            # ref_xy·size − 0.5 as [N, q, 1, 2, L·P] (repeated over the points)
            start = torch.addcmul(sampler.neg_half, ref[:, :, :2], level_sizes)
            start = start[:, :, None, :, :, None].expand(n, q, 1, 2, levels, points)
            start = start.reshape(n, q, 1, 2, levels * points)
            if ref.shape[2] == 2:
                pix = offsets.add_(start)  # in place: a fresh tensor (linear output or copy)
            else:
                scale = ref[:, :, 2:] * level_sizes * (0.5 / points)
                scale = scale[:, :, None, :, :, None].expand(n, q, 1, 2, levels, points)
                pix = torch.addcmul(start, offsets, scale.reshape(n, q, 1, 2, levels * points))
            outs.append(sampler.sample(pix, weights))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return out.to(value.dtype)
