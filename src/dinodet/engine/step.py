"""One training step and the state it changes, shared by the loop, the benchmark and tests.

:class:`TrainState` holds what a step touches and where the run is; its
:meth:`~TrainState.state_dict` / :meth:`~TrainState.load_state_dict` are the checkpoint
layout, in this one place. :func:`train_step` trains on one batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dinodet.data.collate import Batch
from dinodet.engine import distributed as dist
from dinodet.engine.config import AmpMode, OptimConfig
from dinodet.engine.ema import ModelEMA
from dinodet.engine.evaluate import AMP_DTYPES
from dinodet.engine.optim import build_optimizer, build_scheduler, clip_gradients
from dinodet.loss.criterion import build_criterion
from dinodet.model.dino import DINO
from dinodet.weights import CheckpointError, check_keys

__all__ = ["NonFiniteWeightsError", "Progress", "StepResult", "TrainState", "train_step",
           "window_num_boxes"]


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # optimiser steps so far
    # Images of the current epoch's order already trained on, by all processes together:
    # a whole number of total batches, so a run resumed on another number of processes
    # (same total batch) goes on where it was.
    samples_done: int = 0
    skipped_images: list[str] = field(default_factory=list)
    bad_steps: int = 0  # batches with a non-finite loss, in all
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything :func:`train_step` changes; ``net`` is what the forward pass calls (the
    DDP wrapper of the bare ``model`` in a distributed run)."""

    model: DINO
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None = None
    amp: AmpMode = "off"
    clip_max_norm: float = 0.1
    net: nn.Module | None = None
    progress: Progress = field(default_factory=Progress)
    backward_in_window: int = 0  # batches backpropagated since the last step

    @classmethod
    def create(cls, model: DINO, optim: OptimConfig, steps_per_epoch: int, epochs: int,
               amp: AmpMode = "off", ema_decay: float | None = None) -> TrainState:
        """The recipe's state for ``model`` (on its device): DINO's criterion, AdamW with
        the backbone's learning rate, the per-step schedule, a gradient scaler (fp16) and,
        with ``ema_decay``, an EMA of the weights."""
        optimizer = build_optimizer(model, optim)
        device = next(model.parameters()).device
        return cls(model=model, criterion=build_criterion(model.num_classes),
                   optimizer=optimizer,
                   scheduler=build_scheduler(optimizer, optim, steps_per_epoch, epochs),
                   scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),
                   ema=ModelEMA(model, ema_decay) if ema_decay is not None else None,
                   amp=amp, clip_max_norm=optim.clip_max_norm)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dict(self) -> dict[str, Any]:
        """The training part of a checkpoint (the loop adds RNG states, run config and
        class table), all ``weights_only``-loadable data."""
        p = self.progress
        return {
            "model": self.model.state_dict(), "model_config": self.model.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": p.epoch, "step": p.step, "samples_done": p.samples_done,
            "skipped_images": list(p.skipped_images), "bad_steps": p.bad_steps,
            "history": list(p.history),
        }

    def load_state_dict(self, ckpt: dict[str, Any], where: str = "checkpoint") -> list[str]:
        """Continue from :meth:`state_dict`'s output (read from ``where``).

        A file that is not such a checkpoint, or whose model or optimiser does not fit
        this run's, is a :class:`~dinodet.weights.CheckpointError` naming it and what
        differs, raised before anything is changed. The optimiser settings of this run
        (``lr``, ``lr_backbone``, weight decay, betas: the command's) replace the saved
        ones, while the schedule's position and shape are the checkpoint's. Returns a line
        per setting that changed so.
        """
        _check_resumable(self, ckpt, where)
        fresh = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")}
                 for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"--resume {where} does not fit this run: {first[:300]}"
                                  ) from e
        changed = []
        factor = self.scheduler.lr_lambdas[0]
        for i, (group, settings) in enumerate(zip(self.optimizer.param_groups, fresh)):
            name = "lr" if i == 0 else f"lr of parameter group {i}"
            if not math.isclose(self.scheduler.base_lrs[i], base_lrs[i], rel_tol=1e-9):
                changed.append(f"{name}: {self.scheduler.base_lrs[i]:g} in the checkpoint, "
                               f"{base_lrs[i]:g} now")
            for key, value in settings.items():
                if key != "lr" and group.get(key) != value:
                    if key in ("weight_decay", "betas", "eps"):
                            changed.append(f"{key} of parameter group {i}: {group.get(key)} in "
                                       f"the checkpoint, {value} now")
                    group[key] = value
            group["initial_lr"] = base_lrs[i]
            group["lr"] = base_lrs[i] * factor(self.scheduler.last_epoch)
        self.scheduler.base_lrs = base_lrs
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.progress = Progress(ckpt["epoch"], ckpt["step"], ckpt["samples_done"],
                                 list(ckpt.get("skipped_images", [])),
                                 ckpt.get("bad_steps", 0), list(ckpt.get("history", [])))
        return changed


_RESUME_KEYS = ("model", "model_config", "optimizer", "scheduler", "scaler", "epoch", "step",
                "samples_done")


