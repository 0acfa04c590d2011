"""An exponential moving average of the model's weights (evaluated alongside the model).

After each optimiser step, ``ema = d * ema + (1 - d) * model`` for every floating-point
parameter and buffer; integer buffers (BatchNorm's ``num_batches_tracked``) are copied. The
decay ramps up as ``d_n = decay * (1 - exp(-n / tau))`` after ``n`` updates (``tau`` 2000 by
default, YOLOv5's and RT-DETR's ramp): at first the average follows the model, not the random
initialisation; after ``~5 tau`` updates ``d_n`` is within 1% of ``decay``. ``warmup=False``
uses ``decay`` from the first update.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from dinodet.engine.distributed import unwrap_model

__all__ = ["ModelEMA"]


class ModelEMA:
    """A deep copy of ``model`` in eval mode, updated with :meth:`update` after each step.

    ``model`` may be wrapped in DDP or ``torch.compile``; the copy is of the bare module and
    lives on the same device(s). Use ``ema.module`` for evaluation and checkpoints.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997, warmup: bool = True,
                 tau: float = 2000.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"EMA tau must be > 0, got {tau}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.tau = float(tau)
        self.updates = 0
        self._module = copy.deepcopy(unwrap_model(model)).eval()
        self._module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self._module

    def current_decay(self, updates: int | None = None) -> float:
        """The decay applied at update number ``updates`` (1 = the first update)."""
        n = self.updates if updates is None else updates
        if not self.warmup:
            return self.decay
        return self.decay * (1.0 - math.exp(-n / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        self.updates += 1
        d = self.current_decay()
        current = unwrap_model(model).state_dict()
        for name, avg in self._module.state_dict().items():
            new = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(new.to(device=avg.device, dtype=avg.dtype), 1.0 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self._module.state_dict(), "updates": self.updates,
                "decay": self.decay, "warmup": self.warmup, "tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights and the update count (the decay settings stay as
        constructed, i.e. as the current config says)."""
        self._module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
