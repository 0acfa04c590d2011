"""dinodet against the authors' DINO code base, side by side on the CPU: the ratio.

Both models hold the same weights (the original's random initialisation, loaded into
dinodet with ``dinodet.from_original``) and get the same input; the runs alternate (each
repeat times dinodet, then the original), so both see the machine's noise alike, and the
median of the per-repeat ratios dinodet / original is printed (and its last line is JSON).

* inference: ``model(images)`` under ``torch.no_grad`` in eval mode;
* ``--train``: forward with denoising, the criterion's weighted loss and ``backward``
  (no optimiser step: the original's lives in its training loop), in train mode.

    python benchmarks/bench_vs_original.py --original /path/to/DINO --hw 800x1088
    python benchmarks/bench_vs_original.py --original /path/to/DINO --train --batch 2 --hw 512x512

``--original`` is a checkout of https://github.com/IDEA-Research/DINO (see
``original_dino.py`` for how it runs without its CUDA extension; it needs
``pip install addict yapf termcolor timm``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import dinodet
from common import write_json
from original_dino import build_original, on_cpu


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 800x1088, got {text!r}") from None
    if min(h, w) < 64:
        raise argparse.ArgumentTypeError(f"{text}: each side must be at least 64")
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", default=os.environ.get("DINO_ORIGINAL"), required=False,
                   help="checkout of IDEA-Research/DINO (default: $DINO_ORIGINAL)")
    p.add_argument("--hw", type=_size, default=(800, 1088), help="image size HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", action="store_true", help="forward, loss and backward")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not args.original:
        p.error("--original (or $DINO_ORIGINAL) must name a checkout of IDEA-Research/DINO")
    if args.batch < 1 or args.reps < 1 or args.threads < 1:
        p.error("--batch, --reps and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original, original_criterion = build_original(args.original)
    ours = dinodet.from_original(original.state_dict(), "r50-4scale")
    criterion = dinodet.build_criterion(num_classes=91)
    h, w = args.hw
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for _ in range(args.batch)]
    targets = [{"labels": torch.randint(1, 91, (6,), generator=g),
                "boxes": torch.cat([0.2 + 0.6 * torch.rand(6, 2, generator=g),
                                    0.05 + 0.3 * torch.rand(6, 2, generator=g)], 1)}
               for _ in range(args.batch)]
    weights = original_criterion.weight_dict

    def step(model: torch.nn.Module, loss: Callable[[dict], torch.Tensor]) -> float:
        start = time.perf_counter()
        if args.train:
            out = model(images, targets)
            loss(out).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(images)
        return time.perf_counter() - start

    def ours_step() -> float:
        return step(ours, lambda out: criterion(out, targets)["loss"])

    def original_step() -> float:
        def loss(out: dict) -> torch.Tensor:
            parts = original_criterion(out, targets)
            return sum(parts[k] * weights[k] for k in parts if k in weights)

        with on_cpu():
            return step(original, loss)

    for model in (ours, original):
        model.train(args.train)
    ours_step(), original_step()  # warm-up
    times: dict[str, list[float]] = {"dinodet": [], "original": []}
    ratios = []
    for r in range(args.reps):
        a, b = ours_step(), original_step()
        times["dinodet"].append(a)
        times["original"].append(b)
        ratios.append(a / b)
        print(f"  run {r + 1}/{args.reps}: dinodet {a:.2f} s, original {b:.2f} s, "
              f"ratio {a / b:.3f}", flush=True)
    result = {"mode": "train" if args.train else "eval", "hw": f"{h}x{w}",
              "batch": args.batch, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__,
              "ours_s": statistics.median(times["dinodet"]),
              "original_s": statistics.median(times["original"]),
              "ratio": statistics.median(ratios)}
    print(f"dinodet {result['ours_s']:.2f} s, original {result['original_s']:.2f} s: "
          f"median ratio {result['ratio']:.3f}")
    print(json.dumps(result))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, "bench_vs_original", settings, {**result, "runs": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
