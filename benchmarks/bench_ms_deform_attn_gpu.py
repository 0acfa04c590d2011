"""Multi-scale deformable attention on CUDA: the Triton op against the PyTorch paths.

Times the attention alone on the encoder-sized problem of DINO: an 800×1333 image gives 4
levels at strides 8, 16, 32 and 64 (100×167, 50×84, 25×42, 13×21, S = 22 223 values), every
value is a query (Lq = S), batch 2, 8 heads of 32 channels, 4 points per head and level.
Sampling locations are what the encoder samples: each query's own pixel on every level
plus offsets of a few pixels; the attention weights are a softmax over the 16 points. As
in :class:`dinodet.model.MSDeformAttn`, locations and weights are float32 whatever the
dtype of the values.

Implementations: ``triton`` (``torch.ops.dinodet.ms_deform_attn``), ``torch`` (the default
PyTorch path, one ``embedding_bag`` per chunk of queries) and ``grid_sample`` (the
reference, one ``F.grid_sample`` per level). For each dtype (float32, bfloat16) and mode
(forward under ``torch.no_grad``; forward + backward to the values, locations and weights),
every implementation is warmed up (Triton compiles there), then timed with CUDA events,
the implementations alternating so that they share the GPU's clock and thermal state. It
reports medians, ratios to the ``torch`` path, peak memory above the inputs, and the
largest difference of each output from the ``torch`` path's.

    python benchmarks/bench_ms_deform_attn_gpu.py --repeats 20 --json results.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from common import write_json
from dinodet.model import ms_deform_attn as msda
from dinodet.model import ms_deform_attn_triton as mst

STRIDES = (8, 16, 32, 64)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLS: dict[str, Callable[..., Tensor]] = {
    "torch": msda.ms_deform_attn,
    "triton": mst.ms_deform_attn_triton,
    "grid_sample": msda.ms_deform_attn_grid_sample,
}


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes of a ResNet at strides 8..64 (each stride-2 stage rounds up)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def make_inputs(
    shapes: list[tuple[int, int]],
    batch: int,
    heads: int,
    head_dim: int,
    points: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """value [N, S, M, D] in ``dtype``; locations [N, S, M, L, P, 2] and weights
    [N, S, M, L, P] in float32: every value is a query that samples near its own pixel."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, s, heads, head_dim, generator=g, device=device).to(dtype)
    # Normalised centre of every pixel of every level: [S, 2] as (x, y).
    centres = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device) + 0.5) / h,
            (torch.arange(w, device=device) + 0.5) / w,
            indexing="ij",
        )
        centres.append(torch.stack((xs, ys), -1).reshape(-1, 2))
    ref = torch.cat(centres)  # [S, 2]
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device)
    # Offsets of about two pixels of each level.
    offsets = 2 * torch.randn(batch, s, heads, levels, points, 2, generator=g, device=device)
    loc = ref[None, :, None, None, None, :] + offsets / sizes[:, None, :]
    logits = torch.randn(batch, s, heads, levels * points, generator=g, device=device)
    weights = logits.softmax(-1).view(batch, s, heads, levels, points)
    return value, loc, weights


def measure(run: Callable[[], Tensor | None]) -> tuple[float, float, Tensor | None]:
    """Milliseconds of one run (CUDA events), peak MiB allocated above what was allocated
    before it, and its result."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = run()
    end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return start.elapsed_time(end), peak, result


def runner(
    impl: Callable[..., Tensor],
    shapes: list[tuple[int, int]],
    inputs: tuple[Tensor, ...],
    backward: bool,
    grad_out: Tensor,
) -> Callable[[], Tensor | None]:
    """One forward (no autograd), or one forward and backward; returns the output, or the
    concatenated flattened gradients of the backward."""
    if not backward:

        def forward() -> Tensor:
            with torch.no_grad():
                return impl(inputs[0], shapes, inputs[1], inputs[2])

        return forward
    leaves = [t.detach().requires_grad_() for t in inputs]

    def forward_backward() -> Tensor:
        for t in leaves:
            t.grad = None
        impl(leaves[0], shapes, leaves[1], leaves[2]).backward(grad_out)
        return torch.cat([t.grad.float().flatten() for t in leaves])

    return forward_backward


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1 and --warmup at least 0")
    if not torch.cuda.is_available():
        print(
            "bench_ms_deform_attn_gpu: CUDA is not available; this benchmark times GPU "
            "kernels (for CPU timings see benchmarks/bench_inference.py).",
            file=sys.stderr,
        )
        return 1
    if "triton" in args.impls and not mst.AVAILABLE:
        print(
            "bench_ms_deform_attn_gpu: triton is not installed (pip install triton), or "
            "leave it out with --impls torch grid_sample.",
            file=sys.stderr,
        )
        return 1

    device = torch.device("cuda")
    shapes = level_shapes(args.height, args.width)
    s = sum(h * w for h, w in shapes)
    names = list(args.impls)
    print(
        f"batch {args.batch}, {args.height}x{args.width} image -> levels {shapes} "
        f"(S = Lq = {s}), {args.heads} heads x {args.head_dim}, {args.points} points; "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {getattr(mst.triton, '__version__', '-')}",
        flush=True,
    )
    results: list[dict] = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        inputs = make_inputs(
            shapes, args.batch, args.heads, args.head_dim, args.points, dtype, device
        )
        grad_out = torch.randn(args.batch, s, args.heads * args.head_dim, device=device)
        grad_out = grad_out.to(dtype)
        for mode in ("forward", "forward+backward"):
            runs = {
                name: runner(IMPLS[name], shapes, inputs, mode != "forward", grad_out)
                for name in names
            }
            outputs, peaks = {}, {}
            for name in names:  # warm-up: compilation, allocator, lazy initialisation
                for _ in range(args.warmup):
                    runs[name]()
                _, peaks[name], outputs[name] = measure(runs[name])
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    times[name].append(measure(runs[name])[0])
            base = statistics.median(times["torch"]) if "torch" in names else None
            print(f"\n{dtype_name}, {mode}")
            header = (
                f"  {'impl':<12} {'median ms':>10} {'min ms':>8} {'vs torch':>9} "
                f"{'peak MiB':>9} {'max |diff|':>11}"
            )
            print(header)
            print("  " + "-" * (len(header) - 2))
            for name in names:
                med = statistics.median(times[name])
                diff = None
                if "torch" in outputs and outputs[name] is not None:
                    diff = (outputs[name].float() - outputs["torch"].float()).abs().max().item()
                ratio = med / base if base else None
                print(
                    f"  {name:<12} {med:>10.3f} {min(times[name]):>8.3f} "
                    f"{f'{ratio:.2f}x' if ratio else '-':>9} {peaks[name]:>9.1f} "
                    f"{f'{diff:.2e}' if diff is not None else '-':>11}"
                )
                results.append(
                    {
                        "dtype": dtype_name,
                        "mode": mode,
                        "impl": name,
                        "median_ms": med,
                        "min_ms": min(times[name]),
                        "runs_ms": times[name],
                        "ratio_vs_torch": ratio,
                        "peak_mib": peaks[name],
                        "max_abs_diff": diff,
                    }
                )
            del runs, outputs
    print(
        "\nratio < 1: faster than the PyTorch path; peak MiB: allocated above the inputs; "
        "max |diff|: output (forward) or gradients (forward+backward) against torch's."
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, "bench_ms_deform_attn_gpu", {**settings, "levels": shapes},
                   results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
