"""Image backbones that return a list of feature maps (ResNet from torchvision, Swin-L)."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from dinodet.config import BackboneConfig

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

    def forward(self, x: Tensor) -> list[Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if i in self.return_levels:
                out.append(x)
            if i >= self.return_levels[-1]:
                break
        return out


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
