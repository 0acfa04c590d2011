"""Pretrained backbone weights by name (dinodet.model.pretrained): ImageNet through torch.hub's
cache, torchvision weights names, the Hugging Face Hub (timm's Swin layout converted), local
files, none; offline errors that say what to do; and what trains, exactly as the original."""

from __future__ import annotations

import socket
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from dinodet.config import BackboneConfig, get_preset
from dinodet.engine.config import load_train_config
from dinodet.engine.train import build_training_model
from dinodet.model.backbone import build_backbone
from dinodet.model.dino import DINO
from dinodet.model.pretrained import (
    SWIN_L_22K_HF,
    SWIN_L_22K_URL,
    BackboneWeightsUnavailableError,
    hub_cache_path,
    load_pretrained_backbone,
    resolve_backbone_weights,
    timm_swin_to_original,
)
from dinodet.model.swin import swin_large_384, swin_toy
from dinodet.weights import CheckpointError, load_backbone_state_dict

R18_V1 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
R50_V1 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Every way out fails (torch.hub's urlopen, urllib's, any socket); the list records
    the attempts."""
    attempts: list[str] = []

    def refuse(what):
        def fail(*args, **kwargs):
            attempts.append(what)
            raise urllib.error.URLError(f"no network in this test ({what})")
        return fail

    monkeypatch.setattr(torch.hub, "urlopen", refuse("torch.hub.urlopen"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urllib.request.urlopen"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    return attempts


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache under TORCH_HOME; returns its checkpoints folder."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # set_dir() would win over TORCH_HOME
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _cache(hub_dir: Path, url: str, obj) -> Path:
    path = hub_dir / Path(urlparse(url).path).name
    assert path == hub_cache_path(url)  # the file torch.hub.load_state_dict_from_url uses
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def resnet50_imagenet() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return torchvision.models.resnet50().state_dict()  # stands in for IMAGENET1K_V1


def _frozen(model: nn.Module, prefix: str = "") -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad and n.startswith(prefix)}


# --- torch.hub: ImageNet by name ---------------------------------------------------------

def test_imagenet_loads_from_the_torch_hub_cache_without_network(hub_dir, no_network):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()
    assert Path(urlparse(R18_V1).path).name == "resnet18-f37072fd.pth"
    _cache(hub_dir, R18_V1, imagenet)
    cfg = BackboneConfig(name="resnet18", weights="imagenet")
    body = build_backbone(cfg)
    source = load_pretrained_backbone(body, cfg)
    assert source is not None and source.location == R18_V1
    assert "ResNet18_Weights.IMAGENET1K_V1" in source.describe()
    own = body.state_dict()
    for key in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.downsample.1.running_var",
                "bn1.bias"):
        assert torch.equal(own[key], imagenet[key]), key
    assert no_network == []  # cached: not even a request


def test_a_preset_model_is_built_offline_and_loads_when_asked(hub_dir, no_network,
                                                              resnet50_imagenet):
    cfg = get_preset("r50-4scale")
    assert cfg.backbone.weights == "imagenet"
    model = DINO(cfg)  # nothing cached, no network: building must not care
    key = "layer2.0.conv1.weight"
    assert not torch.equal(model.backbone.state_dict()[key], resnet50_imagenet[key])
    _cache(hub_dir, R50_V1, resnet50_imagenet)
    load_pretrained_backbone(model, cfg.backbone)  # the model: its .backbone is loaded
    assert torch.equal(model.backbone.state_dict()[key], resnet50_imagenet[key])
    assert no_network == []


def test_offline_and_not_cached_says_which_file_goes_where(hub_dir, no_network):
    cfg = BackboneConfig(name="resnet18", weights="imagenet")
    with pytest.raises(BackboneWeightsUnavailableError) as err:
        load_pretrained_backbone(build_backbone(cfg), cfg)
    message = str(err.value)
    assert isinstance(err.value, CheckpointError)
    assert R18_V1 in message
    assert str(hub_dir / "resnet18-f37072fd.pth") in message
    assert "--set model.backbone.weights=none" in message and "local file" in message
    assert "torch.hub.urlopen" in no_network  # it did try, and left no file behind
    assert not (hub_dir / "resnet18-f37072fd.pth").exists()


def test_a_damaged_cached_file_is_named(hub_dir, no_network):
    hub_dir.mkdir(parents=True)
    (hub_dir / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    cfg = BackboneConfig(name="resnet18", weights="imagenet")
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth cannot be read.*delete"):
        load_pretrained_backbone(build_backbone(cfg), cfg)


def test_cli_train_offline_exits_2_with_the_message(hub_dir, no_network, tmp_path, capsys):
    from dinodet.cli import main
    from dinodet.data.synthetic import make_synthetic_coco

    data = make_synthetic_coco(tmp_path / "data", num_train=2, num_val=0, image_size=(64, 64),
                               max_objects=2, seed=0)
    code = main(["train", "--preset", "cpu-small", "--train-ann", str(data["train_ann"]),
                 "--train-images", str(data["train_images"]), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "1", "--no-progress",
                 "--set", "model.backbone.weights=imagenet", "--set", "data.num_workers=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dinodet train: error: ") and "Traceback" not in err
    assert str(hub_dir / "resnet18-f37072fd.pth") in err
    assert "--set model.backbone.weights=none" in err


def test_swin_imagenet_is_the_22k_release_in_the_originals_layout(hub_dir, no_network):
    cfg = get_preset("swinl-4scale").backbone
    source = resolve_backbone_weights(cfg)
    assert source is not None and source.location == SWIN_L_22K_URL
    assert hub_cache_path(SWIN_L_22K_URL).name == "swin_large_patch4_window12_384_22k.pth"
    # The release file as the Swin authors save it: {"model": ...} with the classifier, the
    # final norm and the derived buffers. A small Swin stands in for the large one.
    torch.manual_seed(0)
    release = swin_toy(window_size=7).state_dict()
    for key in [k for k in release if k.startswith("norm")]:
        del release[key]
    release.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                    "head.weight": torch.zeros(5, 256), "head.bias": torch.zeros(5),
                    "layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49).long(),
                    "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49)})
    _cache(hub_dir, SWIN_L_22K_URL, {"model": release})
    body = swin_toy(window_size=7)
    load_pretrained_backbone(body, cfg)
    own = body.state_dict()
    assert torch.equal(own["layers.2.blocks.1.attn.relative_position_bias_table"],
                       release["layers.2.blocks.1.attn.relative_position_bias_table"])
    assert torch.equal(own["layers.0.downsample.reduction.weight"],
                       release["layers.0.downsample.reduction.weight"])


# --- names -------------------------------------------------------------------------------

def test_torchvision_weights_names_resolve():
    r50 = BackboneConfig(name="resnet50", weights="IMAGENET1K_V2")
    v2 = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert resolve_backbone_weights(r50).location == v2.url  # type: ignore[union-attr]
    full = BackboneConfig(name="resnet50", weights="ResNet50_Weights.IMAGENET1K_V2")
    assert resolve_backbone_weights(full).location == v2.url  # type: ignore[union-attr]
    default = resolve_backbone_weights(BackboneConfig(name="resnet50", weights="DEFAULT"))
    assert default is not None and default.location == v2.url
    with pytest.raises(CheckpointError, match=r"not weights of resnet50.*ResNet50_Weights"):
        resolve_backbone_weights(BackboneConfig(name="resnet50",
                                                weights="ResNet18_Weights.IMAGENET1K_V1"))
    with pytest.raises(CheckpointError, match=r"no such weights for resnet18.*IMAGENET1K_V1"):
        resolve_backbone_weights(BackboneConfig(name="resnet18", weights="IMAGENET1K_V2"))
    with pytest.raises(CheckpointError, match=r"torchvision has no Swin-L"):
        resolve_backbone_weights(BackboneConfig(name="swin_l_384", weights="IMAGENET1K_V1"))
    with pytest.raises(CheckpointError, match=r"not a file, and not a known name"):
        resolve_backbone_weights(BackboneConfig(name="resnet50", weights="imagenet-21k"))


def test_a_torchvision_name_loads_from_the_cache(hub_dir, no_network, resnet50_imagenet):
    _cache(hub_dir, torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url, resnet50_imagenet)
    cfg = BackboneConfig(name="resnet50", weights="ResNet50_Weights.IMAGENET1K_V2")
    body = build_backbone(cfg)
    load_pretrained_backbone(body, cfg)
    assert torch.equal(body.layer4[2].conv3.weight, resnet50_imagenet["layer4.2.conv3.weight"])


def test_local_files_and_none(tmp_path, no_network):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": imagenet}, tmp_path / "r18.pt")
    save_file({k: v.contiguous() for k, v in imagenet.items()}, str(tmp_path / "r18.safetensors"))
    for name in ("r18.pt", "r18.safetensors"):
        cfg = BackboneConfig(name="resnet18", weights=str(tmp_path / name))
        body = build_backbone(cfg)
        source = load_pretrained_backbone(body, cfg)
        assert source is not None and source.kind == "file"
        assert torch.equal(body.layer1[0].conv1.weight, imagenet["layer1.0.conv1.weight"])
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        cfg = BackboneConfig(name="resnet18", weights=str(tmp_path / "absent.pth"))
        load_pretrained_backbone(build_backbone(cfg), cfg)
    # none: nothing is read, the random weights stay
    for weights in (None, "none", "None", ""):
        cfg = BackboneConfig(name="resnet18", weights=weights)
        assert cfg.weights is None
        body = build_backbone(cfg)
        before = {k: v.clone() for k, v in body.state_dict().items()}
        assert load_pretrained_backbone(body, cfg) is None
        assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())
    assert no_network == []


# --- Hugging Face Hub ----------------------------------------------------------------------

def _fake_hub(monkeypatch, files: dict[str, Path]) -> list[tuple[str, str]]:
    """A stand-in huggingface_hub whose hf_hub_download serves ``files`` (repo/filename)."""
    calls: list[tuple[str, str]] = []

    class EntryNotFoundError(Exception):
        pass

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if f"{repo_id}/{filename}" not in files:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(files[f"{repo_id}/{filename}"])

    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = hf_hub_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    return calls


def test_hub_repository_ids_resolve():
    for weights in (SWIN_L_22K_HF, f"hf-hub:{SWIN_L_22K_HF}"):
        source = resolve_backbone_weights(BackboneConfig(name="swin_l_384", weights=weights))
        assert source is not None and (source.kind, source.location) == ("hf-hub", SWIN_L_22K_HF)


def test_hub_weights_download_through_hf_hub_download(tmp_path, monkeypatch):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()  # timm's ResNets: torchvision names
    bin_file = tmp_path / "pytorch_model.bin"
    torch.save(imagenet, bin_file)
    calls = _fake_hub(monkeypatch, {"timm/resnet18.tv_in1k/pytorch_model.bin": bin_file})
    cfg = BackboneConfig(name="resnet18", weights="hf-hub:timm/resnet18.tv_in1k")
    body = build_backbone(cfg)
    load_pretrained_backbone(body, cfg)
    assert torch.equal(body.layer2[1].conv2.weight, imagenet["layer2.1.conv2.weight"])
    # safetensors first, the pickle only where the repository has no safetensors
    assert calls == [("timm/resnet18.tv_in1k", "model.safetensors"),
                     ("timm/resnet18.tv_in1k", "pytorch_model.bin")]
    _fake_hub(monkeypatch, {})
    with pytest.raises(CheckpointError, match=r"holds neither model\.safetensors nor"):
        load_pretrained_backbone(body, cfg)


def test_hub_without_huggingface_hub_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    cfg = BackboneConfig(name="swin_l_384", weights=SWIN_L_22K_HF)
    with pytest.raises(CheckpointError, match=r"pip install 'dinodet\[hub\]'"):
        load_pretrained_backbone(swin_toy(), cfg)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, no_network):
    """huggingface_hub itself, offline, on an empty cache in tmp_path."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when imported
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_weights_come_from_the_huggingface_cache_offline(hf_cache):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()
    repo, commit = hf_cache / "models--timm--resnet18.tv_in1k", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in imagenet.items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    cfg = BackboneConfig(name="resnet18", weights="timm/resnet18.tv_in1k")
    body = build_backbone(cfg)
    load_pretrained_backbone(body, cfg)
    assert torch.equal(body.layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])


