"""The export formulation of deformable attention (one Gather of corner rows and a MatMul)
against the embedding_bag path and grid_sample, and through torch.export and onnxruntime
with dynamic sizes."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from dinodet.model import ms_deform_attn_onnx
from dinodet.model.ms_deform_attn import ms_deform_attn, ms_deform_attn_grid_sample

F64 = torch.float64
# Odd, non-square sizes, a 1×1 level, tall and wide ones.
SHAPES = [(3, 5), (2, 7), (1, 1), (5, 3)]


def make_inputs(num_levels: int, num_heads: int, num_points: int, n: int = 2, lq: int = 7,
                d: int = 3, dtype: torch.dtype = F64, seed: int = 0,
                shapes: list[tuple[int, int]] | None = None
                ) -> tuple[Tensor, list[tuple[int, int]], Tensor, Tensor]:
    """Values, shapes, locations (about a third of them partly or wholly outside, the
    first query's on borders, pixel centres and boundaries, and far away) and weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES[:num_levels]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, num_heads, d, generator=g, dtype=F64)
    loc = torch.rand(n, lq, num_heads, num_levels, num_points, 2, generator=g, dtype=F64)
    loc = loc * 1.8 - 0.4
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=F64)  # [L, 2]
    special = [torch.zeros(num_levels, 2), torch.ones(num_levels, 2),  # borders
               0.5 / wh, (wh - 0.5) / wh,  # first and last pixel centres
               1 / wh, 1 - 1 / wh,  # boundaries between pixels
               -0.5 / wh, 1 + 0.5 / wh,  # half a pixel outside
               torch.full((num_levels, 2), -6.0), torch.full((num_levels, 2), 9.0),
               torch.tensor([1.0, 0.0]).expand(num_levels, 2),
               torch.tensor([-0.2, 0.6]).expand(num_levels, 2)]
    k = 0
    for b in range(n):
        for head in range(num_heads):
            for p in range(num_points):
                loc[b, 0, head, :, p] = special[k % len(special)]
                k += 1
    w = torch.rand(n, lq, num_heads, num_levels, num_points, generator=g, dtype=F64)
    w = w / w.sum((-1, -2), keepdim=True)
    return value.to(dtype), shapes, loc.to(dtype), w.to(dtype)


CONFIGS = [(1, 1, 1), (1, 3, 4), (2, 3, 2), (3, 2, 3), (4, 3, 4), (4, 2, 1)]  # (L, M, P)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(("levels", "heads", "points"), CONFIGS)
def test_matches_embedding_bag_and_grid_sample(levels, heads, points, dtype):
    value, shapes, loc, w = make_inputs(levels, heads, points, dtype=dtype)
    got = ms_deform_attn_onnx.ms_deform_attn(value, shapes, loc, w)
    assert got.shape == (2, 7, heads * 3) and got.dtype == dtype
    tol = {"atol": 1e-12, "rtol": 0} if dtype == F64 else {"atol": 2e-6, "rtol": 1e-5}
    torch.testing.assert_close(got, ms_deform_attn(value, shapes, loc, w), **tol)
    torch.testing.assert_close(got, ms_deform_attn_grid_sample(value, shapes, loc, w), **tol)


def test_batch_entries_and_heads_read_their_own_values():
    value, shapes, loc, w = make_inputs(3, 2, 2, n=3, lq=4)
    whole = ms_deform_attn_onnx.ms_deform_attn(value, shapes, loc, w)
    for b in range(3):
        one = ms_deform_attn_onnx.ms_deform_attn(value[b:b + 1], shapes, loc[b:b + 1],
                                                 w[b:b + 1])
        torch.testing.assert_close(one, whole[b:b + 1], atol=1e-14, rtol=0)
    # A value change in batch 1 moves batch 1's output only.
    value2 = value.clone()
    value2[1] += 1
    moved = ms_deform_attn_onnx.ms_deform_attn(value2, shapes, loc, w) != whole
    assert moved[1].any() and not moved[0].any() and not moved[2].any()


