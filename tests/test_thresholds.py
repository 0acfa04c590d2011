"""Per-class score thresholds travel with a model: run checkpoint, model directory and
exported metadata carry ``class_thresholds``, checked on load, and ``threshold="auto"``
(Detector, ``dinodet predict``, ExportedModel.detect) keeps each detection whose score
reaches its own class's threshold."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import dinodet
from dinodet.cli import build_parser, main
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.transforms import EvalTransform
from dinodet.engine.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    read_class_thresholds,
    save_checkpoint,
    with_class_thresholds,
)
from dinodet.engine.config import OptimConfig, TrainConfig
from dinodet.engine.step import TrainState
from dinodet.errors import UserError
from dinodet.export import METADATA_KEY, ExportedModel, _metadata, export_model, read_metadata
from dinodet.predict import Detections, Detector
from dinodet.weights import (
    CheckpointError,
    attach_class_thresholds,
    check_class_thresholds,
    load_model,
)

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 3, "name": "dog"},
           {"label": 2, "category_id": 7, "name": "bird"}]
THRESHOLDS = {0: 0.25, 2: 0.7}  # class 1 has none


def _config() -> DINOConfig:
    return DINOConfig(num_classes=3, backbone=BackboneConfig(
        name="resnet18", frozen_batchnorm=False, freeze_stem=False), hidden_dim=32,
        num_heads=2, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=10,
        dn_number=4, num_select=10)


@pytest.fixture(scope="module")
def model() -> dinodet.DINO:
    torch.manual_seed(0)
    model = dinodet.build_model(_config()).eval()
    with torch.no_grad():  # scores around 0.5, spread by the random weights
        model.class_head.bias.zero_()
    return model


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    dinodet.save_pretrained(model, out, extra={"classes": CLASSES, "eval_size": 64})
    return out


@pytest.fixture(scope="module")
def run_state(model) -> dict:
    """A checkpoint dict in the layout the training loop saves."""
    state = TrainState.create(model, OptimConfig(), steps_per_epoch=1, epochs=1)
    cfg = TrainConfig.from_dict({"preset": "cpu-small", "data": {"transform": {
        "eval_size": 64}}})
    return {**state.state_dict(), "rng": [], "config": cfg.to_dict(), "classes": CLASSES}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)


# ------------------------------------------------------------------ storage


def test_a_run_checkpoint_keeps_its_thresholds(run_state, tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    path = manager.save(with_class_thresholds(run_state, THRESHOLDS), epoch=1, step=1,
                        metric=0.5)
    state = load_checkpoint(path)
    assert state["class_thresholds"] == {"0": 0.25, "2": 0.7}  # JSON-ready
    json.dumps(state["class_thresholds"])
    assert read_class_thresholds(state, str(path)) == THRESHOLDS
    assert load_model(path).class_thresholds == THRESHOLDS
    assert load_model(manager.best()).class_thresholds == THRESHOLDS
    assert Detector.from_pretrained(path).class_thresholds == THRESHOLDS
    # None leaves (and removes) them: an older checkpoint has none
    bare = with_class_thresholds(with_class_thresholds(run_state, THRESHOLDS), None)
    assert "class_thresholds" not in bare and "class_thresholds" not in run_state
    assert read_class_thresholds(bare) is None


def test_a_model_directory_keeps_its_thresholds(model, tmp_path):
    out = dinodet.save_pretrained(model, tmp_path / "m", extra={"classes": CLASSES},
                                  class_thresholds={"2": 0.7, 0: 0.25})
    meta = json.loads((out / "config.json").read_text())
    assert meta["class_thresholds"] == {"0": 0.25, "2": 0.7}
    loaded = load_model(out)
    assert loaded.class_thresholds == THRESHOLDS and loaded.classes == CLASSES
    # through extra too, as the other metadata goes
    again = dinodet.save_pretrained(model, tmp_path / "m2",
                                    extra={"class_thresholds": {"1": 1, "0": 0}})
    assert load_model(again).class_thresholds == {0: 0.0, 1: 1.0}
    assert load_model(dinodet.save_pretrained(model, tmp_path / "m3")).class_thresholds is None


def test_thresholds_are_attached_to_a_file_that_has_none(model_dir, run_state, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    assert attach_class_thresholds(folder, {"0": 0.25, "2": 0.7}) == folder / "config.json"
    assert load_model(folder).class_thresholds == THRESHOLDS
    assert load_model(folder).classes == CLASSES  # the rest of config.json stays
    ckpt = save_checkpoint(tmp_path / "run.pt", run_state)
    attach_class_thresholds(ckpt, THRESHOLDS)
    assert load_model(ckpt).class_thresholds == THRESHOLDS
    attach_class_thresholds(ckpt, None)
    assert load_model(ckpt).class_thresholds is None
    with pytest.raises(CheckpointError, match=r"run\.pt.*class_thresholds\[3\]"):
        attach_class_thresholds(ckpt, {3: 0.5})
    # the thresholds.json of `dinodet eval --report` (its class_thresholds), or a bare table
    report = tmp_path / "thresholds.json"
    report.write_text(json.dumps({"iou": 0.5, "class_thresholds": {"0": 0.25, "2": 0.7},
                                  "classes": [{"label": 0, "threshold": 0.25}]}))
    attach_class_thresholds(ckpt, report)
    assert load_model(ckpt).class_thresholds == THRESHOLDS
    report.write_text(json.dumps({"1": 0.5}))
    attach_class_thresholds(folder, str(report))
    assert load_model(folder).class_thresholds == {1: 0.5}
    report.write_text(json.dumps({"class_thresholds": {"9": 0.5}}))
    with pytest.raises(CheckpointError, match=r"thresholds\.json: class_thresholds\['9'\]"):
        attach_class_thresholds(ckpt, report)
    assert load_model(ckpt).class_thresholds == THRESHOLDS  # left as it was
    with pytest.raises(CheckpointError, match="thresholds file not found"):
        attach_class_thresholds(ckpt, tmp_path / "missing.json")


BAD = [
    ({"0": "high"}, r"class_thresholds\['0'\] must be a number in \[0, 1\], got 'high'"),
    ({"0": 1.5}, r"class_thresholds\['0'\] must be a number in \[0, 1\], got 1.5"),
    ({"1": -0.1}, r"class_thresholds\['1'\] must be a number"),
    ({"1": True}, r"class_thresholds\['1'\] must be a number"),
    ({"1": None}, r"class_thresholds\['1'\] must be a number"),
    ({"3": 0.5}, r"class_thresholds\['3'\]: class 3 is outside the model's 3 classes"),
    ({"-1": 0.5}, r"class_thresholds\['-1'\]: the key must be a class index"),
    ({"cat": 0.5}, r"class_thresholds\['cat'\]: the key must be a class index"),
    ([0.5, 0.5, 0.5], r"'class_thresholds' must be a mapping of class index"),
]


@pytest.mark.parametrize(("table", "message"), BAD)
def test_bad_thresholds_in_config_json_name_the_file_and_the_key(model_dir, tmp_path,
                                                                table, message):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "class_thresholds": table}))
    with pytest.raises(CheckpointError, match=message) as found:
        Detector.from_pretrained(folder)
    assert str(folder / "config.json") in str(found.value)


def test_bad_thresholds_in_a_run_checkpoint_name_the_file_and_the_key(run_state, tmp_path):
    for table, message in [*BAD, ({0: math.nan}, r"class_thresholds\[0\] must be a number"),
                           ({0: 0.1, "0": 0.2}, r"class 0 is given twice")]:
        path = save_checkpoint(tmp_path / "bad.pt", {**run_state, "class_thresholds": table})
        with pytest.raises(CheckpointError, match=message) as found:
            load_model(path)
        assert f"checkpoint {path}" in str(found.value)


def test_bad_thresholds_are_refused_when_written(model, run_state, tmp_path):
    with pytest.raises(CheckpointError, match=r"class_thresholds\[5\]: class 5 is outside"):
        with_class_thresholds(run_state, {5: 0.5})
    with pytest.raises(CheckpointError, match=r"class_thresholds\[0\] must be a number"):
        dinodet.save_pretrained(model, tmp_path / "m", class_thresholds={0: 2.0})
    assert not (tmp_path / "m").exists()  # checked before anything is written
    assert check_class_thresholds({}, 3, "x") == {}


# ------------------------------------------------------------------ Detector


class _Fixed(torch.nn.Module):
    """A model whose outputs are given: 2 queries x 3 classes, each (query, class) pair a
    known score, so that every pair is a detection (num_select 6)."""

    def __init__(self, scores: list[list[float]]) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(num_classes=3, num_select=6)
        self.logits = torch.logit(torch.tensor(scores, dtype=torch.float64)).float()

    def forward(self, images):
        b = images.tensors.shape[0]
        boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.4, 0.4]])
        return {"pred_logits": self.logits.expand(b, -1, -1),
                "pred_boxes": boxes.expand(b, -1, -1)}


SCORES = [[0.2, 0.9, 0.71], [0.3, 0.5, 0.69]]  # query x class


def test_auto_keeps_exactly_the_detections_above_their_class_threshold(image):
    det = Detector(_Fixed(SCORES), CLASSES, threshold="auto", class_thresholds=THRESHOLDS)
    found = det(image)
    assert isinstance(found, Detections)
    # class 0 (>= 0.25): 0.3; class 1 (no threshold): none; class 2 (>= 0.7): 0.71
    assert found.labels.tolist() == [2, 0]
    assert found.scores.tolist() == pytest.approx([0.71, 0.3])
    assert found.names == ["bird", "cat"]
    # a threshold equal to the score keeps it; a number still works for every class
    exact = Detector(_Fixed(SCORES), CLASSES, class_thresholds={0: 0.3, 1: 0.9})
    assert sorted(exact(image, threshold="auto").scores.tolist()) == pytest.approx([0.3, 0.9])
    assert len(exact(image)) == 5  # the default threshold 0.3 for every class
    assert len(det(image, threshold=0.6)) == 3
    assert [len(d) for d in det([image, image], threshold="auto")] == [2, 2]


def test_auto_applies_to_files_too(image, tmp_path):
    Image.fromarray(image).save(tmp_path / "a.png")
    det = Detector(_Fixed(SCORES), CLASSES, class_thresholds=THRESHOLDS)
    ((_, found),) = list(det.detect_files([tmp_path / "a.png"], threshold="auto"))
    assert isinstance(found, Detections) and found.labels.tolist() == [2, 0]


def test_auto_without_thresholds_is_an_error_saying_where_they_come_from(model_dir, image):
    with pytest.raises(UserError, match="has no per-class score thresholds") as found:
        Detector(_Fixed(SCORES), CLASSES, threshold="auto")
    assert "validation" in str(found.value) and "--report" in str(found.value)
    assert "attach_class_thresholds" in str(found.value)
    det = Detector(_Fixed(SCORES), CLASSES)
    with pytest.raises(UserError, match="the model has no per-class score thresholds"):
        det(image, threshold="auto")
    with pytest.raises(UserError, match=f"{re.escape(str(model_dir))} has no per-class"):
        Detector.from_pretrained(model_dir, threshold="auto")
    with pytest.raises(UserError, match=f"{re.escape(str(model_dir))} has no per-class"):
        Detector.from_pretrained(model_dir)(image, threshold="auto")
    for bad in (1.5, -0.1, math.nan, "AUTO", True):
        with pytest.raises(UserError, match="threshold must be a number in"):
            det(image, threshold=bad)
    with pytest.raises(CheckpointError, match=r"Detector class_thresholds: class_thresholds"):
        Detector(_Fixed(SCORES), CLASSES, class_thresholds={3: 0.5})


# ------------------------------------------------------------------ command line


def test_predict_threshold_auto_uses_the_models_thresholds(model_dir, image, tmp_path,
                                                            capsys):
    Image.fromarray(image).save(tmp_path / "a.png")
    everything = Detector.from_pretrained(model_dir)(image, threshold=0.0)
    assert isinstance(everything, Detections)
    # per class, a threshold midway between two of its scores: some kept, some not
    table = {}
    for label in (0, 2):
        scores = sorted(everything.scores[everything.labels == label].tolist())
        assert len(scores) >= 2
        table[label] = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    attach_class_thresholds(folder, table)
    out = tmp_path / "out"
    assert main(["predict", str(folder), str(tmp_path / "a.png"), "--out", str(out),
                 "--threshold", "auto"]) == 0
    assert "the model's own thresholds for 2 of 3 classes" in capsys.readouterr().err
    (record,) = json.loads((out / "detections.json").read_text())
    got = sorted((d["label"], round(d["score"], 5)) for d in record["detections"])
    expected = sorted((label, round(score, 5)) for label, score in zip(
        everything.labels.tolist(), everything.scores.tolist())
        if label in table and score >= table[label])
    assert got == expected and {label for label, _ in got} == {0, 2}


def test_predict_threshold_auto_without_thresholds_exits_2(model_dir, image, tmp_path,
                                                           capsys):
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(tmp_path / "a.png"), "--out", str(out),
                 "--threshold", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"{model_dir} has no per-class score thresholds" in err and "Traceback" not in err
    assert not out.exists()  # refused before any output


def test_predict_threshold_option_takes_a_fraction_or_auto(capsys):
    parse = build_parser().parse_args
    assert parse(["predict", "m", "x", "--out", "o", "--threshold", "auto"]).threshold == "auto"
    assert parse(["predict", "m", "x", "--out", "o", "--threshold", "0.25"]).threshold == 0.25
    assert parse(["predict", "m", "x", "--out", "o"]).threshold == 0.3
    for bad in ("1.5", "nan", "Auto"):
        with pytest.raises(SystemExit):
            parse(["predict", "m", "x", "--out", "o", "--threshold", bad])
        assert "a number in [0, 1] or 'auto'" in capsys.readouterr().err


# ------------------------------------------------------------------ export metadata


def test_export_metadata_carries_the_thresholds(model, tmp_path):
    meta = _metadata(CLASSES, EvalTransform(), 3, None, THRESHOLDS)
    assert meta["class_thresholds"] == {"0": 0.25, "2": 0.7}
    assert "class_thresholds" not in _metadata(CLASSES, EvalTransform(), 3, None)
    json.dumps(meta)
    # a bad table fails before the (slow) tracing, naming it
    with pytest.raises(CheckpointError, match=r"export_model: class_thresholds\[7\]"):
        export_model(model, tmp_path / "m.onnx", class_thresholds={7: 0.5})
    assert not (tmp_path / "m.onnx").exists()


def _fixed_onnx(path: Path, meta: dict) -> Path:
    """A hand-made ONNX file in the exported layout whose outputs are constants: one image,
    the 6 detections of SCORES, best first."""
    pairs = sorted(((s, c) for row in SCORES for c, s in enumerate(row)), reverse=True)
    outputs = {"boxes": (TensorProto.FLOAT, [1, 6, 4], [float(i) for i in range(24)]),
               "scores": (TensorProto.FLOAT, [1, 6], [s for s, _ in pairs]),
               "labels": (TensorProto.INT64, [1, 6], [c for _, c in pairs])}
    nodes = [helper.make_node("Constant", [], [name], value=helper.make_tensor(
        f"{name}_value", kind, dims, values)) for name, (kind, dims, values) in outputs.items()]
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                       ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info(name, kind, dims)
         for name, (kind, dims, _) in outputs.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(proto, str(path))
    return path


def test_an_exported_file_applies_its_thresholds(tmp_path):
    path = _fixed_onnx(tmp_path / "m.onnx", _metadata(CLASSES, EvalTransform(), 3, None,
                                                      THRESHOLDS))
    assert read_metadata(path)["class_thresholds"] == {"0": 0.25, "2": 0.7}
    exported = ExportedModel(path)
    assert exported.class_thresholds == THRESHOLDS
    images = torch.rand(1, 3, 64, 64)
    ((boxes, scores, labels),) = exported.detect(images)  # "auto" by default
    assert labels.tolist() == [2, 0] and scores.tolist() == pytest.approx([0.71, 0.3])
    assert boxes.shape == (2, 4)
    ((_, scores, _),) = exported.detect(images, threshold=0.6)
    assert scores.tolist() == pytest.approx([0.9, 0.71, 0.69])

    bare = ExportedModel(_fixed_onnx(tmp_path / "bare.onnx",
                                     _metadata(CLASSES, EvalTransform(), 3, None)))
    assert bare.class_thresholds is None
    with pytest.raises(UserError, match=r"bare\.onnx has no per-class score thresholds"):
        bare.detect(images)
    bad = {**_metadata(CLASSES, EvalTransform(), 3, None), "class_thresholds": {"4": 0.5}}
    with pytest.raises(CheckpointError, match=r"bad\.onnx: class_thresholds\['4'\]"):
        ExportedModel(_fixed_onnx(tmp_path / "bad.onnx", bad))
