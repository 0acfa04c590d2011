"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in pure PyTorch.

No compiled extension: bilinear sampling is done with ``F.grid_sample`` and runs on
CPU and CUDA alike, for float64, float32, bfloat16 and float16 inputs. Half-precision
inputs are sampled in float32 (sampling locations need more than bf16's 8 mantissa bits
to address a pixel of a 100-wide map), and the result is cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32 and anything narrower is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


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
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    compute = _compute_dtype(value.dtype)
    # grid_sample wants [-1, 1] coordinates and a (batch·head) leading dimension.
    grids = (2 * sampling_locations.to(compute) - 1).transpose(1, 2).flatten(0, 1)
    # grids: [N·M, Lq, L, P, 2]
    weights = attention_weights.to(compute).transpose(1, 2).flatten(0, 1)
    # weights: [N·M, Lq, L, P]
    sizes = [h * w for h, w in spatial_shapes]
    out = None
    for level, (v, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes)):
        # v: [N, H·W, M, D] -> [N·M, D, H, W]
        v = v.to(compute).permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        sampled = F.grid_sample(
            v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        # sampled: [N·M, D, Lq, P]; weight the points and sum them on the fly, so the
        # [N·M, D, Lq, L·P] stack the naive version builds is never materialised.
        contrib = torch.einsum("bdqp,bqp->bdq", sampled, weights[:, :, level])
        out = contrib if out is None else out + contrib
    assert out is not None
    # out: [N·M, D, Lq] -> [N, Lq, M·D]
    out = out.reshape(n, m * d, lq).transpose(1, 2)
    return out.to(value.dtype).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the original's parameter names.

    Args:
        dim: model width. num_heads: attention heads (dim must divide).
        num_levels: feature levels. num_points: sampling points per head and level.
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, num_heads: int = 8,
                 num_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_levels, self.num_heads, self.num_points = (
            dim, num_levels, num_heads, num_points)
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
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
        n, lq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, value.shape[1], heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points)
        weights = weights.to(_compute_dtype(weights.dtype)).softmax(-1)
        weights = weights.view(n, lq, heads, levels, points)
        compute = _compute_dtype(reference_points.dtype)
        offsets = offsets.to(compute)
        reference_points = reference_points.to(compute)
        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (W_l, H_l).
            normalizer = torch.tensor(
                [[w, h] for h, w in spatial_shapes], dtype=compute, device=query.device)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # Offsets are fractions of half the box, spread over the points.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape}")
        out = ms_deform_attn(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
