"""Batching: pad images to the batch's largest one, and the DataLoader around it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from dinodet.data.coco import Sample, SkippedImage
from dinodet.structures import ImageBatch

__all__ = ["Batch", "build_loader", "collate_fn", "seed_worker"]


def _map_tensors(target: dict[str, Any], fn: Any) -> dict[str, Any]:
    return {k: fn(v) if isinstance(v, Tensor) else v for k, v in target.items()}


@dataclass
class Batch:
    """A padded batch of samples.

    images: ``ImageBatch`` — tensors [B, 3, H, W], mask [B, H, W] True on padding.
    targets: one dict per image (``labels``, ``boxes``, ``image_id``, ``orig_size``, ``size``).
    skipped: paths of images of this batch that could not be read (left out of B).
    B may be 0 when every image was skipped; the training loop should skip such batches.
    """

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
    """Seed Python's and NumPy's generators from the worker's torch seed.

    torch seeds each worker with ``base_seed + worker_id`` (``base_seed`` drawn from
    the loader's generator); the other libraries are not seeded by torch.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader of :class:`Batch` es.

    Training shuffles (reproducibly for a ``seed``), evaluation keeps the dataset's
    order. With ``distributed`` the samples are split over ranks by a
    ``DistributedSampler``: call ``loader.sampler.set_epoch(epoch)`` every epoch so the
    shuffle changes. ``drop_last`` defaults to ``train``.

    Augmentations draw from torch's generator; in worker processes it is seeded from
    ``seed`` (and the rank), with ``num_workers=0`` seed the main process yourself.
    """
    drop_last = train if drop_last is None else drop_last
    rank = torch.distributed.get_rank() if distributed else 0
    generator = torch.Generator().manual_seed(seed + rank)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=drop_last)
    elif train:
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
