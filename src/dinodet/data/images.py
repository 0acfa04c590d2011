"""Images in every common form -> RGB uint8 [3, H, W]: files (EXIF upright), PIL (grey,
RGBA, palette, 16-bit), numpy HWC / HW, CHW tensors; the one reader of the dataset, the
Detector and the demo."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dinodet.errors import UserError

__all__ = ["IMAGE_EXTENSIONS", "ImageInput", "ImageReadError", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


class ImageReadError(UserError):
    """An image file that is missing or cannot be decoded."""


def _from_pil(im: Image.Image) -> Tensor:
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit / 32-bit greyscale: scale the value range to 8 bits, don't clip it.
        arr = np.asarray(im)
        if im.mode == "F":
            arr = arr * 255.0 if arr.size and float(arr.max()) <= 1.0 else arr
        elif arr.dtype.itemsize > 1 or (arr.size and int(arr.max()) > 255):
            arr = arr.astype(np.float64) / 257.0
        return _from_numpy(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_uint8(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    if x.is_floating_point():  # values in [0, 1]
        return (x.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    if x.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16):
        return (x.double() / 257).round_().clamp_(0, 255).to(torch.uint8)
    raise TypeError(f"unsupported image dtype {x.dtype}")


def _from_numpy(arr: np.ndarray) -> Tensor:
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        hwc = arr
    elif arr.ndim == 2:
        hwc = arr[:, :, None]
    else:
        raise ValueError(f"a numpy image must be HxW or HxWxC with C in 1, 3, 4; "
                         f"got shape {arr.shape}")
    if arr.dtype == np.uint16:
        hwc = hwc.astype(np.int32)
    elif arr.dtype not in (np.uint8, np.bool_) and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"unsupported numpy image dtype {arr.dtype} "
                        "(use uint8, uint16 or float in [0, 1])")
    return _from_chw(torch.from_numpy(np.array(hwc)).permute(2, 0, 1))  # a writable copy


def _from_chw(x: Tensor) -> Tensor:
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        hint = " (give a list of images, not a batch tensor)" if x.ndim == 4 else ""
        raise ValueError(f"an image tensor must be [3, H, W] (or [1|4, H, W], [H, W]); "
                         f"got shape {tuple(x.shape)}{hint}")
    x = _to_uint8(x.detach().cpu())
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3].contiguous()


def load_image(image: ImageInput) -> Tensor:
    """Any supported image form -> RGB uint8 [3, H, W] (upright for EXIF-rotated files).

    Tensors are CHW, uint8 0-255 or float 0-1; numpy arrays are HWC or HW, uint8.
    Raises ImageReadError for a file that is missing or cannot be decoded.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
            raise ImageReadError(f"image file not found: {path}") from missing
        try:
            with Image.open(path) as im:
                im.load()
                return _from_pil(im)
        except Exception as e:  # decoders raise many types (OSError, SyntaxError, ...)
            raise ImageReadError(f"cannot read image {path}: {e}") from e
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_numpy(image)
    if isinstance(image, Tensor):
        return _from_chw(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, a PIL "
                    "image, a numpy array or a [3, H, W] tensor")
