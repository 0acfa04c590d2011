"""The training loop: one process or many (torchrun / DDP), resumable at any step.

``train`` builds the data, the model and its :class:`TrainState`, then runs epochs of
``_train_one_epoch`` (:func:`~dinodet.engine.step.train_step` per batch), each ending with
an evaluation and a checkpoint. A corrupt image, a NaN loss, a kill signal or a full disk
leaves the last good checkpoint whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinodet.data.coco import CocoDetection
from dinodet.data.collate import build_loader
from dinodet.data.formats import common_format, open_dataset
from dinodet.data.transforms import build_transforms
from dinodet.engine import distributed as dist
from dinodet.engine.analysis import result_thresholds, write_eval_report
from dinodet.engine.checkpoint import (
    CheckpointManager,
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    read_class_thresholds,
    restore_rng_state,
    with_class_thresholds,
)
from dinodet.engine.config import TrainConfig
from dinodet.engine.evaluate import EvalResult, evaluate
from dinodet.engine.rundir import RunDirLock
from dinodet.engine.step import NonFiniteWeightsError, TrainState, train_step, window_num_boxes
from dinodet.engine.trackers import (
    Status,
    Tracker,
    check_available,
    draw_plots,
    open_trackers,
    run_files,
)
from dinodet.errors import DataError
from dinodet.model.dino import DINO
from dinodet.weights import CheckpointError, WeightsChoice, load_initial_weights


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row); the message says
    why and where the last good checkpoint is."""


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after every step (and after
    every evaluation): the run then saves a checkpoint and ends. A second SIGINT (Ctrl-C
    twice) does not wait: it raises ``KeyboardInterrupt`` at once, the last checkpoint
    staying whole. Repeated SIGTERMs change nothing: supervisors (torchrun, SLURM) send
    one to the group and one to each process."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt("a second SIGINT: stopping without waiting for the "
                                    "step to end")
        if self.received is None:
            self.received = signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


