from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinodet.config import get_preset
from dinodet.data.transforms import TransformConfig
from dinodet.engine.config import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    load_train_config,
    parse_set,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_recipe():
    cfg = load_train_config()
    assert cfg.preset == "r50-4scale"
    assert cfg.model == get_preset("r50-4scale")
    assert cfg.data.transform.scales == tuple(range(480, 801, 32))
    assert cfg.data.transform.scales[0] == 480 and cfg.data.transform.scales[-1] == 800
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert cfg.optim.lr_drop_epochs == (11,) and cfg.epochs == 12
    assert cfg.optim.clip_max_norm == 0.1 and cfg.amp == "off"
    assert (cfg.batch_size, cfg.total_batch_size, cfg.eval_batch_size) == (2, 16, 1)
    assert cfg.describe_batch(1) == "total batch 16 = 1 process x 2 images x 8 steps"


def test_a_preset_is_a_whole_recipe():
    small = load_train_config("cpu-small")
    t = small.data.transform
    assert (t.eval_size, min(t.scales), max(t.scales), t.max_size) == (320, 192, 320, 533)
    assert (small.optim.lr, small.optim.schedule, small.batch_size) == (4e-4, "cosine", 4)
    assert small.total_batch_size is None and small.describe_batch(1).endswith("x 1 step")
    assert TrainConfig.from_preset("cpu-small") == small
    for name in ("r50-4scale", "r50-5scale", "swinl-4scale", "swinl-5scale"):
        assert load_train_config(name).total_batch_size == 16, name


def test_image_size_rescales_every_size_and_explicit_keys_still_win():
    cfg = load_train_config("cpu-small", image_size=256)
    t = cfg.data.transform
    assert (t.eval_size, max(t.scales), t.max_size, t.crop_max) == (256, 256, 426, 192)
    assert load_train_config("r50-4scale", image_size=400).data.transform == \
        TransformConfig().scaled(400)
    cfg = load_train_config("cpu-small", None, ["data.transform.eval_size=300"],
                            image_size=256)
    assert cfg.data.transform.eval_size == 300 and max(cfg.data.transform.scales) == 256
    with pytest.raises(ValueError, match="image_size"):
        load_train_config("cpu-small", image_size=8)


def test_preset_picks_the_model():
    assert load_train_config("cpu-small").model == get_preset("cpu-small")
    assert TrainConfig(preset="cpu-small").model.hidden_dim == 128


def test_precedence_preset_yaml_set_cli(tmp_path):
    path = write(tmp_path, """
epochs: 5
batch_size: 4
model:
  num_queries: 50
  backbone: {name: resnet34}
optim: {lr: 2e-4, weight_decay: 0.05}
data: {train_ann: from_yaml.json, transform: {scales: [320, 352]}}
""")
    cfg = load_train_config("cpu-small", path, ["optim.lr=3e-4", "epochs=7",
                                                "model.backbone.name=resnet18"],
                            epochs=9, out_dir="runs/x", train_ann=None, batch_size=None)
    assert cfg.epochs == 9  # CLI keyword beats --set beats YAML
    assert cfg.batch_size == 4  # None keywords fall through to the YAML
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.05
    assert cfg.model.num_queries == 50 and cfg.model.backbone.name == "resnet18"
    assert cfg.model.hidden_dim == 128  # untouched preset field
    assert cfg.data.train_ann == "from_yaml.json" and cfg.data.transform.scales == (320, 352)
    assert cfg.out_dir == "runs/x"


def test_cli_keywords_reach_sections():
    cfg = load_train_config("cpu-small", None, [], lr=5e-4, train_images="imgs",
                            num_classes=3)
    assert cfg.optim.lr == 5e-4 and cfg.data.train_images == "imgs"
    assert cfg.model.num_classes == 3
    with pytest.raises(ValueError, match=r"bogus: unknown key.*got 1"):
        load_train_config("cpu-small", None, [], bogus=1)


def test_yaml_and_set_choose_the_preset(tmp_path):
    path = write(tmp_path, "preset: cpu-small\n")
    assert load_train_config(None, path).model == get_preset("cpu-small")
    assert load_train_config(None, path, ["preset=r50-5scale"]).preset == "r50-5scale"
    assert load_train_config("r50-4scale", path).preset == "r50-4scale"
    with pytest.raises(ValueError, match=r"preset: choose one of .*got 'nope'"):
        load_train_config(None, None, ["preset=nope"])


