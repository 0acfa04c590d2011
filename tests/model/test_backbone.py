from __future__ import annotations

import pytest
import torch
import torchvision

from dinodet.config import BackboneConfig
from dinodet.model.backbone import build_backbone


def test_resnet_levels_channels_and_frozen_stem():
    body = build_backbone(BackboneConfig(name="resnet50", return_levels=(1, 2, 3)))
    assert body.out_channels == [512, 1024, 2048]
    feats = body(torch.randn(1, 3, 64, 96))
    assert [f.shape[1:] for f in feats] == [(512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    # FrozenBatchNorm2d holds buffers only; the convolutions of the stem and layer1 stop.
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    five = build_backbone(BackboneConfig(name="resnet50", return_levels=(0, 1, 2, 3)))
    assert five.out_channels == [256, 512, 1024, 2048]
    assert all(p.requires_grad for p in five.layer1.parameters())


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()  # stands in for an ImageNet file: fc + BN stats
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    body = build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    torch.testing.assert_close(body.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)
    torch.testing.assert_close(body.layer2[0].bn1.running_var, imagenet.layer2[0].bn1.running_var)


def test_pretrained_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet50\.pth do not fit"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "absent.pth")))
