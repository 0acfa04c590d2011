"""dinodet against outputs recorded from the authors' implementation (float64)."""

from __future__ import annotations

import pytest
import torch

import dinodet
from dinodet.model.denoising import DenoisingQueries

from reference_weights import load_manifest, make_state_dict

LOGIT_TOL, BOX_TOL, MEMORY_TOL = 1e-5, 2e-6, 1e-6


@pytest.mark.parametrize("name", ["dino_r50_4scale", "dino_r50_5scale", "dino_swinl_4scale"])
def test_stand_in_weights_match_manifest_checksums(name):
    manifest = load_manifest(name)
    sd = make_state_dict(manifest)
    checked = 0
    for e in manifest["tensors"]:
        if "checksum" not in e:
            continue
        got = float(sd[e["name"]].double().sum())
        assert got == pytest.approx(e["checksum"], rel=1e-9, abs=1e-6), e["name"]
        checked += 1
    assert checked > 500


@pytest.fixture(scope="module")
def model():
    sd = make_state_dict(load_manifest("dino_r50_4scale"))
    return dinodet.from_original(sd, "r50-4scale").double()


@pytest.fixture(scope="module")
def recorded(model, case):
    """One eval pass with the encoder memory and every module's output dtype captured."""
    captured: dict = {"dtypes": set()}

    def record_dtype(_mod, _inp, out):
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                captured["dtypes"].add(t.dtype)

    hooks = [m.register_forward_hook(record_dtype) for m in model.modules()]
    hooks.append(model.encoder.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("memory", out)))
    with torch.no_grad():
        captured["out"] = model(case["images"])
    for h in hooks:
        h.remove()
    return captured


def test_model_is_in_eval_mode_after_loading(model):
    assert not model.training


def test_encoder_memory(recorded, case):
    torch.testing.assert_close(recorded["memory"], case["encoder_memory"],
                               atol=MEMORY_TOL, rtol=0)


def test_every_intermediate_follows_float64(recorded):
    assert recorded["dtypes"] == {torch.float64}


def _assert_layer(out, logits, boxes):
    torch.testing.assert_close(out["pred_logits"], logits, atol=LOGIT_TOL, rtol=0)
    torch.testing.assert_close(out["pred_boxes"], boxes, atol=BOX_TOL, rtol=0)


def test_every_decoder_layer_and_encoder_outputs(recorded, case):
    out = recorded["out"]
    _assert_layer(out, case["pred_logits"], case["pred_boxes"])
    assert len(out["aux_outputs"]) == 5
    for i, aux in enumerate(out["aux_outputs"]):
        _assert_layer(aux, case["aux_logits"][i], case["aux_boxes"][i])
    _assert_layer(out["interm_outputs"], case["interm_logits"], case["interm_boxes"])
    for v in [out["pred_logits"], out["pred_boxes"]]:
        assert v.dtype == torch.float64


def test_postprocessed_detections_are_the_same_set(recorded, case):
    results = dinodet.postprocess(recorded["out"], case["target_sizes"], num_select=300)
    for got, want in zip(results, case["results"]):
        assert got["scores"].shape == (300,)
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=0)
        # Equal scores may come in another order: compare as sets of (label, box).
        key_got = sorted(zip(got["labels"].tolist(), got["boxes"].round(decimals=2).tolist()))
        key_want = sorted(zip(want["labels"].tolist(), want["boxes"].round(decimals=2).tolist()))
        assert [k[0] for k in key_got] == [k[0] for k in key_want]
        torch.testing.assert_close(torch.tensor([k[1] for k in key_got]),
                                   torch.tensor([k[1] for k in key_want]), atol=1e-2, rtol=0)
        torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=0)


def test_criterion_total_on_model_outputs(recorded, case):
    losses = dinodet.build_criterion(91)(recorded["out"], case["targets"])
    assert losses["loss"].item() == pytest.approx(case["weighted_loss_total"], rel=1e-4)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_interm"):
        assert losses[key].item() == pytest.approx(case["losses"][key], rel=1e-4, abs=1e-6)
    assert not any(k.endswith("_dn") or "_dn_" in k for k in losses)


@pytest.fixture(scope="module")
def denoised(model, case):
    dn = case["dn"]
    queries = DenoisingQueries(
        content=dn["query_content"], anchor_logits=dn["query_anchor_logits"],
        attn_mask=dn["attn_mask"], num_groups=dn["num_groups"], pad_size=dn["pad_size"],
        noised_labels=dn["noised_labels"])
    with torch.no_grad():
        return model(case["images"], denoising=queries)


def test_recorded_denoising_queries_reproduce_every_layer(denoised, case):
    dn = case["dn"]
    _assert_layer(denoised, dn["pred_logits"], dn["pred_boxes"])
    out = denoised["dn_outputs"]
    layers = [*out["aux_outputs"], out]
    assert len(layers) == 6
    for i, layer in enumerate(layers):
        _assert_layer(layer, dn["dn_logits"][i], dn["dn_boxes"][i])


def test_training_total_with_denoising_terms(denoised, case):
    losses = dinodet.build_criterion(91)(denoised, case["targets"])
    want = case["dn"]["weighted_loss_total"]
    assert losses["loss"].item() == pytest.approx(want, rel=1e-4)
    for key in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0"):
        assert losses[key].item() == pytest.approx(case["dn"]["losses"][key], rel=1e-4)