@dataclasses.dataclass
class EarlyStopping:
    """Ends a run whose validation AP has stopped rising: once ``patience`` evaluations in a
    row (0: never) have not beaten the last gain by more than ``min_delta``.

    ``best_AP`` / ``best_epoch`` are the highest AP so far (that of ``best.pt``); ``bar`` the
    AP of the last gain, which the next must beat (``best_AP`` itself when ``min_delta`` is
    0); ``stale`` the evaluations since that gain. The state goes into every checkpoint,
    so a resumed run stops at the epoch an uninterrupted one would.
    """

    patience: int = 0
    min_delta: float = 0.0
    best_AP: float | None = None
    best_epoch: int | None = None
    bar: float | None = None
    stale: int = 0

    def update(self, ap: float, epoch: int) -> None:
        """Count the evaluation of (1-based) ``epoch``; a non-finite AP is no gain."""
        finite = math.isfinite(ap)
        if finite and (self.best_AP is None or ap > self.best_AP):
            self.best_AP, self.best_epoch = float(ap), int(epoch)
        if finite and (self.bar is None or ap > self.bar + self.min_delta):
            self.bar, self.stale = float(ap), 0
        else:
            self.stale += 1

    @property
    def triggered(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def reason(self, evaluations: str = "epochs") -> str:
        """``"early stopping: no AP gain for 3 epochs (best 0.412 at epoch 5)"``."""
        best = "no finite AP" if self.best_AP is None else (
            f"best {self.best_AP:.3f} at epoch {self.best_epoch}")
        return f"early stopping: no AP gain for {self.stale} {evaluations} ({best})"

    def state_dict(self) -> dict[str, Any]:
        return {"best_AP": self.best_AP, "best_epoch": self.best_epoch, "bar": self.bar,
                "stale": self.stale}

    def load_state_dict(self, saved: Any, history: Sequence[dict[str, Any]] = ()) -> None:
        """Continue from :meth:`state_dict`'s output; from a checkpoint without it (older
        than early stopping), from the APs of its epoch ``history``. The patience and
        ``min_delta`` stay this run's."""
        if isinstance(saved, dict):
            for key in ("best_AP", "best_epoch", "bar", "stale"):
                setattr(self, key, saved.get(key, getattr(self, key)))
            return
        for record in history:
            if isinstance(record.get("AP"), (int, float)):
                self.update(float(record["AP"]), int(record["epoch"]))


def build_training_model(cfg: TrainConfig, num_classes: int, init: str | None = None,
                         init_weights: WeightsChoice = "ema",
                         backbone_weights: bool = True) -> DINO:
    """The network for ``cfg`` with ``num_classes``, with the weights it starts from.

    ``init`` loads weights to start from (of a run checkpoint, its EMA weights unless
    ``init_weights="raw"``); they replace every backbone tensor, so the backbone's
    pretrained weights (``model.backbone.weights``) are then not read. Else those are
    loaded (downloaded into torch.hub's / huggingface_hub's cache when not there; rank 0
    first under DDP), unless ``backbone_weights=False`` (resuming: the checkpoint replaces
    them; what trains is decided as when the run started).

    What trains follows the original under pretrained weights (ImageNet or ``init``):
    frozen BatchNorm, ResNet's conv1/bn1/layer1 without gradient, all of Swin training.
    From scratch (no backbone weights and no ``init``) BatchNorm trains and nothing is
    frozen: frozen random statistics would be meaningless.
    """
    from dinodet.model.pretrained import load_pretrained_backbone

    assert cfg.model is not None
    model_cfg = cfg.model.replace(num_classes=num_classes)
    if model_cfg.backbone.weights is None and init is None:
        model_cfg = model_cfg.replace(backbone={"frozen_batchnorm": False,
                                                "freeze_stem": False})
    model = DINO(model_cfg)
    if init is None and backbone_weights and model_cfg.backbone.weights is not None:
        if not dist.is_main():
            dist.barrier()  # rank 0 downloads, the others then read its cached file
        source = load_pretrained_backbone(model, model_cfg.backbone)
        if dist.is_main():
            dist.barrier()
            if source is not None:
                print(f"backbone weights: {source.describe()}")
    if init is not None:
        found = load_initial_weights(model, init, init_weights)
        if dist.is_main():
            print(f"initialised from {found.describe()}")
    return model


class RunLog:
    """One JSON line per record in ``log.jsonl``; the numbers of step and epoch records also
    go to the experiment ``trackers`` (:mod:`dinodet.engine.trackers`) as
    ``<type>/<key>`` at the record's step. A tracker that fails is warned about once and
    left out of the rest of the run: the log file has every number."""

    def __init__(self, out_dir: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = out_dir / "log.jsonl"
        self.out_dir = out_dir
        self.trackers = list(trackers)
        self._closed = False

    def __call__(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers and record["type"] in ("step", "epoch"):
            scalars = {f"{record['type']}/{key}": value for key, value in record.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)
                       and key not in ("step", "epoch", "type")}
            self._each(lambda t: t.log_scalars(record["step"], scalars))

    def _each(self, call: Any) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:
                self.trackers.remove(tracker)
                warnings.warn(f"{tracker.name}: {type(e).__name__}: {e}; no more is sent to "
                              f"it, {self.path} has everything", stacklevel=3)
                with contextlib.suppress(Exception):
                    tracker.close("failed")

    def close(self, status: Status = "finished", files: bool = True) -> None:
        """End the trackers' runs as ``status``, first (``files``) handing them the run's
        plots (drawn now when a tracker keeps files) and files. Only the first call acts."""
        if self._closed:
            return
        self._closed = True
        if files and any(t.takes_files for t in self.trackers):
            draw_plots(self.out_dir)
            paths = run_files(self.out_dir)
            self._each(lambda t: t.log_files(paths))
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as e:
                warnings.warn(f"{tracker.name}: could not end its run: {type(e).__name__}: "
                              f"{e}", stacklevel=2)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        """A run that ends by an exception: its trackers' runs end failed (killed: Ctrl-C),
        without files."""
        status: Status = ("finished" if kind is None else
                          "killed" if issubclass(kind, KeyboardInterrupt) else "failed")
        self.close(status, files=False)


def train(cfg: TrainConfig, resume: str | None = None, init: str | None = None,
          max_steps: int | None = None, progress: bool = True,
          init_weights: WeightsChoice = "ema") -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; returns a summary dict.

    resume: ``"auto"`` (newest checkpoint in ``cfg.out_dir``, if any) or a checkpoint path.
    init: weights to start from: a dinodet checkpoint or model directory, or an original
        DINO ``.pth`` (the class heads are re-initialised when the classes differ);
        ``init_weights`` picks the EMA or raw weights of a run checkpoint.
    max_steps: stop after this many optimizer steps (tests, smoke runs).
    """
    with dist.deterministic_algorithms(cfg.deterministic):
        return _train(cfg, resume, init, max_steps, progress, init_weights)


def _train(cfg: TrainConfig, resume: str | None, init: str | None, max_steps: int | None,
           progress: bool, init_weights: WeightsChoice) -> dict[str, Any]:
    info = dist.init_distributed(cfg.device)
    dist.seed_everything(cfg.seed, rank=info.rank)
    out_dir = Path(cfg.out_dir)
    # One run per directory: rank 0 holds the lock (and checks --out) before any work.
    with RunDirLock(out_dir) if info.is_main else contextlib.nullcontext() as lock:
        if lock is not None and lock.took_over:
            held = lock.took_over
            print(f"{out_dir}: the run that held it (pid {held.get('pid')} on "
                  f"{held.get('host')}) is gone; continuing in its directory")
        with contextlib.ExitStack() as cleanup:  # ends the trackers' runs on an exception
            return _run(cfg, info, out_dir, resume, init, max_steps, progress, init_weights,
                        cleanup)


def _restart_count() -> int:
    """How often torchrun (``--max-restarts``) has restarted this run's processes."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _run(cfg: TrainConfig, info: dist.DistInfo, out_dir: Path, resume: str | None,
         init: str | None, max_steps: int | None, progress: bool,
         init_weights: WeightsChoice, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    d = cfg.data
    if not d.train_ann:
        raise DataError("training needs data.train_ann (and data.train_images for a COCO "
                        "json)")
    if cfg.early_stop_patience and not d.val_ann:
        raise DataError(f"early_stop_patience={cfg.early_stop_patience} needs validation "
                        "data: set data.val_ann (and data.val_images)")
    check_available(cfg.tracker_names())  # on every rank, before any work
    dataset_options: dict[str, Any] = {"format": d.format,
                       "keep_category_ids": d.keep_category_ids, "strict": d.strict,
                       "max_pixels": d.max_image_pixels,
                       "allow_outside_image_dir": d.allow_outside_image_dir}
    train_set = open_dataset(d.train_ann, d.train_images, split=d.train_split,
                             transforms=build_transforms(True, d.transform), **dataset_options)
    val_set = None
    if d.val_ann:
        val_set = open_dataset(d.val_ann, d.val_images, split=d.val_split,
                               transforms=build_transforms(False, d.transform),
                               **dataset_options)
        if val_set.label_to_category_id != train_set.label_to_category_id:
            raise DataError(f"the categories of {d.val_ann} differ from those of "
                            f"{d.train_ann}; both splits must share one category table")
    # the format read goes into the run's config: a resumed run reads the data the same way
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        d, format=common_format(train_set, val_set)))
    cfg = _with_data_classes(cfg, train_set)

    accumulate = cfg.accumulation(info.world_size)
    total_batch = accumulate * cfg.batch_size * info.world_size
    steps_per_epoch = len(train_set) // total_batch
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_set)} training images are fewer than one "
                        f"{cfg.describe_batch(info.world_size)}; lower total_batch_size "
                        "or batch_size")
    if info.is_main:
        print(f"{cfg.describe_batch(info.world_size)}; {steps_per_epoch} steps per epoch")
    manager = CheckpointManager(out_dir, keep_last=cfg.keep_last)
    if _restart_count() > 0 and manager.latest() is not None:
        if info.is_main:
            print(f"torchrun restart {_restart_count()}: resuming from the newest checkpoint")
        resume = "auto"
    ckpt_path = manager.resolve_resume(resume)
    model = build_training_model(cfg, train_set.num_classes, init, init_weights,
                                 backbone_weights=ckpt_path is None)
    state = TrainState.create(
        model.to(info.device), cfg.optim, steps_per_epoch, cfg.epochs,
        amp=cfg.amp, ema_decay=cfg.ema_decay if cfg.ema else None)
    early = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta)
    # Per-class F1-optimal score thresholds of the latest evaluation (rank 0), saved with
    # every checkpoint for threshold="auto".
    thresholds: dict[int, float] | None = None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        changed = state.load_state_dict(ckpt, where=str(ckpt_path))
        early.load_state_dict(ckpt.get("early_stop"), state.progress.history)
        thresholds = read_class_thresholds(ckpt, str(ckpt_path))
        rng = ckpt.get("rng") or []
        if rng:
            restore_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])
        if info.is_main:
            print(f"resumed from {ckpt_path} (epoch {state.progress.epoch + 1}, "
                  f"step {state.progress.step})")
            for line in changed:
                print(f"  {line}")
    if info.is_main:  # only now: a failed --resume leaves the run's config as it was
        atomic_write(out_dir / "config.yaml", lambda f: f.write(cfg.to_yaml().encode()),
                     what="run config")
    trackers: list[Tracker] = []
    if info.is_main and cfg.tracker_names():
        trackers = open_trackers(cfg.tracker_names(), out_dir, cfg.tracker_project,
                                 cfg.tracker_run_name or out_dir.resolve().name,
                                 cfg.to_dict(), resume=ckpt_path is not None)
    log = cleanup.enter_context(RunLog(out_dir, trackers))
    if info.distributed:
        state.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=True)  # denoising is absent from batches without objects

    run = state.progress
    skipped_file = out_dir / SKIPPED_FILE

    def gather_skipped(per_rank: list[list[str]] | None = None) -> list[str]:
        """Every rank's unreadable images so far, in one sorted list (all ranks call,
        unless ``per_rank`` was gathered already)."""
        if per_rank is None:
            per_rank = dist.all_gather_object(run.skipped_images)
        names = sorted({p for part in per_rank for p in part})
        run.skipped_images = names
        if info.is_main and names:
            _write_skipped(skipped_file, names, train_set)
        return names

    def checkpoint(metric: float | None = None) -> Path | None:
        gathered = dist.all_gather_object((capture_rng_state(), run.skipped_images))
        rng = [state for state, _ in gathered]
        gather_skipped([names for _, names in gathered])
        if not info.is_main:
            return None
        return manager.save(with_class_thresholds(
            {**state.state_dict(), "rng": rng, "config": cfg.to_dict(),
             "classes": train_set.class_table(), "early_stop": early.state_dict()},
            thresholds), epoch=state.progress.epoch, step=state.progress.step, metric=metric)

    start = time.perf_counter()
    stopped_by: str | None = None
    saved = False
    last_eval: EvalResult | None = None
    evaluations = "epochs" if cfg.eval_every_epochs == 1 else "evaluations"
    if early.triggered and run.epoch < cfg.epochs:  # resumed from a run that stopped early
        stopped_by, saved = early.reason(evaluations), True
    with _StopSignal() as stop:
        while run.epoch < cfg.epochs and stopped_by is None:
            loader = build_loader(train_set, cfg.batch_size, True, d.num_workers, cfg.seed,
                                  info.rank, info.world_size, epoch=run.epoch,
                                  skip_samples=run.samples_done)
            before = (run.step, run.samples_done, len(run.skipped_images))
            stopped_by = _train_one_epoch(cfg, state, loader, steps_per_epoch, accumulate,
                                          stop, checkpoint, log, info, max_steps, progress)
            if stopped_by is not None:
                break
            if (run.step == before[0] and run.samples_done > before[1]
                    and len(run.skipped_images) > before[2]):  # nothing it read was usable
                names = gather_skipped()
                raise DataError(
                    f"epoch {run.epoch + 1} took no optimizer step: no image of "
                    f"{train_set.image_dir} could be read ({len(names)} unreadable, listed in "
                    f"{skipped_file}); fix the images or the annotation file")
            metric = None
            every = cfg.eval_every_epochs
            if val_set is not None and ((every and (run.epoch + 1) % every == 0)
                                        or run.epoch + 1 == cfg.epochs):
                last_eval = _evaluate(cfg, state.ema.module if state.ema else model,  # type: ignore[arg-type]
                                      val_set,
                                      info)
                metric = last_eval.metrics["AP"]
                if info.is_main:
                    thresholds = result_thresholds(last_eval)
                if info.distributed:  # rank 0's AP decides for all: the same stop everywhere
                    metric = dist.all_gather_object(metric)[0]
                early.update(metric, run.epoch + 1)
            record = {"type": "epoch", "epoch": run.epoch + 1, "step": run.step,
                      "time": time.perf_counter() - start,
                      **(dict(last_eval.metrics) if last_eval and metric is not None else {})}
            run.history.append(record)
            if info.is_main:
                log(record)
                if last_eval is not None and metric is not None:
                    print(last_eval.format_table())
            run.epoch += 1
            run.samples_done = 0
            checkpoint(metric)
            if _any_rank(stop.received is not None, info, state.device):
                stopped_by = _signal_name(stop)  # during the evaluation: saved just now
                saved = True
            elif early.triggered and run.epoch < cfg.epochs:  # best.pt has the best weights
                stopped_by, saved = early.reason(evaluations), True
        if stopped_by is not None and not saved:  # a signal or max_steps: keep where we are
            checkpoint()

    skipped = gather_skipped()
    summary = {
        "epochs": run.epoch, "steps": run.step, "seconds": time.perf_counter() - start,
        "skipped_images": len(skipped), "bad_steps": run.bad_steps,
        "skipped_images_file": str(skipped_file) if skipped else None,
        "stopped_by": stopped_by, "best_AP": manager.best_metric,
        "best_epoch": early.best_epoch,
        "metrics": last_eval.metrics if last_eval is not None else None,
        "latest_checkpoint": str(manager.latest()) if info.is_main else None,
    }
    if info.is_main and last_eval is not None and last_eval.detections is not None:
        report = out_dir / REPORT_DIR
        try:
            write_eval_report(report, last_eval)
            print(f"evaluation report (PR curves, confusion matrix, thresholds): {report}")
        except OSError as e:  # the weights are saved: a report that fails loses no work
            warnings.warn(f"could not write the evaluation report to {report}: {e}",
                          stacklevel=1)
    if info.is_main:
        log({"type": "summary", **summary})
        log.close("killed" if stopped_by and stopped_by.startswith("signal") else "finished")
        _print_summary(summary, skipped)
    dist.barrier()  # ranks finish together; a rank leaving alone can abort gloo at exit
    return summary


