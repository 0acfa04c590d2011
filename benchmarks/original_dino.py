"""The authors' DINO code base, built on a CPU, to time next to dinodet.

Point ``root`` at a checkout of https://github.com/IDEA-Research/DINO (nothing of it is
vendored here). It needs the original's own imports installed (``pip install addict yapf
termcolor timm``), but not its compiled extension: the module name
``MultiScaleDeformableAttention`` is registered empty, and the attention module's
autograd function is replaced by the checkout's own pure-PyTorch sampling routine
(``ms_deform_attn_core_pytorch``: one ``grid_sample`` per level), which is what the
original runs without its CUDA kernel. Its training code calls ``.cuda()`` on new tensors;
:func:`on_cpu` keeps them on the CPU while it runs.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["build_original", "on_cpu"]


class _Namespace(types.SimpleNamespace):
    """The original reads its settings as attributes and tests them with ``in``."""

    def __contains__(self, key: str) -> bool:
        return hasattr(self, key)


def _import_checkout(root: Path) -> None:
    if not (root / "models" / "dino" / "dino.py").is_file():
        raise FileNotFoundError(f"{root} is not a checkout of IDEA-Research/DINO "
                                "(no models/dino/dino.py)")
    sys.modules.setdefault("MultiScaleDeformableAttention",
                           types.ModuleType("MultiScaleDeformableAttention"))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import models.dino.ops.modules.ms_deform_attn as attention_module
    from models.dino.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch

    class PurePyTorch:
        """Stands in for the extension's autograd function, with its call signature."""

        @staticmethod
        def apply(value: Any, shapes: Any, level_start: Any, locations: Any,
                  weights: Any, im2col_step: Any) -> Any:
            return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    attention_module.MSDeformAttnFunction = PurePyTorch


def _is_cuda(device: Any) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (
        isinstance(device, torch.device) and device.type == "cuda")


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """While active, ``Tensor.cuda()`` and ``Tensor.to("cuda")`` leave a tensor on the CPU
    (the original's training code moves the tensors it creates to CUDA unconditionally)."""
    saved_cuda, saved_to = torch.Tensor.cuda, torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return saved_to(self, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = saved_cuda, saved_to  # type: ignore[method-assign]


def build_original(root: str | Path, config: str = "DINO_4scale") -> tuple[nn.Module, nn.Module]:
    """The original's model and criterion for ``config/DINO/<config>.py`` (COCO's 91
    classes), randomly initialised, on the CPU. Returns (model, criterion); the criterion
    carries the loss weights as ``weight_dict``."""
    root = Path(root).resolve()
    _import_checkout(root)
    import models.dino.backbone as backbone
    from models.dino.dino import build_dino
    from util.slconfig import SLConfig

    backbone.is_main_process = lambda: False  # no ImageNet weights to download
    cfg = SLConfig.fromfile(str(root / "config" / "DINO" / f"{config}.py"))
    args = _Namespace(**cfg._cfg_dict.to_dict())
    args.device, args.dataset_file = "cpu", "coco"
    with on_cpu():
        model, criterion, _ = build_dino(args)
    return model, criterion
