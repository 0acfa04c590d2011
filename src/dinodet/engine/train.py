"""The training loop: one process or many (torchrun / DDP), resumable at any step.

Reading order: ``train`` builds everything, then runs epochs of ``_train_one_epoch``;
each epoch ends with a checkpoint and an evaluation. Anything that goes wrong (a corrupt
image, a NaN loss, a kill signal, a full disk) leaves the last good checkpoint whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from dinodet.data.coco import CocoDetection
from dinodet.data.collate import collate_fn, seed_worker
from dinodet.data.transforms import TransformConfig, build_transforms
from dinodet.engine import distributed as dist
from dinodet.engine.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from dinodet.engine.config import TrainConfig
from dinodet.engine.ema import ModelEMA
from dinodet.engine.evaluate import EvalResult, evaluate
from dinodet.engine.optim import build_optimizer, build_scheduler, clip_gradients
from dinodet.loss.criterion import build_criterion
from dinodet.model.dino import DINO


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row); the message says
    why and where the last good checkpoint is."""


class EpochSampler(Sampler[int]):
    """Shuffled (or ordered) indices for one rank, reproducible from (seed, epoch), that can
    start part-way through an epoch so a resumed run sees exactly the batches it missed."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world]
        else:  # pad so every rank gets the same count (evaluation drops the duplicates)
            order += order[: (-len(order)) % self.world]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


@dataclass
class RunState:
    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # optimizer steps so far
    batches_done: int = 0  # batches of the current epoch already trained on
    skipped_images: list[str] = field(default_factory=list)
    bad_steps: int = 0  # non-finite losses, in all
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after every step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _transform_config(cfg: TrainConfig) -> TransformConfig:
    d = cfg.data
    return TransformConfig(scales=d.scales, max_size=d.max_size,
                           crop_resize_scales=d.crop_resize_scales, crop_min=d.crop_min,
                           crop_max=d.crop_max, eval_size=d.eval_size)


def _loader(dataset: CocoDetection, sampler: EpochSampler, batch_size: int, workers: int,
            seed: int, drop_last: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, collate_fn=collate_fn, worker_init_fn=seed_worker,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


def build_training_model(cfg: TrainConfig, num_classes: int, init: str | None = None) -> DINO:
    """The network for ``cfg`` with ``num_classes``; ``init`` loads weights to start from.

    With no pretrained weights at all the backbone's normalisation layers train (frozen
    random statistics would be meaningless); with pretrained weights they stay frozen.
    """
    assert cfg.model is not None
    model_cfg = cfg.model.replace(num_classes=num_classes)
    if model_cfg.backbone.weights is None and init is None:
        model_cfg = model_cfg.replace(backbone={"frozen_batchnorm": False,
                                                "freeze_stem": False})
    model = DINO(model_cfg)
    if init is not None:
        from dinodet.convert import load_initial_weights

        load_initial_weights(model, init)
    return model


class RunLog:
    """One JSON line per record in ``log.jsonl``; the numbers also go to TensorBoard when
    asked (``tensorboard=true``; needs the ``tensorboard`` package)."""

    def __init__(self, out_dir: Path, tensorboard: bool) -> None:
        self.path = out_dir / "log.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=true needs the tensorboard package: "
                                  "pip install 'dinodet[tensorboard]'") from e
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def __call__(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and record["type"] in ("step", "epoch"):
            x = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch", "type"):
                    self.writer.add_scalar(f"{record['type']}/{key}", value, x)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(cfg: TrainConfig, resume: str | None = None, init: str | None = None,
          max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns a summary dict.

    resume: ``"auto"`` (newest checkpoint in ``cfg.out_dir``, if any) or a checkpoint path.
    init: weights to start from: a dinodet checkpoint or model directory, or an original
        DINO ``.pth`` (the class heads are re-initialised when the classes differ).
    max_steps: stop after this many optimizer steps (tests, smoke runs).
    """
    info = dist.init_distributed(cfg.device)
    device = info.device
    dist.seed_everything(cfg.seed, rank=info.rank, deterministic=cfg.deterministic)
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    log = RunLog(out_dir, cfg.tensorboard and info.is_main)

    d = cfg.data
    if not (d.train_ann and d.train_images):
        raise ValueError("training needs data.train_ann and data.train_images")
    tcfg = _transform_config(cfg)
    train_set = CocoDetection(d.train_ann, d.train_images, build_transforms(True, tcfg),
                              keep_category_ids=d.keep_category_ids, strict=d.strict)
    val_set = None
    if d.val_ann and d.val_images:
        val_set = CocoDetection(d.val_ann, d.val_images, build_transforms(False, tcfg),
                                keep_category_ids=d.keep_category_ids, strict=d.strict)
        if val_set.label_to_category_id != train_set.label_to_category_id:
            raise ValueError(f"the categories of {d.val_ann} differ from those of "
                             f"{d.train_ann}; both splits must share one category table")

    model = build_training_model(cfg, train_set.num_classes, init).to(device)
    criterion = build_criterion(train_set.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    train_sampler = EpochSampler(len(train_set), True, cfg.seed, info.rank, info.world_size,
                                 drop_last=True)
    batches_per_epoch = len(train_set) // (cfg.batch_size * info.world_size)
    if batches_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of "
                         f"{cfg.batch_size} x {info.world_size} process(es)")
    steps_per_epoch = max(1, batches_per_epoch // cfg.optim.accumulate_steps)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.epochs)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema else None
    manager = CheckpointManager(out_dir, keep_last=cfg.keep_last)
    state = RunState()

    ckpt_path = manager.resolve_resume(resume)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        state = RunState(epoch=ckpt["epoch"], step=ckpt["step"],
                         batches_done=ckpt["batches_done"],
                         skipped_images=list(ckpt.get("skipped_images", [])),
                         bad_steps=ckpt.get("bad_steps", 0), history=ckpt.get("history", []))
        restore_rng_state(ckpt["rng"][info.rank] if info.rank < len(ckpt["rng"])
                          else ckpt["rng"][0])
        if info.is_main:
            print(f"resumed from {ckpt_path} (epoch {state.epoch + 1}, step {state.step})")

    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # denoising is absent from batches without objects

    def checkpoint(metric: float | None = None) -> Path | None:
        rng = dist.all_gather_object(capture_rng_state())
        if not info.is_main:
            return None
        return manager.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "rng": rng,
            "epoch": state.epoch, "step": state.step, "batches_done": state.batches_done,
            "config": cfg.to_dict(), "model_config": model.cfg.to_dict(),
            "classes": train_set.class_table(),
            "skipped_images": state.skipped_images, "bad_steps": state.bad_steps,
            "history": state.history,
        }, epoch=state.epoch, step=state.step, metric=metric)

    start = time.perf_counter()
    stopped_by: str | None = None
    last_eval: EvalResult | None = None
    with _StopSignal() as stop:
        while state.epoch < cfg.epochs and stopped_by is None:
            train_sampler.set_epoch(state.epoch, skip=state.batches_done * cfg.batch_size)
            loader = _loader(train_set, train_sampler, cfg.batch_size, d.num_workers,
                             cfg.seed * 1000 + state.epoch * 10 + info.rank, drop_last=True)
            stopped_by = _train_one_epoch(
                cfg, ddp_model, model, criterion, optimizer, scheduler, scaler, ema, loader,
                device, amp_dtype, state, stop, checkpoint, log, info, batches_per_epoch,
                max_steps, progress)
            if stopped_by is not None:
                break
            metric = None
            every = cfg.eval_every_epochs
            if val_set is not None and ((every and (state.epoch + 1) % every == 0)
                                        or state.epoch + 1 == cfg.epochs):
                last_eval = _evaluate(cfg, ema.module if ema else model, val_set, device,
                                      info, amp_dtype)
                metric = last_eval.metrics["AP"]
            record = {"type": "epoch", "epoch": state.epoch + 1, "step": state.step,
                      "time": time.perf_counter() - start,
                      **({k: v for k, v in last_eval.metrics.items()} if metric is not None
                         else {})}
            state.history.append(record)
            if info.is_main:
                log(record)
                if last_eval is not None and metric is not None:
                    print(last_eval.format_table())
            state.epoch += 1
            state.batches_done = 0
            checkpoint(metric)
        if stopped_by is not None:  # a signal or max_steps: keep where we are
            checkpoint()

    summary = {
        "epochs": state.epoch, "steps": state.step, "seconds": time.perf_counter() - start,
        "skipped_images": len(set(state.skipped_images)), "bad_steps": state.bad_steps,
        "stopped_by": stopped_by, "best_AP": manager.best_metric,
        "metrics": last_eval.metrics if last_eval is not None else None,
        "latest_checkpoint": str(manager.latest()) if info.is_main else None,
    }
    if info.is_main:
        log({"type": "summary", **summary})
        log.close()
        _print_summary(summary)
    dist.barrier()  # ranks finish together; a rank leaving alone can abort gloo at exit
    return summary