SKIPPED_FILE = "skipped_images.txt"
"""The run directory's list of unreadable training images, one path per line."""

# fp16: this many optimiser steps in a row of an epoch skipped by the gradient scaler (its
# gradients overflowed at every scale tried) is said, once per epoch; the scaler's first
# steps skip a few.
SCALER_SKIPS_WARNING = 30


def _write_skipped(path: Path, names: list[str], dataset: CocoDetection) -> None:
    text = (f"# {len(names)} image(s) of {dataset.ann_file} could not be read and were "
            "left out of training\n" + "".join(f"{n}\n" for n in names))
    with contextlib.suppress(CheckpointError):  # a full disk: the checkpoint says it
        atomic_write(path, lambda f: f.write(text.encode()), what="list of skipped images")


def _with_data_classes(cfg: TrainConfig, data: CocoDetection) -> TrainConfig:
    """``cfg`` with the class count of the data, which the network is built for. A count
    set on purpose (not the preset's) that disagrees with the data is an error."""
    from dinodet.config import get_preset

    assert cfg.model is not None
    given, found = cfg.model.num_classes, data.num_classes
    if given != found and given != get_preset(cfg.preset).num_classes:
        raise DataError(f"model.num_classes={given} but {data.ann_file} has {found} "
                        f"classes{' (by category id)' if data.keep_category_ids else ''}; "
                        "leave model.num_classes out: it follows the data")
    return dataclasses.replace(cfg, model=cfg.model.replace(num_classes=found))


