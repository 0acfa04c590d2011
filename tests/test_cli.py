"""The `dinodet` command line: parsing, input discovery, errors that name the file, the
weights choice, the detect-only demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinodet
from dinodet.cli import _predict_inputs, build_parser, main
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.engine.checkpoint import save_checkpoint
from dinodet.engine.config import OptimConfig, TrainConfig
from dinodet.engine.step import TrainState

COMMANDS = ["convert", "train", "eval", "plot", "demo", "predict", "export"]


def _config() -> DINOConfig:
    return DINOConfig(num_classes=2, backbone=BackboneConfig(
        name="resnet18", frozen_batchnorm=False, freeze_stem=False), hidden_dim=64,
        num_heads=4, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10,
        dn_number=4, num_select=10)


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory) -> Path:
    """A run checkpoint whose EMA weights score differently from its raw ones."""
    torch.manual_seed(0)
    state = TrainState.create(dinodet.build_model(_config()), OptimConfig(), 1, 1,
                              ema_decay=0.9)
    assert state.ema is not None
    with torch.no_grad():
        state.ema.module.class_head.bias.sub_(2.0)
    cfg = TrainConfig.from_dict({"preset": "cpu-small",
                                 "data": {"transform": {"eval_size": 64}}})
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    classes = [{"label": 0, "category_id": 1, "name": "x"},
               {"label": 1, "category_id": 2, "name": "y"}]
    save_checkpoint(path, {**state.state_dict(), "rng": [], "config": cfg.to_dict(),
                           "classes": classes})
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_every_command_parses_and_has_help(capsys):
    parser = build_parser()
    for command in COMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0
        assert command in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["predict", "x.pt", "a.jpg", "--out", "o", "--weights", "best"])
    assert done.value.code == 2
    assert "invalid choice: 'best'" in capsys.readouterr().err


def test_predict_inputs_expand_folders_and_globs_and_report_misses(tmp_path):
    (tmp_path / "dir").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / "dir" / name).write_bytes(b"")
    (tmp_path / "c.jpg").write_bytes(b"")
    files, missing = _predict_inputs([str(tmp_path / "dir"), str(tmp_path / "*.jpg"),
                                      str(tmp_path / "c.jpg"), str(tmp_path / "none*.png")])
    assert [Path(f).name for f in files] == ["a.PNG", "b.jpg", "c.jpg"]  # no duplicate
    assert missing == [str(tmp_path / "none*.png")]


def test_synthetic_image_is_deterministic_and_has_shapes():
    from dinodet.data.synthetic import synthetic_image

    a, b = synthetic_image(40, 60, seed=3), synthetic_image(40, 60, seed=3)
    assert a.shape == (40, 60, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_image(40, 60, seed=4))
    # saturated shape colours on a grey background: some pixel is far from grey
    assert (a.max(-1).astype(int) - a.min(-1)).max() > 100


def test_predict_uses_the_ema_weights_unless_raw_is_asked(ema_checkpoint, image, tmp_path):
    scores = {}
    for choice in ("ema", "raw"):
        out = tmp_path / choice
        args = ["predict", str(ema_checkpoint), str(image), "--out", str(out),
                "--threshold", "0"]
        assert main([*args, "--weights", choice] if choice == "raw" else args) == 0
        (record,) = json.loads((out / "detections.json").read_text())
        scores[choice] = max(d["score"] for d in record["detections"])
    # the EMA's class bias is 2 lower: small sigmoid scores shrink about e^2-fold
    assert scores["ema"] < scores["raw"] / 3


def test_a_truncated_checkpoint_is_reported_as_truncated_not_as_foreign(
        ema_checkpoint, image, tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ema_checkpoint.read_bytes()[:4096])
    for args in (["predict", str(cut), str(image), "--out", str(tmp_path / "o")],
                 ["export", str(cut), "--out", str(tmp_path / "m.onnx")],
                 ["eval", "--checkpoint", str(cut), "--ann", "a.json", "--images", "i"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "cut.pt is truncated or corrupt" in err and "--variant" not in err


def test_a_missing_checkpoint_exits_2_naming_it(image, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope.pt"), str(image), "--out",
                 str(tmp_path / "o")]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_detect_only_demo_runs_a_model_directory(tmp_path, capsys):
    torch.manual_seed(0)
    dinodet.save_pretrained(dinodet.build_model(_config()).eval(), tmp_path / "m",
                            transform=dinodet.EvalTransform(64))
    assert main(["demo", "--detect-only", "--weights", str(tmp_path / "m"), "--height", "48",
                 "--width", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "resized to 64x106" in out
    rows = [line for line in out.splitlines() if line.strip().endswith(")")]
    assert len(rows) == 3


def test_evaluation_defaults_to_one_image_per_pass_as_the_paper():
    """Padded positions compete in the encoder's top-k, so batch > 1 changes detections:
    eval, its Python twin and training's evaluation all default to batch 1."""
    import inspect

    from dinodet.engine.evaluate import evaluate_checkpoint

    args = build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--ann", "a.json",
                                      "--images", "img"])
    assert args.batch_size == 1
    assert inspect.signature(evaluate_checkpoint).parameters["batch_size"].default == 1
    assert TrainConfig().eval_batch_size == 1
    train = build_parser().parse_args(["train", "--image-size", "256", "--total-batch-size",
                                       "8"])
    assert (train.image_size, train.total_batch_size) == (256, 8)
