"""Image backbones that return a list of feature maps (ResNet from torchvision, Swin-L).

CPU inference of a ResNet with frozen BatchNorm runs fused: each convolution with its
BatchNorm folded into its weights and bias (computed once and kept while the weights stay
the same), its ReLU and the residual sum done by oneDNN in the same call
(``torch.ops.mkldnn._convolution_pointwise``, what PyTorch's inductor emits for CPU
convolutions). That saves the separate scale, shift, add and ReLU passes over every feature
map: the ResNet-50 of r50-4scale at 800x1088 takes about 0.50 s instead of 0.73 s on 2
threads. Results equal the unfused ones up to float32 rounding (about 4e-6 of the largest
value). Training, autograd, CUDA, other dtypes, trainable BatchNorm and export tracing take
the plain modules; ``DINODET_FUSED_BACKBONE=0`` turns the fused path off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from dinodet.config import BackboneConfig
from dinodet.model.quantize import Int8Conv2d
from dinodet.model.tracing import exporting

FUSED_ENV_VAR = "DINODET_FUSED_BACKBONE"

_RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


class ResNetBody(nn.Module):
    """torchvision ResNet without its classifier, returning the chosen stages.

    Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1``…), which are also the
    original DINO checkpoint's below ``backbone.0.body.``.
    """

    def __init__(self, name: str, return_levels: tuple[int, ...], frozen_batchnorm: bool) -> None:
        super().__init__()
        norm = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.return_levels = return_levels
        self.out_channels = [_RESNET_CHANNELS[name][i] for i in return_levels]
        self.strides = [4 * 2**i for i in return_levels]
        # oneDNN (CPU) and cuDNN convolutions are faster on NHWC: ~15 % of a CPU training
        # step of r50-4scale. Results are the same up to summation order.
        self.to(memory_format=torch.channels_last)
        # (conv, bn) -> folded (weight, bias) and the versions of the tensors they came from.
        self._folded: dict[tuple[int, int], tuple[tuple[int, ...], Tensor, Tensor]] = {}

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        fused = self._fusable(x)
        if fused:
            x = self.maxpool(self._conv(x, self.conv1, self.bn1, relu=True))
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: list[Tensor] = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            if fused:
                for block in layer:
                    # A block writes its sum over its input: not over a level's output.
                    x = self._block(block, x, keep_input=bool(out) and out[-1] is x)
            else:
                x = layer(x)
            if i in self.return_levels:
                out.append(x)
            if i >= self.return_levels[-1]:
                break
        return out

    def _fusable(self, x: Tensor) -> bool:
        if isinstance(self.conv1, Int8Conv2d):  # quantize_int8 folded the norms: CPU only
            return not torch.is_grad_enabled() and not exporting()
        return (_FUSED and not self.training and not torch.is_grad_enabled()
                and x.device.type == "cpu" and x.dtype == torch.float32
                and self.conv1.weight.dtype == torch.float32
                and isinstance(self.bn1, FrozenBatchNorm2d) and not exporting()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and not torch.jit.is_scripting())

    def _fold(self, conv: Any, bn: Any) -> tuple[Tensor, Tensor]:
        """conv then bn as one convolution's (weight, bias), cached until either changes
        (``load_state_dict`` and in-place edits bump the versions, ``.to`` the storage)."""
        sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        versions = tuple(v for t in sources for v in (t.data_ptr(), t._version))
        key = (id(conv), id(bn))
        cached = self._folded.get(key)
        if cached is None or cached[0] != versions:
            weight, bias = fold_batchnorm(conv, bn)
            weight = weight.contiguous(memory_format=torch.channels_last)
            cached = self._folded[key] = (versions, weight, bias)
        return cached[1], cached[2]

    def _conv(self, x: Tensor, conv: Any, bn: Any, relu: bool,
              residual: Tensor | None = None) -> Tensor:
        """relu?(bn(conv(x)) (+ residual)) in one oneDNN call, written over ``residual``
        when there is one (no new feature map to allocate). An int8 convolution has its
        norm folded in already (``bn`` is then an identity)."""
        if isinstance(conv, Int8Conv2d):
            return conv(x, relu=relu, residual=residual)
        weight, bias = self._fold(conv, bn)
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, *args, "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, *args, "add", None, "relu" if relu else None, [], "")

    def _block(self, block: Any, x: Tensor, keep_input: bool = False) -> Tensor:
        """A torchvision BasicBlock or Bottleneck, fused; its sum is written over ``x``
        unless ``keep_input`` (or the downsampled copy of ``x``)."""
        identity = x
        if block.downsample is not None:
            conv, bn = block.downsample
            identity = self._conv(x, conv, bn, relu=False)
        elif keep_input:
            identity = x.clone()
        out = self._conv(x, block.conv1, block.bn1, relu=True)
        if isinstance(block, Bottleneck):
            out = self._conv(out, block.conv2, block.bn2, relu=True)
            return self._conv(out, block.conv3, block.bn3, relu=True, residual=identity)
        assert isinstance(block, BasicBlock)
        return self._conv(out, block.conv2, block.bn2, relu=True, residual=identity)


def fold_batchnorm(conv: Any, bn: Any) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of one convolution computing ``bn(conv(x))`` with ``bn``'s
    running statistics (a FrozenBatchNorm2d, or a BatchNorm2d in eval mode)."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def _fused_available() -> bool:
    if os.environ.get(FUSED_ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


_FUSED = _fused_available()


# What gets no gradient under pretrained weights (``freeze_stem``), as the original: ResNet's
# stem and first stage whatever levels are returned; nothing in Swin. The one place this is
# said; FrozenBatchNorm2d (``frozen_batchnorm``) has no parameters to freeze.
_FROZEN_MODULES = {"resnet": ("conv1", "bn1", "layer1"), "swin": ()}


def frozen_modules(cfg: BackboneConfig) -> tuple[str, ...]:
    """Top-level modules of the body whose parameters get no gradient under ``cfg``."""
    if not cfg.freeze_stem:
        return ()
    return _FROZEN_MODULES["resnet" if cfg.name in _RESNET_CHANNELS else "swin"]


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Backbone body with ``out_channels`` and ``strides`` attributes, randomly initialised
    and frozen as :func:`frozen_modules` says.

    Never reads or downloads ``cfg.weights``: training loads them once on a fresh model
    (:func:`dinodet.model.pretrained.load_pretrained_backbone`), and a model that gets a
    checkpoint's weights next needs none.
    """
    if cfg.name in _RESNET_CHANNELS:
        body: nn.Module = ResNetBody(cfg.name, tuple(cfg.return_levels), cfg.frozen_batchnorm)
    elif cfg.name == "swin_l_384":
        from dinodet.model.swin import swin_large_384

        body = swin_large_384(out_indices=tuple(cfg.return_levels),
                              drop_path_rate=cfg.drop_path_rate)
        if cfg.use_checkpoint and hasattr(body, "use_checkpoint"):
            body.use_checkpoint = True
    else:  # validated in the config; kept for direct callers
        raise ValueError(f"unknown backbone {cfg.name!r}")
    frozen = frozen_modules(cfg)
    for name, p in body.named_parameters():
        if name.split(".")[0] in frozen:
            p.requires_grad_(False)
    return body
