"""Export: ONNX through onnxruntime and torch.export programs agree with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

import dinodet
from dinodet.cli import main
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.export import (
    ExportedModel,
    ExportGraph,
    compare_detections,
    export_model,
    read_metadata,
    run_exported,
)

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 3, "name": "dog"},
           {"label": 2, "category_id": 7, "name": "bird"}]
THRESHOLD = 0.3


def _model() -> dinodet.DINO:
    torch.manual_seed(0)
    cfg = DINOConfig(num_classes=3, backbone=BackboneConfig(name="resnet18",
                     frozen_batchnorm=False, freeze_stem=False), hidden_dim=64, num_heads=4,
                     enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=20,
                     dn_number=10, num_select=20)
    model = dinodet.build_model(cfg).eval()
    with torch.no_grad():  # scores around 0.5, so that a threshold of 0.3 keeps many
        model.class_head.bias.zero_()
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    dinodet.save_pretrained(_model(), out, extra={"classes": CLASSES, "eval_size": 96})
    return out


@pytest.fixture(scope="module")
def onnx_file(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(out),
                 "--verify"]) == 0
    return out


def reference(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PyTorch's own path: the model on a list of normalised images, then postprocess."""
    from dinodet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        out = model([(im - mean) / std for im in images])
    sizes = [tuple(images.shape[-2:])] * len(images)
    found = dinodet.postprocess(out, sizes, model.cfg.num_select)
    h, w = images.shape[-2:]
    boxes = torch.stack([f["boxes"] for f in found])
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
    return boxes, torch.stack([f["scores"] for f in found]), torch.stack(
        [f["labels"] for f in found])


def _images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_onnx_file_is_valid_opset_17_plus_with_dynamic_axes_and_metadata(onnx_file):
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {n.op_type for n in proto.graph.node}
    assert "Gather" in ops and "GridSample" not in ops  # the one-gather sampling
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # B, 3, H, W
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    meta = read_metadata(onnx_file)
    assert meta["classes"] == CLASSES and meta["eval_size"] == 96 and meta["num_classes"] == 3


@pytest.mark.parametrize("shape", [(1, 96, 128), (3, 120, 90)])
def test_onnxruntime_agrees_with_pytorch(model_dir, onnx_file, shape):
    model = dinodet.load_pretrained(model_dir).eval()
    images = _images(*shape)
    expected = reference(model, images)
    boxes, scores, labels = run_exported(onnx_file, images)
    assert boxes.shape == (shape[0], 20, 4) and labels.dtype == torch.int64
    kept = (expected[1] >= THRESHOLD).sum()
    assert kept > 10  # the comparison is about real detections
    diff = compare_detections(expected, (boxes, scores, labels), min_score=THRESHOLD)
    assert diff["score"] <= 1e-3 and diff["box"] <= 0.5, diff
    # and the whole top-k, elementwise, where the order is not in doubt
    assert torch.allclose(scores, expected[1], atol=1e-3)


def test_torch_export_program_agrees_and_keeps_dynamic_sizes(model_dir, tmp_path):
    out = tmp_path / "model.pt2"
    assert main(["export", str(model_dir), "--format", "torch-export", "--out", str(out),
                 "--size", "96", "112"]) == 0
    assert read_metadata(out)["classes"] == CLASSES
    model = dinodet.load_pretrained(model_dir).eval()
    program = ExportedModel(out)
    assert program.metadata["eval_size"] == 96
    for shape in [(2, 96, 112), (1, 80, 144)]:  # the traced size, and another batch / size
        images = _images(*shape, seed=shape[2])
        diff = compare_detections(reference(model, images), program(images),
                                  min_score=THRESHOLD)
        assert diff["score"] <= 1e-3 and diff["box"] <= 0.5, (shape, diff)


def test_static_export_fixes_the_input_shape(tmp_path):
    out = export_model(_model(), tmp_path / "static.onnx", example_size=(96, 96),
                       dynamic=False)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 96, 96]


def test_export_errors_name_the_problem(tmp_path, model_dir, capsys):
    model = _model()
    with pytest.raises(ValueError, match="'tflite'"):
        export_model(model, tmp_path / "m", "tflite")
    with pytest.raises(ValueError, match="opset 16"):
        export_model(model, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match="32x32"):
        export_model(model, tmp_path / "m.onnx", example_size=(32, 32))
    # A 64 px example has a 1-pixel coarsest map, which tracing would fix: the file would
    # fail at every other size (onnxruntime: a Concat size mismatch).
    with pytest.raises(ValueError, match="stride 64"):
        export_model(model, tmp_path / "m.onnx", example_size=(64, 96))
    with pytest.raises(FileNotFoundError, match=r"nothing\.onnx"):
        read_metadata(tmp_path / "nothing.onnx")
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(foreign))
    with pytest.raises(ValueError, match="not exported by dinodet"):
        read_metadata(foreign)
    with pytest.raises(ValueError, match=r"torch\.export archive"):
        read_metadata(foreign.rename(tmp_path / "foreign.pt2"))
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_compare_detections_pairs_by_label_and_score():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]]])
    scores = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[0, 1, 2]])
    # the same detections, two of them swapped and slightly moved
    other = (boxes[:, [1, 0, 2]] + 0.2, scores[:, [1, 0, 2]] + 1e-4, labels[:, [1, 0, 2]])
    diff = compare_detections((boxes, scores, labels), other, min_score=0.3)
    assert diff["score"] == pytest.approx(1e-4, rel=1e-3)
    assert diff["box"] == pytest.approx(0.2, rel=1e-5)
    wrong = (other[0], other[1], torch.tensor([[1, 1, 2]]))  # label 0 is gone
    assert compare_detections((boxes, scores, labels), wrong)["box"] == float("inf")