def test_hub_offline_and_not_cached_says_what_to_do(hf_cache):
    cfg = BackboneConfig(name="swin_l_384", weights=SWIN_L_22K_HF)
    with pytest.raises(BackboneWeightsUnavailableError) as err:
        load_pretrained_backbone(swin_toy(), cfg)
    message = str(err.value)
    cache = hf_cache / "models--timm--swin_large_patch4_window12_384.ms_in22k"
    assert f"{cache}/snapshots/<commit>/model.safetensors" in message
    assert f"https://huggingface.co/{SWIN_L_22K_HF}/resolve/main/model.safetensors" in message
    assert "--set model.backbone.weights=none" in message


# --- timm's Swin layout --------------------------------------------------------------------

def timm_swin_layout(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window=12,
                     num_classes=21841) -> dict[str, tuple[int, ...]]:
    """Key -> shape of timm's SwinTransformer state dict (timm >= 0.9), Swin-L 384 by
    default: patch merging at the start of stages 1..3, classifier ``head.fc``, no derived
    buffers (checked against timm itself below, when it is installed)."""
    layout: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4), "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        c = embed_dim * 2**i
        if i > 0:
            layout[f"layers.{i}.downsample.norm.weight"] = (2 * c,)
            layout[f"layers.{i}.downsample.norm.bias"] = (2 * c,)
            layout[f"layers.{i}.downsample.reduction.weight"] = (c, 2 * c)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            layout.update({
                b + "norm1.weight": (c,), b + "norm1.bias": (c,),
                b + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,),
                b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
                b + "norm2.weight": (c,), b + "norm2.bias": (c,),
                b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,),
                b + "mlp.fc2.weight": (c, 4 * c), b + "mlp.fc2.bias": (c,)})
    c = embed_dim * 2 ** (len(depths) - 1)
    layout.update({"norm.weight": (c,), "norm.bias": (c,), "head.fc.weight": (num_classes, c),
                   "head.fc.bias": (num_classes,)})
    return layout


