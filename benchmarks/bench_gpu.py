"""Whole-model DINO on a GPU: inference and training-step throughput and peak memory.

A randomly initialised model (``r50-4scale`` by default; the weights do not change the
work done) at 800×1333 (``--size H W``, e.g. ``--size 800 1088``):

* inference: ``model.eval()`` under ``torch.inference_mode``, a batch of ``--infer-batch``
  images (1 by default) as one ``[B, 3, H, W]`` tensor on the GPU, forward and
  ``postprocess`` (top 300);
* training step: what the training loop does per batch of ``--train-batch`` images (2 by
  default): forward with contrastive denoising, ``dinodet.build_criterion`` (Hungarian
  matching of the 6 decoder layers and the encoder proposals, denoising losses),
  backward, gradient-norm clipping at 0.1 and the fused AdamW step of the training
  recipe (``dinodet.engine.optim.build_optimizer``). Synthetic targets: ``--boxes`` boxes
  per image, random labels and boxes, already on the GPU.

Each is run in float32 and in bfloat16 autocast (the criterion always runs in float32),
``--warmup`` times untimed (Triton and ``torch.compile`` compile there), then
``--repeats`` times, each run between two ``torch.cuda.synchronize()`` calls and timed
with ``time.perf_counter`` (a training step waits for the GPU inside the matcher anyway,
so wall-clock time is the honest figure). It reports the median images/s, the spread and
the peak memory allocated by PyTorch over the timed runs. ``--compile`` wraps the model in
``torch.compile``; ``--backend`` picks the deformable-attention implementation (``auto``:
Triton on CUDA when installed). ``--count-syncs`` runs one more iteration of each case with
``torch.cuda.set_sync_debug_mode("warn")`` and reports how many times the host waited for
the GPU (a training step needs one: the matcher copies the costs to the host).

    python benchmarks/bench_gpu.py --json gpu.json
    python benchmarks/bench_gpu.py --size 800 1088 --compile --backend triton
    python benchmarks/bench_gpu.py --device cpu --size 256 320 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import dinodet
from common import stats, write_json
from dinodet.engine.config import OptimConfig
from dinodet.engine.optim import build_optimizer, clip_gradients
from dinodet.model import ms_deform_attn_triton as mst

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synthetic_batch(batch: int, height: int, width: int, boxes: int, num_classes: int,
                    device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random ImageNet-normalised-like images [B, 3, H, W] and ``boxes`` random GT boxes
    (normalised cxcywh, inside the image) with random labels per image, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    targets = []
    for _ in range(batch):
        centre = 0.2 + 0.6 * torch.rand(boxes, 2, generator=g)
        size = 0.05 + 0.3 * torch.rand(boxes, 2, generator=g)
        labels = torch.randint(0, num_classes, (boxes,), generator=g)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], 1)
                        .to(device)})
    return images.to(device), targets


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_runner(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None,
                     device: torch.device) -> Callable[[], None]:
    height, width = images.shape[-2:]
    sizes = [(height, width)] * images.shape[0]

    def run() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            outputs = model(images)
        dinodet.postprocess(outputs, sizes, num_select=300)

    return run


def training_runner(model: torch.nn.Module, runnable: torch.nn.Module, images: torch.Tensor,
                    targets: list[dict[str, torch.Tensor]], dtype: torch.dtype | None,
                    device: torch.device, clip_max_norm: float) -> Callable[[], None]:
    """One training step of ``runnable`` (``model`` or its compiled wrapper)."""
    criterion = dinodet.build_criterion(model.num_classes)
    optimizer = build_optimizer(model, OptimConfig())  # fused AdamW on CUDA
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def run() -> None:
        with autocast(device, dtype):
            outputs = runnable(images, targets)
        losses = criterion(outputs, targets)  # float32 whatever the outputs' dtype
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
        clip_gradients(model, clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return run


def count_syncs(run: Callable[[], None], device: torch.device) -> int | None:
    """Host-device synchronisations of one run, as CUDA's sync debug mode reports them."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(run: Callable[[], None], batch: int, warmup: int, repeats: int,
            device: torch.device) -> dict[str, Any]:
    for _ in range(warmup):
        run()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = stats(seconds)
    return {**result, "images_per_s": batch / result["median_s"], "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50-4scale")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=10, help="GT boxes per training image")
    p.add_argument("--modes", nargs="+", choices=["inference", "training"],
                   default=["inference", "training"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="deformable attention (auto: Triton on CUDA when installed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--clip-max-norm", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed runs per case (raise it with --compile)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--count-syncs", action="store_true",
                   help="count host-device synchronisations of one run per case (CUDA)")
    p.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu, for a quick check of the script itself")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.infer_batch < 1 or args.train_batch < 1:
        p.error("--repeats and the batch sizes must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; this benchmark times the model on a GPU "
              "(for CPU timings see benchmarks/bench_inference.py and bench_train.py; "
              "--device cpu only checks that this script runs).", file=sys.stderr)
        return 1
    if args.backend == "triton" and not mst.AVAILABLE:
        print("bench_gpu: --backend triton needs triton installed (pip install triton)",
              file=sys.stderr)
        return 1
    height, width = args.size

    torch.manual_seed(0)
    cfg = dinodet.get_preset(args.variant).replace(attention_backend=args.backend)
    model = dinodet.build_model(cfg).to(device)
    num_classes = model.num_classes
    runnable: torch.nn.Module = torch.compile(model) if args.compile else model
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    triton_version = getattr(mst.triton, "__version__", None)
    print(f"{args.variant} at {height}x{width}, {device_name}, torch {torch.__version__}, "
          f"triton {triton_version or '-'}, deformable attention: {args.backend}"
          f"{', torch.compile' if args.compile else ''}", flush=True)

    results = []
    for mode in args.modes:
        batch = args.infer_batch if mode == "inference" else args.train_batch
        images, targets = synthetic_batch(batch, height, width, args.boxes, num_classes, device)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            if mode == "inference":
                model.eval()
                run = inference_runner(runnable, images, dtype, device)
            else:
                model.train()
                run = training_runner(model, runnable, images, targets, dtype, device,
                                      args.clip_max_norm)
            try:
                result = measure(run, batch, args.warmup, args.repeats, device)
            except torch.OutOfMemoryError:
                print(f"  {mode} {dtype_name}: out of memory", flush=True)
                results.append({"mode": mode, "dtype": dtype_name, "batch": batch,
                                "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            if args.count_syncs:
                result["syncs"] = count_syncs(run, device)
            results.append({"mode": mode, "dtype": dtype_name, "batch": batch, **result})
            print(f"  {mode} {dtype_name}: {result['images_per_s']:.2f} images/s", flush=True)
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()

    header = (f"{'mode':<10} {'dtype':<9} {'batch':>5} {'images/s':>9} {'ms/batch':>9} "
              f"{'min ms':>8} {'max ms':>8} {'peak MiB':>9} {'syncs':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<10} {r['dtype']:<9} {r['batch']:>5} {r['error']}")
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        syncs = r.get("syncs")
        print(f"{r['mode']:<10} {r['dtype']:<9} {r['batch']:>5} {r['images_per_s']:>9.2f} "
              f"{1e3 * r['median_s']:>9.1f} {1e3 * r['min_s']:>8.1f} {1e3 * r['max_s']:>8.1f} "
              f"{peak:>9} {syncs if syncs is not None else '-':>6}")
    print(f"medians of {args.repeats} runs after {args.warmup} warm-up runs; peak MiB: "
          "allocated by PyTorch (CUDA only); syncs: host waits per run (--count-syncs)")

    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, "bench_gpu", {**settings, "device_name": device_name}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
