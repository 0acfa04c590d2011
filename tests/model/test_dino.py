"""Behaviour of the detector beyond the recorded case: inputs, ablations, training paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

import dinodet
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.model.boxes import inverse_sigmoid
from dinodet.model.dino import DINO
from dinodet.model.ms_deform_attn import ENV_VAR, MSDeformAttn, ms_deform_attn

from reference_weights import load_manifest, make_state_dict


def trained_box_head(model):
    """Give the box MLP a non-zero last layer (it starts at zero, which hides gradients)."""
    with torch.no_grad():
        model.box_head.layers[-1].weight.normal_(0, 0.1)
    return model


def tiny_config(**changes) -> DINOConfig:
    cfg = DINOConfig(
        num_classes=7, backbone=BackboneConfig(name="resnet18", frozen_batchnorm=False,
                                               freeze_stem=False),
        hidden_dim=64, num_heads=4, enc_layers=1, dec_layers=3, dim_feedforward=128,
        num_queries=30, dn_number=10, num_select=20)
    return cfg.replace(**changes)


def targets_for(counts, num_classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        cxcy = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                    "boxes": torch.cat([cxcy, wh], 1)})
    return out


def images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def test_output_structure_and_any_number_of_classes_and_queries():
    torch.manual_seed(0)
    model = DINO(tiny_config(num_classes=13, num_queries=17)).eval()
    with torch.no_grad():
        out = model(images((64, 96), (80, 48)))
    assert out["pred_logits"].shape == (2, 17, 13)
    assert out["pred_boxes"].shape == (2, 17, 4)
    assert len(out["aux_outputs"]) == 2
    assert set(out["aux_outputs"][0]) == {"pred_logits", "pred_boxes"}
    assert out["interm_outputs"]["pred_logits"].shape == (2, 17, 13)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert "dn_outputs" not in out
    results = dinodet.postprocess(out, torch.tensor([[64, 96], [80, 48]]), num_select=10)
    assert results[1]["boxes"].shape == (10, 4)
    assert (results[1]["labels"] < 13).all()
    # Boxes are xyxy pixels of each image's own size (not clipped, as in the original).
    assert (results[1]["boxes"][:, 0] <= results[1]["boxes"][:, 2]).all()


def test_a_batch_tensor_is_accepted_like_a_list():
    torch.manual_seed(0)
    model = DINO(tiny_config()).eval()
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(batch)
        b = model(list(batch))
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])


@pytest.mark.parametrize(("bad", "message"), [
    ([torch.randn(64, 64)], r"images\[0\] has rank 2"),
    ([torch.randn(3, 64, 64), torch.randn(1, 3, 64, 64)], r"images\[1\] has rank 4"),
    ([torch.randn(4, 64, 64)], r"images\[0\] has 4 channels"),
    ([torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)], r"dtype torch\.uint8"),
    (torch.randn(3, 64, 64), r"got a tensor of shape \(3, 64, 64\)"),
    ([], "non-empty list"),
    (["image.jpg"], r"images\[0\] is a str"),
    ([torch.randn(3, 0, 64)], "empty"),
])
def test_bad_images_are_named(bad, message):
    model = DINO(tiny_config()).eval()
    with pytest.raises((ValueError, TypeError), match=message):
        model(bad)


def test_training_step_with_denoising_and_empty_images():
    torch.manual_seed(0)
    model = DINO(tiny_config()).train()
    criterion = dinodet.build_criterion(7)
    targets = targets_for([3, 0, 1])
    out = model(images((64, 96), (64, 64), (48, 80)), targets)
    dn = out["dn_outputs"]
    # groups = max(1, 2·dn_number // (2·max GT)) = 20 // 6 = 3; 2·3 slots each.
    assert dn["dn_meta"]["num_groups"] == 3
    assert dn["pred_logits"].shape == (3, 18, 7)
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss"])
    assert "loss_bbox_dn" in losses and "loss_giou_interm" in losses
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.label_embed.weight.grad.abs().sum() > 0


def test_training_on_a_batch_without_any_object():
    torch.manual_seed(0)
    model = DINO(tiny_config()).train()
    targets = targets_for([0, 0])
    out = model(images((64, 64), (48, 64)), targets)
    assert "dn_outputs" not in out
    losses = dinodet.build_criterion(7)(out, targets)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    assert losses["loss_bbox"] == 0
    losses["loss"].backward()


@pytest.mark.parametrize("changes", [
    {"denoising": "off"},
    {"denoising": "positives_only"},
    {"query_selection": "static"},
    {"query_selection": "pure"},
    {"look_forward_twice": False},
    {"mask_padded_proposals": True},
])
def test_ablation_switches_train(changes):
    torch.manual_seed(0)
    cfg = tiny_config(**changes)
    model = DINO(cfg).train()
    targets = targets_for([2, 4])
    out = model(images((64, 96), (80, 64)), targets)
    if cfg.denoising == "off":
        assert "dn_outputs" not in out
    else:
        meta = out["dn_outputs"]["dn_meta"]
        per_group = 4 if cfg.denoising == "positives_only" else 8
        assert meta["pad_size"] == meta["num_groups"] * per_group
    if cfg.query_selection == "static":
        assert "interm_outputs" not in out
        assert model.query_selection.anchors is not None
    if cfg.query_selection == "pure":
        assert model.query_selection.content is None
    losses = dinodet.build_criterion(7)(out, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


def _decoder_inputs(model, batch):
    """Run the model up to the decoder; returns the decoder's arguments."""
    captured = {}

    def grab(_module, args, kwargs):
        captured["args"] = args

    handle = model.decoder.register_forward_pre_hook(grab, with_kwargs=True)
    model(batch)
    handle.remove()
    return captured["args"]


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_reaches_the_previous_layer(look_forward_twice):
    torch.manual_seed(0)
    model = trained_box_head(DINO(tiny_config(look_forward_twice=look_forward_twice)).train())
    args = _decoder_inputs(model, images((64, 96)))
    hidden, refs = model.decoder(*args)
    for i in (1, 2):
        # Layer i's box, with its own content detached: what is left reaches layer i-1
        # only through the refined reference box of layer i-1.
        box = (model.box_head(hidden[i].detach()) + inverse_sigmoid(refs[i])).sigmoid()
        params = list(model.decoder.layers[i - 1].parameters())
        grads = torch.autograd.grad(box.sum(), params, allow_unused=True)
        reached = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert reached == look_forward_twice
        # The anchor handed on to the next layer is always detached.
        assert refs[i].requires_grad == look_forward_twice


