"""Export a detector for deployment: ONNX (onnxruntime, TensorRT, ...) or ``torch.export``.

Both hold :class:`ExportGraph`: float32 ``images`` [B, 3, H, W], RGB in [0, 1], resized
by the model's :class:`~dinodet.data.EvalTransform` (B, H, W dynamic unless
``dynamic=False``) -> ``boxes`` [B, K, 4] (xyxy pixels of the input, clipped), ``scores``
[B, K] (descending), ``labels`` [B, K] (int64), K = the model's ``num_select``; no
threshold. Normalisation and top-k are inside; the deformable attention is traced as a
Gather of its points' corner rows and a MatMul by their weights
(:mod:`dinodet.model.ms_deform_attn_onnx`), in ONNX a Scan over steps of rows
(:func:`to_onnx`), denoising is off, a batch shares one size. The
class table, the transform's metadata and the model's per-class score thresholds (if it
has them: ``class_thresholds``, ``{"0": 0.41, ...}``) travel in the file (ONNX
``metadata_props`` key ``dinodet``, or the archive's ``dinodet.json``); :func:`read_metadata`
reads either, and :meth:`ExportedModel.detect` applies a threshold (``"auto"``: those).

:func:`verify_coco` measures a file's COCO box AP next to PyTorch's on a dataset;
:func:`quantize_int8` (``export_model(..., int8=True)``) quantises an ONNX file's MatMul /
Gemm weights to int8, ``"precision": "int8"`` in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinodet.data.transforms import EvalTransform
from dinodet.model.postprocess import select_top

__all__ = ["EXPORT_FORMATS", "INT8_WEIGHT_TYPE", "ExportGraph", "ExportedModel",
           "compare_detections", "export_model", "quantize_int8", "read_metadata",
           "run_exported", "to_onnx", "verify_coco"]

EXPORT_FORMATS = ("onnx", "torch-export")
METADATA_KEY = "dinodet"
DEFAULT_OPSET = 18
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
#: What int8 quantisation changes: the weights of these ONNX operators (onnxruntime's dynamic
#: quantiser; activations are quantised at run time, the rest stays float32).
INT8_OPS = ("MatMul", "Gemm")
#: The int8 weights' type: unsigned (QUInt8, onnxruntime's U8U8 kernels). The signed QInt8
#: (U8S8) runs on AVX2 / AVX-512 CPUs without VNNI through VPMADDUBSW, whose 16-bit pair
#: sums saturate (onnxruntime's quantisation docs): there it moved a small test model's top
#: logits by 0.31 where U8U8 moves them by under 0.25, as U8S8 does on a VNNI CPU.
INT8_WEIGHT_TYPE = "QUInt8"


class ExportGraph(nn.Module):
    """RGB [0, 1] images -> (boxes, scores, labels); see the module docstring."""

    def __init__(self, model: nn.Module, num_select: int | None = None,
                 transform: EvalTransform | None = None) -> None:
        super().__init__()
        transform = transform or EvalTransform()
        self.model = model.eval()
        cfg = getattr(model, "cfg", None)
        self.num_select = int(num_select or getattr(cfg, "num_select", None) or 300)
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(transform.mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(transform.std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, w = images.shape[-2:]
        out = self.model((images - self.mean) / self.std)
        # The size multiplies a tensor as symbols, so the traced graph reads it from the
        # input instead of fixing the example's.
        one = images.new_ones(())
        size = torch.stack([one * w, one * h, one * w, one * h])
        scores, labels, xyxy = select_top(out["pred_logits"], out["pred_boxes"], size,
                                          self.num_select)
        xyxy = torch.minimum(xyxy.clamp(min=0), size)
        return xyxy, scores, labels


def _coarsest_stride(model: nn.Module) -> int:
    """The stride of ``model``'s coarsest feature level: the backbone's last stride, halved
    once per extra level (64 for every preset); 64 when the model does not say."""
    cfg = getattr(model, "cfg", None)
    strides = getattr(getattr(model, "backbone", None), "strides", None)
    if cfg is None or not strides:
        return 64
    extra = int(getattr(cfg, "num_feature_levels", len(strides))) - len(strides)
    return int(strides[-1]) * 2 ** max(extra, 0)


def _metadata(classes: list[dict[str, Any]] | None, transform: EvalTransform,
              num_classes: int, variant: str | None,
              class_thresholds: Mapping[int, float] | None = None) -> dict[str, Any]:
    """What an exported file says about itself; ``class_thresholds`` (checked against
    ``num_classes``) only where the model has them."""
    from dinodet.weights import CLASS_THRESHOLDS_KEY, check_class_thresholds, class_thresholds_json

    meta = {"format_version": 1, "input": "float32 [B, 3, H, W] RGB in [0, 1]",
            "outputs": OUTPUT_NAMES, "classes": classes, "num_classes": num_classes,
            **transform.metadata(), "variant": variant, "precision": "float32"}
    thresholds = check_class_thresholds(class_thresholds, num_classes,
                                        "export_model")
    if thresholds is not None:
        meta[CLASS_THRESHOLDS_KEY] = class_thresholds_json(thresholds)
    return meta


def export_model(model: nn.Module, out: str | Path, fmt: str = "onnx", *,
                 example_size: tuple[int, int] = (800, 1088), batch_size: int = 1,
                 dynamic: bool = True, opset: int = DEFAULT_OPSET,
                 classes: list[dict[str, Any]] | None = None,
                 transform: EvalTransform | None = None, num_select: int | None = None,
                 variant: str | None = None, int8: bool = False,
                 class_thresholds: Mapping[int, float] | None = None) -> Path:
    """Trace ``model`` (a :class:`~dinodet.model.DINO`) and write it to ``out``.

    Args:
        fmt: "onnx" (an ``.onnx`` file, opset >= 17) or "torch-export" (a ``.pt2`` archive
            for ``torch.export.load``).
        example_size: (H, W) of the example traced; with ``dynamic`` any other size runs
            too, as long as the image yields at least ``num_queries`` encoder tokens.
        batch_size: the example's batch (at least 2 with ``dynamic``, which keeps B free).
        classes / transform: stored as metadata (see :func:`read_metadata`); the
            transform's mean and std normalise inside the graph, its sizes tell a runtime
            how to resize (:meth:`EvalTransform.from_metadata`).
        class_thresholds: the model's per-class score thresholds (class index -> score in
            [0, 1]; :attr:`dinodet.weights.LoadedModel.class_thresholds`), stored as
            metadata for :meth:`ExportedModel.detect`'s ``threshold="auto"``; checked
            before tracing.
        int8: ONNX only: write the float32 graph quantised by :func:`quantize_int8` (the
            float32 file is never written beside ``out``); approximate, measure it with
            :func:`verify_coco`.
    Returns:
        The path written. It is written atomically (into a temporary folder of a unique name
        beside it, then moved), and checked before any tracing
        (:func:`~dinodet.weights.check_output_file`); a failed export leaves nothing behind.
    """
    from dinodet.weights import check_output_file

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of "
                         f"{', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and opset < 17:
        raise ValueError(f"opset {opset} is too old: the graph needs opset >= 17")
    if int8 and fmt != "onnx":
        raise ValueError(f"int8 works with the onnx format only (onnxruntime's quantiser), "
                         f"not {fmt}")
    height, width = example_size
    if min(height, width) < 64 or batch_size < 1:
        raise ValueError(f"example batch {batch_size} of {height}x{width} is too small "
                         "(at least 1 image of 64x64)")
    coarsest = _coarsest_stride(model)
    if dynamic and min(height, width) <= coarsest:
        # Tracing fixes every size that is 1 in the example: a coarsest map of 1 pixel would
        # make a file that fails (a Concat size mismatch) on any image of another size.
        raise ValueError(f"example size {height}x{width} gives the coarsest feature map "
                         f"(stride {coarsest}) a side of 1 pixel, which tracing would fix: "
                         f"the file would run at that size only; use an example of more "
                         f"than {coarsest} px a side (or static=True)")
    out = check_output_file(out, "export file")
    transform = transform or EvalTransform()
    cfg = getattr(model, "cfg", None)
    meta = _metadata(classes, transform, int(getattr(cfg, "num_classes", 0)), variant,
                     class_thresholds)
    graph = ExportGraph(model, num_select, transform).eval()
    param = next(model.parameters())
    if dynamic:  # a size-1 example would fix B to 1 (tracing specialises sizes 0 and 1)
        batch_size = max(batch_size, 2)
    example = torch.rand(batch_size, 3, height, width, dtype=param.dtype, device=param.device)
    dims = None
    if dynamic:
        any_size = torch.export.Dim.DYNAMIC
        dims = {"images": {0: any_size, 2: any_size, 3: any_size}}
    with torch.no_grad():
        if fmt == "torch-export":
            program = torch.export.export(graph, (example,), dynamic_shapes=dims)

            def save(path: Path) -> None:
                with warnings.catch_warnings():  # weights shared by the layers' heads
                    warnings.filterwarnings("ignore", "No complete tensor found")
                    torch.export.save(program, path,
                                      extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})

            _write_beside(out, save)
        else:
            _export_onnx(graph, example, dims, opset, out, meta, int8)
    return out


def _write_beside(out: Path, save: Callable[[Path], None]) -> None:
    """``save(path)`` into a fresh temporary folder beside ``out`` (a unique name, made by
    ``mkdtemp``), with ``out``'s own name, then every file it made moved next to ``out``:
    ``out`` itself last, each by ``os.replace``. The folder goes, whatever happens; a reader
    never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_folder(out) as folder:
        save(folder / out.name)
        made = sorted(folder.iterdir(), key=lambda f: f.name == out.name)
        if not made or made[-1].name != out.name:
            raise RuntimeError(f"the exporter wrote no {out.name}")
        for file in made:  # side files (ONNX external data) first, then the model
            os.replace(file, out.parent / file.name)


