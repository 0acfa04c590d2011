"""dinodet ``cpu-small`` next to torchvision's FCOS / RetinaNet on the hard small dataset.

Is the low AP of ``cpu-small`` on users' small datasets DINO's, or the data's? This trains,
on the same images of :func:`dinodet.data.synthetic_hard.make_hard_coco` (or a COCO folder
of your own, ``--data``):

* **dinodet**: ``load_train_config("cpu-small", ...)`` with only the data paths, ``out_dir``,
  ``epochs`` and ``seed`` (and ``--batch-size`` when given), trained by
  :func:`dinodet.engine.train.train`; plus ``eval_every_epochs=0`` (one evaluation, at the
  end, so the epoch times are training only), which does not change training.
* **fcos** / **retinanet**: torchvision's detectors with a ResNet-18 FPN (C3-C5 + P6/P7,
  256 channels), every layer trainable, trainable BatchNorm (frozen random statistics would
  be meaningless) and ``weights=None`` everywhere: from scratch, like ``cpu-small``.
  RetinaNet gets GroupNorm in its head (as FCOS's has; the v1 head without it is hard to
  train from scratch) and torchvision's anchor sizes (32-512 px for 800-px images) scaled
  to the evaluation size, as the recipe's image sizes are.

Equal budget: the same epochs, batch (``batch_size`` and ``total_batch_size`` of the
recipe), images and image sizes: the baselines resize with the recipe's training scales
(one drawn per image, torchvision's ``min_size`` tuple) and longer-side cap, and evaluate
at its ``eval_size``; they flip horizontally (p = 0.5), torchvision's standard detection
augmentation. The recipe's random crop is DINO's and is not given to them.

The baselines' optimiser is **AdamW** (lr 1e-3, weight decay 1e-4, betas 0.9/0.999), linear
warm-up from 0.001x over the first 10% of the steps (at most 1000, torchvision's
detection warm-up), then cosine decay to zero, no gradient clipping. Why not torchvision's
reference SGD (lr 0.01 for a batch of 16, momentum 0.9, 26 epochs from ImageNet weights)?
Here the networks start from random weights, take ~100 steps an epoch at a batch of 4 and
train for the recipe's 12 epochs: by the linear scaling rule SGD's rate would shrink to
0.0025, a rate meant for fine-tuning pretrained weights over tens of thousands of steps,
while adaptive per-weight steps are the usual choice for short from-scratch schedules (and
what the DETR family and the ``cpu-small`` recipe use). That is a judgement, not a
measurement: ``--baseline-optim sgd`` runs the reference recipe (lr 0.01 x batch / 16,
momentum 0.9, weight decay 1e-4) under the same schedule to check it.

All detectors are scored by the same code: dinodet's :class:`~dinodet.engine.evaluate.
CocoEvaluator` (pycocotools' COCOeval) on the same val json, at most 100 detections per
image (``cpu-small``'s ``num_select``), baselines with score threshold 0.05.

Reproduce (2 CPU cores, one seed, the recipe's 12 epochs: roughly 20 min for dinodet and
30 min for each baseline, whose steps took ~1.5x as long as dinodet's at these sizes)::

    .venv/bin/python benchmarks/bench_small_data.py --threads 2 --detector both \\
        --num-train 400 --num-val 100 --image-size 256 --json runs/small_data/results.json

Smoke run (seconds): ``--num-train 4 --num-val 2 --image-size 64 --epochs 1
--batch-size 2 --set data.num_workers=0 --set "data.transform={scales: [64],
crop_resize_scales: [64], crop_min: 48, crop_max: 64, eval_size: 64, max_size: 64}"``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ablation import (
    BOOKKEEPING,
    add_data_arguments,
    data_overrides,
    drop_checkpoints,
    epoch_seconds,
    fmt,
    hard_data,
    spread,
)
from common import write_json

DETECTORS = ("fcos", "retinanet")
SCORE_THRESH = 0.05
WARMUP_FRACTION, WARMUP_MAX, WARMUP_FACTOR = 0.1, 1000, 1e-3


# --------------------------------------------------------------------------- baselines


def build_baseline(kind: str, num_classes: int, train_sizes: Sequence[int], max_size: int,
                   eval_size: int, detections: int) -> nn.Module:
    """FCOS or RetinaNet on a ResNet-18 FPN, every weight random (nothing is downloaded)."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                   norm_layer=nn.BatchNorm2d, trainable_layers=5,
                                   returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    common = {"min_size": tuple(train_sizes), "max_size": max_size,
              "score_thresh": SCORE_THRESH, "detections_per_img": detections}
    if kind == "fcos":
        return FCOS(backbone, num_classes=num_classes, **common)
    if kind != "retinanet":
        raise ValueError(f"unknown detector {kind!r}")
    scale = eval_size / 800
    sizes = tuple(tuple(s * scale * 2 ** (k / 3) for k in range(3))
                  for s in (32, 64, 128, 256, 512))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0],
                         num_classes, norm_layer=partial(nn.GroupNorm, 32))
    return RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, head=head,
                     **common)


