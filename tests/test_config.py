"""The detector's config (dinodet.config) and the walker every config goes through
(dinodet.settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

import dinodet
from dinodet import settings
from dinodet.config import LIMITS, PRESETS, BackboneConfig, DINOConfig, get_preset


def test_config_rejects_bad_values_by_name():
    # Moved from tests/model/test_dino.py; the key and the value are named.
    with pytest.raises(ValueError, match=r"^hidden_dim: .*, got 100$"):
        DINOConfig(hidden_dim=100)
    with pytest.raises(ValueError, match=r"^query_selection: expected one of .*got 'two-stage'"):
        DINOConfig(query_selection="two-stage")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^backbone\.depth: unknown key.*got 50$"):
        DINOConfig.from_dict({"backbone": {"depth": 50}})
    cfg = DINOConfig.from_dict(dinodet.get_preset("cpu-small").to_dict())
    assert cfg == dinodet.get_preset("cpu-small")


@pytest.mark.parametrize(("data", "message"), [
    ({"num_heads": 3}, r"^hidden_dim: not divisible by num_heads=3, got 256$"),
    ({"num_queries": 0}, r"^num_queries: must be a positive integer, got 0$"),
    ({"num_queries": 2.5}, r"^num_queries: expected an integer, got 2\.5$"),
    ({"dropout": 1.0}, r"^dropout: must be in \[0, 1\), got 1\.0$"),
    ({"dn_labelbook_size": 10}, r"^dn_labelbook_size: smaller than num_classes=91, got 10$"),
    ({"num_feature_levels": 2}, r"^num_feature_levels: fewer than the 3 backbone levels"),
    ({"attention_backend": "cuda"}, r"^attention_backend: expected one of 'auto', 'triton', "
                                    r"'torch' or null, got 'cuda'$"),
    ({"backbone": {"name": "vgg"}}, r"^backbone\.name: expected one of 'resnet18'.*got 'vgg'$"),
    ({"backbone": {"return_levels": [2, 1]}}, r"^backbone\.return_levels: must be increasing"),
    ({"backbone": "resnet18"}, r"^backbone: expected a mapping, got 'resnet18'$"),
    ({"look_forward_twice": "yes"}, r"^look_forward_twice: expected true or false, got 'yes'$"),
])
def test_from_dict_errors_name_the_key_and_value(data, message):
    with pytest.raises(ValueError, match=message):
        DINOConfig.from_dict(data)


def test_round_trip_and_replace():
    cfg = get_preset("r50-5scale")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["backbone"]["return_levels"] == [0, 1, 2, 3]  # tuples become lists
    assert DINOConfig.from_dict(data) == cfg
    assert DINOConfig.from_dict({"attention_backend": "triton"}).attention_backend == "triton"
    assert DINOConfig().attention_backend is None
    small = cfg.replace(num_classes=3, backbone={"name": "resnet18"})
    assert small.num_classes == 3 and small.backbone.name == "resnet18"
    assert small.backbone.return_levels == (0, 1, 2, 3) and cfg.num_classes == 91
    other = cfg.replace(backbone=BackboneConfig(name="resnet34"))
    assert other.backbone == BackboneConfig(name="resnet34")
    with pytest.raises(ValueError, match=r"^backbone\.nme: unknown key \(did you mean "
                                         r"'backbone\.name'\?\)"):
        cfg.replace(backbone={"nme": "resnet18"})
    # A nested dict is built on direct construction as well.
    assert DINOConfig(backbone={"name": "resnet18"}).backbone.name == "resnet18"  # type: ignore[arg-type]


def test_presets():
    assert get_preset("cpu-small") is not PRESETS["cpu-small"]
    assert get_preset("r50-4scale").num_feature_levels == 4
    with pytest.raises(ValueError, match=r"unknown variant 'r50-3scale'.*r50-4scale"):
        get_preset("r50-3scale")


# The walker on its own, on a dataclass of every kind of field it handles.


@dataclass
class Inner:
    size: int = 1
    mode: Literal["off", "on", "auto"] = "auto"

    def __post_init__(self) -> None:
        settings.coerce_fields(self)
        settings.require(self.size > 0, "size", self.size, "must be > 0")


@dataclass
class Outer:
    rate: float = 0.5
    name: str = "x"
    pair: tuple[float, float] = (0.0, 1.0)
    sizes: tuple[int, ...] = (1,)
    path: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None

    def __post_init__(self) -> None:
        settings.coerce_fields(self)


def test_walker_coerces_by_type_hints():
    o = settings.from_dict(Outer, {"rate": "2e-4", "name": 2024, "pair": [1, 2], "sizes": 3,
                                   "path": None, "flag": True, "inner": {"mode": False},
                                   "extra": {"size": 4.0}})
    assert o.rate == 2e-4 and o.name == "2024" and o.pair == (1.0, 2.0) and o.sizes == (3,)
    assert o.inner == Inner(mode="off") and o.extra == Inner(size=4)
    assert isinstance(o.extra.size, int) and isinstance(o.pair[0], float)
    back = settings.to_dict(o)
    assert back["pair"] == [1.0, 2.0] and back["inner"] == {"size": 1, "mode": "off"}
    assert settings.from_dict(Outer, back) == o
    assert Outer(sizes=[2, 3]).sizes == (2, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "message"), [
    ({"pair": [1]}, r"^pair: expected a list of 2 floats, got \[1\]$"),
    ({"pair": [1, 2, 3]}, r"^pair: expected a list of 2 floats, got \[1, 2, 3\]$"),
    ({"sizes": [1, "a"]}, r"^sizes: expected a list of integers, got \[1, 'a'\]$"),
    ({"flag": 1}, r"^flag: expected true or false, got 1$"),
    ({"rate": True}, r"^rate: expected a float, got True$"),
    ({"path": 3.5j}, r"^path: expected a string or null"),
    ({"inner": {"mode": "maybe"}}, r"^inner\.mode: expected one of 'off', 'on', 'auto'"),
    ({"inner": {"size": 0}}, r"^inner\.size: must be > 0, got 0$"),
    ({"extra": {"size": -1}}, r"^extra\.size: must be > 0, got -1$"),
    ({"inner": {"sise": 2}}, r"^inner\.sise: unknown key \(did you mean 'inner\.size'\?\), got 2"),
    ({"size": 2}, r"^size: unknown key \(did you mean 'inner\.size'\?\)"),
    ({"zzz": 2}, r"^zzz: unknown key \(known: rate, name, pair,"),
])
def test_walker_errors(data, message):
    with pytest.raises(ValueError, match=message):
        settings.from_dict(Outer, data)


def test_walker_prefix_and_overrides():
    with pytest.raises(ValueError, match=r"^top\.inner\.size: must be > 0"):
        settings.from_dict(Outer, {"inner": {"size": 0}}, "top.")
    tree = settings.to_dict(Outer())
    for item in ("inner.mode=off", "rate=2e-4", "name=off", "path=null", "sizes=[4, 5]",
                 "inner={size: 7}", "extra.size=3"):
        settings.apply_override(tree, Outer, item)
    o = settings.from_dict(Outer, tree)
    assert o.inner == Inner(size=7, mode="off") and o.rate == 2e-4 and o.name == "off"
    assert o.path is None and o.sizes == (4, 5) and o.extra == Inner(size=3)
    with pytest.raises(ValueError, match=r"^--set pair=\[1\]: pair: expected a list of 2 floats"):
        settings.apply_override(tree, Outer, "pair=[1]")
    with pytest.raises(ValueError, match=r"^--set rate\.x=1: rate\.x: unknown key \(rate is not "
                                         r"a section\), got '1'$"):
        settings.apply_override(tree, Outer, "rate.x=1")
    assert settings.parse_set(" a.b = c=d ") == ("a.b", "c=d")
    assert settings.parse_value("off", Literal["off", "on"]) == "off"
    assert settings.parse_value("off", bool) is False
    assert settings.parse_value("null", str | None) is None
    assert settings.parse_value("1.50", str) == "1.50"


@pytest.mark.parametrize(("key", "limit"), sorted(LIMITS.items()))
def test_every_size_is_bounded_by_its_limit(key, limit):
    with pytest.raises(ValueError, match=rf"^{key}: must be <= {limit}, got {limit + 1}$"):
        DINOConfig.from_dict({key: limit + 1})
    DINOConfig.from_dict({key: limit} if key != "num_heads" else
                         {key: limit, "hidden_dim": limit * 32})


def test_the_limits_message_and_generous_values():
    with pytest.raises(ValueError, match=r"^num_queries: must be <= 100000, got 100000000000$"):
        DINOConfig(num_queries=10**11)
    # every preset, and sizes well past the released models', stay within the limits
    for cfg in PRESETS.values():
        DINOConfig.from_dict(cfg.to_dict())
    DINOConfig(num_classes=100_000, num_queries=5000, num_select=5000, hidden_dim=1024,
               num_heads=16, dim_feedforward=8192, enc_layers=12, dec_layers=12,
               dn_number=1000)
    for key, value in (("pe_temperature", float("nan")), ("pe_temperature", 0.0),
                       ("dn_box_noise_scale", float("inf"))):
        with pytest.raises(ValueError, match=rf"^{key}: "):
            DINOConfig.from_dict({key: value})