@contextlib.contextmanager
def _temporary_folder(out: Path) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _export_onnx(graph: ExportGraph, example: Tensor, dims: dict | None, opset: int,
                 out: Path, meta: dict[str, Any], int8: bool = False) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is "
                          "missing): pip install 'dinodet[export]'") from e
    if int8:
        _quantizer()  # a missing onnxruntime is said before the (slow) tracing
    program = to_onnx(graph, (example,), dynamic_shapes=dims, opset=opset,
                      input_names=INPUT_NAMES, output_names=OUTPUT_NAMES)
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    # Weights of a model over 2 GB go to a side file named after the model; writing under
    # out's own name in a temporary folder keeps that reference right once moved.
    if not int8:
        _write_beside(out, lambda path: program.save(path))
        return

    def save_int8(path: Path) -> None:
        # the float32 graph in a scratch folder of its own, gone before the move
        with _temporary_folder(path) as scratch:
            program.save(scratch / path.name)
            _quantize(scratch / path.name, path, meta)

    _write_beside(out, save_int8)


def to_onnx(module: nn.Module, args: tuple[Any, ...], *, dynamic_shapes: Any = None,
            opset: int = DEFAULT_OPSET, input_names: list[str] | None = None,
            output_names: list[str] | None = None) -> Any:
    """``torch.onnx.export`` (the ``torch.export`` exporter) of ``module`` as ``dinodet
    export`` writes it: the deformable attention's corner sums traced as one op each
    (:func:`~dinodet.model.ms_deform_attn_onnx.corner_sum_op`), then made Scans over
    chunks of rows (:func:`chunk_corner_sums`), then :func:`optimize_onnx`. Returns the
    ``torch.onnx.ONNXProgram``."""
    from dinodet.model import ms_deform_attn_onnx

    with ms_deform_attn_onnx.corner_sum_op():
        program = torch.onnx.export(
            module, args, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
            verbose=False, optimize=False,
            custom_translation_table={torch.ops.dinodet.corner_sum.default: _corner_sum_onnx})
    if program is None:  # pragma: no cover - the TorchScript exporter returns nothing
        raise RuntimeError("torch.onnx.export returned no program")
    chunk_corner_sums(program.model, SCAN_STEP_BYTES)
    optimize_onnx(program.model)
    return program


