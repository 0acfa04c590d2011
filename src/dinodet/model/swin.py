"""Swin Transformer backbone, detection variant, as used by DINO.

This computes what the original DINO Swin backbone computes for inputs of any size:

* the patch embedding zero-pads the image on the bottom/right to a multiple of the patch size;
* every block zero-pads its (normalised) feature map on the bottom/right to a multiple of the
  window size. The padded tokens are *not* masked out: they take part in attention like any
  other token (keys/values of a zero input are the qkv biases), exactly as in the original;
* odd blocks use shifted windows: a cyclic roll by ``-window_size // 2`` and an additive mask of
  ``-100`` (not ``-inf``) between tokens that come from different regions of the rolled, padded
  map. The shift is applied even when the map fits in a single window (no clamping of window or
  shift to the feature size, unlike the classification Swin);
* patch merging zero-pads odd heights/widths and concatenates the 2x2 neighbours in the order
  (top-left, bottom-left, top-right, bottom-right);
* every requested output stage gets its own LayerNorm ``norm{i}``; no absolute position
  embedding, no dropout (DINO uses rate 0), stochastic depth increasing linearly over all blocks.

Parameter names equal the original's (below ``backbone.0.`` in a DINO checkpoint).
``relative_position_index`` is derived from the window size and is a non-persistent buffer:
``state_dict()`` omits it, and ``load_state_dict`` accepts it when present after checking it
equals the derived one (a mismatch raises ``ValueError`` naming the key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinodet.model.linear import Linear

__all__ = ["SWIN_CONFIGS", "SwinTransformer", "build_swin", "check_relative_position_index",
           "drop_relative_position_index", "make_relative_position_index", "shifted_window_mask",
           "swin_large_384", "swin_toy"]

# Layouts DINO knows (embed_dim, depths, num_heads, window_size), keyed like its backbone names.
SWIN_CONFIGS: dict[str, dict] = {
    "swin_T_224_1k": dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7
    ),
    "swin_B_224_22k": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7
    ),
    "swin_B_384_22k": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
    ),
    "swin_L_224_22k": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7
    ),
    "swin_L_384_22k": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12
    ),
}

_RPI = "relative_position_index"


def make_relative_position_index(window_size: int, device: torch.device | None = None) -> Tensor:
    """Index into the relative-position bias table for each (query, key) pair of a window.

    Tokens are numbered row-major inside the window, ``t = r * ws + c``. For a pair (i, j)
    the index is ``(r_i - r_j + ws - 1) * (2 ws - 1) + (c_i - c_j + ws - 1)``.

    Returns an int64 tensor of shape ``[ws², ws²]``.
    """
    ws = window_size
    t = torch.arange(ws * ws, device=device)
    r, c = t // ws, t % ws
    dr = r[:, None] - r[None, :] + (ws - 1)
    dc = c[:, None] - c[None, :] + (ws - 1)
    return dr * (2 * ws - 1) + dc


def _check_index(key: str, value: Tensor, window_size: int | None) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is the derived index."""
    if window_size is None:
        n = value.shape[0] if value.dim() == 2 else -1
        window_size = math.isqrt(n) if n > 0 else 0
        if value.dim() != 2 or window_size * window_size != n or value.shape[1] != n:
            raise ValueError(f"{key}: shape {tuple(value.shape)} is not [ws², ws²]")
    expected = make_relative_position_index(window_size, device=torch.device("cpu"))
    if tuple(value.shape) != tuple(expected.shape):
        raise ValueError(
            f"{key}: shape {tuple(value.shape)} != {tuple(expected.shape)} "
            f"derived for window {window_size}"
        )
    if value.is_meta:  # nothing to compare on the meta device
        return
    # float64 comparison is exact for these small integers and accepts any numeric dtype
    if not torch.equal(value.detach().cpu().to(torch.float64), expected.to(torch.float64)):
        raise ValueError(f"{key}: values differ from the index derived for window {window_size}")


def check_relative_position_index(
    state_dict: Mapping[str, Tensor], window_size: int | None = None
) -> None:
    """Check every ``*relative_position_index`` entry against the derived index.

    ``window_size`` defaults to the one implied by each entry's shape ``[ws², ws²]``.
    Raises ``ValueError`` naming the first offending key.
    """
    for key, value in state_dict.items():
        if key.endswith(_RPI):
            _check_index(key, value, window_size)