def test_timm_swin_l_layout_converts_to_dinodets():
    timm_sd = {k: torch.empty(s, device="meta") for k, s in timm_swin_layout().items()}
    with torch.device("meta"):
        body = swin_large_384(out_indices=(0, 1, 2, 3))
    converted = timm_swin_to_original(timm_sd)
    own = body.state_dict()
    kept = {k: v for k, v in converted.items() if not k.startswith(("head.", "norm."))}
    assert set(own) - set(kept) == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert set(kept) == set(own) - {k for k in own if k[:4] == "norm" and k[4].isdigit()}
    assert all(kept[k].shape == own[k].shape for k in kept)
    assert "layers.0.downsample.reduction.weight" in converted
    assert "layers.3.downsample.reduction.weight" not in converted
    # the original's layout passes through unchanged, and the conversion loses no tensor
    assert timm_swin_to_original(converted) == converted
    assert len(converted) == len(timm_sd)


def test_timm_layout_loads_into_a_swin_body():
    torch.manual_seed(0)
    dino_layout = swin_toy(window_size=7).state_dict()
    timm_sd = {}
    for key, value in dino_layout.items():
        if key[:4] == "norm" and key[4].isdigit():
            continue  # timm has one final norm, not per-level ones
        stage, sep, rest = key.partition(".downsample.")
        if sep:  # layers.i.downsample -> layers.{i+1}.downsample
            key = f"layers.{int(stage.split('.')[1]) + 1}.downsample.{rest}"
        timm_sd[key] = value
    timm_sd.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256),
                    "head.fc.weight": torch.zeros(3, 256), "head.fc.bias": torch.zeros(3)})
    body = swin_toy(window_size=7)
    load_backbone_state_dict(body, timm_sd, "timm swin")
    loaded = body.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in dino_layout.items() if k[:4] != "norm")


