"""dinodet.weights: every source opens through one module, with one error type and an
explicit choice of EMA or raw weights."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import dinodet
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.transforms import EvalTransform
from dinodet.engine.checkpoint import CheckpointSaveError, load_checkpoint, save_checkpoint
from dinodet.engine.config import OptimConfig, TrainConfig
from dinodet.engine.step import TrainState
from dinodet.weights import (
    CheckpointError,
    CheckpointNotFoundError,
    load_initial_weights,
    load_model,
    open_weights,
)

from reference_weights import load_manifest, make_state_dict

CLASSES = [{"label": 0, "category_id": 5, "name": "a"}, {"label": 1, "category_id": 9,
                                                         "name": "b"}]


def _config(num_classes: int = 2) -> DINOConfig:
    return DINOConfig(num_classes=num_classes, backbone=BackboneConfig(
        name="resnet18", frozen_batchnorm=False, freeze_stem=False), hidden_dim=64,
        num_heads=4, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10,
        dn_number=4, num_select=10)


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A run checkpoint in the layout training writes, with EMA weights that differ from
    the raw ones."""
    torch.manual_seed(0)
    model = dinodet.build_model(_config())
    state = TrainState.create(model, OptimConfig(), steps_per_epoch=1, epochs=1,
                              ema_decay=0.9)
    assert state.ema is not None
    with torch.no_grad():
        state.ema.module.class_head.bias.add_(3.0)  # tell the two apart
    cfg = TrainConfig.from_dict({"preset": "cpu-small", "data": {"transform": {
        "eval_size": 96, "max_size": 150, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}})
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(path, {**state.state_dict(), "rng": [], "config": cfg.to_dict(),
                           "classes": CLASSES})
    return path, state


def test_a_run_checkpoint_gives_the_ema_weights_unless_raw_is_asked(run_checkpoint):
    path, state = run_checkpoint
    ema = load_model(path)
    assert ema.weights.which == "ema" and "EMA weights" in ema.weights.describe()
    torch.testing.assert_close(ema.model.class_head.bias, state.ema.module.class_head.bias)
    raw = load_model(path, weights="raw")
    assert raw.weights.which == "raw" and "raw weights" in raw.weights.describe()
    torch.testing.assert_close(raw.model.class_head.bias, state.model.class_head.bias)
    assert ema.classes == CLASSES
    assert ema.transform == EvalTransform(96, 150, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="'ema' or 'raw'"):
        load_model(path, weights="best")


def test_init_takes_the_same_weights_as_predict_and_says_which(run_checkpoint):
    path, state = run_checkpoint
    model = dinodet.build_model(_config())
    found = load_initial_weights(model, path)
    assert found.which == "ema"
    torch.testing.assert_close(model.class_head.bias, state.ema.module.class_head.bias)
    found = load_initial_weights(model, path, weights="raw")
    assert found.which == "raw"
    torch.testing.assert_close(model.class_head.bias, state.model.class_head.bias)


def test_init_onto_other_classes_reinitialises_only_the_class_heads(run_checkpoint):
    path, state = run_checkpoint
    model = dinodet.build_model(_config(num_classes=5))
    with pytest.warns(UserWarning, match="re-initialising .*class_head"):
        load_initial_weights(model, path)
    torch.testing.assert_close(model.box_head.layers[0].weight,
                               state.ema.module.box_head.layers[0].weight)


def test_a_truncated_run_checkpoint_is_named_as_truncated(run_checkpoint, tmp_path):
    path, _ = run_checkpoint
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is truncated or corrupt"):
        load_model(cut)
    with pytest.raises(CheckpointError, match=r"cut\.pt is truncated or corrupt"):
        load_checkpoint(cut)


def test_one_error_type_for_every_source(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as missing:
        load_model(tmp_path / "absent.pt")
    assert isinstance(missing.value, FileNotFoundError)
    assert isinstance(missing.value, CheckpointError) and isinstance(missing.value, ValueError)
    with pytest.raises(CheckpointError, match=r"config\.json missing"):
        load_model(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not a valid dinodet config"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps({"config": _config().to_dict()}))
    with pytest.raises(CheckpointNotFoundError, match=r"model\.safetensors"):
        load_model(bad)
    assert issubclass(CheckpointSaveError, CheckpointError)


def test_an_original_checkpoint_needs_its_variant(tmp_path):
    sd = make_state_dict(load_manifest("dino_r50_4scale"))
    path = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": sd, "args": argparse.Namespace(num_classes=91)}, path)
    found = open_weights(path)
    assert found.kind == "original DINO checkpoint" and found.config is None
    assert "class_head.weight" in found.state_dict  # already in dinodet's layout
    with pytest.raises(CheckpointError, match=r"give its variant \(e\.g\. --variant"):
        load_model(path)
    loaded = load_model(path, variant="r50-4scale")
    assert loaded.classes is None and loaded.model.num_classes == 91
    assert loaded.transform == EvalTransform(800, 1333)
    with pytest.raises(ValueError, match="unknown variant"):
        load_model(path, variant="r50-3scale")


def test_model_directory_round_trip_keeps_classes_and_transform(tmp_path):
    torch.manual_seed(1)
    model = dinodet.build_model(_config()).eval()
    dinodet.save_pretrained(model, tmp_path / "m", extra={"classes": CLASSES},
                            transform=EvalTransform(128))
    loaded = load_model(tmp_path / "m")
    assert loaded.weights.kind == "dinodet model directory" and loaded.classes == CLASSES
    assert loaded.transform == EvalTransform(128, 213)
    for (name, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_damaged_files_of_any_kind_are_a_checkpoint_error(tmp_path):
    for name, content in [("one.pth", b"\x80"), ("text.pth", b"epoch 11, not a checkpoint\n"),
                          ("zip.pth", b"PK\x03\x04" + bytes(60))]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_model(tmp_path / name, variant="r50-4scale")


def test_a_stored_attention_backend_does_not_follow_the_weights(tmp_path, monkeypatch):
    """A model saved with "triton" (trained on a GPU) opens anywhere: the backend is where
    the model runs (DINODET_MS_DEFORM_ATTN, else auto), not part of the file."""
    monkeypatch.delenv("DINODET_MS_DEFORM_ATTN", raising=False)
    dinodet.save_pretrained(dinodet.build_model(_config()), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["attention_backend"] = "triton"
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")
    assert loaded.model.cfg.attention_backend is None
    assert loaded.model.attention_backend == "auto"


def test_a_directory_of_weights_without_a_config_still_initialises(tmp_path):
    torch.manual_seed(2)
    source = dinodet.build_model(_config())
    dinodet.save_pretrained(source, tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    model = dinodet.build_model(_config())
    assert load_initial_weights(model, tmp_path / "m").kind == "safetensors file"
    torch.testing.assert_close(model.class_head.weight, source.class_head.weight)