def test_export_graph_matches_the_detector_on_one_image(model_dir):
    """The graph's own normalisation and post-processing are the Detector's."""
    det = dinodet.Detector.from_pretrained(model_dir, eval_size=96, max_size=96)
    image = (_images(1, 96, 96)[0] * 255).round() / 255  # representable as uint8
    found = det(image, threshold=THRESHOLD)
    with torch.no_grad():
        boxes, scores, labels = ExportGraph(det.model)(image[None])
    keep = scores[0] >= THRESHOLD
    assert len(found) == int(keep.sum())
    torch.testing.assert_close(found.scores, scores[0, keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(found.boxes, boxes[0, keep], atol=1e-3, rtol=0)
    assert json.loads(json.dumps(found.to_dict()))["labels"] == labels[0, keep].tolist()


def test_an_exported_file_slices_like_the_detector(onnx_file, model_dir):
    # The slicing happens outside the graph: the ONNX file's tiles and merge give the
    # detections that the PyTorch Detector's sliced path gives on the same model.
    from dinodet.export import ExportedModel
    from dinodet.predict import Detector
    from dinodet.slicing import Slicing, exported_runner, sliced_detect

    image = (_images(1, 250, 330, seed=4)[0] * 255).to(torch.uint8)
    boxes, scores, labels = sliced_detect(exported_runner(ExportedModel(onnx_file), THRESHOLD),
                                          image, 128, 0.25, batch_size=4)
    det = Detector.from_pretrained(model_dir)
    found = det(image, threshold=THRESHOLD, slice=Slicing(128, 0.25, batch_size=4))
    assert len(scores) == len(found) > 0
    torch.testing.assert_close(scores, found.scores, atol=1e-3, rtol=0)
    assert torch.equal(labels, found.labels)
    torch.testing.assert_close(boxes, found.boxes, atol=0.5, rtol=0)


def test_optimize_onnx_folds_and_rewrites_but_never_matches_several_output_nodes(monkeypatch):
    """Constants folded and no-op nodes removed, as onnxscript's optimizer does, but no
    pattern of several output nodes (``SlicesSplit``) is matched: onnxscript matches those
    against every node at every node, minutes on the exported r50-4scale."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper
    from onnxscript import optimizer
    from onnxscript.rewriter import _matcher

    from dinodet.export import optimize_onnx

    def graph() -> ir.Model:
        def const(name, value):
            return helper.make_node("Constant", [], [name],
                                    value=numpy_helper.from_array(value, name))

        nodes = [
            const("a", np.ones(4, np.float32)), const("b", np.full(4, 2.0, np.float32)),
            helper.make_node("Add", ["a", "b"], ["ab"]),  # foldable: 3.0
            helper.make_node("Add", ["x", "ab"], ["y"]),
            helper.make_node("Identity", ["y"], ["y1"]),  # a no-op
            const("s0", np.array([0])), const("s2", np.array([2])), const("s4", np.array([4])),
            const("ax", np.array([0])),
            helper.make_node("Slice", ["x", "s0", "s2", "ax"], ["lo"]),
            helper.make_node("Slice", ["x", "s2", "s4", "ax"], ["hi"]),
            helper.make_node("Mul", ["lo", "hi"], ["z"]),
        ]
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n])
                   for name, n in (("y1", 4), ("z", 2))]
        g = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              outputs)
        proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        return ir.serde.deserialize_model(proto)

    multi: list[int] = []
    real = _matcher.SimplePatternMatcher._multi_match

    def counted(self, *args, **kwargs):
        multi.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_matcher.SimplePatternMatcher, "_multi_match", counted)
    ours, theirs = graph(), graph()
    optimize_onnx(ours)
    assert multi == []
    assert [n.op_type for n in ours.graph] == ["Add", "Slice", "Slice", "Mul"]
    folded = [v.const_value.numpy().tolist() for v in ours.graph.initializers.values()
              if v.const_value is not None and v.const_value.numpy().size == 4]
    assert folded == [[3.0] * 4]  # Add(a, b); the Identity is gone
    optimizer.optimize_ir(theirs)
    assert multi  # onnxscript's own optimizer does match them
    assert [n.op_type for n in theirs.graph] == [n.op_type for n in ours.graph]


def test_optimize_onnx_keeps_constant_splits_without_warning_of_them(caplog):
    """onnxscript's folding warns at each Split of a constant it cannot fold (one per
    layer of the exported model); optimize_onnx keeps the Split and shows no warning."""
    import logging

    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from dinodet.export import optimize_onnx

    nodes = [
        helper.make_node("Constant", [], ["c"],
                         value=numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")),
        helper.make_node("Split", ["c"], ["p", "q"], axis=0, num_outputs=2),
        helper.make_node("Add", ["x", "p"], ["y"]),
        helper.make_node("Mul", ["x", "q"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("y", "z")])
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with caplog.at_level(logging.WARNING):
        optimize_onnx(model)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [n.op_type for n in model.graph] == ["Split", "Add", "Mul"]
    # The filter is gone afterwards: onnxscript's other warnings still show.
    logging.getLogger("onnxscript.optimizer._constant_folding").warning(
        "Skipping constant folding for op Split with multiple outputs.")
    assert "Skipping constant folding for op Split with multiple outputs." in caplog.messages
