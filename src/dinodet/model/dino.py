"""The DINO detector: backbone → deformable encoder → mixed query selection → decoder."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinodet.config import DINOConfig
from dinodet.model.backbone import build_backbone
from dinodet.model.boxes import inverse_sigmoid
from dinodet.model.denoising import DenoisingQueries, build_denoising_queries
from dinodet.model.heads import box_head, class_head, init_box_head, init_class_head
from dinodet.model.ms_deform_attn import Backend, MSDeformAttn, resolve_backend
from dinodet.model.position import sine_feature_embedding
from dinodet.model.query_selection import QuerySelection
from dinodet.model.transformer import Decoder, Encoder
from dinodet.structures import ImageBatch

Targets = list[dict[str, Tensor]]


def _check_image(im: Any, name: str, rank: int = 3) -> None:
    """Validate one [3, H, W] image (``rank`` 3) or a [B, 3, H, W] batch (``rank`` 4)."""
    if not isinstance(im, Tensor):
        raise TypeError(f"{name} is a {type(im).__name__}, expected a torch.Tensor")
    if im.dim() != rank:
        raise ValueError(f"{name} has rank {im.dim()} (shape {tuple(im.shape)}); expected "
                         + ("[B, 3, H, W]" if rank == 4 else "[3, H, W]"))
    if im.shape[-3] != 3:
        raise ValueError(f"{name} has {im.shape[-3]} channels (shape {tuple(im.shape)}); "
                         "expected 3 (RGB, ImageNet-normalised)")
    if not im.is_floating_point():
        raise TypeError(f"{name} has dtype {im.dtype}; expected a floating-point "
                        "ImageNet-normalised tensor (convert uint8 with dinodet's transforms)")
    if im.shape[-2] < 1 or im.shape[-1] < 1:
        raise ValueError(f"{name} is empty: shape {tuple(im.shape)}")


def check_images(images: Any) -> list[Tensor] | Tensor:
    """Validate the model input: a list of [3, H, W] floating-point tensors (returned as a
    list) or a [B, 3, H, W] batch (returned as is, never split: tracing keeps B symbolic)."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"images must be a list of [3, H, W] tensors or a [B, 3, H, W] batch; "
                f"got a tensor of shape {tuple(images.shape)}")
        _check_image(images, "images", rank=4)
        return images
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError(f"images must be a non-empty list of [3, H, W] tensors, got {images!r}")
    for i, im in enumerate(images):
        _check_image(im, f"images[{i}]")
    return list(images)


def valid_ratios(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, H, W] padding mask -> [B, 2] (w, h) fraction that is image."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype) / h
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype) / w
    return torch.stack([valid_w, valid_h], -1)


