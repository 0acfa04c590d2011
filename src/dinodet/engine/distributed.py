"""Distributed training under ``torchrun`` (``init_distributed`` reads RANK / WORLD_SIZE /
LOCAL_RANK; ``cleanup`` leaves the group), seeding and scoped determinism. Every helper
works in a single process too: collectives become identities, ``is_main()`` is true.
Nothing here overrides ``print``: callers log with ``if is_main(): ...``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dinodet.errors import UserError

__all__ = ["DistInfo", "all_gather_object", "all_reduce_mean", "barrier", "cleanup",
           "deterministic_algorithms", "init_distributed", "is_main", "rank", "reduce_dict_mean",
           "resolve_device", "seed_everything", "unwrap_model", "world_size"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global ``rank`` of ``world_size``, its ``local_rank``
    on the node, the ``device`` it should use, and whether it is the main (rank 0) one."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ``"cuda"`` ->
    ``cuda:<local_rank>``; anything else as ``torch.device`` reads it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    except RuntimeError as e:
        raise UserError(f"device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = dev.index or 0
        if index >= count:
            have = f"only {count} CUDA device(s)" if count else "no CUDA device"
            raise UserError(f"device: {device!r} (process {local_rank}) asks for "
                            f"cuda:{index}, but this machine has {have}; use device=cpu "
                            "or auto")
    elif dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise UserError(f"device: {device!r}, but MPS is not available on this machine")
    return dev


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    With ``WORLD_SIZE`` unset (or 1) this is a single process and no group is created. The
    backend is NCCL when this process uses a CUDA device (``device="auto"`` with CUDA
    available), else Gloo; each process uses ``cuda:<LOCAL_RANK>``. Calling it again in a
    process whose group already exists reuses that group.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(0, 1, 0, resolve_device(device), True)
    global_rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set "
                                   "(launch with torchrun, which sets it)")
        dist.init_process_group(
            backend=backend or ("nccl" if dev.type == "cuda" else "gloo"),
            init_method="env://",
            rank=global_rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(global_rank, world, local_rank, dev, global_rank == 0)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if not _active() or world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all processes, as a new detached floating-point tensor
    (``tensor`` itself is not changed). With NCCL it must be on this process's GPU."""
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if _active() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= world_size()
    return out


def reduce_dict_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average a dict of scalar tensors (e.g. loss terms) over processes in one collective.

    Every process must pass the same keys.
    """
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().reshape(()).float() for k in keys])
    mean = all_reduce_mean(stacked)
    return {k: mean[i] for i, k in enumerate(keys)}


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects); ``[obj]`` in one process."""
    if not _active() or world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    """Leave the process group, if there is one."""
    if _active():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed + rank``; returns it.

    Each process gets its own seed so that random augmentation differs between ranks.
    Deterministic kernels are a separate, scoped choice: :func:`deterministic_algorithms`.
    """
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Deterministic kernels inside the block, everything as it was after it (nothing
    changes when ``enabled`` is false): ``CUBLAS_WORKSPACE_CONFIG`` if unset,
    ``use_deterministic_algorithms(True, warn_only=True)`` (ops without a deterministic
    version warn), cuDNN deterministic, no cuDNN benchmarking."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
             cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