def test_more_queries_than_pieces_and_fewer():
    # PIECES slices of the rows: fewer rows than slices (empty ones) and uneven ones.
    for lq in (1, 5, 37):
        value, shapes, loc, w = make_inputs(2, 1, 2, n=1, lq=lq)
        torch.testing.assert_close(ms_deform_attn_onnx.ms_deform_attn(value, shapes, loc, w),
                                   ms_deform_attn(value, shapes, loc, w), atol=1e-12, rtol=0)


def test_non_finite_locations():
    value, shapes, loc, w = make_inputs(2, 3, 2, lq=3)
    loc[1, 1, 0, 0, 0, 0] = float("nan")
    out = ms_deform_attn_onnx.ms_deform_attn(value, shapes, loc, w)
    assert out[1, 1, :3].isnan().all()  # NaN in, NaN out for that (query, head), no crash
    assert out.isnan().sum() == 3
    # Infinite and huge coordinates are outside: as far-away points.
    loc[1, 1, 0, 0, 0, 0] = float("inf")
    loc[0, 2, 1, 1, 1, 1] = -float("inf")
    loc[1, 2, 2, 0, 1, 0] = 1e30
    far = loc.clone()
    far[1, 1, 0, 0, 0, 0] = 50.0
    far[0, 2, 1, 1, 1, 1] = -50.0
    far[1, 2, 2, 0, 1, 0] = 50.0
    torch.testing.assert_close(ms_deform_attn_onnx.ms_deform_attn(value, shapes, loc, w),
                               ms_deform_attn_grid_sample(value, shapes, far, w),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_sampled_in_float32(dtype):
    value, shapes, loc, w = make_inputs(4, 2, 3, dtype=dtype)
    got = ms_deform_attn_onnx.ms_deform_attn(value, shapes, loc, w)
    assert got.dtype == dtype
    want = ms_deform_attn(value, shapes, loc, w)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def test_level_count_must_match():
    value, shapes, loc, w = make_inputs(2, 1, 1)
    with pytest.raises(ValueError, match="1 spatial shapes for 2 levels"):
        ms_deform_attn_onnx.ms_deform_attn(value, shapes[:1], loc, w)


class _Attention(nn.Module):
    """Per-level [N, M·D, H_l, W_l] maps (their sizes symbolic when exported), locations and
    weights -> the attention's [N, Lq, M·D]."""

    def __init__(self, heads: int, fn=ms_deform_attn_onnx.ms_deform_attn) -> None:
        super().__init__()
        self.heads, self.fn = heads, fn

    def forward(self, maps: list[Tensor], loc: Tensor, weights: Tensor) -> Tensor:
        n, c = maps[0].shape[:2]
        shapes = [(x.shape[2], x.shape[3]) for x in maps]
        value = torch.cat([x.flatten(2) for x in maps], 2).transpose(1, 2)
        return self.fn(value.reshape(n, -1, self.heads, c // self.heads), shapes, loc, weights)


HEADS, DIM = 2, 3


def _export_inputs(n: int, lq: int, shapes: list[tuple[int, int]], seed: int
                   ) -> tuple[list[Tensor], Tensor, Tensor]:
    value, shapes, loc, w = make_inputs(len(shapes), HEADS, 2, n=n, lq=lq, d=DIM,
                                        dtype=torch.float32, seed=seed, shapes=shapes)
    sizes = [h * w for h, w in shapes]
    maps = [v.reshape(n, h, w, HEADS * DIM).permute(0, 3, 1, 2)
            for v, (h, w) in zip(value.split(sizes, 1), shapes)]
    return maps, loc, w


def _dynamic_shapes(levels: int) -> tuple:
    any_size = torch.export.Dim.DYNAMIC
    return ([{0: any_size, 2: any_size, 3: any_size}] * levels, {0: any_size, 1: any_size},
            {0: any_size, 1: any_size})


TRACED = _export_inputs(2, 6, [(6, 7), (3, 4), (2, 3)], seed=1)
OTHER = _export_inputs(3, 11, [(5, 9), (4, 2), (1, 1)], seed=2)  # another batch and sizes


def _reference(inputs: tuple[list[Tensor], Tensor, Tensor]) -> Tensor:
    return _Attention(HEADS, ms_deform_attn)(*inputs)


def _body(scan):
    """A Scan NodeProto's body attribute (by name, not position)."""
    return next(a for a in scan.attribute if a.name == "body")


def _assert_runs_like_pytorch(ort, path) -> None:
    """The ONNX file under onnxruntime agrees with PyTorch at the traced sizes and others."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for inputs in (TRACED, OTHER):
        maps, loc, w = inputs
        arrays = [t.numpy() for t in (*maps, loc, w)]
        feeds = {i.name: a for i, a in zip(session.get_inputs(), arrays)}
        (out,) = session.run(None, feeds)
        torch.testing.assert_close(torch.from_numpy(out), _reference(inputs), atol=1e-5,
                                   rtol=1e-5)


def test_torch_export_keeps_sizes_dynamic():
    program = torch.export.export(_Attention(HEADS), TRACED, dynamic_shapes=_dynamic_shapes(3))
    for inputs in (TRACED, OTHER):
        torch.testing.assert_close(program.module()(*inputs), _reference(inputs),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opset", [17, 18])
def test_onnxruntime_matches_pytorch_at_another_size(tmp_path, opset):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    program = torch.onnx.export(_Attention(HEADS).eval(), TRACED, dynamic_shapes=_dynamic_shapes(3),
                                opset_version=opset, dynamo=True, verbose=False)
    path = tmp_path / "attention.onnx"
    program.save(str(path))
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert "Gather" in ops and "GridSample" not in ops
    _assert_runs_like_pytorch(ort, path)


@pytest.mark.parametrize("coords", [2, 4])  # points (the encoder) and boxes (the decoder)
def test_module_samples_with_it_while_exporting(monkeypatch, coords):
    from dinodet.model.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, num_levels=2, num_heads=2, num_points=3).eval()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(std=0.5)  # points spread, some outside
        attn.attention_weights.weight.normal_()
    shapes = [(5, 3), (2, 4)]
    query = torch.randn(2, 6, 16)
    value = torch.randn(2, 23, 16)
    refs = torch.rand(2, 6, 2, coords)
    mask = torch.zeros(2, 23, dtype=torch.bool)
    mask[1, -3:] = True
    with torch.no_grad():
        want = attn(query, refs, value, shapes, mask)
        calls = []
        sample = ms_deform_attn_onnx.sample

        def spy(*args):
            calls.append(1)
            return sample(*args)

        monkeypatch.setattr(ms_deform_attn_onnx, "sample", spy)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        got = attn(query, refs, value, shapes, mask)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_corner_sum_op_samples_as_the_pieces_do():
    """Under ``corner_sum_op`` (what ``dinodet export`` traces) one ``dinodet::corner_sum``
    sums every corner row; eagerly it is embedding_bag, and agrees with the pieces."""
    inputs = OTHER
    want = _Attention(HEADS)(*inputs)
    with ms_deform_attn_onnx.corner_sum_op():
        got = _Attention(HEADS)(*inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, _reference(inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step_rows", [5, 1000])  # steps of 5 rows (padded), or one step
def test_export_sums_the_corners_in_a_scan_over_steps(tmp_path, monkeypatch, caplog,
                                                     step_rows):
    """dinodet's export (to_onnx) turns the traced corner sum into a Scan over steps of
    rows: standard ops only, dynamic sizes kept, the rows padded to whole steps and cut
    back (TRACED has 24 (batch, query, head) rows, OTHER 66: neither a multiple of 5).
    Every value of the Scan's body has its type, so saving warns of none."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from dinodet import export

    row_bytes = 4 * 3 * 2 * DIM * 4  # 4 corners · L · P, D float32 values
    monkeypatch.setattr(export, "SCAN_STEP_BYTES", step_rows * row_bytes)
    program = export.to_onnx(_Attention(HEADS).eval(), TRACED,
                             dynamic_shapes=_dynamic_shapes(3))
    path = tmp_path / "attention.onnx"
    with caplog.at_level(logging.WARNING):
        program.save(str(path))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    scans = [node for node in proto.graph.node if node.op_type == "Scan"]
    assert len(scans) == 1
    body = onnx.helper.get_attribute_value(_body(scans[0]))
    assert [node.op_type for node in body.node] == ["Gather", "MatMul"]
    assert {i.type.tensor_type.elem_type for i in body.input} == {
        onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}
    assert [d.dim_value for d in body.input[0].type.tensor_type.shape.dim] == [step_rows, 24]
    assert not any(p.key == export.CORNER_SUM_KEY for n in proto.graph.node
                   for p in n.metadata_props)  # the marks are gone
    _assert_runs_like_pytorch(ort, path)


def test_chunking_refuses_a_corner_sum_it_does_not_recognise():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from dinodet.export import CORNER_SUM_KEY, chunk_corner_sums

    shape = helper.make_node("Constant", [], ["s"],
                             value=helper.make_tensor("s", TensorProto.INT64, [2], [-1, 2]))
    node = helper.make_node("Reshape", ["x", "s"], ["y"])
    graph = helper.make_graph([shape, node, helper.make_node("Relu", ["y"], ["z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])])
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert chunk_corner_sums(model) == 0  # nothing marked: nothing changed
    next(n for n in model.graph if n.op_type == "Reshape").metadata_props[CORNER_SUM_KEY] = "1"
    with pytest.raises(RuntimeError, match="is not Gather -> MatMul -> Reshape"):
        chunk_corner_sums(model)
    assert [n.op_type for n in model.graph] == ["Constant", "Reshape", "Relu"]  # untouched


def test_chunking_keeps_the_graph_sorted_whatever_comes_first():
    """The Scan and its padding go where the corner sum's MatMul was: after the weights and
    the indices, whichever of the two the graph makes last (here the indices)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnx import TensorProto, helper, numpy_helper

    from dinodet.export import CORNER_SUM_KEY, chunk_corner_sums

    rows, corners, width, table_rows = 7, 4, 3, 10
    const = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))
             for name, v in (("axes", np.array([1])), ("flat", np.array([-1, width])))]
    nodes = [
        *const,
        helper.make_node("Unsqueeze", ["w", "axes"], ["w1"]),
        helper.make_node("Identity", ["i0"], ["i"]),  # the indices, made after the weights
        helper.make_node("Gather", ["table", "i"], ["g"], axis=0),
        helper.make_node("MatMul", ["w1", "g"], ["m"]),
        helper.make_node("Reshape", ["m", "flat"], ["s"]),
        helper.make_node("Relu", ["s"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("table", TensorProto.FLOAT, [table_rows, width]),
        helper.make_tensor_value_info("i0", TensorProto.INT64, ["R", corners]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, ["R", corners])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["R", width])],
        value_info=[helper.make_tensor_value_info("i", TensorProto.INT64, ["R", corners])])
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    next(n for n in model.graph if n.op_type == "Reshape").metadata_props[CORNER_SUM_KEY] = "1"
    assert chunk_corner_sums(model, step_bytes=2 * corners * width * 4) == 1  # 2 rows a step
    common.NameFixPass()(model)  # names the new values, as to_onnx's optimizer
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)  # sorted: every input made before it is read
    rng = np.random.default_rng(0)
    feed = {"table": rng.standard_normal((table_rows, width), dtype=np.float32),
            "i0": rng.integers(0, table_rows, (rows, corners)),
            "w": rng.random((rows, corners), dtype=np.float32)}
    (out,) = ort.InferenceSession(proto.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, feed)
    expected = np.einsum("rk,rkd->rd", feed["w"], feed["table"][feed["i0"]])
    np.testing.assert_allclose(out, np.maximum(expected, 0), rtol=1e-6, atol=1e-6)