def test_look_forward_twice_changes_the_gradient_of_the_previous_layer():
    torch.manual_seed(0)
    model = trained_box_head(DINO(tiny_config()).train())
    batch = images((64, 96))
    grads = {}
    for flag in (True, False):
        model.decoder.look_forward_twice = flag
        model.zero_grad()
        out = model(batch)
        box = out["aux_outputs"][1]["pred_boxes"]  # layer 1
        F.l1_loss(box, torch.full_like(box, 0.5)).backward()
        grads[flag] = model.decoder.layers[0].cross_attn.output_proj.weight.grad.clone()
    assert not torch.allclose(grads[True], grads[False])


@pytest.fixture(scope="module")
def padded_case(case):
    """Reference weights, with the encoder class head steered so that the constant
    embedding of padded (zeroed) tokens outscores real ones, as trained models can."""
    sd = make_state_dict(load_manifest("dino_r50_4scale"))
    ims = [im.float() for im in case["images"]]
    return sd, ims


def _steer_to_padding(model):
    qs = model.query_selection
    with torch.no_grad():
        pad_embed = F.layer_norm(qs.enc_output.bias, qs.enc_output.bias.shape,
                                 qs.enc_output_norm.weight, qs.enc_output_norm.bias)
        qs.class_head.weight[0] = pad_embed * 0.05


def test_mask_padded_proposals_keeps_padding_out_of_the_top_k(padded_case):
    sd, ims = padded_case
    agreement = {}
    for flag in (False, True):
        model = dinodet.from_original(sd, "r50-4scale")
        _steer_to_padding(model)
        model.query_selection.mask_padded = flag
        with torch.no_grad():
            alone = model([ims[1]])
            both = model(ims)
        # Proposals on padding have +inf box logits: their boxes are (1, 1, 1, 1).
        on_padding = (both["interm_outputs"]["pred_boxes"][1] > 0.999).all(-1).sum().item()
        assert (on_padding == 0) == flag
        size = torch.tensor([[200, 288]])
        ra = dinodet.postprocess(alone, size, 10)[0]
        rb = dinodet.postprocess({k: v[1:] for k, v in both.items() if k.startswith("pred")},
                                 size, 10)[0]
        agreement[flag] = (box_iou(ra["boxes"], rb["boxes"]).max(1)[0] > 0.9).float().mean()
    assert agreement[True] > agreement[False]


def test_float64_and_bfloat16_autocast_forward():
    torch.manual_seed(0)
    model = DINO(tiny_config()).eval()
    batch = images((64, 96))
    memory = {}
    with torch.no_grad():
        handle = model.encoder.register_forward_hook(lambda m, i, o: memory.setdefault("fp32", o))
        ref = model(batch)
        handle.remove()
        handle = model.encoder.register_forward_hook(lambda m, i, o: memory.setdefault("bf16", o))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch)
        handle.remove()
        dbl = model.double()(batch)
    assert dbl["pred_logits"].dtype == torch.float64
    torch.testing.assert_close(dbl["pred_logits"].float(), ref["pred_logits"],
                               atol=1e-4, rtol=1e-4)
    # bf16 has ~3 significant digits: near-tied proposals may swap ranks (and with them
    # their queries), so compare the encoder memory, before any ranking.
    assert torch.isfinite(low["pred_boxes"]).all()
    err = (memory["bf16"].float() - memory["fp32"]).norm() / memory["fp32"].norm()
    assert err < 3e-2