def _train_one_epoch(cfg: TrainConfig, ddp_model: nn.Module, model: DINO, criterion: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                     ema: ModelEMA | None, loader: DataLoader, device: torch.device,
                     amp_dtype: torch.dtype | None, state: RunState, stop: _StopSignal,
                     checkpoint: Any, log: RunLog, info: dist.DistInfo,
                     batches_per_epoch: int, max_steps: int | None,
                     progress: bool) -> str | None:
    """Train until the epoch ends; returns why it stopped early, or None."""
    ddp_model.train()
    accumulate = cfg.optim.accumulate_steps
    bad_in_a_row = 0
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=batches_per_epoch, initial=state.batches_done,
                   desc=f"epoch {state.epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
    tick, images_seen = time.perf_counter(), 0
    try:
        for batch in loader:
            state.skipped_images.extend(batch.skipped)
            state.batches_done += 1
            if bar is not None:
                bar.update(1)
            if len(batch) == 0:
                continue
            batch = batch.to(device, non_blocking=True)
            sync = state.batches_done % accumulate == 0
            no_sync = (ddp_model.no_sync() if info.distributed and not sync
                       else contextlib.nullcontext())
            with no_sync:
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    outputs = ddp_model(batch.images, batch.targets)
                losses = criterion(_to_float(outputs), batch.targets)
                loss = losses["loss"]
                finite = torch.isfinite(loss.detach()).float()
                if info.distributed:  # every rank skips the step if any rank saw a NaN
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if finite.item() < 1:
                    optimizer.zero_grad(set_to_none=True)
                    state.bad_steps += 1
                    bad_in_a_row += 1
                    warnings.warn(f"non-finite loss at epoch {state.epoch + 1} step "
                                  f"{state.step}: step skipped ({bad_in_a_row} in a row)",
                                  stacklevel=2)
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingStopped(
                            f"{bad_in_a_row} non-finite losses in a row; stopping. The last "
                            f"good checkpoint is intact in {cfg.out_dir}: lower the learning "
                            "rate or check the data, then --resume auto")
                    continue
                bad_in_a_row = 0
                scaler.scale(loss / accumulate).backward()
            images_seen += len(batch)
            if not sync:
                continue
            scaler.unscale_(optimizer)
            clip_gradients(model, cfg.optim.clip_max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            if ema is not None:
                ema.update(model)
            if state.step % cfg.log_every == 0 or state.step == 1:
                now = time.perf_counter()
                speed = images_seen * info.world_size / max(now - tick, 1e-9)
                tick, images_seen = now, 0
                record = {"type": "step", "epoch": state.epoch + 1, "step": state.step,
                          "lr": optimizer.param_groups[0]["lr"], "images_per_s": speed,
                          **{k: float(v) for k, v in dist.reduce_dict_mean(
                              {k: v.detach() for k, v in losses.items()}).items()}}
                if info.is_main:
                    log(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                        img_s=f"{speed:.1f}")
            if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                checkpoint()
            if _any_rank(stop.received is not None, info, device):
                name = signal.Signals(stop.received).name if stop.received else "peer"
                return f"signal {name}"
            if max_steps is not None and state.step >= max_steps:
                return "max_steps"
    finally:
        if bar is not None:
            bar.close()
    return None


def _any_rank(flag: bool, info: dist.DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is set on any (a signal may reach only one)."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _to_float(outputs: Any) -> Any:
    """Losses run in float32: cast half-precision outputs (nested dicts and lists) up."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float(v) for v in outputs]
    return outputs


def _evaluate(cfg: TrainConfig, model: nn.Module, val_set: CocoDetection, device: torch.device,
              info: dist.DistInfo, amp_dtype: torch.dtype | None) -> EvalResult:
    sampler = EpochSampler(len(val_set), False, 0, info.rank, info.world_size)
    loader = _loader(val_set, sampler, cfg.batch_size, cfg.data.num_workers, 0, False)
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off")
    result, _ = evaluate(model, loader, device, val_set.label_to_category_id, val_set.coco,
                         num_select=model.cfg.num_select, amp=amp,
                         class_names=val_set.class_names)
    return result


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [("epochs", summary["epochs"]), ("optimizer steps", summary["steps"]),
            ("time", f"{summary['seconds'] / 60:.1f} min"),
            ("images skipped (unreadable)", summary["skipped_images"]),
            ("steps skipped (non-finite loss)", summary["bad_steps"])]
    if summary["metrics"]:
        rows += [("AP", f"{summary['metrics']['AP']:.3f}"),
                 ("AP50", f"{summary['metrics']['AP50']:.3f}")]
    if summary["best_AP"] is not None and not math.isnan(summary["best_AP"]):
        rows.append(("best AP", f"{summary['best_AP']:.3f}"))
    if summary["stopped_by"]:
        rows.append(("stopped by", summary["stopped_by"]))
    rows.append(("latest checkpoint", summary["latest_checkpoint"]))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