def _check_resumable(state: TrainState, ckpt: Any, where: str) -> None:
    """Refuse, naming the file, a checkpoint this run cannot continue from."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(
            f"--resume {where} is not a dinodet training checkpoint (no model, optimizer "
            "and schedule state); to start from its weights use --init instead")
    missing = [k for k in _RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {where} is not a complete dinodet training "
                              f"checkpoint: it lacks {', '.join(missing)}; to start from "
                              "its weights use --init instead")
    check_keys(state.model.state_dict(), ckpt["model"], f"--resume {where}",
               "the network of this run (another preset or model setting?)")
    groups = (ckpt["optimizer"] or {}).get("param_groups") if isinstance(
        ckpt["optimizer"], dict) else None
    own = state.optimizer.param_groups
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in own]:
        raise CheckpointError(f"--resume {where}: its optimizer state does not fit this "
                              "run's parameter groups (the model or which parts train "
                              "differ)")


@dataclass
class StepResult:
    """What one :func:`train_step` did: the detached loss terms (empty for a batch of
    unreadable images only), whether the loss was finite on every rank, whether the
    optimiser stepped, and whether fp16's gradient scaler skipped the step (overflow)."""

    losses: dict[str, Tensor]
    finite: bool
    stepped: bool
    scaler_skipped: bool = False


def _to_float(outputs: Any) -> Any:
    """Losses run in float32: cast half-precision outputs (nested dicts and lists) up."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float(v) for v in outputs]
    return outputs


def train_step(state: TrainState, batch: Batch, window: int = 1,
               closes_window: bool = True, num_boxes: float | Tensor | None = None
               ) -> StepResult:
    """Forward (autocast), losses (float32) and backward of one batch, the loss divided
    by ``window``, the batch count of its gradient-accumulation window. With
    ``num_boxes``, the window's GT count per batch and process (:func:`window_num_boxes`),
    the window's gradient is that of one batch of all its images; without, each batch is
    normalised by its own count. When ``closes_window``: unscale, clip, step, zero the
    gradients, step the schedule and the EMA (DDP all-reduces on that batch only).

    A non-finite loss on any rank drops the window's gradients and takes no step. Under
    fp16, a step whose scaled gradients overflow is skipped by the scaler (which lowers its
    scale): ``stepped`` is False and nothing else moves.
    """
    net = state.net if state.net is not None else state.model
    net.train()
    losses: dict[str, Tensor] = {}
    if len(batch):
        device = state.device
        batch = batch.to(device, non_blocking=True)
        hold_sync = isinstance(net, nn.parallel.DistributedDataParallel) and not closes_window
        amp_dtype = AMP_DTYPES[state.amp]
        with net.no_sync() if hold_sync else contextlib.nullcontext():  # type: ignore[operator]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                outputs = net(batch.images, batch.targets)
            terms = state.criterion(_to_float(outputs), batch.targets, num_boxes)
            loss = terms["loss"]
            finite = torch.isfinite(loss.detach()).float()
            if dist.world_size() > 1:  # every rank skips if any rank saw a NaN
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            losses = {k: v.detach() for k, v in terms.items()}
            if finite.item() < 1:
                state.optimizer.zero_grad(set_to_none=True)
                state.progress.bad_steps += 1
                state.backward_in_window = 0
                return StepResult(losses, False, False)
            state.scaler.scale(loss / window).backward()
            state.backward_in_window += 1
    if not closes_window or not state.backward_in_window:  # nothing to step on: no step
        return StepResult(losses, True, False)
    state.backward_in_window = 0
    state.scaler.unscale_(state.optimizer)
    norm = clip_gradients(state.model, state.clip_max_norm)
    if not state.scaler.is_enabled():  # fp16's scaler skips non-finite gradients itself
        if norm is None:
            norm = _grad_norm(state.model)
        if not bool(torch.isfinite(norm)):  # the same on every rank: grads are all-reduced
            state.optimizer.zero_grad(set_to_none=True)
            state.progress.bad_steps += 1
            return StepResult(losses, False, False)
    scale = state.scaler.get_scale() if state.scaler.is_enabled() else 0.0
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler.is_enabled() and state.scaler.get_scale() < scale:
        # fp16: the scaled gradients overflowed, so the scaler skipped the optimiser step
        # and lowered its scale (the first steps find the scale this way). The weights
        # are as they were: no schedule, EMA or step count moves; not a bad step.
        return StepResult(losses, True, False, scaler_skipped=True)
    if not _weights_finite(state.model):
        raise NonFiniteWeightsError(
            f"the weights became non-finite at optimizer step {state.progress.step + 1} "
            f"(learning rate {state.optimizer.param_groups[0]['lr']:.3g}); they are not "
            "saved. Lower optim.lr, then --resume auto from the last good checkpoint")
    state.scheduler.step()
    state.progress.step += 1
    if state.ema is not None:
        state.ema.update(state.model)
    return StepResult(losses, True, True)


class NonFiniteWeightsError(RuntimeError):
    """An optimiser step left NaN or inf in the weights: training cannot go on."""


def _grad_norm(model: nn.Module) -> Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite: one fused norm per device, one sync."""
    params = [p.detach() for p in model.parameters()]
    norms = torch.stack([n.float() for n in torch._foreach_norm(params, float("inf"))])
    return bool(torch.isfinite(norms).all())


def window_num_boxes(batches: list[Batch], device: torch.device) -> float | Tensor:
    """The loss normaliser of one accumulation window: its GT boxes on all processes,
    divided by its batches and the processes (at least 1). Each batch's loss divided by it
    and by the window, then averaged over processes by DDP, sums to the window's loss per
    GT box: the loss of one batch of the window's images."""
    local = float(sum(len(t["labels"]) for b in batches for t in b.targets))
    per_batch = max(len(batches), 1)
    if dist.world_size() > 1:
        count = torch.full((1,), local, device=device)
        torch.distributed.all_reduce(count)
        return (count[0] / (per_batch * dist.world_size())).clamp(min=1.0)
    return max(local / per_batch, 1.0)
