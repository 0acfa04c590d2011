"""dinodet.weights: every source opens through one module, with one error type and an
explicit choice of EMA or raw weights."""

from __future__ import annotations

import argparse
import json
import shutil

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


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "m"
    dinodet.save_pretrained(dinodet.build_model(_config()), out, extra={"classes": CLASSES})
    return out


@pytest.fixture()
def model_dir_with(saved_model_dir, tmp_path):
    """A copy of a saved model directory whose config.json has changes laid over it."""
    def make(**meta_changes):
        out = tmp_path / "m"
        shutil.copytree(saved_model_dir, out)
        meta = json.loads((out / "config.json").read_text())
        meta.update(meta_changes)
        (out / "config.json").write_text(json.dumps(meta))
        return out

    return make


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", r"config\.json is not a valid dinodet config: expected a JSON object with a "
               r"'config' entry, got list"),
    ('"config"', r"config\.json is not a valid dinodet config: expected a JSON object"),
    ('{"classes": []}', r"config\.json is not a valid dinodet config: no 'config' entry"),
    ('{"config": [256]}', r"config\.json: 'config' must be a mapping of model settings"),
    ('{"config": {"num_classes": "two"}}',
     r"config\.json: config\.num_classes: expected an integer, got 'two'"),
    ('{"config": {"backbone": {"name": 50}}}', r"config\.json: config\.backbone\.name: "),
    ('{"config": {"hidden_dim": 64, "num_heads": 5}}',
     r"config\.json: config\.hidden_dim: not divisible by num_heads=5"),
    ("{not json", r"config\.json is not a valid dinodet config: not JSON"),
    (b"\xff\xfe\x00garbage", r"config\.json is not a valid dinodet config: not JSON"),
    ("[" * 100_000, r"config\.json is not a valid dinodet config: not JSON"),
])
def test_a_bad_config_json_names_the_file_and_the_key(model_dir_with, text, message):
    out = model_dir_with()
    cfg = out / "config.json"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=message) as e:
        open_weights(out)
    assert str(cfg) in str(e.value)


@pytest.mark.parametrize(("key", "value", "limit"), [
    ("num_queries", 10**11, 100_000), ("num_classes", 10**9, 100_000),
    ("num_select", 10**6, 100_000), ("hidden_dim", 2**20, 4096),
    ("dim_feedforward", 10**8, 65_536), ("enc_layers", 1000, 64), ("dec_layers", 1000, 64),
    ("dn_number", 10**7, 10_000), ("enc_points", 10**4, 64),
])
def test_a_config_json_asking_for_too_much_fails_before_any_allocation(
        tmp_path, key, value, limit):
    folder = tmp_path / "m"
    folder.mkdir()  # no weights at all: the config is refused before they are looked for
    (folder / "config.json").write_text(json.dumps({"config": {key: value}}))
    with pytest.raises(CheckpointError, match=rf"config\.json: config\.{key}: must be "
                                              rf"<= {limit}, got {value}$"):
        load_model(folder)


@pytest.mark.parametrize(("classes", "message"), [
    ([{"label": 10**9, "category_id": 1, "name": "a"}],
     r"classes\[0\]\.label 1000000000 is outside the model's 2 classes \(0 to 1\)"),
    ([{"label": -1, "category_id": 1, "name": "a"}], r"classes\[0\]\.label -1 is outside"),
    ({"0": "a"}, r"'classes' must be a list of \{label, category_id, name\} objects"),
    (["a", "b"], r"classes\[0\] must be an object with label, category_id and name, got 'a'"),
    ([{"label": "0", "category_id": 1, "name": "a"}],
     r"classes\[0\]\.label must be an integer, got '0'"),
    ([{"label": 0, "category_id": 1.5, "name": "a"}],
     r"classes\[0\]\.category_id must be an integer, got 1\.5"),
    ([{"label": 0, "category_id": 1, "name": 7}], r"classes\[0\]\.name must be a string"),
    ([{"label": True, "category_id": 1, "name": "a"}], r"classes\[0\]\.label must be an int"),
    ([{"category_id": 1, "name": "a"}], r"classes\[0\] has no 'label'"),
    ([{"label": 0, "name": "a"}], r"classes\[0\] has no 'category_id'"),
    ([{"label": 0, "category_id": 1, "name": "a"}, {"label": 0, "category_id": 2,
                                                   "name": "b"}],
     r"classes\[1\]\.label 0 is given twice"),
    ([{"label": i, "category_id": i, "name": str(i)} for i in range(3)],
     r"'classes' has 3 entries for a model of 2 classes"),
])
def test_a_bad_class_table_names_the_file_and_the_entry(model_dir_with, classes, message):
    out = model_dir_with(classes=classes)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(out)
    assert str(out / "config.json") in str(e.value)


