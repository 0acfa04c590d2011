"""Seconds per image of DINO inference on CPU: dinodet against the original's attention path.

Builds a randomly initialised model (eval mode), feeds one random image of the given size
(batch 1, float32, ``torch.inference_mode``) and times whole forward passes. Side by side in
the same process, with the runs alternating so that both share the machine's noise, it
times a baseline: the same model with its multi-scale deformable attention swapped for the
algorithm of the original DINO's pure-PyTorch fallback (one ``grid_sample`` per level on
values laid out [N·M, D, H, W], a stack of the sampled levels, a product with the attention
weights and a sum). The baseline is that algorithm inside dinodet's model, not the
original code base; the original code base itself was recorded once on this machine
(``ORIGINAL_ANCHOR_S``) and is printed for reference.

    python benchmarks/bench_inference.py --repeats 3 --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

import dinodet
import dinodet.model.ms_deform_attn as msda

# The original DINO (its pure-PyTorch deformable attention, no compiled extension) on the
# default settings (r50-4scale, one 3×800×1088 image, float32, 2 threads), median of 3,
# recorded on this machine.
ORIGINAL_ANCHOR_S = 9.3
ANCHOR_SETTINGS = {"variant": "r50-4scale", "height": 800, "width": 1088, "threads": 2}
ORIGINAL_ANCHOR_NOTE = (
    "original DINO pure-PyTorch path: 9.3 s (median of 3, recorded on this machine)"
)


def original_style_ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The original's pure-PyTorch deformable attention algorithm, same signature as
    :func:`dinodet.model.ms_deform_attn.ms_deform_attn`.

    Per level: values to [N·M, D, H, W], grids to [N·M, Lq, P, 2] in [-1, 1], one
    ``grid_sample``; then the per-level samples are stacked on a new dimension, flattened to
    L·P, multiplied by the attention weights as [N·M, 1, Lq, L·P], summed over the points,
    viewed as [N, M·D, Lq] and transposed to [N, Lq, M·D].
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [N, H·W, M, D] -> [N, H·W, M·D] -> [N, M·D, H·W] -> [N·M, D, H, W]
        v = per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N, M, Lq, P, 2] -> [N·M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N·M, 1, Lq, L·P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # samples: L × [N·M, D, Lq, P] -> [N·M, D, Lq, L, P] -> [N·M, D, Lq, L·P]
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def original_attention() -> Iterator[None]:
    """Swap the original's algorithm into every MSDeformAttn (looked up at call time)."""
    saved = msda.ms_deform_attn
    msda.ms_deform_attn = original_style_ms_deform_attn
    try:
        yield
    finally:
        msda.ms_deform_attn = saved


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50-4scale")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1088)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the original's attention algorithm in the same model (default: on)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be at least 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dinodet.build_model(args.variant).eval()
    image = torch.randn(3, args.height, args.width)

    def infer() -> None:
        with torch.inference_mode():
            model([image])

    def infer_original() -> None:
        with original_attention():
            infer()

    impls: dict[str, Callable[[], None]] = {"dinodet": infer}
    if args.baseline:
        impls = {"original attention (in dinodet)": infer_original, **impls}
    names = list(impls)
    print(
        f"{args.variant}, one 3x{args.height}x{args.width} image, float32, batch 1, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.machine()}",
        flush=True,
    )
    for name in names:  # warm-up: allocator, lazy initialisation, first-call dispatch
        warm = timed(impls[name])
        print(f"  warm-up {name}: {warm:.2f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        # Alternate the order so that neither implementation always runs first.
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(impls[name]))
            print(f"  run {r + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s", flush=True)

    results = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "runs_s": ts,
        }
        for name, ts in times.items()
    }
    base = results[names[0]]["median_s"] if args.baseline else None
    print()
    header = f"{'implementation':<34} {'median s/img':>12} {'min':>7} {'max':>7}"
    header += f" {'vs baseline':>11} {'vs 9.3 s':>9}"
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        ratio = f"{res['median_s'] / base:.2f}x" if base else "-"
        res["ratio_vs_baseline"] = res["median_s"] / base if base else None
        res["ratio_vs_original_anchor"] = res["median_s"] / ORIGINAL_ANCHOR_S
        print(
            f"{name:<34} {res['median_s']:>12.2f} {res['min_s']:>7.2f} {res['max_s']:>7.2f}"
            f" {ratio:>11} {res['ratio_vs_original_anchor']:>8.2f}x"
        )
    print()
    print(f"Anchor: {ORIGINAL_ANCHOR_NOTE}.")
    ours = {
        "variant": args.variant,
        "height": args.height,
        "width": args.width,
        "threads": torch.get_num_threads(),
    }
    if ours != ANCHOR_SETTINGS:
        print(
            f"Note: the anchor was recorded with {ANCHOR_SETTINGS}, this run used {ours}; "
            "the ratio to it compares different settings."
        )
    if args.baseline:
        print(
            "The baseline is the original's deformable-attention algorithm (grid_sample per "
            "level, stack, weight, sum) swapped into dinodet's model, not the original code base."
        )
    if args.json:
        payload = {
            "variant": args.variant,
            "height": args.height,
            "width": args.width,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "original_anchor_s": ORIGINAL_ANCHOR_S,
            "original_anchor_note": ORIGINAL_ANCHOR_NOTE,
            "baseline_note": "original attention algorithm inside dinodet's model",
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