#: metadata_props key of the node whose output is a traced ``dinodet::corner_sum``.
CORNER_SUM_KEY = "dinodet.corner_sum"
#: Bytes of gathered rows per step of a corner sum's Scan (2 MB: 256 rows of 64 corners of
#: 32 values), within a core's L2. One encoder attention layer at 800×1088 on the 2-core
#: Xeon, one run, alternating: 369 to 393 ms for steps of 1 to 16 MB, 423 ms for 512 KB,
#: 635 ms in one step (all 1.2 GB of rows through memory).
SCAN_STEP_BYTES = 2 << 20


def _corner_sum_onnx(table: Any, index: Any, weights: Any) -> Any:
    """``dinodet::corner_sum`` in ONNX: Gather the [R, K] rows of the [T, D] table (->
    [R, K, D]), MatMul by the [R, 1, K] weights, Reshape to [R, D]; that last node is
    marked for :func:`chunk_corner_sums`."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def const(values: list[int]) -> Any:
        tensor: Any = ir.tensor(np.array(values, dtype=np.int64))  # the tracer takes IR's
        return op.Constant(value=tensor)

    rows = op.Gather(table, index, axis=0)
    summed = op.MatMul(op.Unsqueeze(weights, const([1])), rows)  # [R, 1, D]
    out = op.Reshape(summed, const([-1, table.shape[1]]))
    out.producer().metadata_props[CORNER_SUM_KEY] = "1"
    return out


def _producer(node: Any, position: int) -> Any:
    """The node that makes ``node``'s input ``position`` (None if none does)."""
    if node is None or len(node.inputs) <= position or node.inputs[position] is None:
        return None
    return node.inputs[position].producer()