def test_a_bad_class_table_in_a_run_checkpoint_is_named(run_checkpoint, tmp_path):
    path, _ = run_checkpoint
    ckpt = torch.load(path, weights_only=True)
    ckpt["classes"] = [{"label": 5, "category_id": 1, "name": "a"}]
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"checkpoint .*bad\.pt: classes\[0\]\.label 5 "
                                              r"is outside the model's 2 classes"):
        load_model(bad)
    ckpt["classes"] = CLASSES
    ckpt["model_config"] = {**ckpt["model_config"], "num_queries": 10**11}
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pt: model_config\.num_queries: must be "
                                              r"<= 100000"):
        load_model(bad)


@pytest.mark.parametrize(("meta", "message"), [
    ({"eval_size": 10**9}, r"eval_size must be an integer in \[1, 10000\]"),
    ({"eval_size": "800"}, r"eval_size must be an integer"),
    ({"max_size": 10**7}, r"max_size must be an integer in \[1, 20000\]"),
    ({"mean": [0.5, 0.5]}, r"mean must be 3 finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, r"std must be 3 finite numbers > 0"),
])
def test_a_stored_transform_is_bounded(model_dir_with, meta, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(model_dir_with(**meta))


def test_the_detector_never_names_more_classes_than_the_model_has(tmp_path):
    from dinodet.predict import Detector

    model = dinodet.build_model(_config())
    det = Detector(model, classes=[{"label": 1, "name": "b"}])
    assert det.class_names == ["0", "b"] and det.label_to_category_id == {1: 1}
    with pytest.raises(CheckpointError, match=r"classes\[0\]\.label 1000000000 is outside "
                                              r"the model's 2 classes"):
        Detector(model, classes=[{"label": 10**9, "name": "huge"}])


def test_corrupt_weights_in_a_model_directory_name_the_file(model_dir_with):
    out = model_dir_with()
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    for with_config in (True, False):
        if not with_config:
            (out / "config.json").unlink()
        with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
            open_weights(out)
        with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
            load_initial_weights(dinodet.build_model(_config()), out)
    weights.write_bytes(b"\x00" * 7)  # shorter than a header
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
        load_initial_weights(dinodet.build_model(_config()), out)


def test_a_corrupt_config_json_fails_init_naming_it(model_dir_with):
    out = model_dir_with()
    (out / "config.json").write_text('{"config": {"num_classes": ')
    with pytest.raises(CheckpointError, match=r"config\.json is not a valid dinodet config"):
        load_initial_weights(dinodet.build_model(_config()), out)


class _Gadget:
    """Anything but tensors and plain data: unpickling it would run its class's code."""


def test_a_pickled_object_is_refused_without_torch_advice(tmp_path):
    from dinodet.weights import read_torch_file

    path = tmp_path / "gadget.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Gadget()}, path)
    for call in (lambda: read_torch_file(path), lambda: load_model(path),
                 lambda: load_initial_weights(dinodet.build_model(_config()), path)):
        with pytest.raises(CheckpointError) as e:
            call()
        message = str(e.value)
        assert str(path) in message and "_Gadget" in message and "refused" in message
        assert "not allowed to be unpickled" in message
        for advice in ("weights_only", "likely succeed", "safe_globals", "trust"):
            assert advice not in message, advice


def test_damaged_pickles_are_corrupt_not_foreign_and_carry_no_advice(tmp_path):
    from dinodet.weights import read_torch_file

    path = tmp_path / "odd.pt"
    path.write_bytes(b"\x80\x02\x95garbage that is no pickle")
    with pytest.raises(CheckpointError, match=r"odd\.pt is truncated or corrupt") as e:
        read_torch_file(path)
    assert "weights_only" not in str(e.value) and "likely succeed" not in str(e.value)


def test_output_paths_are_checked_without_creating_anything(tmp_path):
    from dinodet.errors import RunDirError, UserError
    from dinodet.weights import check_output_dir, check_output_file

    a_file = tmp_path / "f.txt"
    a_file.write_text("")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with pytest.raises(RunDirError, match=r"f\.txt is a file, not a folder"):
        check_output_dir(a_file, "--out")
    with pytest.raises(RunDirError, match=r"--out .*f\.txt/sub: .*f\.txt is a file"):
        check_output_dir(a_file / "sub", "--out")
    with pytest.raises(UserError, match=r"is a folder"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match=r"f\.txt is a file, not a folder"):
        check_output_file(a_file / "x.json")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RunDirError, match="broken symbolic link"):
        check_output_dir(tmp_path / "dangling" / "x")


def test_save_pretrained_checks_its_folder_first(tmp_path):
    from dinodet.errors import RunDirError

    a_file = tmp_path / "f.txt"
    a_file.write_text("keep")
    with pytest.raises(RunDirError, match=r"model directory .*f\.txt/m: .*f\.txt is a file"):
        dinodet.save_pretrained(dinodet.build_model(_config()), a_file / "m")
    assert a_file.read_text() == "keep"