def _readable(samples: Sequence[Any]) -> list[Any]:
    """Collate: the (image, target) samples as a list, unreadable images left out."""
    return [s for s in samples if isinstance(s, tuple)]


def _to_torchvision(image: Tensor, target: dict[str, Any], flip: bool
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """A dinodet sample (boxes cxcywh relative to the image) as torchvision wants it (xyxy
    pixels), flipped horizontally when asked."""
    h, w = image.shape[-2:]
    cx, cy, bw, bh = target["boxes"].unbind(-1)
    boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                         (cy + bh / 2) * h], -1)
    if flip:
        image = image.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], -1)
    return image, {"boxes": boxes, "labels": target["labels"]}


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up from WARMUP_FACTOR over the first steps, then cosine decay to 0."""
    warmup = max(1, min(WARMUP_MAX, round(WARMUP_FRACTION * total)))
    if step < warmup:
        return WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_baseline(kind: str, cfg: Any, paths: dict[str, Path], seed: int, optim: str,
                   lr: float | None) -> dict[str, Any]:
    """Train and evaluate one torchvision detector with ``cfg``'s budget and sizes."""
    from dinodet.data.coco import CocoDetection
    from dinodet.data.collate import build_loader
    from dinodet.engine.distributed import resolve_device, seed_everything
    from dinodet.engine.evaluate import CocoEvaluator

    seed_everything(seed)
    device = resolve_device(cfg.device)
    t = cfg.data.transform
    train_set = CocoDetection(paths["train_ann"], paths["train_images"])
    val_set = CocoDetection(paths["val_ann"], paths["val_images"])
    model = build_baseline(kind, train_set.num_classes, sorted(set(t.scales)), t.max_size,
                           t.eval_size, cfg.model.num_select).to(device)
    batch = cfg.batch_size
    accumulate = (getattr(cfg, "total_batch_size", None) or batch) // batch
    steps_per_epoch = len(train_set) // (batch * accumulate)
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images are fewer than one batch")
    total = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "adamw":
        base_lr = lr if lr is not None else 1e-3
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=base_lr,
                                                             weight_decay=1e-4)
    else:
        base_lr = lr if lr is not None else 0.01 * batch * accumulate / 16
        optimizer = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))
    flips = torch.Generator().manual_seed(seed)
    epoch_times, bad_steps, losses = [], 0, []
    for epoch in range(cfg.epochs):
        model.train()
        loader = build_loader(train_set, batch, True, cfg.data.num_workers, seed, epoch=epoch,
                              collate=_readable)
        start, window = time.perf_counter(), 0
        optimizer.zero_grad(set_to_none=True)
        for samples in loader:
            if not samples:
                continue
            flip = torch.rand(len(samples), generator=flips) < t.hflip_prob
            pairs = [_to_torchvision(im, tg, bool(f)) for (im, tg), f in zip(samples, flip)]
            images = [im.to(device) for im, _ in pairs]
            targets = [{k: v.to(device) for k, v in tg.items()} for _, tg in pairs]
            loss = sum(model(images, targets).values())
            assert isinstance(loss, Tensor)
            if not torch.isfinite(loss):
                bad_steps += 1
                continue
            (loss / accumulate).backward()
            losses.append(loss.item())
            window += 1
            if window == accumulate:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                window = 0
        epoch_times.append(time.perf_counter() - start)
        recent = f"{statistics.fmean(losses[-50:]):.3f}" if losses else "-"
        print(f"{kind} epoch {epoch + 1}/{cfg.epochs}: loss {recent} (mean of the last 50 "
              f"batches), lr {optimizer.param_groups[0]['lr']:.2e}, {epoch_times[-1]:.0f} s",
              flush=True)

    model.eval()
    resize: Any = model.transform
    resize.min_size = (t.eval_size,)  # evaluate at the recipe's size
    evaluator = CocoEvaluator(val_set.coco, val_set.label_to_category_id, val_set.class_names)
    start = time.perf_counter()
    with torch.inference_mode():
        for samples in build_loader(val_set, batch, False, cfg.data.num_workers,
                                    collate=_readable):
            outputs = model([im.to(device) for im, _ in samples])
            evaluator.update({tg["image_id"]: out for (_, tg), out in zip(samples, outputs)})
    eval_seconds = time.perf_counter() - start
    result = evaluator.summarize()
    return {"metrics": result.metrics, "epoch_seconds": epoch_times,
            "eval_seconds": eval_seconds, "bad_steps": bad_steps,
            "params": sum(p.numel() for p in model.parameters()),
            "optimizer": optim, "lr": base_lr,
            "final_loss": statistics.fmean(losses[-50:]) if losses else None}


# --------------------------------------------------------------------------- dinodet


