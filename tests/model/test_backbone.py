from __future__ import annotations

import pytest
import torch
import torchvision

from dinodet.config import BackboneConfig
from dinodet.model import backbone as backbone_module
from dinodet.model.backbone import build_backbone, frozen_modules
from dinodet.weights import load_backbone_weights


def _frozen(body: torch.nn.Module) -> set[str]:
    return {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}


def test_resnet_levels_channels_and_frozen_stem():
    body = build_backbone(BackboneConfig(name="resnet50", return_levels=(1, 2, 3)))
    assert body.out_channels == [512, 1024, 2048]
    feats = body(torch.randn(1, 3, 64, 96))
    assert [f.shape[1:] for f in feats] == [(512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    # FrozenBatchNorm2d holds buffers only; the convolutions of the stem and layer1 stop.
    assert _frozen(body) == {"conv1", "layer1"}
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    # The original freezes layer1 whatever the levels: the 5-scale model returns C2 from a
    # layer1 that does not train.
    five = build_backbone(BackboneConfig(name="resnet50", return_levels=(0, 1, 2, 3)))
    assert five.out_channels == [256, 512, 1024, 2048]
    assert _frozen(five) == {"conv1", "layer1"}
    assert all(p.requires_grad for name in ("layer2", "layer3", "layer4")
               for p in getattr(five, name).parameters())


def test_the_freezing_rule_is_the_originals():
    assert frozen_modules(BackboneConfig(name="resnet50")) == ("conv1", "bn1", "layer1")
    assert frozen_modules(BackboneConfig(name="resnet50", freeze_stem=False)) == ()
    assert frozen_modules(BackboneConfig(name="swin_l_384")) == ()  # nothing in Swin
    scratch = build_backbone(BackboneConfig(name="resnet18", return_levels=(0, 1, 2, 3),
                                            frozen_batchnorm=False, freeze_stem=False))
    assert _frozen(scratch) == set() and isinstance(scratch.bn1, torch.nn.BatchNorm2d)


def test_building_never_reads_the_weights(tmp_path):
    # A source that does not exist (or could only be downloaded) is no concern of the model.
    for weights in (str(tmp_path / "absent.pth"), "imagenet", "IMAGENET1K_V1",
                    "timm/resnet18.tv_in1k"):
        build_backbone(BackboneConfig(name="resnet18", weights=weights))


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()  # stands in for an ImageNet file: fc + BN stats
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    body = build_backbone(BackboneConfig(name="resnet18", weights=str(path)))
    assert not torch.equal(body.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)
    load_backbone_weights(body, path)
    torch.testing.assert_close(body.layer3[1].conv2.weight, imagenet.layer3[1].conv2.weight)
    torch.testing.assert_close(body.layer2[0].bn1.running_var, imagenet.layer2[0].bn1.running_var)


def test_pretrained_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    body = build_backbone(BackboneConfig(name="resnet18"))
    with pytest.raises(ValueError, match=r"resnet50\.pth do not fit"):
        load_backbone_weights(body, path)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_backbone_weights(body, tmp_path / "absent.pth")


def _randomise_batchnorm(body: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in body.modules():
        if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


@pytest.mark.skipif(not backbone_module._FUSED, reason="this torch has no oneDNN convolution")
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("levels", [(1, 2, 3), (0, 1, 2, 3)])  # all: none written over
def test_fused_cpu_inference_equals_the_modules(name, levels):
    torch.manual_seed(0)
    body = build_backbone(BackboneConfig(name=name, return_levels=levels)).eval()
    _randomise_batchnorm(body)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        fused = body(x)
        assert body._folded, "the no-grad eval forward took the fused path"
        plain = body.train()(x)  # frozen BatchNorm: train mode computes the same, unfused
    body.eval()
    for f, p in zip(fused, plain, strict=True):
        assert f.shape == p.shape
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5 * float(p.abs().max()))
    # New weights (load_state_dict copies in place) are folded anew, not served stale.
    state = {k: v.clone() for k, v in body.state_dict().items()}
    state["layer2.0.bn1.weight"] *= 3
    state["layer3.0.conv2.weight"] *= -1
    body.load_state_dict(state)
    with torch.no_grad():
        again, reference = body(x), body.train()(x)
    for f, p in zip(again, reference, strict=True):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5 * float(p.abs().max()))
    assert not torch.allclose(again[-1], fused[-1])


@pytest.mark.skipif(not backbone_module._FUSED, reason="this torch has no oneDNN convolution")
def test_fused_block_sums_over_its_input_unless_kept():
    torch.manual_seed(0)
    body = build_backbone(BackboneConfig(name="resnet50")).eval()
    _randomise_batchnorm(body)
    block = body.layer1[1]  # no downsample: the residual is the block's input itself
    x = torch.randn(1, 256, 24, 32).relu().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
        kept = x.clone()
        out = body._block(block, kept, keep_input=True)
        assert torch.equal(kept, x) and out.data_ptr() != kept.data_ptr()
        mine = x.clone()
        out_over = body._block(block, mine)
        assert out_over.data_ptr() == mine.data_ptr()  # no new feature map
    for o in (out, out_over):
        torch.testing.assert_close(o, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_training_and_autograd_take_the_plain_modules():
    body = build_backbone(BackboneConfig(name="resnet18", return_levels=(2, 3))).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = body(x)  # grad enabled: the modules, so that the gradient flows to the input
    out[-1].sum().backward()
    assert x.grad is not None and not body._folded
