"""Where the ONNX file loses to PyTorch on CPU: one encoder layer's deformable attention,
PyTorch (``embedding_bag``, gathering and summing in one pass) against its ONNX export under
onnxruntime (a ``Scan`` over steps of rows, each a ``Gather`` of corner rows and a ``MatMul``
by their weights), side by side.

It builds one ``MSDeformAttn`` of the r50-4scale encoder (256 channels, 8 heads, 4 levels,
4 points; random weights, the offsets spread over a few pixels), with the four levels of
an H×W image (strides 8 to 64) and one query per value at its own pixel, as in the
encoder; exports it as ``dinodet export`` does (:func:`dinodet.export.to_onnx`), checks
the file against PyTorch, then alternates the two, ``--repeats`` times each. One more run
of each under a profiler splits its time: for onnxruntime, the corner ``Gather``, the
``MatMul`` that sums the corner rows, the projections' ``Gemm`` and the rest; for PyTorch,
``embedding_bag``, the Linear layers and the rest. The ``Gather`` writes N·Lq·M·4·L·P·D
float32 values (1.2 GB at 800×1088, a step's 2 MB at a time) that the ``MatMul`` reads
back; the printed GB/s is what onnxruntime achieves on them.

    python benchmarks/bench_onnx_attention.py --repeats 5 --json attention.json
    python benchmarks/bench_onnx_attention.py --hw 512x512 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common import ort_session_options, print_table, summarize, timed, write_json
from dinodet.export import to_onnx
from dinodet.model.ms_deform_attn import MSDeformAttn
from dinodet.model.transformer import Encoder

BASELINE = "pytorch"
DIM, HEADS, LEVELS, POINTS = 256, 8, 4, 4
EMBEDDING_BAG = "aten::_embedding_bag_forward_only"
LINEAR = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")


def level_shapes(height: int, width: int, levels: int = LEVELS) -> list[tuple[int, int]]:
    """The backbone's feature sizes for an H×W input: stride 8, then halved (ceil) per level."""
    shapes = [(math.ceil(height / 8), math.ceil(width / 8))]
    for _ in range(levels - 1):
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


class EncoderAttention(nn.Module):
    """``MSDeformAttn`` at fixed level shapes: (query, reference points, value) -> output."""

    def __init__(self, attention: MSDeformAttn, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.attention, self.shapes = attention, shapes

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor) -> Tensor:
        return self.attention(query, reference_points, value, self.shapes)


def make_layer(height: int, width: int, seed: int = 0
               ) -> tuple[EncoderAttention, tuple[Tensor, Tensor, Tensor]]:
    """The layer and its inputs: one query per value, each at its own pixel's centre on
    every level (the encoder's reference points, no padding)."""
    torch.manual_seed(seed)
    attention = MSDeformAttn(DIM, LEVELS, HEADS, POINTS).eval()
    with torch.no_grad():  # offsets of a few pixels that differ between queries
        attention.sampling_offsets.weight.normal_(0, 0.02)
        attention.attention_weights.weight.normal_(0, 0.05)
    shapes = level_shapes(height, width)
    tokens = sum(h * w for h, w in shapes)
    reference = Encoder.reference_points(shapes, torch.ones(1, LEVELS, 2))
    inputs = (torch.randn(1, tokens, DIM), reference, torch.randn(1, tokens, DIM))
    return EncoderAttention(attention, shapes).eval(), inputs


