"""`dinodet export --ann/--images` (COCO AP of the file against PyTorch) and `--int8`.

The dataset is made from the model itself: its ground truth is the model's own best
detections, so that PyTorch scores a high AP and an exported file that computes the same
thing scores the same. The images (120 x 160) all resize to 96 x 128, so that a static
export (quicker to trace) runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import dinodet
from dinodet.cli import _report_coco, main
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.transforms import EvalTransform
from dinodet.engine.evaluate import evaluate_checkpoint
from dinodet.export import (
    ExportedModel,
    ExportGraph,
    export_model,
    quantize_int8,
    read_metadata,
    verify_coco,
)

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 3, "name": "dog"},
           {"label": 2, "category_id": 7, "name": "bird"}]
H, W = 96, 128  # what the graph sees
TRANSFORM = EvalTransform(96)  # the 120 x 160 images -> 96 x 128
H0, W0 = 120, 160
NUM_IMAGES = 4
AP_LINE = re.compile(
    r"COCO AP on (\d+) images of ann\.json: PyTorch ([\d.]+), (exported(?: int8)?) "
    r"([\d.]+) \(([+-][\d.]+)\); AP50 PyTorch ([\d.]+), exported(?: int8)? ([\d.]+) "
    r"\(([+-][\d.]+)\)")


def _model() -> dinodet.DINO:
    torch.manual_seed(0)
    cfg = DINOConfig(num_classes=3, backbone=BackboneConfig(name="resnet18",
                     frozen_batchnorm=False, freeze_stem=False), hidden_dim=64, num_heads=4,
                     enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=20,
                     dn_number=10, num_select=20)
    return dinodet.build_model(cfg).eval()


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A model directory and a COCO dataset whose boxes are the model's top 3 per image."""
    root = tmp_path_factory.mktemp("verify")
    model = _model()
    dinodet.save_pretrained(model, root / "model", extra={"classes": CLASSES},
                            transform=TRANSFORM)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    graph = ExportGraph(model, transform=TRANSFORM).eval()
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": c["category_id"], "name": c["name"]} for c in CLASSES]}
    for i in range(1, NUM_IMAGES + 1):
        pixels = rng.integers(0, 256, (H0, W0, 3), dtype=np.uint8)
        pixels[H0 // 4: H0 // 2, W0 // 3: W0 // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{i}.png")
        coco["images"].append({"id": i, "file_name": f"im{i}.png", "height": H0, "width": W0})
        with torch.no_grad():
            resized = TRANSFORM.resize(torch.from_numpy(pixels).permute(2, 0, 1))
            boxes, _, labels = graph(resized[None] / 255)
        boxes = TRANSFORM.boxes_to_original(boxes, (H, W), (H0, W0))
        kept = 0
        for (x0, y0, x1, y1), label in zip(boxes[0].tolist(), labels[0].tolist()):
            if x1 - x0 < 5 or y1 - y0 < 5 or kept == 3:
                continue
            kept += 1
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i, "iscrowd": 0,
                "category_id": CLASSES[label]["category_id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    (root / "ann.json").write_text(json.dumps(coco))
    return {"model": root / "model", "images": images, "ann": root / "ann.json",
            "root": root}


def _export(case, out: Path, *extra: str) -> list[str]:
    return ["export", str(case["model"]), "--static", "--size", str(H), str(W), "--out",
            str(out), "--ann", str(case["ann"]), "--images", str(case["images"]), *extra]


@pytest.fixture(scope="module")
def float_run(case) -> dict:
    """`export --ann` of the float32 file; the traced ONNX program is kept, so that the int8
    run quantises the same trace instead of tracing again (tens of seconds)."""
    out = case["root"] / "model.onnx"
    printed = io.StringIO()  # capsys is for one test; this run serves several
    programs = []
    trace = torch.onnx.export

    def keep(*args, **kwargs):
        programs.append(trace(*args, **kwargs))
        return programs[-1]

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(torch.onnx, "export", keep)
        code = main(_export(case, out, "--max-images", "3"))
    return {"code": code, "out": out, "text": printed.getvalue(), "program": programs[0]}


def _ap_numbers(text: str) -> dict:
    match = AP_LINE.search(text)
    assert match, text
    n, torch_ap, name, file_ap, diff, torch_50, file_50, diff_50 = match.groups()
    return {"images": int(n), "name": name, "pytorch": float(torch_ap),
            "exported": float(file_ap), "diff": float(diff), "pytorch50": float(torch_50),
            "exported50": float(file_50), "diff50": float(diff_50)}


def test_export_ann_prints_both_aps_and_their_difference(float_run):
    assert float_run["code"] == 0, float_run["text"]
    found = _ap_numbers(float_run["text"])
    assert found["images"] == 3 and found["name"] == "exported"
    for key in ("pytorch", "exported", "pytorch50", "exported50"):
        assert 0.0 <= found[key] <= 1.0
    # the ground truth is PyTorch's own top detections: a high AP, and the same for the file
    assert found["pytorch"] > 0.5 and found["pytorch50"] > 0.5
    assert found["diff"] == pytest.approx(found["exported"] - found["pytorch"], abs=1.5e-3)
    assert abs(found["diff"]) <= 0.01 and abs(found["diff50"]) <= 0.01
    assert "verify on 1x3x96x128" in float_run["text"] and ": ok" in float_run["text"]
    assert read_metadata(float_run["out"])["precision"] == "float32"


def test_pytorch_side_is_what_dinodet_eval_measures(case, float_run):
    model = dinodet.load_pretrained(case["model"]).eval()
    found = verify_coco(float_run["out"], model, case["ann"], case["images"])
    assert found["images"] == NUM_IMAGES and found["skipped"] == []
    expected = evaluate_checkpoint(case["model"], case["ann"], case["images"], num_workers=0)
    for name, value in expected.metrics.items():  # unclipped boxes: eval's very numbers
        assert found["pytorch_unclipped"][name] == pytest.approx(value, abs=1e-9), name
    for name, value in found["pytorch"].items():  # clipped, as the file's: the same AP
        assert found["exported"][name] == pytest.approx(value, abs=0.01), name
        assert found["difference"][name] == found["exported"][name] - value or value < 0
    assert found["pytorch"]["AP"] > 0.5


def test_a_torch_export_program_is_verified_the_same_way(case, tmp_path):
    model = dinodet.load_pretrained(case["model"]).eval()
    out = export_model(model, tmp_path / "model.pt2", "torch-export", example_size=(H, W),
                       dynamic=False, classes=CLASSES, transform=TRANSFORM)
    program = ExportedModel(out)
    assert program.input_shape == [1, 3, H, W]
    found = verify_coco(program, model, case["ann"], case["images"], max_images=2)
    assert found["images"] == 2 and found["pytorch"]["AP"] > 0.5
    assert abs(found["difference"]["AP"]) <= 0.01 and abs(found["difference"]["AP50"]) <= 0.01


def test_int8_file_says_int8_runs_and_agrees_with_float32(case, float_run, tmp_path):
    out = quantize_int8(float_run["out"], tmp_path / "int8.onnx")
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["int8"]["weight_type"] == "QUInt8"
    assert meta["classes"] == CLASSES and meta["eval_size"] == 96
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops and meta["int8"]["quantized_nodes"] > 10
    images = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    float_boxes, float_scores, float_labels = ExportedModel(float_run["out"])(images)
    int8 = ExportedModel(out)
    boxes, scores, labels = int8(images)
    assert boxes.shape == float_boxes.shape and labels.dtype == torch.int64
    # the top scores (small: the class prior's) within a quarter of a logit of float32's
    logits, float_logits = torch.logit(scores[0, :5]), torch.logit(float_scores[0, :5])
    assert (logits - float_logits).abs().max() < 0.25, (scores, float_scores)
    assert (labels[0, :5] == float_labels[0, :5]).float().mean() >= 0.6
    model = dinodet.load_pretrained(case["model"]).eval()
    found = verify_coco(int8, model, case["ann"], case["images"], max_images=3)
    assert found["precision"] == "int8" and found["images"] == 3
    # on this dataset the ranking of near-equal scores is the AP: int8's AP drops here
    assert 0 < found["exported"]["AP"] <= 1 and found["pytorch"]["AP"] > 0.5
    assert found["difference"]["AP"] == found["exported"]["AP"] - found["pytorch"]["AP"]
    with pytest.raises(ValueError, match="already int8"):
        quantize_int8(out, tmp_path / "again.onnx")


def test_a_failing_quantisation_leaves_nothing(float_run, tmp_path, monkeypatch):
    from onnxruntime import quantization

    def half_written(source, out, **kwargs):
        Path(out).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(quantization, "quantize_dynamic", half_written)
    with pytest.raises(OSError, match="No space"):
        quantize_int8(float_run["out"], tmp_path / "int8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_int8_cli_with_ann(case, float_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: float_run["program"])
    out = tmp_path / "int8.onnx"
    assert main(_export(case, out, "--int8", "--max-images", "2", "--max-ap-drop", "1")) == 0
    text = capsys.readouterr().out
    assert "int8" in text.splitlines()[0] and "approximate" in text
    found = _ap_numbers(text)
    assert found["name"] == "exported int8" and found["images"] == 2
    assert 0 <= found["exported"] <= 1 and 0 <= found["pytorch"] <= 1
    assert read_metadata(out)["precision"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no float32 file left


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"ann": "ann.json", "max_ap_drop": None, **kw})


def _found(torch_ap: float, file_ap: float) -> dict:
    metrics = {"AP": torch_ap, "AP50": 0.9, "AP75": -1.0}
    exported = {"AP": file_ap, "AP50": 0.85, "AP75": -1.0}
    return {"images": 10, "skipped": [], "precision": "float32", "pytorch": metrics,
            "exported": exported, "seconds": {"pytorch": 1.0, "exported": 0.5},
            "pytorch_unclipped": {"AP": torch_ap - 0.01, "AP50": 0.89, "AP75": -1.0},
            "difference": {"AP": file_ap - torch_ap, "AP50": -0.05, "AP75": math.nan}}


def test_an_ap_drop_over_the_limit_exits_1(capsys):
    assert _report_coco(_args(), _found(0.40, 0.395)) == 0
    out = capsys.readouterr().out
    assert "PyTorch 0.400, exported 0.395 (-0.005); AP50 PyTorch 0.900, exported 0.850 " \
           "(-0.050); AP75 PyTorch -, exported - (-)" in out
    assert "as `dinodet eval` scores them: AP 0.390, AP50 0.890" in out
    assert _report_coco(_args(), _found(0.40, 0.38)) == 1  # default limit 0.01
    err = capsys.readouterr().err
    assert "0.020 below PyTorch's" in err and "--max-ap-drop 0.01" in err
    assert _report_coco(_args(max_ap_drop=0.05), _found(0.40, 0.38)) == 0


@pytest.mark.parametrize(("extra", "message"), [
    (["--ann", "{ann}"], "a COCO annotation json needs --images"),
    (["--images", "{images}"], "--images needs --ann"),
    (["--max-images", "3"], "--max-images needs --ann"),
    (["--split", "val"], "--split needs --ann"),
    (["--ann", "{root}/none.json", "--images", "{images}"], "none.json: no such file"),
    (["--ann", "{root}/no_dataset"], "no_dataset: no such file or folder"),
    (["--format", "torch-export", "--int8"], "--int8 works with --format onnx only"),
])
def test_option_mistakes_are_one_line_before_any_export(case, capsys, tmp_path, extra,
                                                        message):
    extra = [e.format(**{k: str(v) for k, v in case.items()}) for e in extra]
    out = tmp_path / "never.onnx"
    assert main(["export", str(case["model"]), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_library_refuses_int8_torch_export_and_static_size_mismatch(case, float_run,
                                                                    tmp_path):
    with pytest.raises(ValueError, match="onnx format only"):
        export_model(_model(), tmp_path / "m.pt2", "torch-export", int8=True)
    other = tmp_path / "ann.json"
    coco = json.loads(case["ann"].read_text())
    Image.new("RGB", (W + 24, H)).save(tmp_path / "wide.png")
    coco["images"] = [{"id": 1, "file_name": "wide.png", "height": H, "width": W + 24}]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == 1]
    other.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"takes only 96x128 images .* resized to 96x152"):
        verify_coco(float_run["out"], _model(), other, tmp_path)


def test_a_yolo_or_voc_dataset_and_its_split_go_to_the_one_dataset_reader(case, float_run,
                                                                        monkeypatch):
    # YOLO / VOC layouts are read by open_dataset (tested in tests/data/test_yolo_voc.py);
    # verify_coco hands it the dataset and the split as given, with no image folder.
    import dinodet.data.formats as formats
    from dinodet.export import verify_coco

    seen = {}

    class Stop(Exception):
        pass

    def record(ann, images=None, **kwargs):
        seen.update(ann=ann, images=images, split=kwargs.get("split"))
        raise Stop

    monkeypatch.setattr(formats, "open_dataset", record)
    with pytest.raises(Stop):
        verify_coco(float_run["out"], dinodet.load_pretrained(case["model"]),
                    case["root"] / "data.yaml", split="val")
    assert seen == {"ann": case["root"] / "data.yaml", "images": None, "split": "val"}