def test_against_timm_itself():
    """Where timm is installed: its real Swin-L keys and shapes are the layout above, and a
    small timm Swin loaded into dinodet's computes the same stage outputs."""
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    with torch.device("meta"):
        real = timm.create_model("swin_large_patch4_window12_384", pretrained=False,
                                 num_classes=21841)
    assert {k: tuple(v.shape) for k, v in real.state_dict().items()} == timm_swin_layout()
    torch.manual_seed(0)
    small = SwinTransformer(img_size=224, embed_dim=32, depths=(2, 2, 2, 2),
                            num_heads=(1, 2, 4, 8), window_size=7, num_classes=3).eval()
    ours = swin_toy(window_size=7).eval()
    load_backbone_state_dict(ours, small.state_dict(), "timm swin")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats, y = ours(x), small.patch_embed(x)
        # Stages 0-2 (maps larger than a window) compute the same; at 7x7 timm drops the
        # shift, the detection Swin does not.
        for i in range(3):
            y = small.layers[i](y)
            norm = getattr(ours, f"norm{i}")
            ref = nn.functional.layer_norm(y, y.shape[-1:], norm.weight, norm.bias)
            torch.testing.assert_close(feats[i], ref.permute(0, 3, 1, 2))


# --- what trains ---------------------------------------------------------------------------

