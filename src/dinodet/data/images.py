"""Images in every common form -> RGB uint8 [3, H, W]: files (EXIF upright), PIL (grey,
RGBA, palette, 16-bit), numpy HWC / HW, CHW tensors; the one reader of the dataset, the
Detector and the demo, so training, evaluation and prediction decode a file identically.

16-bit and 32-bit images are scaled to 8 bits (``v / 257``), never clipped. A file must be a
regular file (a FIFO, device, socket or directory is refused before it is opened, so nothing
blocks), and its declared size must be within a pixel limit, checked from the header before
any pixel is decoded: ``max_pixels`` of :func:`load_image`, else the environment variable
``DINODET_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS` (PIL's own default);
0 or less means no limit. This check replaces PIL's global ``Image.MAX_IMAGE_PIXELS`` one
while a file is read, so a raised limit works above PIL's threshold too.
"""

from __future__ import annotations

import contextlib
import operator
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from dinodet.errors import UserError

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_EXTENSIONS", "MAX_PIXELS_ENV", "ImageFormatError",
           "ImageInput", "ImageReadError", "ImageTooLargeError", "decode_image", "load_image",
           "resolve_max_pixels"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: The default pixel limit of a decoded file: PIL's default ``Image.MAX_IMAGE_PIXELS``
#: (1024**3 // 4 // 3, about 89.5 megapixels: a 3-byte-per-pixel image of 256 MiB).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
#: The environment variable that sets the pixel limit when ``max_pixels`` is None.
MAX_PIXELS_ENV = "DINODET_MAX_IMAGE_PIXELS"
_HOW_TO_RAISE = (f"raise it with load_image(..., max_pixels=N), the environment variable "
                 f"{MAX_PIXELS_ENV}=N or the setting data.max_image_pixels (0 = no limit)")

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


class ImageReadError(UserError):
    """An image file that is missing, not a regular file, too large or cannot be decoded."""


class ImageFormatError(ImageReadError):
    """Bytes in none of the image formats that could be read (PIL identifies none)."""


class ImageTooLargeError(ImageReadError):
    """An image whose declared size is over the pixel limit (nothing was decoded):
    ``size`` is its (width, height), ``limit`` the limit in pixels."""

    def __init__(self, message: str, size: tuple[int, int], limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels``, else ``$DINODET_MAX_IMAGE_PIXELS`` (when set
    and not empty), else :data:`DEFAULT_MAX_IMAGE_PIXELS`; 0 means no limit (so does any
    value <= 0). Raises :class:`~dinodet.errors.UserError` for a value that is no integer."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"environment variable {MAX_PIXELS_ENV}={text!r} is not an "
                            "integer (a number of pixels; 0 = no limit)") from None
    else:
        try:
            if isinstance(max_pixels, bool):
                raise TypeError
            value = operator.index(max_pixels)
        except TypeError:
            raise UserError(f"max_pixels must be an integer number of pixels (0 = no limit) "
                            f"or None, got {max_pixels!r}") from None
    return max(value, 0)


def _kind(mode: int) -> str:
    """What a non-regular file is, for the error message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _not_regular(path: Path, mode: int) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: is {_kind(mode)}, not a regular file")


def _open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading, refused with ImageReadError unless it is a regular file.

    ``stat`` comes first, so a FIFO or device is never opened; the descriptor is opened
    non-blocking and checked again, so a file swapped for a FIFO in between can't block
    either.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise ImageReadError(f"image file not found: {path}") from e
    except (OSError, ValueError) as e:  # permission, a path through a file, a NUL byte ...
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX only, as O_NOCTTY
    flags = os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:  # removed since the stat
        raise ImageReadError(f"image file not found: {path}") from e
    except OSError as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_pil_lock = threading.Lock()
_pil_readers = 0
_pil_saved: int | None = None


@contextlib.contextmanager
def _own_size_check() -> Iterator[None]:
    """PIL's global decompression-bomb check off while any :func:`load_image` reads a file
    (its size check replaces it), then ``Image.MAX_IMAGE_PIXELS`` back as it was.

    Counted, so concurrent readers in threads share one save and restore; a value that
    someone else set meanwhile is left alone.
    """
    global _pil_readers, _pil_saved
    with _pil_lock:
        if _pil_readers == 0:
            _pil_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pil_readers += 1
    try:
        yield
    finally:
        with _pil_lock:
            _pil_readers -= 1
            if _pil_readers == 0 and Image.MAX_IMAGE_PIXELS is None:
                Image.MAX_IMAGE_PIXELS = _pil_saved


def decode_image(stream: IO[bytes], name: str | Path, limit: int,
                 formats: Sequence[str] | None = None) -> Tensor:
    """An open binary stream's image -> RGB uint8 [3, H, W], upright, the way
    :func:`load_image` decodes a file (it calls this): the header's width x height is checked
    against ``limit`` (> 0; 0 or less: none) before any pixel is decoded, with PIL's global
    check off meanwhile. ``name`` (a path, "the upload") names the image in the errors;
    ``formats`` limits the formats tried (PIL's names, e.g. ``("JPEG", "PNG")``).

    Raises :class:`ImageFormatError` for bytes in none of the formats,
    :class:`ImageTooLargeError` over the limit and :class:`ImageReadError` for a broken
    image; each keeps PIL's exception as its ``__cause__``.
    """
    with _own_size_check():
        try:
            im = Image.open(stream, formats=None if formats is None else tuple(formats))
        except UnidentifiedImageError as e:  # PIL's message names the stream object
            named = UnidentifiedImageError(f"cannot identify image file {str(name)!r}")
            named.__cause__ = e
            raise ImageFormatError(f"cannot read image {name}: {named}") from named
        except Exception as e:  # decoders raise many types (OSError, SyntaxError, ...)
            raise ImageReadError(f"cannot read image {name}: {e}") from e
        with im:
            width, height = im.size
            pixels = width * height
            if limit > 0 and pixels > limit:
                raise ImageTooLargeError(
                    f"image {name} is {width}x{height} = {pixels / 1e6:.1f} megapixels, over "
                    f"the limit of {limit / 1e6:.1f} megapixels ({limit} pixels); "
                    f"{_HOW_TO_RAISE}", (width, height), limit)
            try:
                im.load()
                return _from_pil(im)
            except Exception as e:
                raise ImageReadError(f"cannot read image {name}: {e}") from e


def _read_file(path: Path, limit: int) -> Tensor:
    with _open_regular(path) as f:
        return decode_image(f, path, limit)


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


def load_image(image: ImageInput, max_pixels: int | None = None) -> Tensor:
    """Any supported image form -> RGB uint8 [3, H, W] (upright for EXIF-rotated files).

    Tensors are CHW, uint8 0-255 or float 0-1; numpy arrays are HWC or HW, uint8.
    ``max_pixels`` limits the declared width x height of a *file* (see
    :func:`resolve_max_pixels`: None takes ``$DINODET_MAX_IMAGE_PIXELS`` or the default,
    0 or less no limit); images already in memory are not limited.
    Raises ImageReadError for a file that is missing, not a regular file or cannot be
    decoded, ImageTooLargeError (an ImageReadError) for one over the limit.
    """
    if isinstance(image, (str, Path)):
        return _read_file(Path(image), resolve_max_pixels(max_pixels))
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_numpy(image)
    if isinstance(image, Tensor):
        return _from_chw(image)
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, a PIL "
                    "image, a numpy array or a [3, H, W] tensor")