@pytest.mark.parametrize(("item", "message"), [
    ("optim.lrr=1", r"optim\.lrr: unknown key \(did you mean 'optim\.lr'\?\), got '1'"),
    ("optim.lr=abc", "optim.lr: expected a float, got 'abc'"),
    ("model.num_queries=abc", "model.num_queries: expected an integer, got 'abc'"),
    ("model.backbone.nme=resnet18", r"model\.backbone\.nme: unknown key.*got 'resnet18'"),
    ("model.backbone.name=vgg", "model.backbone.name: expected one of"),
    ("model.hidden_dim=100", r"model\.hidden_dim: .*, got 100"),
    ("amp=fp32", "amp: expected one of 'off', 'bf16', 'fp16', got 'fp32'"),
    ("ema=maybe", "ema: expected true or false"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 floats"),
    ("epochs=0", "epochs: must be >= 1"),
    ("epochs.x=1", r"epochs\.x: unknown key \(epochs is not a section\)"),
    ("optim=3", "optim: expected a mapping"),
    ("no_equals_sign", "expected key=value"),
])
def test_set_errors_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        load_train_config("cpu-small", None, [item])


def test_set_value_parsing():
    cfg = load_train_config("cpu-small", None, [
        "optim.lr=2e-4",  # PyYAML reads this as a string
        "optim.gamma=1",  # int where a float is expected
        "amp=bf16", "ema=true", "optim.lr_drop_epochs=[8, 11]", "optim.schedule=multistep",
        "data.train_ann=null", "out_dir=2024", "optim.betas=[0.8, 0.9]",
        "model={num_queries: 30}",
    ])
    assert cfg.optim.lr == 2e-4 and cfg.optim.gamma == 1.0 and isinstance(cfg.optim.gamma,
                                                                           float)
    assert cfg.amp == "bf16" and cfg.ema is True
    assert cfg.optim.lr_drop_epochs == (8, 11) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.train_ann is None and cfg.out_dir == "2024"
    assert cfg.model.num_queries == 30
    assert load_train_config("cpu-small", None, ["amp=off"]).amp == "off"
    assert parse_set(" optim.lr = 1e-3 ") == ("optim.lr", "1e-3")


def test_yaml_errors_name_the_file_and_key(tmp_path):
    path = write(tmp_path, "optim:\n  lr: [1\n")
    with pytest.raises(ValueError, match=r"YAML syntax error in config file .*train\.yaml"):
        load_train_config("cpu-small", path)
    path = write(tmp_path, "optim:\n  lrr: 1\n")
    with pytest.raises(ValueError, match=r"train\.yaml: optim\.lrr: unknown key"):
        load_train_config("cpu-small", path)
    path = write(tmp_path, "data:\n  num_workers: two\n")
    with pytest.raises(ValueError, match=r"train\.yaml: data\.num_workers: expected an integer"):
        load_train_config("cpu-small", path)
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_train_config("cpu-small", path)
    with pytest.raises(ValueError, match="cannot read config file"):
        load_train_config("cpu-small", tmp_path / "missing.yaml")


def test_yaml_off_means_off(tmp_path):
    path = write(tmp_path, "amp: off\nmodel:\n")
    assert load_train_config("cpu-small", path).amp == "off"


def test_round_trip_through_json():
    cfg = load_train_config("cpu-small", None, ["optim.betas=[0.8, 0.95]", "amp=fp16",
                                                "model.backbone.return_levels=[2, 3]",
                                                "model.num_feature_levels=3"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["optim"]["betas"] == [0.8, 0.95]  # tuples become lists
    back = TrainConfig.from_dict(data)
    assert back == cfg
    assert isinstance(back.data.transform.scales, tuple)
    assert back.model.backbone.return_levels == (2, 3)
    with pytest.raises(ValueError, match=r"optim\.lrr: unknown key"):
        TrainConfig.from_dict({**data, "optim": {**data["optim"], "lrr": 1}})
    with pytest.raises(ValueError, match=r"model\.hidden_dim: .*num_heads=5"):
        TrainConfig.from_dict({**data, "model": {**data["model"], "num_heads": 5}})


def test_to_yaml_loads_back(tmp_path):
    cfg = load_train_config("cpu-small", None, ["epochs=3", "optim.schedule=cosine"])
    path = write(tmp_path, cfg.to_yaml())
    assert load_train_config(None, path) == cfg


def test_direct_construction_is_checked():
    assert OptimConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)
    # A section built on its own names its fields; inside a TrainConfig, by their full path.
    with pytest.raises(ValueError, match=r"^lr: must be in \(0, 1\] .*, got 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"^optim\.lr: must be in \(0, 1\] .*, got 0"):
        TrainConfig.from_dict({"optim": {"lr": 0}})
    with pytest.raises(ValueError, match=r"^lr_drop_epochs: .*'step' schedule"):
        OptimConfig(schedule="step", lr_drop_epochs=())
    with pytest.raises(ValueError, match=r"^transform\.crop_max: smaller than crop_min=600"):
        DataConfig(transform={"crop_min": 600, "crop_max": 384})
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="gpu")
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        TrainConfig(epochs="many")


def test_nested_set_reaches_the_backbone():
    cfg = load_train_config("cpu-small", None, [
        "model.backbone.name=resnet34", "model.backbone.return_levels=[0, 1, 2, 3]",
        "model.num_feature_levels=5", "model.backbone.frozen_batchnorm=off",
        "model.backbone.weights=null", "model.backbone.drop_path_rate=1e-1"])
    bb = cfg.model.backbone
    assert (bb.name, bb.return_levels, bb.frozen_batchnorm) == ("resnet34", (0, 1, 2, 3), False)
    assert bb.weights is None and bb.drop_path_rate == 0.1
    assert cfg.model.num_feature_levels == 5 and cfg.model.hidden_dim == 128  # preset kept
    assert cfg.model.backbone.freeze_stem is False  # cpu-small's, untouched


def test_literal_off_from_yaml_and_set(tmp_path):
    path = write(tmp_path, "model: {denoising: off, attention_backend: null}\n")
    cfg = load_train_config("cpu-small", path, ["amp=off"])
    assert cfg.model.denoising == "off" and cfg.amp == "off"
    assert cfg.model.attention_backend is None
    cfg = load_train_config("cpu-small", None, ["model.denoising=off",
                                                "model.attention_backend=torch"])
    assert cfg.model.denoising == "off" and cfg.model.attention_backend == "torch"


@pytest.mark.parametrize(("item", "message"), [
    ("optim.betas=[0.9, 0.99, 0.5]", r"optim\.betas: expected a list of 2 floats, got \[0\.9"),
    ("optim.betas=0.9", r"optim\.betas: expected a list of 2 floats, got 0\.9"),
    ("data.transform.mean=[0.5, 0.5]", r"data\.transform\.mean: expected a list of 3 floats"),
    ("data.transform.scales=[320, x]", r"data\.transform\.scales: expected a list of integers"),
])
def test_fixed_length_tuples_are_checked(item, message):
    with pytest.raises(ValueError, match=message):
        load_train_config("cpu-small", None, [item])


def test_unknown_keys_hint_at_the_right_place(tmp_path):
    # The sizes moved into data.transform: the old keys point there.
    with pytest.raises(ValueError, match=r"^--set data\.eval_size=320: data\.eval_size: unknown "
                                         r"key \(did you mean 'data\.transform\.eval_size'\?\)"):
        load_train_config("cpu-small", None, ["data.eval_size=320"])
    path = write(tmp_path, "data: {scales: [320]}\n")
    with pytest.raises(ValueError, match=r"train\.yaml: data\.scales: unknown key \(did you "
                                         r"mean 'data\.transform\.scales'\?\), got \[320\]"):
        load_train_config("cpu-small", path)
    with pytest.raises(ValueError, match=r"hidden_dim: unknown key \(did you mean "
                                         r"'model\.hidden_dim'\?\)"):
        load_train_config("cpu-small", None, ["hidden_dim=64"])
    with pytest.raises(ValueError, match=r"data\.transform\.zzz: unknown key \(known in "
                                         r"data\.transform: scales, max_size,"):
        load_train_config("cpu-small", None, ["data.transform.zzz=1"])


def test_transform_round_trip(tmp_path):
    cfg = load_train_config("cpu-small", None, [
        "data.transform.eval_size=320", "data.transform.scales=[256, 288, 320]",
        "data.transform.max_size=533", "data.transform.hflip_prob=0.25",
        "data.transform.mean=[0.5, 0.5, 0.5]"])
    t = cfg.data.transform
    assert isinstance(t, TransformConfig) and t.scales == (256, 288, 320) and t.mean == (0.5,) * 3
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["data"]["transform"]["scales"] == [256, 288, 320]
    assert data["data"]["transform"]["eval_size"] == 320 and "eval_size" not in data["data"]
    assert TrainConfig.from_dict(data) == cfg
    assert DataConfig(**data["data"]) == cfg.data  # direct construction takes plain data too
    assert load_train_config(None, write(tmp_path, cfg.to_yaml())) == cfg
    path = write(tmp_path, "data:\n  transform:\n    eval_size: 640\n    crop_max: 700\n")
    t = load_train_config("cpu-small", path).data.transform
    recipe = load_train_config("cpu-small").data.transform
    assert (t.eval_size, t.crop_max, t.crop_min) == (640, 700, recipe.crop_min)


@pytest.mark.parametrize(("item", "message"), [
    ("data.transform.crop_min=700", r"^data\.transform\.crop_max: smaller than crop_min=700, "
                                    r"got 240$"),
    ("data.transform.eval_size=0", r"^data\.transform\.eval_size: must be > 0, got 0$"),
    ("model.backbone.return_levels=[3, 1]", r"^model\.backbone\.return_levels: must be "
                                            r"increasing stage indices in 0\.\.3, got \(3, 1\)$"),
    ("model.num_heads=5", r"^model\.hidden_dim: not divisible by num_heads=5, got 128$"),
    ("optim.gamma=0", r"^optim\.gamma: must be > 0, got 0\.0$"),
    ("data.num_workers=-1", r"^data\.num_workers: must be >= 0, got -1$"),
])
def test_nested_validation_names_the_full_key(item, message):
    with pytest.raises(ValueError, match=message):
        load_train_config("cpu-small", None, [item])
