"""Images per second of ``Detector(int8=True)`` against float32 ``Detector`` on the CPU.

Builds a randomly initialised model (speed does not depend on the weights), makes one
float32 ``Detector``, one int8 ``Detector`` per quantised engine asked for (its Linear
layers packed for that engine and its convolutions in int8 by
:func:`dinodet.model.quantize.quantize_int8`) and one with the Linear layers only
(``convs=False``: what the convolutions add), and times
``det(image)`` on one uint8 image of the model's input size (batch 1; the resize is a
no-op), the runs alternating so that all share the machine's noise. The speed-up is the
float32 median over the int8 median. ``--profile`` adds, for one call of each, the split of
CPU time (torch.profiler, self time) between the Linear products, the convolutions, the
quantisation of their inputs and everything else.

    python benchmarks/bench_int8.py --repeats 5 --threads 2 --json int8.json
    python benchmarks/bench_int8.py --engines x86 fbgemm onednn --profile
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

import dinodet
from common import print_table, summarize, timed, write_json
from dinodet.data.transforms import EvalTransform
from dinodet.model.quantize import ENGINES, Int8Warning, int8_counts, quantize_int8
from dinodet.predict import Detector

BASELINE = "float32"

# Profiler op names -> the group they are counted in (first match). The rest, "other", is
# the deformable attention's sampling (plain tensor ops), norms and elementwise ops.
OP_GROUPS = (
    ("linear", ("quantized::linear_dynamic", "mkldnn::_linear_pointwise", "aten::addmm",
                "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("convolution", ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution",
                     "aten::conv2d", "aten::_slow_conv2d_forward",
                     "mkldnn::_convolution_pointwise", "onednn::qconv2d_pointwise")),
    ("quantise input", ("aten::quantize_per_tensor", "aten::aminmax", "aten::int_repr",
                        "aten::quantize_per_tensor_dynamic")),
)


def _group(op: str) -> str:
    for group, names in OP_GROUPS:
        if op in names:
            return group
    return "other"


def profile_split(run: Callable[[], object]) -> dict[str, Any]:
    """Self CPU seconds of one call of ``run`` by :data:`OP_GROUPS`, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    by_group: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        by_group[_group(event.key)] = by_group.get(_group(event.key), 0.0) + seconds
        ops.append((seconds, event.key))
    total = sum(by_group.values())
    return {"total_s": total,
            "groups_s": dict(sorted(by_group.items(), key=lambda kv: -kv[1])),
            "top_ops_s": {key: s for s, key in sorted(ops, reverse=True)[:8]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50-4scale")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1088)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", nargs="+", default=[ENGINES[0]],
                   help=f"quantised engines to pack the int8 weights for (default "
                        f"{ENGINES[0]}, what Detector(int8=True) uses; this build has "
                        f"{', '.join(torch.backends.quantized.supported_engines)})")
    p.add_argument("--profile", action="store_true",
                   help="also profile one call of each: Linear products vs the rest")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be at least 1")
    if args.height < 32 or args.width < 32:
        p.error("--height and --width must be at least 32")
    unknown = [e for e in args.engines if e not in torch.backends.quantized.supported_engines]
    if unknown:
        p.error(f"--engines {' '.join(unknown)}: not in this torch build's "
                f"{', '.join(torch.backends.quantized.supported_engines)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dinodet.build_model(args.variant).eval()
    transform = EvalTransform(min(args.height, args.width), max(args.height, args.width))
    image = torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    detectors = {BASELINE: Detector(model, transform=transform)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Int8Warning)
        default_int8 = Detector(model, transform=transform, int8=True)
    counts = int8_counts(default_int8.model)
    for engine in args.engines:
        det = Detector(model, transform=transform)
        det.model = (default_int8.model if engine == ENGINES[0]
                     else quantize_int8(model, engine=engine))
        detectors[f"int8 ({engine})"] = det
    linear_only = Detector(model, transform=transform)
    linear_only.model = quantize_int8(model, convs=False)
    detectors["int8 Linear only"] = linear_only
    names = list(detectors)
    print(f"{args.variant}, one 3x{args.height}x{args.width} uint8 image, batch 1, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.machine()}; int8: {counts.describe()}", flush=True)

    def call(name: str) -> Callable[[], object]:
        return lambda: detectors[name](image, threshold=0.0)

    for name in names:  # warm-up: allocator, lazy initialisation, weight packing
        print(f"  warm-up {name}: {timed(call(name)):.2f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        # Alternate the order so that no implementation always runs first.
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(call(name)))
            print(f"  run {r + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s", flush=True)

    results = summarize(times, baseline=BASELINE)
    base = results[BASELINE]["median_s"]
    for res in results.values():
        res["speedup_vs_float32"] = base / res["median_s"]
        res["images_per_s"] = 1.0 / res["median_s"]
    print()
    print_table(results, median_label="median s/img",
                extra={"speed-up": lambda res: f"{res['speedup_vs_float32']:.2f}x"})

    profiles: dict[str, Any] = {}
    if args.profile:
        print()
        for name in names:
            profiles[name] = split = profile_split(call(name))
            groups = ", ".join(f"{g} {s:.2f} s ({100 * s / split['total_s']:.0f}%)"
                               for g, s in split["groups_s"].items())
            print(f"profile {name}: {split['total_s']:.2f} s self CPU: {groups}")
            for op, s in split["top_ops_s"].items():
                print(f"    {s:7.3f} s  {op}")
    if args.json:
        settings = {"variant": args.variant, "height": args.height, "width": args.width,
                    "threads": torch.get_num_threads(), "repeats": args.repeats,
                    "engines": args.engines}
        write_json(args.json, "bench_int8", settings, {
            "int8_layers": counts.int8, "float_linear_layers": counts.float,
            "int8_convolutions": counts.convs,
            "implementations": results, "profiles": profiles,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
