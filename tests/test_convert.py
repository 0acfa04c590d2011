"""Loading the original's checkpoints and dinodet's own format."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch

import dinodet
from dinodet.cli import main as cli_main
from dinodet.convert import CheckpointError, original_to_dinodet
from dinodet.model.swin import make_relative_position_index

from reference_weights import load_manifest, make_state_dict


@pytest.fixture(scope="module")
def r50_sd():
    return make_state_dict(load_manifest("dino_r50_4scale"))


def _released_checkpoint(sd, path, prefix=""):
    """Save like the original's training script: model, optimizer, args Namespace, epoch."""
    ckpt = {
        "model": {prefix + k: v for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "lr_scheduler": {"step_size": 11, "last_epoch": 12},
        "epoch": 11,
        "args": argparse.Namespace(lr=1e-4, num_classes=91, dn_number=100,
                                   backbone="resnet50", return_interm_indices=[1, 2, 3]),
    }
    torch.save(ckpt, path)
    return path


def _forward_small(model):
    with torch.no_grad():
        return model([torch.randn(3, 96, 128), torch.randn(3, 64, 112)])


@pytest.mark.parametrize(("manifest", "variant"), [
    ("dino_r50_5scale", "r50-5scale"),
    ("dino_swinl_4scale", "swinl-4scale"),
])
def test_every_manifest_key_converts_and_the_model_runs(manifest, variant):
    man = load_manifest(manifest)
    sd = make_state_dict(man)
    renamed = original_to_dinodet(sd)
    model = dinodet.from_original(sd, variant)
    # Nothing missing, nothing unexpected: every model tensor came from the checkpoint.
    assert set(renamed) == set(model.state_dict())
    for key, value in renamed.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    out = _forward_small(model)
    assert out["pred_logits"].shape[-1] == 91
    assert torch.isfinite(out["pred_boxes"]).all()


def test_swin_index_buffers_accepted_when_present_and_checked():
    man = load_manifest("dino_swinl_4scale")
    sd = make_state_dict(man)
    index_keys = [e["name"] for e in man["tensors"] if e["dtype"] == "int64"]
    assert index_keys
    with_index = dict(sd, **{k: make_relative_position_index(12) for k in index_keys})
    dinodet.from_original(with_index, "swinl-4scale")
    bad = dict(with_index)
    bad[index_keys[3]] = make_relative_position_index(12).flip(0)
    with pytest.raises(CheckpointError, match=index_keys[3].replace(".", r"\.")):
        dinodet.from_original(bad, "swinl-4scale")


def test_released_pth_with_args_namespace_and_module_prefix(r50_sd, tmp_path):
    path = _released_checkpoint(r50_sd, tmp_path / "checkpoint0011_4scale.pth", "module.")
    model = dinodet.from_original(path, "r50-4scale")
    assert not model.training
    torch.testing.assert_close(model.class_head.weight, r50_sd["class_embed.0.weight"])
    torch.testing.assert_close(model.query_selection.content.weight,
                               r50_sd["transformer.tgt_embed.weight"])


def test_convert_cli_writes_safetensors_that_load_without_pickle(r50_sd, tmp_path, monkeypatch):
    path = _released_checkpoint(r50_sd, tmp_path / "orig.pth")
    out_dir = tmp_path / "converted"
    assert cli_main(["convert", str(path), str(out_dir), "--variant", "r50-4scale"]) == 0
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["config"]["num_classes"] == 91

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = dinodet.load_pretrained(out_dir)
    monkeypatch.undo()
    reference = dinodet.from_original(r50_sd, "r50-4scale")
    images = [torch.randn(3, 64, 96)]
    with torch.no_grad():
        a, b = loaded(images), reference(images)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)


def test_finetuning_to_other_classes_reinitialises_only_class_heads(r50_sd):
    with pytest.warns(UserWarning, match="re-initialising class_head"):
        model = dinodet.from_original(r50_sd, "r50-4scale", num_classes=5)
    assert model.class_head.weight.shape == (5, 256)
    assert model.query_selection.class_head.weight.shape == (5, 256)
    assert model.label_embed.weight.shape == (6, 256)
    torch.testing.assert_close(model.box_head.layers[0].weight,
                               r50_sd["bbox_embed.0.layers.0.weight"])
    torch.testing.assert_close(model.backbone.layer4[0].conv1.weight,
                               r50_sd["backbone.0.body.layer4.0.conv1.weight"])
    out = _forward_small(model)
    assert out["pred_logits"].shape[-1] == 5


def test_unknown_variant_is_named(r50_sd):
    with pytest.raises(ValueError, match=r"unknown variant 'r50-3scale'.*r50-4scale"):
        dinodet.from_original(r50_sd, "r50-3scale")


def test_wrong_checkpoint_names_the_keys(r50_sd):
    # A 5-scale checkpoint does not fit the 4-scale layout: shapes named.
    sd5 = make_state_dict(load_manifest("dino_r50_5scale"))
    with pytest.raises(CheckpointError, match=r"mis-shaped: .*level_embed"):
        dinodet.from_original(sd5, "r50-4scale")
    missing = {k: v for k, v in r50_sd.items() if not k.startswith("transformer.enc_output.")}
    with pytest.raises(CheckpointError, match=r"missing 2 key\(s\): query_selection\.enc_output"):
        dinodet.from_original(missing, "r50-4scale")
    extra = dict(r50_sd, **{"transformer.mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"transformer\.mystery\.weight"):
        dinodet.from_original(extra, "r50-4scale")
    conflicting = dict(r50_sd)
    conflicting["class_embed.3.bias"] = conflicting["class_embed.3.bias"] + 1
    with pytest.raises(CheckpointError, match=r"class_embed\.3\.bias"):
        dinodet.from_original(conflicting, "r50-4scale")


def test_truncated_and_foreign_files_fail_with_the_file_name(r50_sd, tmp_path):
    path = _released_checkpoint(r50_sd, tmp_path / "full.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated or corrupt"):
        dinodet.from_original(truncated, "r50-4scale")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth"):
        dinodet.from_original(text, "r50-4scale")
    with pytest.raises(CheckpointError, match="not found"):
        dinodet.from_original(tmp_path / "absent.pth", "r50-4scale")
    no_model = tmp_path / "optimizer_only.pth"
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, no_model)
    with pytest.raises(CheckpointError, match="no model weights"):
        dinodet.from_original(no_model, "r50-4scale")


class _Payload:
    pass


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="not allowed to be unpickled"):
        dinodet.from_original(path, "r50-4scale")


def test_convert_cli_reports_errors_with_exit_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    assert cli_main(["convert", str(bad), str(tmp_path / "out"), "--variant",
                     "r50-4scale"]) == 2
    assert "bad.pth" in capsys.readouterr().err
