"""Seconds per image of DINO inference on CPU: dinodet against the original's attention path.

Builds a randomly initialised model (eval mode), feeds one random image of the given size
(batch 1, float32, ``torch.inference_mode``) and times whole forward passes. Side by side in
the same process, with the runs alternating so that both share the machine's noise, it
times a baseline: the same model with its multi-scale deformable attention swapped for the
algorithm of the original DINO's pure-PyTorch fallback (one ``grid_sample`` per level on
values laid out [N·M, D, H, W], a stack of the sampled levels, a product with the attention
weights and a sum). The baseline is that algorithm inside dinodet's model, not the
original code base: ``bench_vs_original.py`` times the original code base itself, side by
side.

    python benchmarks/bench_inference.py --repeats 3 --threads 2 --json results.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch

import dinodet
from common import original_attention, print_table, summarize, timed, write_json


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
        with original_attention(model):
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

    results = summarize(times, baseline=names[0] if args.baseline else None)
    print()
    print_table(results, median_label="median s/img")
    print()
    if args.baseline:
        print(
            "The baseline is the original's deformable-attention algorithm (grid_sample per "
            "level, stack, weight, sum) swapped into dinodet's model, not the original code base."
        )
    if args.json:
        settings = {"variant": args.variant, "height": args.height, "width": args.width,
                    "threads": torch.get_num_threads(), "repeats": args.repeats,
                    "baseline": args.baseline}
        write_json(args.json, "bench_inference", settings, {
            "baseline_note": "original attention algorithm inside dinodet's model",
            "implementations": results,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
