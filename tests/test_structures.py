"""ImageBatch padding and masks, device moves, and to_device."""

from __future__ import annotations

import torch

from dinodet.structures import ImageBatch, to_device


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # Strictly positive pixels, so a zero in the batch can only be padding.
    return [torch.rand(3, 4, 6, generator=gen) + 1.0,
            torch.rand(3, 5, 3, generator=gen) + 1.0,
            torch.rand(3, 2, 2, generator=gen) + 1.0]


def test_from_images_pads_bottom_right_with_zeros_and_copies_pixels():
    images = _images()
    batch = ImageBatch.from_images(images)
    assert batch.tensors.shape == (3, 3, 5, 6)
    assert batch.mask.shape == (3, 5, 6)
    assert batch.tensors.dtype == images[0].dtype
    assert batch.mask.dtype == torch.bool
    for i, im in enumerate(images):
        _, h, w = im.shape
        torch.testing.assert_close(batch.tensors[i, :, :h, :w], im, rtol=0, atol=0)
        # Everything below and to the right of the image is zero.
        assert (batch.tensors[i, :, h:, :] == 0).all()
        assert (batch.tensors[i, :, :, w:] == 0).all()
        expected = torch.ones(5, 6, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(batch.mask[i], expected)
    # The mask is True exactly where the (positive) image has no pixel.
    assert torch.equal(batch.mask, (batch.tensors == 0).all(1))


def test_from_images_copies_instead_of_aliasing():
    images = _images()
    batch = ImageBatch.from_images(images)
    before = images[0].clone()
    batch.tensors[0].zero_()
    torch.testing.assert_close(images[0], before, rtol=0, atol=0)


def test_from_images_same_size_has_no_padding():
    images = [torch.full((3, 2, 3), float(i + 1)) for i in range(2)]
    batch = ImageBatch.from_images(images)
    assert not batch.mask.any()
    torch.testing.assert_close(batch.tensors, torch.stack(images), rtol=0, atol=0)


def test_from_images_keeps_integer_dtype():
    images = [torch.full((3, 2, 2), 7, dtype=torch.uint8), torch.full((3, 1, 3), 9,
                                                                         dtype=torch.uint8)]
    batch = ImageBatch.from_images(images)
    assert batch.tensors.dtype == torch.uint8
    expected = torch.tensor([[[7, 7, 0], [7, 7, 0]], [[9, 9, 9], [0, 0, 0]]], dtype=torch.uint8)
    assert torch.equal(batch.tensors[:, 0], expected)


def test_image_sizes_are_height_width_per_image():
    batch = ImageBatch.from_images(_images())
    sizes = batch.image_sizes
    assert sizes == [(4, 6), (5, 3), (2, 2)]
    assert all(isinstance(v, int) for hw in sizes for v in hw)


def test_unpadded_shares_storage_and_has_false_mask():
    tensors = torch.randn(2, 3, 4, 5)
    batch = ImageBatch.unpadded(tensors)
    assert batch.tensors is tensors
    assert batch.mask.shape == (2, 4, 5)
    assert batch.mask.dtype == torch.bool
    assert not batch.mask.any()
    assert batch.image_sizes == [(4, 5), (4, 5)]


def test_len_is_batch_size():
    assert len(ImageBatch.from_images(_images())) == 3
    assert len(ImageBatch.unpadded(torch.zeros(5, 3, 2, 2))) == 5


def test_to_cpu_and_pin_memory_keep_values():
    batch = ImageBatch.from_images(_images())
    moved = batch.to("cpu")
    assert isinstance(moved, ImageBatch)
    assert moved.tensors.device.type == "cpu" and moved.mask.device.type == "cpu"
    torch.testing.assert_close(moved.tensors, batch.tensors, rtol=0, atol=0)
    assert torch.equal(moved.mask, batch.mask)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    torch.testing.assert_close(moved.tensors, batch.tensors, rtol=0, atol=0)
    if torch.cuda.is_available():  # pinning needs a CUDA runtime
        pinned = batch.pin_memory()
        assert pinned.tensors.is_pinned() and pinned.mask.is_pinned()
        torch.testing.assert_close(pinned.tensors, batch.tensors, rtol=0, atol=0)
        assert torch.equal(pinned.mask, batch.mask)
        on_gpu = batch.to("cuda")
        assert on_gpu.tensors.is_cuda and on_gpu.mask.is_cuda
        assert on_gpu.image_sizes == batch.image_sizes


def test_to_device_cpu_returns_equal_values_and_leaves_source_intact():
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    before = src.clone()
    out = to_device(src, "cpu")
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    torch.testing.assert_close(src, before, rtol=0, atol=0)
    out = to_device(src, torch.device("cpu"))
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    empty = to_device(torch.zeros(0, 4), "cpu")
    assert empty.shape == (0, 4)
    if torch.cuda.is_available():
        gpu = to_device(src, "cuda")
        src.fill_(-1.0)  # the staging buffer is not reused before the copy has run
        torch.testing.assert_close(gpu.cpu(), before, rtol=0, atol=0)