def _signal_name(stop: _StopSignal) -> str:
    return f"signal {signal.Signals(stop.received).name if stop.received else 'peer'}"


def _train_one_epoch(cfg: TrainConfig, state: TrainState, loader: Any, steps_per_epoch: int,
                     accumulate: int, stop: _StopSignal, checkpoint: Any, log: RunLog,
                     info: dist.DistInfo, max_steps: int | None, progress: bool) -> str | None:
    """Train until the epoch's ``steps_per_epoch`` optimiser steps are done; returns why it
    stopped early, or None. Each step is one window of ``accumulate`` batches (all drawn
    before the first backward, to normalise by the whole window's GT count); a window with
    a non-finite loss is dropped whole."""
    run = state.progress
    window_images = accumulate * cfg.batch_size * info.world_size
    bad_in_a_row = scaler_skips = 0
    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=steps_per_epoch, initial=run.samples_done // window_images,
                   desc=f"epoch {run.epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True)
    tick, images_seen = time.perf_counter(), 0
    losses: dict[str, torch.Tensor] = {}
    batches = iter(loader)
    try:
        while run.samples_done < steps_per_epoch * window_images:
            window = list(itertools.islice(batches, accumulate))
            if len(window) < accumulate:  # cannot happen with drop_last; kept safe
                break
            run.samples_done += window_images
            num_boxes = window_num_boxes(window, state.device)
            for i, batch in enumerate(window):
                run.skipped_images.extend(batch.skipped)
                try:
                    result = train_step(state, batch, accumulate, i == accumulate - 1,
                                        num_boxes)
                except NonFiniteWeightsError as e:
                    raise TrainingStopped(f"{e} (intact in {cfg.out_dir})") from None
                images_seen += len(batch)
                if not result.finite:
                    break
            if bar is not None:
                bar.update(1)
            if not result.finite:
                bad_in_a_row += 1
                warnings.warn(f"non-finite loss or gradient at epoch {run.epoch + 1} step "
                              f"{run.step}: step skipped ({bad_in_a_row} in a row)",
                              stacklevel=2)
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise TrainingStopped(
                        f"{bad_in_a_row} non-finite losses or gradients in a row (learning "
                        f"rate {state.optimizer.param_groups[0]['lr']:.3g}); stopping. The last "
                        f"good checkpoint is intact in {cfg.out_dir}: lower the learning "
                        "rate or check the data, then --resume auto")
                continue
            if result.losses:
                bad_in_a_row = 0
                losses = result.losses
            if result.scaler_skipped:
                scaler_skips += 1
                if scaler_skips == SCALER_SKIPS_WARNING:
                    warnings.warn(
                        f"fp16: the gradient scaler skipped the last {scaler_skips} optimiser "
                        f"steps (gradients overflow; scale now {state.scaler.get_scale():.3g}):"
                        " the weights do not change. Try amp=bf16 or amp=off, or a lower "
                        "learning rate", stacklevel=2)
            elif result.stepped:
                scaler_skips = 0
            if not result.stepped:
                continue
            if (run.step % cfg.log_every == 0 or run.step == 1) and losses:
                now = time.perf_counter()
                speed = images_seen * info.world_size / max(now - tick, 1e-9)
                tick, images_seen = now, 0
                record = {"type": "step", "epoch": run.epoch + 1, "step": run.step,
                          "lr": state.optimizer.param_groups[0]["lr"], "images_per_s": speed,
                          **{k: float(v) for k, v in dist.reduce_dict_mean(losses).items()}}
                if info.is_main:
                    log(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                        img_s=f"{speed:.1f}")
            if cfg.checkpoint_every_steps and run.step % cfg.checkpoint_every_steps == 0:
                checkpoint()
            if _any_rank(stop.received is not None, info, state.device):
                return _signal_name(stop)
            if max_steps is not None and run.step >= max_steps:
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