def test_an_image_batch_gives_what_the_list_gives():
    from dinodet.structures import ImageBatch

    torch.manual_seed(0)
    model = DINO(tiny_config()).eval()
    ims = images((64, 96), (48, 80))
    batch = ImageBatch.from_images(ims)
    assert batch.image_sizes == [(64, 96), (48, 80)]
    with torch.no_grad():
        a, b = model(ims), model(batch)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)


def _backends(model):
    return [m.backend for m in model.modules() if isinstance(m, MSDeformAttn)]


def test_a_callable_attention_backend_is_called_and_used(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch.manual_seed(0)
    model = DINO(tiny_config(attention_backend="torch")).eval()
    cfg = model.cfg
    batch = images((64, 96))
    calls = []

    def recording(value, spatial_shapes, locations, weights):
        calls.append((value.shape, spatial_shapes, locations.shape, weights.shape))
        return ms_deform_attn(value, spatial_shapes, locations, weights)

    with torch.no_grad():
        want = model(batch)
        model.set_attention_backend(recording)
        got = model(batch)
        model.set_attention_backend(
            lambda value, _, loc, __: value.new_zeros(loc.shape[0], loc.shape[1], cfg.hidden_dim))
        zero = model(batch)
    assert len(calls) == cfg.enc_layers + cfg.dec_layers
    heads, head_dim = cfg.num_heads, cfg.hidden_dim // cfg.num_heads
    levels, s = cfg.num_feature_levels, calls[0][0][1]
    for i, (value, shapes, locations, weights) in enumerate(calls):
        lq, points = (s, cfg.enc_points) if i < cfg.enc_layers else (cfg.num_queries,
                                                                      cfg.dec_points)
        assert value == (1, s, heads, head_dim) and len(shapes) == levels
        assert sum(h * w for h, w in shapes) == s
        assert locations == (1, lq, heads, levels, points, 2)
        assert weights == (1, lq, heads, levels, points)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zero["pred_boxes"], want["pred_boxes"], atol=1e-3)
    # The plain function itself as the backend: the unfused path, same result.
    model.set_attention_backend(ms_deform_attn)
    with torch.no_grad():
        plain = model(batch)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(plain[key], want[key], rtol=1e-5, atol=1e-5)


def test_attention_backend_from_the_config_the_environment_and_the_setter(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = DINO(tiny_config())
    cfg = model.cfg
    assert cfg.attention_backend is None
    assert len(_backends(model)) == cfg.enc_layers + cfg.dec_layers
    assert set(_backends(model)) == {"auto"} and model.attention_backend == "auto"
    model = DINO(tiny_config(attention_backend="torch"))
    assert set(_backends(model)) == {"torch"} and model.attention_backend == "torch"
    # The environment variable is the default at build time; the config overrides it.
    monkeypatch.setenv(ENV_VAR, "torch")
    model = DINO(tiny_config())
    assert set(_backends(model)) == {"torch"}
    assert DINO(tiny_config(attention_backend="auto")).attention_backend == "auto"
    # Changing it afterwards changes no built module.
    monkeypatch.setenv(ENV_VAR, "auto")
    assert set(_backends(model)) == {"torch"} and model.attention_backend == "torch"
    # set_attention_backend reaches every MSDeformAttn, encoder and decoder.
    assert model.set_attention_backend("auto") is None
    assert set(_backends(model)) == {"auto"}
    model.set_attention_backend(ms_deform_attn)
    assert all(b is ms_deform_attn for b in _backends(model))
    assert model.attention_backend is ms_deform_attn
    assert model.encoder.layers[0].self_attn.backend is ms_deform_attn
    assert model.decoder.layers[-1].cross_attn.backend is ms_deform_attn
    monkeypatch.setenv(ENV_VAR, "torch")
    model.set_attention_backend(None)  # None: the environment variable, read now
    assert set(_backends(model)) == {"torch"}
    with pytest.raises(ValueError, match="'fast'"):
        model.set_attention_backend("fast")
    assert set(_backends(model)) == {"torch"}  # nothing changed
    with pytest.raises(ValueError, match=r"attention_backend.*'fast'"):
        DINOConfig(attention_backend="fast")
    # Modules set apart: no common backend to report.
    model.decoder.layers[0].cross_attn.backend = "auto"
    with pytest.raises(ValueError, match="different backends"):
        _ = model.attention_backend
