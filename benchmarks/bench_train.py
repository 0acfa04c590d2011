"""Seconds per DINO training step on CPU, and images/s of the data pipeline alone.

A training step is the library's own, :func:`dinodet.engine.step.train_step` on a
:class:`~dinodet.engine.step.TrainState` built from the default ``OptimConfig`` (the
paper's AdamW with the backbone's own learning rate, gradient clipping at 0.1, the
per-step schedule): forward with denoising, the criterion, backward, clipping and the
AdamW step, exactly what the training loop runs per batch. The model is randomly
initialised (``r50-4scale`` by default, batch 2 of 512×512 images with a few boxes each).
Side by side in one process, with the runs alternating so both share the machine's noise,
it times a baseline: the same step with the deformable attention swapped for the original
DINO's pure-PyTorch algorithm (``common.original_attention``). ``bench_vs_original.py``
times the original code base itself, side by side.

The data pipeline is timed on a generated COCO-format dataset with the paper's training
augmentation, through the training loop's loader (``dinodet.data.collate.build_loader``:
decode, augment, normalise, collate).

    python benchmarks/bench_train.py --repeats 3 --threads 2 --json train.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dinodet
from common import original_attention, print_table, summarize, timed, write_json
from dinodet.data.collate import Batch
from dinodet.engine.config import OptimConfig
from dinodet.engine.step import TrainState, train_step
from dinodet.structures import ImageBatch

BASELINE = "baseline (original attention)"


def synthetic_batch(size: int, batch: int, num_classes: int, boxes: int = 6,
                    seed: int = 0) -> Batch:
    """``batch`` random size×size images and ``boxes`` random boxes (normalised cxcywh,
    inside the image) with random labels each, as the loader's :class:`Batch`."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        centre = 0.2 + 0.6 * torch.rand(boxes, 2, generator=g)
        extent = 0.05 + 0.3 * torch.rand(boxes, 2, generator=g)
        targets.append({"labels": torch.randint(0, num_classes, (boxes,), generator=g),
                        "boxes": torch.cat([centre, extent], 1)})
    return Batch(ImageBatch.from_images(images), targets)


def time_steps(variant: str, size: int, batch: int, repeats: int, baseline: bool
               ) -> dict[str, list[float]]:
    """Seconds of each timed ``train_step``, per implementation (dinodet, and the baseline
    if asked), after one untimed step of each."""
    torch.manual_seed(0)
    model = dinodet.build_model(variant)
    state = TrainState.create(model, OptimConfig(), steps_per_epoch=1, epochs=1)
    data = synthetic_batch(size, batch, model.num_classes)

    def step() -> None:
        result = train_step(state, data)
        if not result.stepped:  # a non-finite loss: no optimiser step, nothing to time
            raise RuntimeError(f"train_step took no step (losses {result.losses})")

    def step_original() -> None:
        with original_attention(model):
            step()

    impls: dict[str, Callable[[], None]] = {"dinodet": step}
    if baseline:
        impls[BASELINE] = step_original
    names = list(impls)
    for name in names:  # warm-up: allocations, AdamW state, first-call dispatch
        timed(impls[name])
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        # Alternate the order so that neither implementation always runs first.
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(timed(impls[name]))
    return runs


def time_data(num_images: int, workers: int, batch: int) -> float:
    """Images per second through the training loader over ``num_images`` generated
    480×640 JPEGs with the training augmentation."""
    from dinodet.data.coco import CocoDetection
    from dinodet.data.collate import build_loader
    from dinodet.data.synthetic import make_synthetic_coco
    from dinodet.data.transforms import build_transforms
    from dinodet.engine.distributed import seed_everything

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic_coco(tmp, num_train=num_images, num_val=1,
                                    image_size=(480, 640), seed=0)
        dataset = CocoDetection(paths["train_ann"], paths["train_images"],
                                build_transforms(True))
        seed_everything(0)  # the augmentation's generators when it runs in this process
        loader = build_loader(dataset, batch, train=True, num_workers=workers, seed=0)
        start = time.perf_counter()
        seen = sum(len(b) for b in loader)
        elapsed = time.perf_counter() - start
    if seen == 0:
        raise ValueError(f"--data-images {num_images} gives no full batch of {batch}")
    return seen / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="r50-4scale")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="leave out the original attention baseline")
    p.add_argument("--data-images", type=int, default=64)
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.batch_size < 1:
        p.error("--repeats, --threads and --batch-size must be at least 1")
    if args.data_images < args.batch_size:
        p.error("--data-images must be at least --batch-size (the loader drops partial "
                "batches)")
    torch.set_num_threads(args.threads)

    runs = time_steps(args.variant, args.size, args.batch_size, args.repeats, args.baseline)
    results = summarize(runs, baseline=BASELINE if args.baseline else None)
    medians = {name: res["median_s"] for name, res in results.items()}
    print(f"training step, {args.variant}, batch {args.batch_size} at {args.size}x{args.size}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print_table(results, median_label="median s", name_width=32)
    print("(the step is dinodet.engine.step.train_step; the baseline is the original's "
          "attention algorithm inside dinodet's model)")

    images_per_s = time_data(args.data_images, args.data_workers, args.batch_size)
    print(f"data pipeline alone: {images_per_s:.1f} images/s ({args.data_workers} workers, "
          "480x640 JPEGs, training augmentation, collate)")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, "bench_train", settings, {
            "runs": runs,
            "medians": medians,
            "ratios_vs_baseline": {name: res["ratio_vs_baseline"]
                                   for name, res in results.items()},
            "data_images_per_s": images_per_s,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