def gathered_values(tokens: int) -> int:
    """Float32 values the export's corner Gather writes for one image: N·Lq·M·4·L·P·D."""
    return tokens * HEADS * 4 * LEVELS * POINTS * (DIM // HEADS)


def export(layer: EncoderAttention, inputs: tuple[Tensor, ...], path: Path, opset: int
           ) -> Path:
    """The layer as ``dinodet export`` writes a model (:func:`dinodet.export.to_onnx`)."""
    program = to_onnx(layer, inputs, opset=opset)
    program.save(str(path))
    return path


def ort_profile(session_path: Path, feeds: dict[str, Any], threads: int, workdir: Path
                ) -> dict[str, Any]:
    """Kernel milliseconds of one run by part, and the bytes the corner Gathers wrote."""
    import onnxruntime as ort

    options = ort_session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "ort")
    session = ort.InferenceSession(str(session_path), options,
                                   providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up, then the profiled run is the last one
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    last = [e for e in events if e.get("name") == "model_run"][-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    parts: collections.Counter[str] = collections.Counter()
    gather_bytes = 0
    for e in events:
        if not (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and start <= e["ts"] <= end):
            continue
        op = e["args"]["op_name"]
        if op in ("Scan", "Loop"):  # their body's nodes are counted one by one
            continue
        shapes = [next(iter(d.values())) for d in e["args"].get("output_type_shape", [])]
        out = shapes[0] if shapes else []
        if op == "Gather" and len(out) in (2, 3) and out[-1] == DIM // HEADS:
            part = "corner Gather"
            gather_bytes += 4 * math.prod(out)
        elif op == "MatMul" and len(out) == 3 and out[1] == 1:
            part = "corner MatMul"
        elif op in ("Gemm", "FusedGemm"):
            part = "projections (Gemm)"
        else:
            part = "other"
        parts[part] += e["dur"]
    return {"ms": {k: v / 1e3 for k, v in parts.most_common()},
            "run_ms": last["dur"] / 1e3, "gather_bytes": gather_bytes}


def torch_profile(layer: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, Any]:
    """Self CPU milliseconds of one call by part: embedding_bag, Linear layers, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(*inputs)
    parts: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages():
        if event.key == EMBEDDING_BAG:
            part = "embedding_bag"
        elif event.key in LINEAR:
            part = "projections (Linear)"
        else:
            part = "other"
        parts[part] += event.self_cpu_time_total / 1e3
    return {"ms": dict(parts.most_common())}


def bench(height: int, width: int, repeats: int, threads: int, opset: int,
          workdir: Path) -> dict[str, Any]:
    import onnxruntime as ort

    layer, inputs = make_layer(height, width)
    path = export(layer, inputs, workdir / "attention.onnx", opset)
    session = ort.InferenceSession(str(path), ort_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    with torch.no_grad():
        want = layer(*inputs)
    (got,) = session.run(None, feeds)
    max_abs_diff = float((torch.from_numpy(got) - want).abs().max())

    def run_torch() -> None:
        with torch.no_grad():
            layer(*inputs)

    runners = {BASELINE: run_torch, "onnxruntime": lambda: session.run(None, feeds)}
    for run in runners.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(timed(run))
    tokens = inputs[0].shape[1]
    ort_parts = ort_profile(path, feeds, threads, workdir)
    gather_s = ort_parts["ms"].get("corner Gather", 0.0) / 1e3
    return {
        "height": height, "width": width, "level_shapes": layer.shapes, "queries": tokens,
        "max_abs_diff": max_abs_diff,
        "gathered_values": gathered_values(tokens),
        "timings": summarize(times, BASELINE),
        "onnxruntime_profile": ort_parts,
        "onnxruntime_gather_gb_per_s": (ort_parts["gather_bytes"] / gather_s / 1e9
                                        if gather_s else None),
        "pytorch_profile": torch_profile(layer, inputs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hw", default="800x1088", help="image size HxW (default 800x1088)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    try:
        height, width = (int(v) for v in args.hw.lower().split("x"))
    except ValueError:
        parser.error(f"--hw must be HxW, e.g. 800x1088, got {args.hw!r}")
    try:
        import onnxruntime
    except ImportError:
        print("bench_onnx_attention needs onnxruntime: pip install 'dinodet[export]'",
              file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    print(f"one encoder attention layer at {height}x{width}: exporting, then {args.repeats} "
          "alternating runs ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(height, width, args.repeats, args.threads, args.opset, Path(tmp))
    print(f"\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{result['queries']} queries, max |onnx - pytorch| {result['max_abs_diff']:.1e}")
    in_ms = {name: {**t, **{k: t[k] * 1e3 for k in ("median_s", "min_s", "max_s")}}
             for name, t in result["timings"].items()}
    print_table(in_ms, median_label="median ms", name_width=14)
    for side in ("pytorch_profile", "onnxruntime_profile"):
        split = ", ".join(f"{k} {v:.0f}" for k, v in result[side]["ms"].items())
        print(f"{side.split('_')[0]} ms: {split}")
    gb = result["onnxruntime_profile"]["gather_bytes"] / 1e9
    rate = result["onnxruntime_gather_gb_per_s"]
    print(f"the corner Gather wrote {gb:.2f} GB"
          + (f" at {rate:.1f} GB/s" if rate else "")
          + "; embedding_bag reads the same rows without writing them")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        settings["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        write_json(args.json, "bench_onnx_attention", settings, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
