"""Batching: pad images to the batch's largest one, and the DataLoader around it."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dinodet.data.coco import Sample, SkippedImage
from dinodet.structures import ImageBatch

__all__ = ["Batch", "EpochSampler", "build_loader", "collate_fn", "seed_worker"]


def _map_tensors(target: dict[str, Any], fn: Any) -> dict[str, Any]:
    return {k: fn(v) if isinstance(v, Tensor) else v for k, v in target.items()}


@dataclass
class Batch:
    """A padded batch: ``images`` (tensors [B, 3, H, W], mask [B, H, W] True on padding),
    one target dict per image (``labels``, ``boxes``, ``image_id``, ``orig_size``,
    ``size``), and the paths of the unreadable images left out (B may be 0)."""

    images: ImageBatch
    targets: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            [_map_tensors(t, move) for t in self.targets],
            list(self.skipped),
        )

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return Batch(
            self.images.pin_memory(),
            [_map_tensors(t, Tensor.pin_memory) for t in self.targets],
            list(self.skipped),
        )


def _empty_images() -> ImageBatch:
    return ImageBatch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.bool))


def collate_fn(samples: Sequence[Sample | SkippedImage | None]) -> Batch:
    """Pad the readable samples into a ``Batch``; list the skipped ones by path.

    ``None`` samples (from other datasets) are dropped silently.
    """
    images, targets, skipped = [], [], []
    for sample in samples:
        if sample is None:
            continue
        if isinstance(sample, SkippedImage):
            skipped.append(sample.path)
            continue
        image, target = sample
        images.append(image)
        targets.append(target)
    batch_images = ImageBatch.from_images(images) if images else _empty_images()
    return Batch(batch_images, targets, skipped)


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy from the worker's torch seed (torch seeds only itself)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _init_worker(worker_id: int) -> None:
    """A loader worker: seeded (:func:`seed_worker`) and deaf to SIGINT / SIGTERM.

    Ctrl-C, ``kill -- -PGID``, SLURM preemption and container runtimes signal every
    process of the group; a worker that died of it would take the main process down
    before it could save. Ignoring them leaves the decision to the main process, which
    shuts its workers down as usual; a worker whose main process is gone exits by itself
    (the DataLoader's watchdog).
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    seed_worker(worker_id)


class EpochSampler(Sampler[int]):
    """This rank's indices of one epoch: shuffled from (``seed``, epoch) or in order, the
    first ``skip`` of that order left out (a resumed run sees exactly the samples it
    missed, whatever the number of ranks before), then split over ``world`` ranks. Without
    ``drop_last`` the order is padded with its first indices so every rank gets as many
    (evaluation drops the repeats)."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_last: bool = False) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw ``epoch``'s order; ``skip``: samples of it (all ranks together) done."""
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        order = order[self.skip:]
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world]
        elif order:
            order += order[: (-len(order)) % self.world]
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 skip_samples: int = 0, drop_last: bool | None = None,
                 collate: Callable[[Sequence[Any]], Any] = collate_fn) -> DataLoader:
    """The DataLoader of training, evaluation and prediction: batches of ``collate`` drawn
    by an :class:`EpochSampler`.

    ``train`` shuffles (from ``seed`` and ``epoch``) and drops the last partial batch
    (unless ``drop_last=False``). ``rank`` / ``world_size`` split the samples;
    ``skip_samples`` (of the epoch's order, all ranks together) resumes part-way. Workers
    are seeded from ``seed``, ``epoch`` and ``rank``; with ``num_workers=0``, seed the main
    process yourself.
    """
    drop_last = train if drop_last is None else drop_last
    sampler = EpochSampler(len(dataset), train, seed, rank, world_size,  # type: ignore[arg-type]
                           drop_last=drop_last)
    sampler.set_epoch(epoch, skip=skip_samples)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_init_worker,
        generator=torch.Generator().manual_seed(seed * 1000 + epoch * 10 + rank),
    )