def drop_relative_position_index(
    state_dict: Mapping[str, Tensor], window_size: int | None = None
) -> dict[str, Tensor]:
    """Check (see :func:`check_relative_position_index`), then return a copy without them."""
    check_relative_position_index(state_dict, window_size)
    return {k: v for k, v in state_dict.items() if not k.endswith(_RPI)}


def window_partition(x: Tensor, ws: int) -> Tensor:
    """``[B, Hp, Wp, C] -> [B * nWh * nWw, ws*ws, C]``; windows ordered batch, row, column."""
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_merge(windows: Tensor, ws: int, B: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, ws*ws, C] -> [B, Hp, Wp, C]``."""
    C = windows.shape[-1]
    x = windows.reshape(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, C)


def shifted_window_mask(
    Hp: int, Wp: int, window_size: int, shift: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Additive attention mask for shifted windows on a padded ``Hp x Wp`` map.

    After the roll by ``-shift`` each axis splits into three bands, ``[0, n-ws)``,
    ``[n-ws, n-shift)`` and ``[n-shift, n)`` (the last holds content wrapped around from the
    start). Token pairs in different bands along either axis get ``-100``, others 0.

    Returns ``[nW, ws², ws²]`` in ``dtype`` on ``device``.
    """

    def bands(n: int) -> Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window_size).long() + (i >= n - shift).long()

    label = bands(Hp)[:, None] * 3 + bands(Wp)[None, :]
    win = window_partition(label[None, :, :, None], window_size).squeeze(-1)  # [nW, ws²]
    differs = win[:, :, None] != win[:, None, :]
    return torch.zeros(differs.shape, dtype=dtype, device=device).masked_fill(differs, -100.0)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with prob. ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask = mask / keep  # rescale so the expectation is unchanged
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` on ``[..., dim]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # derivable from the window size, so kept out of state_dict (see _load_from_state_dict)
        self.relative_position_index: Tensor
        self.register_buffer(_RPI, make_relative_position_index(window_size), persistent=False)
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Original checkpoints carry the index; accept it only if it is the derived one.
        key = prefix + _RPI
        if key in state_dict:
            _check_index(key, state_dict.pop(key), self.window_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B*nW, N, C]`` with N = ws²; ``mask``: ``[nW, N, N]`` additive or None."""
        Bw, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(Bw, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        # explicit softmax(q*scale @ k^T + bias + mask) @ v, in the original's order of operations
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [Bw, h, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(N, N, h).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.reshape(Bw // nW, nW, h, N, N) + mask[None, :, None]
            attn = attn.reshape(Bw, h, N, N)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(Bw, N, C))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP block on ``[B, H*W, C]`` tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} not in [0, {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: tuple[int, int], attn_mask: Tensor | None) -> Tensor:
        """``x``: ``[B, H*W, C]``; ``attn_mask``: the stage's shifted-window mask (used only
        when this block shifts). Returns ``[B, H*W, C]``."""
        H, W = hw
        B, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        y = self.norm1(x).reshape(B, H, W, C)
        # padding comes after norm1, so padded tokens are exact zeros entering qkv
        pad_b, pad_r = (-H) % ws, (-W) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, ws), attn_mask if s else None)
        y = window_merge(y, ws, B, Hp, Wp)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :H, :W, :].reshape(B, L, C)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + linear: ``[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2),
    2C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, _, C = x.shape
        x = x.reshape(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        # this concat order is what the checkpoint's reduction/norm weights expect
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain/shifted windows, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                0 if j % 2 == 0 else self.shift_size,
                mlp_ratio,
                drop_paths[j],
            )
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: Tensor, H: int, W: int, use_checkpoint: bool = False
    ) -> tuple[Tensor, Tensor, int, int]:
        """``x``: ``[B, H*W, C]``. Returns (stage output ``[B, H*W, C]``, input of the next
        stage, its H, its W); without downsampling the next input is the output itself."""
        ws = self.window_size
        mask = None
        if self.shift_size and any(b.shift_size for b in self.blocks):
            # built for the padded size, in the activations' dtype/device (float64 stays float64)
            Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
            mask = shifted_window_mask(Hp, Wp, ws, self.shift_size, x.dtype, x.device)
        for blk in self.blocks:
            if use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, (H, W), mask, use_reentrant=False)
            else:
                x = blk(x, (H, W), mask)
        if self.downsample is None:
            return x, x, H, W
        return x, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    """Pad to a multiple of the patch size, strided conv, LayerNorm.

    ``[B, 3, H, W] -> ([B, Hp*Wp, C], Hp, Wp)`` with ``Hp = ceil(H / patch)``.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        p = self.patch_size
        pad_b, pad_r = (-x.shape[2]) % p, (-x.shape[3]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        Hp, Wp = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), Hp, Wp


class SwinTransformer(nn.Module):
    """Swin Transformer backbone returning the feature maps of ``out_indices`` (stage order).

    ``forward(x: [B, in_chans, H, W]) -> list of [B, embed_dim * 2**i, H_i, W_i]`` with
    ``H_0 = ceil(H / patch_size)`` and ``H_{i+1} = ceil(H_i / 2)``; nominal stride
    ``patch_size * 2**i``.

    Attributes: ``out_indices``, ``out_channels`` (per output), ``strides`` (per output),
    ``num_features`` (per stage), ``use_checkpoint`` (may be toggled after construction).
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        patch_size: int = 4,
        in_chans: int = 3,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError("depths and num_heads must have the same length")
        idx = tuple(sorted(set(int(i) for i in out_indices)))
        if not idx or idx[0] < 0 or idx[-1] >= n:
            raise ValueError(f"out_indices {tuple(out_indices)} must be in [0, {n})")
        self.out_indices = idx
        self.window_size = window_size
        self.use_checkpoint = use_checkpoint
        self.num_features = [embed_dim * 2**i for i in range(n)]
        self.out_channels = [self.num_features[i] for i in idx]
        self.strides = [patch_size * 2**i for i in idx]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # linear in the block index over the whole network, computed as the original does
        # (float32 linspace) so the rates are bit-identical
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(n)]
        self.layers = nn.ModuleList(
            SwinStage(
                self.num_features[i],
                depths[i],
                num_heads[i],
                window_size,
                mlp_ratio,
                dpr[starts[i] : starts[i] + depths[i]],
                downsample=i < n - 1,
            )
            for i in range(n)
        )
        for i in idx:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x``: ``[B, in_chans, H, W]`` -> list of ``[B, C_i, H_i, W_i]`` for ``out_indices``."""
        if x.dim() != 4:
            raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)}")
        x, H, W = self.patch_embed(x)
        outs = []
        # later stages are not needed for any output, so they are skipped
        for i, stage in enumerate(self.layers[: self.out_indices[-1] + 1]):
            y, x, Hn, Wn = stage(x, H, W, self.use_checkpoint)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(y)
                outs.append(y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous())
            H, W = Hn, Wn
        return outs


def build_swin(
    name: str,
    out_indices: Sequence[int] = (1, 2, 3),
    drop_path_rate: float = 0.2,
    use_checkpoint: bool = False,
) -> SwinTransformer:
    """Build one of :data:`SWIN_CONFIGS` (DINO's backbone names, e.g. ``"swin_L_384_22k"``)."""
    if name not in SWIN_CONFIGS:
        raise ValueError(f"unknown Swin layout {name!r}; known: {sorted(SWIN_CONFIGS)}")
    return SwinTransformer(
        **SWIN_CONFIGS[name],
        drop_path_rate=drop_path_rate,
        out_indices=out_indices,
        use_checkpoint=use_checkpoint,
    )


def swin_large_384(
    out_indices: Sequence[int] = (1, 2, 3),
    drop_path_rate: float = 0.2,
    use_checkpoint: bool = False,
) -> SwinTransformer:
    """Swin-L, 384 px ImageNet-22k layout used by DINO: embed 192, depths (2, 2, 18, 2),
    heads (6, 12, 24, 48), window 12 (~197M parameters)."""
    return build_swin("swin_L_384_22k", out_indices, drop_path_rate, use_checkpoint)


def swin_toy(
    out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.0, window_size: int = 7
) -> SwinTransformer:
    """Small layout for tests: embed 32, depths (2, 2, 2, 2), heads (1, 2, 4, 8)."""
    return SwinTransformer(
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=window_size,
        drop_path_rate=drop_path_rate,
        out_indices=out_indices,
    )
