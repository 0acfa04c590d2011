"""AdamW with a backbone learning rate, the iteration-based LR schedule, gradient clipping.

The recipe (the spec's "Training recipe"): AdamW, lr 1e-4 for the transformer and heads,
1e-5 for the backbone, weight decay 1e-4 on every parameter (norms and biases included, as
in the original), lr x0.1 after epoch 11 of 12, gradient-norm clip 0.1. The schedule is a
``LambdaLR`` stepped per optimiser step, so warm-up and cosine are smooth within an epoch
and a run resumed mid-epoch gets exactly the same learning rates. Its factor is an object
(:class:`LRFactor`), not a closure: ``LambdaLR.state_dict()`` stores its attributes, plain
numbers that ``weights_only`` loading accepts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dinodet.engine.config import OptimConfig
from dinodet.engine.distributed import unwrap_model

__all__ = ["LRFactor", "build_optimizer", "build_scheduler", "clip_gradients",
           "param_groups"]

BACKBONE_PREFIX = "backbone."


def param_groups(model: nn.Module, lr: float, lr_backbone: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``backbone.*`` parameters at ``lr_backbone``, the rest at ``lr``.

    Only ``requires_grad`` parameters; empty groups are left out. Each group has a ``"name"``
    (``"backbone"`` / ``"transformer"``) for logging. DDP / ``torch.compile`` wrappers are
    removed first so the names match.
    """
    backbone: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith(BACKBONE_PREFIX) else rest).append(p)
    groups = [
        {"name": "transformer", "params": rest, "lr": lr, "weight_decay": weight_decay},
        {"name": "backbone", "params": backbone, "lr": lr_backbone,
         "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel when every parameter is on CUDA."""
    groups = param_groups(model, cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no parameters that require gradients")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                             weight_decay=cfg.weight_decay, fused=fused or None)


class LRFactor:
    """The learning-rate multiplier for optimiser step ``i`` (0-based), picklable by value.

    Linear warm-up from ``warmup_start`` x over ``warmup_steps`` steps, times the schedule:

    - ``"step"``: ``gamma`` from epoch ``milestones[0]`` on;
    - ``"multistep"``: ``gamma ** (number of milestones reached)``;
    - ``"cosine"``: from 1 down to ``min_lr_ratio`` over the steps after warm-up.

    Epoch ``e`` starts at step ``e * steps_per_epoch``.
    """

    def __init__(self, schedule: str, steps_per_epoch: int, total_steps: int,
                 milestones: Iterable[int] = (), gamma: float = 0.1, warmup_steps: int = 0,
                 min_lr_ratio: float = 0.0, warmup_start: float = 0.001) -> None:
        if schedule not in ("step", "multistep", "cosine"):
            raise ValueError(f"unknown schedule {schedule!r}; use step, multistep or cosine")
        if steps_per_epoch < 1 or total_steps < 1:
            raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and total_steps "
                             f"({total_steps}) must be >= 1")
        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(total_steps)
        self.milestones = [int(m) for m in milestones]
        if schedule == "step":
            self.milestones = self.milestones[:1]
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup_start = float(warmup_start)

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.decay(step)

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps

    def decay(self, step: int) -> float:
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine
        epoch = step // self.steps_per_epoch
        return self.gamma ** sum(epoch >= m for m in self.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-optimiser-step schedule of ``cfg`` (call ``scheduler.step()`` after each
    ``optimizer.step()``); ``steps_per_epoch`` counts optimiser steps, i.e. total batches
    (``TrainConfig.total_batch_size``) of an epoch.

    To resume, build it the same way, then ``load_state_dict`` the optimiser and scheduler:
    this also restores the saved :class:`LRFactor` (schedule, steps, milestones), so a resumed
    run keeps its schedule even if the epochs changed since.
    """
    factor = LRFactor(cfg.schedule, steps_per_epoch, steps_per_epoch * epochs,
                      milestones=cfg.lr_drop_epochs, gamma=cfg.gamma,
                      warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(model_or_params: nn.Module | Iterable[torch.Tensor],
                   max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm to ``max_norm``; returns the norm before clipping
    (non-finite returned, not raised, so the caller can skip the step), or ``None`` untouched
    when ``max_norm <= 0``. With fp16 AMP, call ``scaler.unscale_(optimizer)`` first."""
    if max_norm <= 0:
        return None
    source = (model_or_params.parameters() if isinstance(model_or_params, nn.Module)
              else model_or_params)
    params: list[torch.Tensor] = [p for p in source if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
