from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinodet.config import get_preset
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
    assert cfg.data.scales == tuple(range(480, 801, 32))
    assert cfg.data.scales[0] == 480 and cfg.data.scales[-1] == 800
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert cfg.optim.lr_drop_epochs == (11,) and cfg.epochs == 12
    assert cfg.optim.clip_max_norm == 0.1 and cfg.amp == "off"


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
data: {train_ann: from_yaml.json, scales: [320, 352]}
""")
    cfg = load_train_config("cpu-small", path, ["optim.lr=3e-4", "epochs=7",
                                                "model.backbone.name=resnet18"],
                            epochs=9, out_dir="runs/x", train_ann=None, batch_size=None)
    assert cfg.epochs == 9  # CLI keyword beats --set beats YAML
    assert cfg.batch_size == 4  # None keywords fall through to the YAML
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.05
    assert cfg.model.num_queries == 50 and cfg.model.backbone.name == "resnet18"
    assert cfg.model.hidden_dim == 128  # untouched preset field
    assert cfg.data.train_ann == "from_yaml.json" and cfg.data.scales == (320, 352)
    assert cfg.out_dir == "runs/x"


def test_cli_keywords_reach_sections():
    cfg = load_train_config("cpu-small", None, [], lr=5e-4, train_images="imgs",
                            num_classes=3)
    assert cfg.optim.lr == 5e-4 and cfg.data.train_images == "imgs"
    assert cfg.model.num_classes == 3
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        load_train_config("cpu-small", None, [], bogus=1)


def test_yaml_and_set_choose_the_preset(tmp_path):
    path = write(tmp_path, "preset: cpu-small\n")
    assert load_train_config(None, path).model == get_preset("cpu-small")
    assert load_train_config(None, path, ["preset=r50-5scale"]).preset == "r50-5scale"
    assert load_train_config("r50-4scale", path).preset == "r50-4scale"
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_train_config(None, None, ["preset=nope"])


@pytest.mark.parametrize(("item", "message"), [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
    ("optim.lr=abc", "optim.lr: expected a float, got 'abc'"),
    ("model.num_queries=abc", "model.num_queries: expected an integer, got 'abc'"),
    ("model.backbone.nme=resnet18", "unknown key 'model.backbone.nme'"),
    ("model.backbone.name=vgg", "model.backbone.name: expected one of"),
    ("model.hidden_dim=100", "model: .*hidden_dim"),
    ("amp=fp32", "amp: expected one of 'off', 'bf16', 'fp16', got 'fp32'"),
    ("ema=maybe", "ema: expected true or false"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 floats"),
    ("epochs=0", "epochs: must be >= 1"),
    ("epochs.x=1", "unknown key 'epochs.x'"),
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
    with pytest.raises(ValueError, match=r"train\.yaml: unknown key 'optim\.lrr'"):
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
    assert isinstance(back.data.scales, tuple) and back.model.backbone.return_levels == (2, 3)
    with pytest.raises(ValueError, match=r"unknown key 'optim\.lrr'"):
        TrainConfig.from_dict({**data, "optim": {**data["optim"], "lrr": 1}})
    with pytest.raises(ValueError, match="model: "):
        TrainConfig.from_dict({**data, "model": {**data["model"], "num_heads": 5}})


def test_to_yaml_loads_back(tmp_path):
    cfg = load_train_config("cpu-small", None, ["epochs=3", "optim.schedule=cosine"])
    path = write(tmp_path, cfg.to_yaml())
    assert load_train_config(None, path) == cfg


def test_direct_construction_is_checked():
    assert OptimConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)
    with pytest.raises(ValueError, match=r"optim\.lr: must be > 0"):
        OptimConfig(lr=0)
    with pytest.raises(ValueError, match=r"optim\.lr_drop_epochs"):
        OptimConfig(schedule="step", lr_drop_epochs=())
    with pytest.raises(ValueError, match=r"data\.crop_max"):
        DataConfig(crop_min=600, crop_max=384)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="gpu")
    with pytest.raises(ValueError, match="epochs: expected an integer"):
        TrainConfig(epochs="many")
