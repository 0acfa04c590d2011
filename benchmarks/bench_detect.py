"""Images per second of detection on CPU: ``dinodet.Detector`` against the exported ONNX file
under onnxruntime, side by side.

For each model (randomly initialised; speed does not depend on the weights) it exports the
ONNX file once, then alternates the two on the same uint8 image, batch 1, so that both see
the machine's noise alike:

- ``Detector``: the whole user path, ``det(image)``: resize (a no-op here, the image has the
  model's input size), normalisation, the model (fused deformable attention), top-k and
  the Detections.
- onnxruntime: ``session.run`` on the [1, 3, H, W] float input of the same image (the
  normalisation and top-k are inside the graph; the resize is the caller's).

    python benchmarks/bench_detect.py --repeats 5 --json detect.json
    python benchmarks/bench_detect.py --models cpu-small --repeats 20

``--also-onnx LABEL=FILE`` times another ONNX file of the same model in the same
alternation, e.g. one exported by an older commit (``git worktree add /tmp/old COMMIT``,
then ``PYTHONPATH=/tmp/old/src python -c "import torch, dinodet; torch.manual_seed(0);
dinodet.export.export_model(dinodet.build_model('r50-4scale').eval(), 'old.onnx')"``):
a before/after of the export measured side by side, as a ratio to the same ``Detector``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dinodet
from common import ort_session_options, timed, write_json
from dinodet.data.transforms import EvalTransform
from dinodet.export import export_model
from dinodet.predict import Detector

# (preset, height, width): r50-4scale at COCO's evaluation size for a 4:3 image; cpu-small at
# the 256 px of the demo it is trained on.
MODELS = {"r50-4scale": (800, 1088), "cpu-small": (256, 256)}


def _median_ips(times: list[float]) -> float:
    return 1.0 / statistics.median(times)


def bench_model(name: str, height: int, width: int, repeats: int, warmup: int,
                threads: int, workdir: Path, also: dict[str, str] | None = None) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = dinodet.build_model(name).eval()
    t0 = time.perf_counter()
    onnx_path = export_model(model, workdir / f"{name}.onnx", "onnx",
                             example_size=(height, width))
    export_s = time.perf_counter() - t0

    det = Detector(model, transform=EvalTransform(min(height, width), max(height, width)))
    session = ort.InferenceSession(str(onnx_path), ort_session_options(threads),
                                   providers=["CPUExecutionProvider"])

    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    array = (image.float() / 255)[None].numpy()

    def run_detector() -> None:
        det(image, threshold=0.3)

    def run_onnx() -> None:
        session.run(None, {"images": array})

    runners = {"Detector": run_detector, "onnxruntime": run_onnx}
    for label, path in (also or {}).items():
        other = ort.InferenceSession(path, ort_session_options(threads),
                                     providers=["CPUExecutionProvider"])
        runners[label] = lambda other=other: other.run(None, {"images": array})
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            times[key].append(timed(run))
    result = {"model": name, "height": height, "width": width, "export_s": export_s,
              "onnx_mb": onnx_path.stat().st_size / 1e6}
    for key, ts in times.items():
        result[key] = {"images_per_s": _median_ips(ts), "median_s": statistics.median(ts),
                       "min_s": min(ts), "max_s": max(ts), "times_s": ts}
    for key in runners:
        if key != "Detector":
            result[key]["over_detector"] = (result[key]["images_per_s"]
                                            / result["Detector"]["images_per_s"])
    result["onnx_over_detector"] = result["onnxruntime"]["over_detector"]
    result["also_onnx"] = dict(also or {})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--also-onnx", action="append", default=[], metavar="LABEL=FILE",
                        help="another ONNX file of the (one) model to alternate with, "
                             "e.g. one exported by an older commit")
    args = parser.parse_args(argv)
    also = {}
    for item in args.also_onnx:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            parser.error(f"--also-onnx {item!r}: give LABEL=FILE of an existing file")
        if label in ("Detector", "onnxruntime"):
            parser.error(f"--also-onnx label {label!r} is taken")
        also[label] = path
    if also and len(args.models) != 1:
        parser.error("--also-onnx times a file of one model: give one --models")
    try:
        import onnxruntime
    except ImportError:
        print("bench_detect needs onnxruntime: pip install 'dinodet[export]'", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            h, w = MODELS[name]
            print(f"{name} at {h}x{w}: exporting, then {args.repeats} alternating runs ...",
                  flush=True)
            results.append(bench_model(name, h, w, args.repeats, args.warmup, args.threads,
                                       Path(tmp), also))
    print(f"\ntorch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, batch 1")
    print(f"{'model':<12} {'size':>10} {'Detector img/s':>15} {'onnxruntime img/s':>18} "
          f"{'ratio':>6}")
    for r in results:
        print(f"{r['model']:<12} {r['height']:>4}x{r['width']:<5} "
              f"{r['Detector']['images_per_s']:>15.3f} "
              f"{r['onnxruntime']['images_per_s']:>18.3f} {r['onnx_over_detector']:>6.2f}")
        for label in r["also_onnx"]:
            print(f"  {label}: {r[label]['images_per_s']:.3f} img/s, "
                  f"{r[label]['over_detector']:.2f} of the Detector's")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, "bench_detect", settings, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