def _evaluate(cfg: TrainConfig, model: DINO, val_set: CocoDetection,
              info: dist.DistInfo) -> EvalResult:
    loader = build_loader(val_set, cfg.eval_batch_size, False, cfg.data.num_workers,
                          rank=info.rank, world_size=info.world_size)
    result, detections = evaluate(model, loader, info.device, val_set.label_to_category_id,
                                  val_set.coco, num_select=model.cfg.num_select, amp=cfg.amp,
                                  class_names=val_set.class_names)
    result.detections = detections
    return result


REPORT_DIR = "report"
"""The run directory's folder for the last evaluation's report (``dinodet eval --report``'s
files: PR curves, confusion matrix, thresholds), written at the end of training."""


def _print_summary(summary: dict[str, Any], skipped: list[str]) -> None:
    rows = [("epochs", summary["epochs"]), ("optimizer steps", summary["steps"]),
            ("time", f"{summary['seconds'] / 60:.1f} min"),
            ("images skipped (unreadable)", summary["skipped_images"]),
            ("steps skipped (non-finite loss)", summary["bad_steps"])]
    if summary["metrics"]:
        rows += [("AP", f"{summary['metrics']['AP']:.3f}"),
                 ("AP50", f"{summary['metrics']['AP50']:.3f}")]
    if summary["best_AP"] is not None and not math.isnan(summary["best_AP"]):
        epoch = summary.get("best_epoch")
        rows.append(("best AP", f"{summary['best_AP']:.3f}"
                                + (f" (epoch {epoch})" if epoch is not None else "")))
    if summary["stopped_by"]:
        rows.append(("stopped by", summary["stopped_by"]))
    rows.append(("latest checkpoint", summary["latest_checkpoint"]))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if skipped:
        shown = "\n  ".join(skipped[:_SKIPPED_SHOWN])
        more = (f"\n  ... and {len(skipped) - _SKIPPED_SHOWN} more"
                if len(skipped) > _SKIPPED_SHOWN else "")
        print(f"unreadable images left out (all in {summary['skipped_images_file']}):\n"
              f"  {shown}{more}")


_SKIPPED_SHOWN = 10