def train_dinodet(cfg: Any, keep_checkpoints: bool) -> dict[str, Any]:
    from dinodet.data.coco import CocoDetection
    from dinodet.engine.train import build_training_model, train

    assert cfg.data.train_ann and cfg.data.train_images
    if Path(cfg.out_dir).exists():  # this script's own run folder: start afresh
        shutil.rmtree(cfg.out_dir)
    num_classes = CocoDetection(cfg.data.train_ann, cfg.data.train_images).num_classes
    params = sum(p.numel() for p in build_training_model(cfg, num_classes).parameters())
    summary = train(cfg, progress=False)
    if summary["metrics"] is None:
        raise SystemExit(f"dinodet ended without an evaluation ({summary['stopped_by']})")
    times = epoch_seconds(Path(cfg.out_dir))
    if not keep_checkpoints:
        drop_checkpoints(Path(cfg.out_dir))
    return {"metrics": summary["metrics"],
            # the last epoch's time includes the one evaluation
            "epoch_seconds": times[:-1] if len(times) > 1 else times,
            "seconds": summary["seconds"], "bad_steps": summary["bad_steps"],
            "params": params}


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", choices=[*DETECTORS, "both"], default="both",
                        help="the torchvision baseline(s) next to dinodet")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds (the data stay the same)")
    add_data_arguments(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dinodet recipe override (repeatable); the baselines follow its "
                             "sizes, batch and epochs")
    parser.add_argument("--baseline-optim", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--baseline-lr", type=float, default=None,
                        help="default: 1e-3 (adamw), 0.01 x batch / 16 (sgd)")
    parser.add_argument("--out", default="runs/small_data", help="folder of the dinodet runs")
    parser.add_argument("--json", default=None, help="default: OUT/bench_small_data.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--keep-checkpoints", action="store_true")
    args = parser.parse_args(argv)

    from dinodet.engine.config import load_train_config

    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = list(DETECTORS) if args.detector == "both" else [args.detector]
    out = Path(args.out)
    runs: dict[str, list[dict[str, Any]]] = {"dinodet": [], **{k: [] for k in kinds}}
    with hard_data(args.data, args.num_train, args.num_val, args.image_size,
                   args.data_seed) as paths:
        for seed in args.seeds:
            cfg = load_train_config("cpu-small", None, [*BOOKKEEPING, *args.set],
                                    epochs=args.epochs, seed=seed, batch_size=args.batch_size,
                                    out_dir=str(out / f"dinodet-seed{seed}"),
                                    **data_overrides(paths))
            print(f"\n=== dinodet cpu-small, seed {seed}: {cfg.epochs} epochs, batch "
                  f"{cfg.batch_size}, eval size {cfg.data.transform.eval_size}", flush=True)
            assert cfg.model is not None
            weights = cfg.model.backbone.weights
            if weights is not None:
                print(f"warning: the recipe's backbone starts from {weights}"
                      "; the baselines start from scratch, so the comparison is not even",
                      flush=True)
            runs["dinodet"].append({"seed": seed, **train_dinodet(cfg, args.keep_checkpoints)})
            for kind in kinds:
                print(f"\n=== {kind} (torchvision, from scratch), seed {seed}", flush=True)
                runs[kind].append({"seed": seed, **train_baseline(
                    kind, cfg, paths, seed, args.baseline_optim, args.baseline_lr)})
        settings = {"detectors": ["dinodet", *kinds], "seeds": args.seeds,
                    "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                    "total_batch_size": getattr(cfg, "total_batch_size", None),
                    "train_scales": list(cfg.data.transform.scales),
                    "eval_size": cfg.data.transform.eval_size,
                    "max_size": cfg.data.transform.max_size,
                    "num_train": args.num_train, "num_val": args.num_val,
                    "image_size": args.image_size, "data": args.data or "generated",
                    "data_seed": args.data_seed, "extra_sets": args.set,
                    "dinodet_backbone_weights": weights,
                    "baseline_optim": args.baseline_optim,
                    "baseline_lr": runs[kinds[0]][0]["lr"] if kinds else None,
                    "baseline_score_thresh": SCORE_THRESH,
                    "threads": torch.get_num_threads()}

    results: dict[str, Any] = {}
    for name, rs in runs.items():
        per_epoch = [s for r in rs for s in r["epoch_seconds"]]
        results[name] = {
            "params": rs[0]["params"],
            **{m: spread([r["metrics"][m] for r in rs]) for m in ("AP", "AP50", "APs", "APm")},
            "epoch_seconds": spread(per_epoch),
            "runs": rs,
        }
    print()
    header = (f"{'detector':<12} {'params':>8} {'AP':>11} {'AP50':>11} {'APs':>11} "
              f"{'s/epoch (median, min-max)':>27}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        e = r["epoch_seconds"]
        times = f"{e['median']:.1f} ({e['min']:.1f}-{e['max']:.1f})" if e["n"] else "-"
        print(f"{name:<12} {r['params'] / 1e6:>7.1f}M {fmt(r['AP']):>11} {fmt(r['AP50']):>11} "
              f"{fmt(r['APs']):>11} {times:>27}")
    print(f"AP in percent points (mean ± sample std over {len(args.seeds)} seed(s)); "
          "same val json, pycocotools")
    write_json(args.json or out / "bench_small_data.json", "bench_small_data", settings,
               results)


if __name__ == "__main__":
    main(sys.argv[1:])