def chunk_corner_sums(model: Any, step_bytes: int = SCAN_STEP_BYTES) -> int:
    """Each marked corner sum of an ONNX IR model (:func:`_corner_sum_onnx`), in place, as
    a Scan over steps of ``step_bytes // (K·D·4)`` rows (their indices and weights padded
    with zeros to whole steps; row 0 read with weight 0), then the result's first R rows.
    In one Gather, all R·K·D gathered values (1.2 GB for the encoder attention of an
    800×1088 image) go through memory before the MatMul reads them back; a step's stay in
    cache. Returns the number of sums rewritten."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.metadata_props.get(CORNER_SUM_KEY) is None:
            continue
        summed = _producer(node, 0)
        unsqueeze, gather = _producer(summed, 0), _producer(summed, 1)
        if [x and x.op_type for x in (node, summed, unsqueeze, gather)] != [
                "Reshape", "MatMul", "Unsqueeze", "Gather"]:
            raise RuntimeError(f"corner sum {node.name!r} is not Gather -> MatMul -> Reshape")
        if node.outputs[0].is_graph_output():
            raise RuntimeError(f"corner sum {node.name!r} is a graph output")
        table, index = gather.inputs
        weights = unsqueeze.outputs[0]  # [R, 1, K]
        corners = index.shape[1] if index.shape is not None and len(index.shape) == 2 else None
        width = table.shape[1] if table.shape is not None and len(table.shape) == 2 else None
        if not isinstance(corners, int) or not isinstance(width, int):
            raise RuntimeError(f"corner sum {node.name!r} has unknown or symbolic K or D: "
                               f"indices {index.shape}, table {table.shape}")
        step = max(1, step_bytes // (corners * width * 4))
        made: list[ir.Node] = []

        def add(op_type: str, inputs: list[Any], into: list[ir.Node] = made,
                **attributes: Any) -> Any:
            new = ir.node(op_type, inputs, attributes=attributes)
            into.append(new)
            return new.outputs[0]

        def const(values: list[int]) -> Any:
            return add("Constant", [], value=ir.tensor(np.array(values, dtype=np.int64)))

        # Rows padded to whole steps: (step − R mod step) mod step more.
        step_1d, zero_1d = const([step]), const([0])
        total = add("Shape", [index], start=0, end=1)  # [1]
        pad = add("Mod", [add("Sub", [step_1d, add("Mod", [total, step_1d])]), step_1d])
        pads = add("Concat", [zero_1d, zero_1d, pad, zero_1d], axis=0)
        step_index = add("Reshape", [add("Pad", [index, pads]), const([-1, step, corners])])
        pads = add("Concat", [zero_1d, zero_1d, zero_1d, pad, zero_1d, zero_1d], axis=0)
        step_weights = add("Reshape", [add("Pad", [weights, pads]),
                                       const([-1, step, 1, corners])])

        # Body: a step's [step, K] indices and [step, 1, K] weights -> [step, 1, D].
        name = f"corner_sum_{count}"
        index_in = ir.Value(name=f"{name}_index", type=ir.TensorType(ir.DataType.INT64),
                            shape=ir.Shape([step, corners]))
        # The weights' dtype is the table's (Unsqueeze's output may carry no type yet).
        dtype = table.dtype or weights.dtype or ir.DataType.FLOAT
        weights_in = ir.Value(name=f"{name}_weights", type=ir.TensorType(dtype),
                              shape=ir.Shape([step, 1, corners]))
        body: list[ir.Node] = []
        rows = add("Gather", [table, index_in], body, axis=0)
        step_out = add("MatMul", [weights_in, rows], body)
        scan = ir.node("Scan", [step_index, step_weights], attributes={
            "body": ir.Graph([index_in, weights_in], [step_out], nodes=body,
                             name=f"{name}_step"),
            "num_scan_inputs": 2})
        made.append(scan)
        out = add("Slice", [add("Reshape", [scan.outputs[0], const([-1, width])]),
                            zero_1d, total, zero_1d])
        # Where the MatMul is: after both the weights and the indices (and the table).
        graph.insert_before(summed, made)
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        for dead in (node, summed, gather):
            graph.remove(dead, safe=True)
        count += 1
    return count


def optimize_onnx(model: Any, iterations: int = 2) -> None:
    """What ``torch.onnx.export(optimize=True)`` does to the graph (onnxscript's optimizer:
    constant folding, its rewrite rules, unused nodes and duplicate initializers removed,
    common subexpressions merged), in place, without the rewrite rules whose pattern has
    several output nodes (onnxscript's ``SlicesSplit``, two Slices into one Split).

    onnxscript matches such a pattern at every node by scanning every node: quadratic in
    the graph's size: 597 of the 766 s of exporting r50-4scale (15,600 nodes after
    folding) on a 2-core CPU; every other rule matches at its node only. Where onnxscript
    lacks what this relies on (its rule list, their patterns, ``fold_constants``), its
    whole optimizer runs instead.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import optimizer, rewriter

    local = [rule for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ())
             if getattr(getattr(rule, "_target_pattern", None), "has_single_output_node",
                        None) is True]
    if not local or not hasattr(optimizer, "fold_constants"):
        optimizer.optimize_ir(model)
        return
    rewrite = rewriter.RewritePass(local)
    common.InlinePass()(model)
    # Folding warns at each constant op of several outputs it leaves as it is (a Split
    # per layer): not a problem of the user's model, not shown.
    with _dropping_log(logging.getLogger("onnxscript.optimizer._constant_folding"),
                       "with multiple outputs"):
        for _ in range(iterations):
            folded = optimizer.fold_constants(model, onnx_shape_inference=True).modified
            rewritten = rewrite(model).modified
            removed = common.RemoveUnusedNodesPass()(model).modified
            if not (folded or rewritten or removed):
                break
    ir.passes.Sequential(
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _quantizer() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise ImportError("int8 quantisation needs onnxruntime: pip install "
                          "'dinodet[export]'") from e
    return quantization


class _DropLog(logging.Filter):
    """Drops the log records whose message holds ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _dropping_log(logger: logging.Logger, text: str) -> Iterator[None]:
    """Within it, ``logger`` drops the records whose message holds ``text``."""
    quiet = _DropLog(text)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _quantize(source: Path, out: Path, meta: dict[str, Any], per_channel: bool = False
              ) -> None:
    """onnxruntime's dynamic quantisation of ``source``'s :data:`INT8_OPS` weights
    (:data:`INT8_WEIGHT_TYPE`; activations quantised at run time) into ``out``, with
    ``meta`` marked int8."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    q = _quantizer()
    weights = onnx.load(str(source), load_external_data=False).graph.initializer
    big = any(uses_external_data(t) for t in weights)  # over 2 GB: so is the int8 file
    # The quantiser logs advice to pre-process the graph, whose shape inference fails on
    # this one (and does not change which weights are quantised): not shown.
    with _dropping_log(logging.getLogger(), "pre-processing"):
        q.quantize_dynamic(source, out, op_types_to_quantize=list(INT8_OPS),
                           per_channel=per_channel,
                           weight_type=getattr(q.QuantType, INT8_WEIGHT_TYPE),
                           use_external_data_format=big)
    model = onnx.load(str(out), load_external_data=False)
    quantised = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                    for n in model.graph.node)
    meta = {**meta, "precision": "int8",
            "int8": {"method": "onnxruntime.quantization.quantize_dynamic",
                     "ops": list(INT8_OPS), "weight_type": INT8_WEIGHT_TYPE,
                     "per_channel": per_channel, "quantized_nodes": quantised}}
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]  # ours, copied by the quantiser, is replaced
    for key, value in [*kept, (METADATA_KEY, json.dumps(meta))]:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))  # the external data (if any) stays where the quantiser put it


