"""Mixed query selection: anchors from the encoder's best proposals, learned content."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinodet.model.heads import box_head, class_head
from dinodet.model.linear import Linear


@dataclass
class SelectedQueries:
    """What the encoder hands the decoder (Q = number of queries).

    content: [B, Q, D] content queries. anchor_logits: [B, Q, 4] σ⁻¹ of the anchors
    (detached). interm_logits / interm_boxes: [B, Q, C] / [B, Q, 4] predictions of the
    encoder heads for the selected tokens (the two-stage loss); None for static anchors.
    init_boxes: [B, Q, 4] the selected proposals before the box head.
    """

    content: Tensor
    anchor_logits: Tensor
    interm_logits: Tensor | None = None
    interm_boxes: Tensor | None = None
    init_boxes: Tensor | None = None


def encoder_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: list[tuple[int, int]]
                      ) -> tuple[Tensor, Tensor]:
    """One proposal box per encoder token.

    Centre = (cell + 0.5) / valid size, w = h = 0.05·2^level, in logit space; proposals on
    padding or outside (0.01, 0.99) get +inf and their memory is zeroed.

    Args:
        memory: [B, S, D]; padding_mask: [B, S] True on padding.
    Returns:
        (memory with invalid tokens zeroed [B, S, D], proposal logits [B, S, 4]).
    """
    b = memory.shape[0]
    dtype, device = memory.dtype, memory.device
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(b, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                torch.arange(w, dtype=dtype, device=device), indexing="ij")
        grid = torch.stack([xs, ys], -1)  # [H, W, 2]
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2).to(dtype)
        grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * 2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    boxes = torch.cat(proposals, 1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True)
    invalid = padding_mask[..., None] | ~valid
    logits = torch.log(boxes / (1 - boxes)).masked_fill(invalid, float("inf"))
    return memory.masked_fill(invalid, 0.0), logits


class QuerySelection(nn.Module):
    """Pick the top-Q encoder tokens as anchors.

    mode "mixed": anchors from the encoder, content from a learned embedding (DINO).
    mode "pure": content from the selected encoder tokens too (detached).
    mode "static": learned anchors and content, no selection (a DAB-DETR-style ablation).

    Built on its own, its layers have PyTorch's default init; :meth:`DINO.reset_parameters
    <dinodet.model.dino.DINO.reset_parameters>` gives them the original's.
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int, mode: str = "mixed",
                 mask_padded: bool = False) -> None:
        super().__init__()
        self.mode, self.num_queries, self.mask_padded = mode, num_queries, mask_padded
        self.enc_output = Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.class_head = class_head(dim, num_classes)
        self.box_head = box_head(dim)
        # Learned content (the original's tgt_embed) and, static mode only, learned anchor
        # logits (its refpoint_embed). Both are xavier-uniform tables once the model is
        # built: see DINO.reset_parameters, which initialises this module in a detector.
        self.content = nn.Embedding(num_queries, dim) if mode != "pure" else None
        self.anchors = nn.Embedding(num_queries, 4) if mode == "static" else None

    def forward(self, memory: Tensor, padding_mask: Tensor,
                spatial_shapes: list[tuple[int, int]]) -> SelectedQueries:
        b = memory.shape[0]
        if self.mode == "static":
            assert self.content is not None and self.anchors is not None
            return SelectedQueries(
                content=self.content.weight[None].expand(b, -1, -1).to(memory.dtype),
                anchor_logits=self.anchors.weight[None].expand(b, -1, -1).to(memory.dtype))
        out_memory, proposals = encoder_proposals(memory, padding_mask, spatial_shapes)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        logits = self.class_head(out_memory)  # [B, S, C]
        box_logits = self.box_head(out_memory) + proposals  # [B, S, 4]
        scores = logits.max(-1)[0]
        if self.mask_padded:
            scores = scores.masked_fill(padding_mask, float("-inf"))
        k = min(self.num_queries, scores.shape[1])
        topk = torch.topk(scores, k, dim=1)[1]  # [B, Q]

        def gather(x: Tensor) -> Tensor:
            return torch.gather(x, 1, topk[..., None].expand(-1, -1, x.shape[-1]))

        anchors_undetached = gather(box_logits)
        selected_memory = gather(out_memory)
        if self.mode == "pure":
            content = selected_memory.detach()
        else:
            assert self.content is not None
            content = self.content.weight[None, :k].expand(b, -1, -1).to(memory.dtype)
        return SelectedQueries(
            content=content,
            anchor_logits=anchors_undetached.detach(),
            interm_logits=gather(logits),
            interm_boxes=anchors_undetached.sigmoid(),
            init_boxes=gather(proposals).sigmoid(),
        )