# The backbone is the preset's; the transformer is cut down to keep the tests quick.
SMALL = ["model.enc_layers=1", "model.dec_layers=1", "model.num_queries=10",
         "model.dim_feedforward=64", "model.dn_number=4", "model.num_select=10"]


def _train_config(preset: str, *sets: str):
    return load_train_config(preset, None, [*SMALL, *sets])


def test_pretrained_resnet_trains_as_the_original(hub_dir, no_network, resnet50_imagenet):
    _cache(hub_dir, R50_V1, resnet50_imagenet)
    for preset in ("r50-4scale", "r50-5scale"):
        model = build_training_model(_train_config(preset), num_classes=3)
        frozen = _frozen(model)
        assert frozen == {n for n, _ in model.named_parameters()
                          if n.startswith(("backbone.conv1.", "backbone.bn1.",
                                           "backbone.layer1."))}, preset
        assert frozen and all(n.startswith("backbone.layer1.") or n == "backbone.conv1.weight"
                              for n in frozen)  # bn1 is frozen BatchNorm: no parameters
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
        assert torch.equal(model.backbone.layer4[0].conv1.weight,
                           resnet50_imagenet["layer4.0.conv1.weight"])
    assert no_network == []


def test_swin_l_trains_every_parameter():
    for preset in ("swinl-4scale", "swinl-5scale"):
        cfg = get_preset(preset).backbone
        assert cfg.weights == "imagenet"
        with torch.device("meta"):
            body = build_backbone(cfg)  # as build_training_model builds it with weights
        assert _frozen(body) == set(), preset


def test_from_scratch_everything_trains(no_network):
    for preset in ("r50-4scale", "r50-5scale"):
        model = build_training_model(_train_config(preset, "model.backbone.weights=none"),
                                     num_classes=3)
        assert _frozen(model) == set()
        assert model.cfg.backbone.frozen_batchnorm is False
        assert isinstance(model.backbone.bn1, nn.BatchNorm2d)
    assert no_network == []


def test_init_weights_replace_the_backbone_so_imagenet_is_not_read(hub_dir, no_network,
                                                                   tmp_path):
    from dinodet.weights import save_pretrained

    cfg = _train_config("cpu-small", "model.backbone.weights=imagenet")
    assert cfg.model is not None
    start = DINO(cfg.model.replace(num_classes=3))
    save_pretrained(start, tmp_path / "start")
    model = build_training_model(cfg, num_classes=3, init=str(tmp_path / "start"))
    assert torch.equal(model.backbone.conv1.weight, start.backbone.conv1.weight)
    assert no_network == [] and not hub_dir.exists()


def test_resuming_needs_no_backbone_weights(hub_dir, no_network):
    # backbone_weights=False (a checkpoint's weights come next): nothing read, nothing
    # fetched, and what trains is as with the weights.
    model = build_training_model(_train_config("r50-5scale"), num_classes=3,
                                 backbone_weights=False)
    assert "backbone.layer1.0.conv1.weight" in _frozen(model)
    assert no_network == [] and not hub_dir.exists()