def quantize_int8(source: str | Path, out: str | Path, *, per_channel: bool = False) -> Path:
    """Quantise a float32 ``.onnx`` file of :func:`export_model` to int8, into ``out``.

    onnxruntime's dynamic quantiser (``quantize_dynamic``): the weights of every
    :data:`INT8_OPS` node with a constant weight (the transformer's and heads' linear
    layers) become 8-bit (:data:`INT8_WEIGHT_TYPE`, one scale per tensor, or per output
    channel with ``per_channel``); their inputs are quantised at run time; convolutions,
    the deformable sampling and the rest stay float32. The metadata says
    ``"precision": "int8"``. The detections are approximate: measure them with
    :func:`verify_coco`. ``out`` is written atomically and may be ``source`` itself."""
    from dinodet.errors import UserError
    from dinodet.weights import check_output_file

    source = Path(source)
    meta = read_metadata(source)
    if source.suffix != ".onnx":
        raise UserError(f"{source}: int8 quantisation takes an .onnx file, not a "
                        "torch.export archive")
    if meta.get("precision", "float32") != "float32":
        raise UserError(f"{source} is already {meta['precision']}: quantise its float32 "
                        "export")
    out = check_output_file(out, "int8 file")
    _write_beside(out, lambda path: _quantize(source, path, meta, per_channel))
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_model` stored in an ``.onnx`` file or ``.pt2`` archive
    (read without loading the model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                return json.loads(prop.value)
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not exported by dinodet")
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist()
                     if n.endswith(f"/extra/{METADATA_KEY}.json")]
            if not names:
                raise ValueError(f"{path} has no {METADATA_KEY}.json: not exported by dinodet")
            return json.loads(archive.read(names[0]))
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is neither an .onnx file nor a torch.export archive") from e


class ExportedModel:
    """An exported file ready to run: onnxruntime for ``.onnx`` (``providers`` default to
    the CPU), ``torch.export.load`` for a ``.pt2`` archive. Calling it with [B, 3, H, W]
    RGB [0, 1] float32 images returns (boxes, scores, labels) tensors; ``metadata`` is
    :func:`read_metadata`'s, ``class_thresholds`` the per-class score thresholds in it
    (checked; None where the model had none), which :meth:`detect` applies."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        from dinodet.weights import CLASS_THRESHOLDS_KEY, check_class_thresholds

        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        num_classes = self.metadata.get("num_classes")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool):
            num_classes = 0  # then any class threshold in the file is outside the classes
        self.class_thresholds = check_class_thresholds(
            self.metadata.get(CLASS_THRESHOLDS_KEY), num_classes, str(self.path))
        self.format = "onnx" if self.path.suffix == ".onnx" else "torch-export"
        if self.format == "onnx":
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise ImportError("running an ONNX file needs onnxruntime: "
                                  "pip install 'dinodet[export]'") from e
            self._session = ort.InferenceSession(
                str(self.path), providers=providers or ["CPUExecutionProvider"])
            dims = self._session.get_inputs()[0].shape
        else:
            program = torch.export.load(self.path)
            self._module = program.module()
            first = program.graph_signature.user_inputs[0]
            val = next(n for n in program.graph.nodes if n.name == first).meta.get("val")
            dims = list(val.shape) if val is not None else [None] * 4
        #: [B, 3, H, W]: an int where the file fixes the size (``dynamic=False``), else None
        self.input_shape: list[int | None] = [d if isinstance(d, int) else None for d in dims]

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.format == "onnx":
            outs = self._session.run(OUTPUT_NAMES,
                                     {INPUT_NAMES[0]: images.float().cpu().numpy()})
            boxes, scores, labels = (torch.from_numpy(o) for o in outs)
            return boxes, scores, labels
        with torch.no_grad():
            return self._module(images)

    def detect(self, images: Tensor, threshold: float | str = "auto"
               ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(boxes, scores, labels) of every image, only the detections that reach
        ``threshold``: a number in [0, 1], or ``"auto"``: each class's own from the file's
        ``class_thresholds`` (a class without one keeps none; a file without any is a
        :class:`~dinodet.errors.UserError` saying where they come from)."""
        from dinodet.predict import check_threshold, keep_above, no_thresholds_error

        threshold = check_threshold(threshold)
        if threshold == "auto" and not self.class_thresholds:
            raise no_thresholds_error(str(self.path))  # before running the model
        found = []
        for boxes, scores, labels in zip(*self(images)):
            keep = keep_above(scores, labels, threshold, self.class_thresholds,
                              str(self.path))
            found.append((boxes[keep], scores[keep], labels[keep]))
        return found


def run_exported(path: str | Path, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Load an exported file and run it once; see :class:`ExportedModel` (its
    :meth:`~ExportedModel.detect` applies a threshold, ``"auto"``: the file's own)."""
    return ExportedModel(path)(images)


def compare_detections(expected: tuple[Tensor, Tensor, Tensor],
                       actual: tuple[Tensor, Tensor, Tensor], min_score: float = 0.0
                       ) -> dict[str, float]:
    """Largest score and box differences between two (boxes, scores, labels) results over
    the detections scoring at least ``min_score`` in ``expected``.

    Detections are paired by label and nearest score, so two near-equal scores that the
    runtimes order differently still pair up; an unpaired detection counts as infinite.
    """
    worst = {"score": 0.0, "box": 0.0}
    for e_boxes, e_scores, e_labels, a_boxes, a_scores, a_labels in zip(*expected, *actual):
        free = torch.ones(len(a_scores), dtype=torch.bool)
        for box, score, label in zip(e_boxes, e_scores, e_labels):
            if score < min_score:
                continue
            cost = (a_scores - score).abs().double()
            cost[(a_labels != label) | ~free] = float("inf")
            if not torch.isfinite(cost.min()):
                return {"score": float("inf"), "box": float("inf")}
            # among equally close scores, the closest box
            close = cost <= cost.min() + 1e-6
            box_err = (a_boxes - box).abs().amax(1).double()
            box_err[~close] = float("inf")
            j = int(box_err.argmin())
            if not torch.isfinite(box_err[j]):
                return {"score": float("inf"), "box": float("inf")}
            free[j] = False
            worst["score"] = max(worst["score"], float(cost[j]))
            worst["box"] = max(worst["box"], float(box_err[j]))
    return worst


class _ResizeOnly:
    """``transform``'s resize of a COCO sample, boxes following, and nothing else: the
    sample becomes the RGB [0, 1] image the exported graph takes (it normalises inside)."""

    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        from torchvision.transforms.v2 import functional as F

        size = list(self.transform.output_size(*image.shape[-2:]))
        return (F.resize(image, size, antialias=True),
                {**target, "boxes": F.resize(target["boxes"], size)})


def verify_coco(path: str | Path | ExportedModel, model: nn.Module, ann: str | Path,
                images: str | Path | None = None, *, max_images: int | None = None,
                keep_category_ids: bool = False, progress: bool = False,
                split: str | None = None) -> dict[str, Any]:
    """COCO box metrics of an exported file and of the PyTorch ``model`` it was exported
    from, on the same images of a dataset: a COCO json ``ann`` with its ``images`` folder,
    or a YOLO / Pascal VOC dataset (``ann``; ``split`` for a layout with splits), read as
    :func:`~dinodet.data.formats.open_dataset` reads it.

    Every image of ``ann`` (the first ``max_images`` by image id; all by default) is
    resized by the file's :class:`~dinodet.data.EvalTransform` (its metadata) to RGB
    [0, 1]. The file (:class:`ExportedModel`: onnxruntime or ``torch.export``) runs on it
    alone (one image at a time: a batch shares one size), its boxes scaled back to the
    original image; ``model`` runs on it normalised, its outputs through
    :func:`~dinodet.model.postprocess.postprocess`, which is what ``dinodet eval`` does at
    batch 1. The file clips its boxes to the image and eval does not (as the original's
    evaluation), which moves the AP by up to a point or so; so PyTorch's boxes are scored
    clipped too ("pytorch": the reference the file is held to) and as eval writes them
    ("pytorch_unclipped": ``dinodet eval``'s metrics on these images). Every score is
    pycocotools' through :class:`~dinodet.engine.evaluate.CocoEvaluator`.

    Returns:
        ``{"ann", "images" (evaluated), "skipped" (unreadable files), "precision" (the
        file's), "pytorch", "exported", "pytorch_unclipped" (``METRIC_NAMES`` -> [0, 1], -1
        where undefined), "difference" (exported - pytorch; nan where either is
        undefined), "seconds" ({"pytorch", "exported"}: time spent running each)}``.
    """
    import math
    import time

    from tqdm import tqdm

    from dinodet.data.coco import SkippedImage
    from dinodet.data.formats import open_dataset
    from dinodet.engine.evaluate import CocoEvaluator, label_table
    from dinodet.errors import UserError
    from dinodet.model.postprocess import postprocess

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    exported = path if isinstance(path, ExportedModel) else ExportedModel(path)
    meta = exported.metadata
    cfg = getattr(model, "cfg", None)
    num_classes = int(getattr(cfg, "num_classes", 0))
    if meta.get("num_classes") and int(meta["num_classes"]) != num_classes:
        raise UserError(f"{exported.path} was exported from a model of "
                        f"{meta['num_classes']} classes, not of {num_classes}")
    transform = EvalTransform.from_metadata(meta)
    classes = meta.get("classes")
    dataset = open_dataset(ann, images, split=split, transforms=_ResizeOnly(transform),
                           keep_category_ids=keep_category_ids or classes is None)
    label_to_id, names = label_table(classes, num_classes, dataset, ann)
    evaluators = {side: CocoEvaluator(dataset.coco, label_to_id, names)
                  for side in ("pytorch", "exported", "pytorch_unclipped")}
    seconds = {"pytorch": 0.0, "exported": 0.0}
    param = next(model.parameters())
    mean = torch.tensor(transform.mean, device=param.device).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, device=param.device).view(1, 3, 1, 1)
    fixed = exported.input_shape
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    skipped: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(count), unit="image", disable=not progress or count <= 4):
            sample = dataset[index]
            if isinstance(sample, SkippedImage):
                skipped.append(sample.path)
                continue
            image, target = sample
            image_id, h, w = int(target["image_id"]), *image.shape[-2:]
            if (fixed[2] or h, fixed[3] or w) != (h, w):
                raise UserError(
                    f"{exported.path} takes only {fixed[2]}x{fixed[3]} images (exported with "
                    f"static sizes) but {dataset.image_path(index)} is resized to {h}x{w}: "
                    f"export with dynamic sizes to verify it on {ann}")
            batch = image[None].expand(fixed[0] or 1, -1, -1, -1).contiguous()
            original = [int(v) for v in target["orig_size"]]
            start = time.perf_counter()
            boxes, scores, labels = exported(batch)
            seconds["exported"] += time.perf_counter() - start
            evaluators["exported"].update({image_id: {
                "boxes": transform.boxes_to_original(boxes[0].float(), (h, w), original),
                "scores": scores[0], "labels": labels[0]}})
            start = time.perf_counter()
            with torch.inference_mode():
                out = model((batch[:1].to(param) - mean) / std)
                out = {k: out[k].float() for k in ("pred_logits", "pred_boxes")}
                found = postprocess(out, [(original[0], original[1])],
                                    num_select=cfg.num_select if cfg is not None else 300)
            seconds["pytorch"] += time.perf_counter() - start
            evaluators["pytorch_unclipped"].update({image_id: found[0]})
            size = torch.tensor(original[::-1] * 2, dtype=found[0]["boxes"].dtype)
            clipped = torch.minimum(found[0]["boxes"].cpu().clamp(min=0), size)
            evaluators["pytorch"].update({image_id: {**found[0], "boxes": clipped}})
    finally:
        model.train(was_training)
    if not evaluators["exported"].image_ids:
        raise UserError(f"no image of {ann} could be read from {images}")
    metrics = {side: e.summarize().metrics for side, e in evaluators.items()}
    difference = {
        name: (metrics["exported"][name] - metrics["pytorch"][name]
               if min(metrics["exported"][name], metrics["pytorch"][name]) >= 0 else math.nan)
        for name in metrics["pytorch"]}
    return {"ann": str(ann), "images": len(evaluators["exported"].image_ids),
            "skipped": skipped, "precision": meta.get("precision", "float32"), **metrics,
            "difference": difference, "seconds": seconds}