class DINO(nn.Module):
    """DINO with a ResNet or Swin backbone.

    ``forward(images, targets=None)`` takes a list of ImageNet-normalised [3, H, W] tensors
    and returns ``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4] (normalised cxcywh),
    ``aux_outputs`` (earlier decoder layers) and ``interm_outputs`` (the encoder's selected
    proposals). In training mode with targets (a list of dicts with ``labels`` [n] and
    normalised cxcywh ``boxes`` [n, 4]) it adds ``dn_outputs`` for contrastive denoising.
    """

    def __init__(self, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_dim
        self.backbone = build_backbone(cfg.backbone)
        in_channels: list[int] = list(self.backbone.out_channels)  # type: ignore[arg-type]
        convs = [nn.Conv2d(c, dim, 1) for c in in_channels]
        c = in_channels[-1]
        for _ in range(cfg.num_feature_levels - len(in_channels)):
            convs.append(nn.Conv2d(c, dim, 3, stride=2, padding=1))
            c = dim
        self.input_proj = nn.ModuleList(nn.Sequential(conv, nn.GroupNorm(32, dim))
                                        for conv in convs)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, dim))
        # Resolved once for every MSDeformAttn (the environment variable is read here only).
        layer_kwargs: dict[str, Any] = dict(
            ffn_dim=cfg.dim_feedforward, dropout=cfg.dropout,
            num_levels=cfg.num_feature_levels, num_heads=cfg.num_heads,
            attention_backend=resolve_backend(cfg.attention_backend))
        self.encoder = Encoder(cfg.enc_layers, dim=dim, num_points=cfg.enc_points,
                               **layer_kwargs)
        self.query_selection = QuerySelection(dim, cfg.num_classes, cfg.num_queries,
                                              cfg.query_selection, cfg.mask_padded_proposals)
        self.decoder = Decoder(cfg.dec_layers, dim, cfg.look_forward_twice,
                               num_points=cfg.dec_points, **layer_kwargs)
        # One class head and one box MLP shared by every decoder layer.
        self.class_head = class_head(dim, cfg.num_classes)
        self.box_head = box_head(dim)
        self.label_embed = nn.Embedding(cfg.labelbook_size + 1, dim)
        self.reset_parameters()

    # Parameters of the query selection that the original keeps outside its transformer
    # when that resets: its enc_out_class_embed / enc_out_bbox_embed are assigned later.
    _QUERY_HEADS = ("query_selection.class_head.", "query_selection.box_head.")

    def named_transformer_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters the original holds in its ``transformer`` when that runs its
        ``_reset_parameters``: ``level_embed``, the encoder, the decoder (its layers, final
        norm and ``ref_point_head``) and the query selection (``enc_output`` and its norm,
        the content table ``tgt_embed``, static mode's anchor table ``refpoint_embed``)
        without its two heads. The shared class/box heads and the encoder's copies of
        them are assigned into the original's transformer only after that reset, so they
        are not part of it (nor, in dinodet, of the encoder or decoder modules)."""
        for name, p in self.named_parameters():
            if name == "level_embed" or name.startswith(("encoder.", "decoder.")) or (
                    name.startswith("query_selection.")
                    and not name.startswith(self._QUERY_HEADS)):
                yield name, p

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter outside the backbone as the original DINO does
        (the backbone is left alone: it loads pretrained weights). Run by ``__init__``;
        calling it again re-draws the same rules.

        1. PyTorch's defaults first: Linear and Conv2d weights and biases uniform in
           ±1/sqrt(fan_in) (kaiming-uniform with a = √5), LayerNorm / GroupNorm weight 1 and
           bias 0, Embedding N(0, 1).
        2. The transformer (:meth:`named_transformer_parameters`, the original's
           ``DeformableTransformer._reset_parameters``): xavier-uniform on every tensor with
           more than one dimension: FFN linear1 / linear2, the decoder self-attention's
           ``in_proj_weight`` and ``out_proj.weight``, ``ref_point_head``, ``enc_output``,
           the 900×256 content table (std ≈ 0.042) and, in static mode, the anchor table;
           mode "pure" has no table. Then every deformable attention's own
           :meth:`~dinodet.model.ms_deform_attn.MSDeformAttn.reset_parameters` (offsets 0
           with the direction-fan bias, attention weights 0, value / output projections
           xavier-uniform with bias 0), then ``level_embed`` N(0, 1). One-dimensional
           tensors keep step 1 (norms 1 / 0, Linear biases uniform), except the
           self-attention's ``in_proj_bias`` and ``out_proj.bias``: 0, as
           ``nn.MultiheadAttention`` sets them.
        3. Heads, outside the transformer: the class head keeps the default weight with
           bias −log((1−0.01)/0.01); the box MLP the default except its last layer, zero
           weight and bias. The encoder's class and box heads (the original's
           ``enc_out_class_embed`` / ``enc_out_bbox_embed``, deep copies) start equal to
           them.
        4. ``input_proj``: convolutions xavier-uniform (gain 1) with bias 0, GroupNorm as
           step 1; ``label_embed`` (the denoising label table) N(0, 1) from step 1.
        """
        # 1. PyTorch's defaults (MSDeformAttn's own reset comes in step 2).
        for name, part in self.named_children():
            if name == "backbone":
                continue
            for m in part.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset) and not isinstance(m, MSDeformAttn):
                    reset()
        # 2. The transformer.
        for _, p in self.named_transformer_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.MultiheadAttention):
                assert m.in_proj_bias is not None and m.out_proj.bias is not None
                nn.init.zeros_(m.in_proj_bias)
                nn.init.zeros_(m.out_proj.bias)
            elif isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        # 3. Heads, and the encoder's copies of them.
        init_class_head(self.class_head)
        init_box_head(self.box_head)
        self.query_selection.class_head.load_state_dict(self.class_head.state_dict())
        self.query_selection.box_head.load_state_dict(self.box_head.state_dict())
        # 4. Input projections.
        for conv in self.input_proj.modules():
            if isinstance(conv, nn.Conv2d):
                assert conv.bias is not None
                nn.init.xavier_uniform_(conv.weight, gain=1)
                nn.init.zeros_(conv.bias)

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def _deform_attns(self) -> list[MSDeformAttn]:
        return [m for m in self.modules() if isinstance(m, MSDeformAttn)]

    @property
    def attention_backend(self) -> Backend:
        """The backend of every :class:`MSDeformAttn` of the model (a name or a callable);
        ValueError if they were set apart and differ."""
        backends = [m.backend for m in self._deform_attns()]
        first = backends[0]
        if any(b is not first and b != first for b in backends[1:]):
            raise ValueError(f"the model's MSDeformAttn modules have different backends "
                             f"{backends}; set one with set_attention_backend")
        return first

    def set_attention_backend(self, backend: Backend | None) -> None:
        """Set the backend of every :class:`MSDeformAttn` (as in
        :func:`~dinodet.model.ms_deform_attn.resolve_backend`); ``cfg`` keeps the original."""
        backend = resolve_backend(backend)  # validated before any module changes
        for m in self._deform_attns():
            m.backend = backend

    def _features(self, batch: Tensor, mask: Tensor
                  ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected maps, their padding masks and position encodings, per level."""
        feats = self.backbone(batch)
        srcs, masks = [], []
        x = feats[-1]
        for lvl, proj in enumerate(self.input_proj):
            if lvl < len(feats):
                src = proj(feats[lvl])
            else:  # extra levels: stride-2 convs on C5, then on the previous extra level
                src = proj(x)
                x = src
            srcs.append(src)
            masks.append(F.interpolate(mask[None].float(), size=src.shape[-2:])[0].bool())
        half = self.cfg.hidden_dim // 2
        pos = [sine_feature_embedding(m, half, self.cfg.pe_temperature, dtype=s.dtype)
               for s, m in zip(srcs, masks)]
        return srcs, masks, pos

    def forward(self, images: list[Tensor] | Tensor | ImageBatch, targets: Targets | None = None,
                denoising: DenoisingQueries | None = None) -> dict[str, Any]:
        """Detect. ``images``: a list of [3, H, W] tensors, a [B, 3, H, W] tensor or an
        already padded :class:`ImageBatch`. ``denoising`` feeds pre-built denoising
        queries (tests, analysis)."""
        if isinstance(images, ImageBatch):
            check_images(images.tensors)
        else:
            checked = check_images(images)
            images = (ImageBatch.unpadded(checked) if isinstance(checked, Tensor)
                      else ImageBatch.from_images(checked))
        batch, mask = images.tensors, images.mask
        if not torch.is_autocast_enabled(batch.device.type):
            batch = batch.to(self.level_embed.dtype)
        srcs, masks, pos = self._features(batch, mask)

        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([(p.flatten(2).transpose(1, 2) + self.level_embed[lvl].to(p.dtype))
                              for lvl, p in enumerate(pos)], 1)
        ratios = torch.stack([valid_ratios(m, src_flat.dtype) for m in masks], 1)  # [B, L, 2]

        memory = self.encoder(src_flat, pos_flat, spatial_shapes, ratios, mask_flat)
        selected = self.query_selection(memory, mask_flat, spatial_shapes)

        if denoising is None and self.training and targets is not None \
                and self.cfg.denoising != "off" and self.cfg.dn_number > 0:
            denoising = build_denoising_queries(
                targets, self.label_embed, num_queries=selected.content.shape[1],
                num_classes=self.cfg.num_classes, num_dn=self.cfg.dn_number,
                label_noise_ratio=self.cfg.dn_label_noise_ratio,
                box_noise_scale=self.cfg.dn_box_noise_scale,
                positives_only=self.cfg.denoising == "positives_only")
        tgt, anchors, attn_mask, num_dn = selected.content, selected.anchor_logits, None, 0
        if denoising is not None and denoising.pad_size > 0:
            num_dn = denoising.pad_size
            tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], 1)
            anchors = torch.cat([denoising.anchor_logits.to(anchors.dtype), anchors], 1)
            attn_mask = denoising.attn_mask

        hidden, refs = self.decoder(tgt, anchors, memory, spatial_shapes, ratios, mask_flat,
                                    attn_mask, self.box_head)
        logits = [self.class_head(h) for h in hidden]
        boxes = [(self.box_head(h) + inverse_sigmoid(r)).sigmoid()
                 for h, r in zip(hidden, refs[:-1])]

        def layer_outputs(i: int, part: slice) -> dict[str, Tensor]:
            return {"pred_logits": logits[i][:, part], "pred_boxes": boxes[i][:, part]}

        match = slice(num_dn, None)
        out: dict[str, Any] = layer_outputs(-1, match)
        out["aux_outputs"] = [layer_outputs(i, match) for i in range(len(hidden) - 1)]
        if selected.interm_logits is not None:
            out["interm_outputs"] = {"pred_logits": selected.interm_logits,
                                     "pred_boxes": selected.interm_boxes}
        if num_dn:
            assert denoising is not None
            dn = slice(0, num_dn)
            out["dn_outputs"] = {
                **layer_outputs(-1, dn),
                "aux_outputs": [layer_outputs(i, dn) for i in range(len(hidden) - 1)],
                "dn_meta": denoising.dn_meta,
            }
        return out
