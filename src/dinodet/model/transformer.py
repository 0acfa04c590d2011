"""Deformable encoder and the DINO decoder (look-forward-twice box refinement)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinodet.model.boxes import inverse_sigmoid
from dinodet.model.heads import MLP
from dinodet.model.linear import Linear, linear_relu
from dinodet.model.ms_deform_attn import Backend, MSDeformAttn, resolve_backend
from dinodet.model.position import sine_box_embedding
from dinodet.model.tracing import exporting


def add_norm(norm: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``norm(x + y)``; while exporting, the sum is reshaped to rows before the norm, which
    keeps onnxruntime from fusing the Add and the LayerNormalization into its
    SkipLayerNormalization: on CPU that kernel took 3.4-4x the time of the two ops (62-89
    against 18-25 ms for [1, 18071, 256] on 2 threads, alternating in one run), 0.4-0.5 s of
    an 800×1088 image's 12 encoder norms."""
    total = x + y
    if exporting():
        return norm(total.reshape(-1, total.shape[-1])).view(total.shape)
    return norm(total)


class FFN(nn.Module):
    """Linear → ReLU → Linear, added back and layer-normed (post-norm).

    On CPU, tokens go in chunks of about ``CPU_CHUNK_ELEMENTS`` hidden activations: for the
    18k tokens of an 800×1088 image's encoder, the [18k, 2048] hidden layer would be a fresh
    150 MB written and read back in every layer, while an 8 MB chunk is recycled and stays in
    cache (about 30 % faster per FFN with 2 threads). Ops are row-wise: chunks change nothing.
    """

    CPU_CHUNK_ELEMENTS = 2**21

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = Linear(dim, hidden)
        self.linear2 = Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def _block(self, x: Tensor) -> Tensor:
        h = linear_relu(self.linear1, x)
        y = self.dropout(self.linear2(self.dropout(h)))
        return add_norm(self.norm, x, y)

    def forward(self, x: Tensor) -> Tensor:
        rows = max(1, self.CPU_CHUNK_ELEMENTS // self.linear1.out_features)
        # Chunks only pay without autograd, which keeps every chunk's hidden layer anyway
        # (and the split and cat would cost a copy of each).
        if (x.device.type != "cpu" or x.dim() < 2 or exporting() or x.shape[-2] <= rows
                or (torch.is_grad_enabled() and x.requires_grad)):
            return self._block(x)
        return torch.cat([self._block(part) for part in x.split(rows, dim=-2)], dim=-2)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels → add & norm → FFN."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int,
                 num_heads: int, num_points: int,
                 attention_backend: Backend | None = None) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points,
                                      backend=attention_backend)
        self.dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: Tensor | None) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = add_norm(self.self_attn_norm, src, self.dropout(attn))
        return self.ffn(src)


class Encoder(nn.Module):
    """``num_layers`` :class:`EncoderLayer`; ``layer_kwargs`` are theirs. Every layer's
    :class:`MSDeformAttn` gets ``attention_backend`` (None: the environment variable
    ``DINODET_MS_DEFORM_ATTN``, else ``"auto"``, read once here)."""

    def __init__(self, num_layers: int, *, attention_backend: Backend | None = None,
                 **layer_kwargs) -> None:
        super().__init__()
        backend = resolve_backend(attention_backend)
        self.layers = nn.ModuleList(EncoderLayer(attention_backend=backend, **layer_kwargs)
                                    for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Cell centres of every level normalised by the valid size, seen from every level.

        Args:
            valid_ratios: [B, L, 2] (w, h) fraction of each level that is not padding.
        Returns:
            [B, S, L, 2].
        """
        refs = []
        dtype, device = valid_ratios.dtype, valid_ratios.device
        for lvl, (h, w) in enumerate(spatial_shapes):
            # arange (exact for these half-integers) keeps h and w symbolic when exported,
            # where linspace would fix them.
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=dtype, device=device) + 0.5,
                torch.arange(w, dtype=dtype, device=device) + 0.5,
                indexing="ij",
            )
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((xs, ys), -1))
        ref = torch.cat(refs, 1)
        return ref[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: list[tuple[int, int]],
                valid_ratios: Tensor, padding_mask: Tensor | None) -> Tensor:
        """src, pos: [B, S, D]; padding_mask: [B, S]. Returns memory [B, S, D]."""
        ref = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Self-attention among queries → deformable cross-attention → FFN, each post-norm."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_levels: int,
                 num_heads: int, num_points: int,
                 attention_backend: Backend | None = None) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_levels, num_heads, num_points,
                                       backend=attention_backend)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]], memory_padding_mask: Tensor | None,
                self_attn_mask: Tensor | None) -> Tensor:
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = add_norm(self.self_attn_norm, tgt, self.dropout(attn))
        attn = self.cross_attn(tgt + query_pos, reference_boxes, memory, spatial_shapes,
                               memory_padding_mask)
        tgt = add_norm(self.cross_attn_norm, tgt, self.dropout(attn))
        return self.ffn(tgt)


class Decoder(nn.Module):
    """Decoder layers that refine anchor boxes layer by layer (``attention_backend`` as in
    :class:`Encoder`). ``box_head`` is the detector's shared box MLP; ``look_forward_twice``
    keeps each refined box in the graph as the next layer's reference for the loss, so layer
    i's box loss also trains layer i−1."""

    def __init__(self, num_layers: int, dim: int, look_forward_twice: bool = True, *,
                 attention_backend: Backend | None = None, **layer_kwargs) -> None:
        super().__init__()
        backend = resolve_backend(attention_backend)
        self.layers = nn.ModuleList(
            DecoderLayer(dim=dim, attention_backend=backend, **layer_kwargs)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.ref_point_head = MLP(2 * dim, dim, dim, 2)
        self.look_forward_twice = look_forward_twice
        self.dim = dim

    def forward(self, tgt: Tensor, anchor_logits: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor,
                memory_padding_mask: Tensor | None, self_attn_mask: Tensor | None,
                box_head: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """Run all layers.

        Args:
            tgt: [B, Q, D] content queries. anchor_logits: [B, Q, 4] σ⁻¹ of the anchors.
            memory: [B, S, D]. valid_ratios: [B, L, 2]. self_attn_mask: [Q, Q] bool.
        Returns:
            (hidden states, references): ``hidden[i]`` [B, Q, D] is layer i's normed output;
            ``references[i]`` [B, Q, 4] the box layer i's prediction refines.
        """
        boxes = anchor_logits.sigmoid()
        references = [boxes]
        hidden = []
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        for layer in self.layers:
            ref_input = boxes[:, :, None] * ratios  # [B, Q, L, 4]
            query_pos = self.ref_point_head(
                sine_box_embedding(ref_input[:, :, 0, :], self.dim // 2))
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, memory_padding_mask,
                        self_attn_mask)
            # The refinement that moves the anchor reads the layer's raw output.
            refined = (box_head(tgt) + inverse_sigmoid(boxes)).sigmoid()
            boxes = refined.detach()
            references.append(refined if self.look_forward_twice else boxes)
            hidden.append(self.norm(tgt))
        return hidden, references
