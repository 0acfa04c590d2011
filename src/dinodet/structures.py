"""Padded image batches shared by the data pipeline and the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImageBatch", "to_device"]


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device`` without making the host wait for the GPU where avoidable.

    A plain ``.to("cuda")`` from pageable memory waits for every queued kernel first, so a
    CPU tensor bound for CUDA is staged in pinned memory and copied with
    ``non_blocking=True`` (the caching host allocator keeps the buffer until the copy has
    run: ``tensor`` may change straight away). Anything else is a plain ``.to``.
    """
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda" and tensor.numel() > 0:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class ImageBatch:
    """Images zero-padded at the bottom/right to the batch's largest H and W.

    tensors: [B, 3, H, W]; mask: [B, H, W] bool, True on padding.
    """

    tensors: Tensor
    mask: Tensor

    @classmethod
    def from_images(cls, images: list[Tensor]) -> ImageBatch:
        h = max(im.shape[1] for im in images)
        w = max(im.shape[2] for im in images)
        tensors = images[0].new_zeros(len(images), images[0].shape[0], h, w)
        mask = torch.ones(len(images), h, w, dtype=torch.bool, device=images[0].device)
        for i, im in enumerate(images):
            tensors[i, :, : im.shape[1], : im.shape[2]].copy_(im)
            mask[i, : im.shape[1], : im.shape[2]] = False
        return cls(tensors, mask)

    @classmethod
    def unpadded(cls, tensors: Tensor) -> ImageBatch:
        """A [B, 3, H, W] batch of same-sized images: no copy, an all-False mask."""
        b, _, h, w = tensors.shape
        return cls(tensors, torch.zeros(b, h, w, dtype=torch.bool, device=tensors.device))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(self.tensors.to(device, non_blocking=non_blocking),
                          self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ImageBatch:
        return ImageBatch(self.tensors.pin_memory(), self.mask.pin_memory())

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every image without its padding (Python ints: a device sync when the
        mask is on a GPU; the model's forward never asks for them)."""
        valid = ~self.mask
        hs = valid[:, :, 0].sum(1).tolist()
        ws = valid[:, 0, :].sum(1).tolist()
        return list(zip(hs, ws))

    def __len__(self) -> int:
        return self.tensors.shape[0]
