"""Seconds per DINO training step on CPU, and images/s of the data pipeline alone.

A training step is what the training loop does per batch: forward with denoising, the
criterion, backward, gradient clipping and an AdamW step. The model is randomly initialised
(``r50-4scale`` by default, batch 2 of 512×512 images with a few boxes each). Side by side
in one process, with runs alternating so both share the machine's noise, it times a
baseline: the same step with the deformable attention swapped for the original DINO's
pure-PyTorch algorithm (see ``bench_inference.py``). The original code base itself took
21.4 s per step on this machine (recorded once; printed for reference).

The data pipeline is timed on a generated COCO-format dataset with the paper's training
augmentation, through the DataLoader (decode, augment, normalise, collate).

    python benchmarks/bench_train.py --repeats 3 --threads 2 --json train.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dinodet
from dinodet.engine.optim import clip_gradients

ORIGINAL_STEP_S = 21.4  # the original DINO, r50-4scale, batch 2 at 512×512, median


def _bench_inference():
    spec = importlib.util.spec_from_file_location(
        "bench_inference", Path(__file__).with_name("bench_inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = 6
        targets.append({"labels": torch.randint(0, 80, (n,), generator=g),
                        "boxes": torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=g),
                                            0.05 + 0.3 * torch.rand(n, 2, generator=g)], 1)})
    return images, targets


def time_steps(variant: str, size: int, batch: int, repeats: int, baseline: bool
               ) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = dinodet.build_model(variant).train()
    criterion = dinodet.build_criterion(model.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    images, targets = _batch(size, batch)

    def step() -> float:
        start = time.perf_counter()
        losses = criterion(model(images, targets), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        clip_gradients(model, 0.1)
        optimizer.step()
        return time.perf_counter() - start

    step()  # warm-up (allocations, AdamW state)
    runs: dict[str, list[float]] = {"dinodet": []}
    original = _bench_inference().original_attention if baseline else None
    if baseline:
        runs["baseline (original attention)"] = []
    for _ in range(repeats):
        runs["dinodet"].append(step())
        if original is not None:
            with original():
                runs["baseline (original attention)"].append(step())
    return runs


def time_data(num_images: int, workers: int, batch: int) -> float:
    from dinodet.data.coco import CocoDetection
    from dinodet.data.collate import build_loader
    from dinodet.data.synthetic import make_synthetic_coco
    from dinodet.data.transforms import build_transforms

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic_coco(tmp, num_train=num_images, num_val=1,
                                    image_size=(480, 640), seed=0)
        dataset = CocoDetection(paths["train_ann"], paths["train_images"],
                                build_transforms(True))
        loader = build_loader(dataset, batch, train=True, num_workers=workers, seed=0)
        start = time.perf_counter()
        seen = sum(len(b) for b in loader)
        return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50-4scale")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--data-images", type=int, default=64)
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    runs = time_steps(args.variant, args.size, args.batch_size, args.repeats, args.baseline)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(f"training step, {args.variant}, batch {args.batch_size} at {args.size}x{args.size}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"{'implementation':<32} {'median s':>9} {'min':>7} {'max':>7} {'vs baseline':>12}")
    base = medians.get("baseline (original attention)")
    for name, values in runs.items():
        ratio = f"{medians[name] / base:.2f}x" if base else "-"
        print(f"{name:<32} {medians[name]:9.2f} {min(values):7.2f} {max(values):7.2f} "
              f"{ratio:>12}")
    print(f"original DINO code base (recorded on this machine): {ORIGINAL_STEP_S:.1f} s; "
          f"dinodet / original = {medians['dinodet'] / ORIGINAL_STEP_S:.2f}")
    print("(the baseline is the original's attention algorithm inside dinodet's model)")

    images_per_s = time_data(args.data_images, args.data_workers, args.batch_size)
    print(f"data pipeline alone: {images_per_s:.1f} images/s ({args.data_workers} workers, "
          "480x640 JPEGs, training augmentation, collate)")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": vars(args) | {"json": str(args.json)}, "runs": runs,
            "medians": medians, "original_step_s": ORIGINAL_STEP_S,
            "data_images_per_s": images_per_s}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
