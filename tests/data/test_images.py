"""load_image: non-regular files, the pixel limit, 16-bit files decoded alike everywhere."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.data import CocoDetection, SkippedImage, TransformConfig, build_transforms
from dinodet.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    ImageFormatError,
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    load_image,
    resolve_max_pixels,
)
from dinodet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from dinodet.errors import DataError, UserError

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


# -- helpers --------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_bytes(width: int, height: int, depth: int, colour: int, rows=None) -> bytes:
    """A PNG file by hand: IHDR, then (when ``rows`` yields filter-less scanlines) IDAT."""
    head = b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if rows is None:
        return head + _chunk(b"IEND", b"")
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(b"\x00" + row) for row in rows) + packer.flush()
    return head + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG of ``array`` (uint16, HxW grey or HxWx3 RGB); PIL can't write RGB 16."""
    colour = 0 if array.ndim == 2 else 2
    h, w = array.shape[:2]
    rows = (array[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(_png_bytes(w, h, 16, colour, rows))
    return path


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A real, decodable 1-bit PNG of a black image: a few KB even when it is huge."""
    row = bytes((width + 7) // 8)
    path.write_bytes(_png_bytes(width, height, 1, 0, (row for _ in range(height))))
    return path


def write_header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG that declares its size but holds no pixel data: decoding it fails."""
    path.write_bytes(_png_bytes(width, height, 8, 2))
    return path


def _run_guarded(fn, timeout: float = 10.0, unblock: Path | None = None):
    """``fn()`` in a daemon thread: (result or exception, seconds); fails if it blocks.

    A reader stuck in open() of the FIFO ``unblock`` is released by opening its write end.
    """
    out: dict = {}

    def target():
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as e:
            out["value"] = e
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if unblock is not None:
            with contextlib.suppress(OSError):  # OSError: no reader waiting after all
                os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"blocked for more than {timeout} s")
    return out["value"], out["seconds"]


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


# -- non-regular files ----------------------------------------------------------------------


@posix_only
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    err, seconds = _run_guarded(lambda: load_image(fifo), unblock=fifo)
    assert isinstance(err, ImageReadError), err
    assert str(fifo) in str(err) and "is a FIFO (named pipe), not a regular file" in str(err)
    assert seconds < 5


@posix_only
def test_directory_socket_and_device_are_refused(tmp_path):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageReadError, match=r"folder\.jpg: is a directory, not a regular"):
        load_image(folder)

    sock_path = tmp_path / "s.png"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(sock_path))
    except OSError as e:  # e.g. a path over the 108-byte limit of AF_UNIX
        sock.close()
        pytest.skip(f"cannot bind a unix socket here: {e}")
    with sock, pytest.raises(ImageReadError, match=r"s\.png: is a socket, not a regular file"):
        load_image(sock_path)

    if stat.S_ISCHR(os.stat("/dev/zero").st_mode):
        err, _ = _run_guarded(lambda: load_image("/dev/zero"))
        assert isinstance(err, ImageReadError)
        assert "/dev/zero: is a character device, not a regular file" in str(err)


def test_missing_file_and_symlink(tmp_path):
    with pytest.raises(ImageReadError, match=r"image file not found: .*nope\.png") as info:
        load_image(tmp_path / "nope.png")
    assert isinstance(info.value.__cause__, FileNotFoundError)

    Image.fromarray(np.full((4, 5, 3), 77, np.uint8)).save(tmp_path / "real.png")
    link = tmp_path / "link.png"
    try:
        link.symlink_to(tmp_path / "real.png")
    except OSError:
        pytest.skip("no symlinks here")
    assert torch.equal(load_image(link), load_image(tmp_path / "real.png"))


@posix_only
def test_dataset_skips_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "pipe.png"}],
                               "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    ds = CocoDetection(ann, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample, _ = _run_guarded(lambda: ds[0], unblock=tmp_path / "pipe.png")
    assert isinstance(sample, SkippedImage) and "FIFO" in sample.reason

    strict = CocoDetection(ann, tmp_path, strict=True)
    err, _ = _run_guarded(lambda: strict[0], unblock=tmp_path / "pipe.png")
    assert isinstance(err, DataError) and "pipe.png" in str(err) and "FIFO" in str(err)


# -- the pixel limit ------------------------------------------------------------------------


def test_default_limit_is_pils():
    assert DEFAULT_MAX_IMAGE_PIXELS == 89_478_485 == 1024**3 // 4 // 3  # PIL's
    assert resolve_max_pixels() == DEFAULT_MAX_IMAGE_PIXELS
    assert resolve_max_pixels(0) == 0 and resolve_max_pixels(-5) == 0
    assert resolve_max_pixels(np.int64(123)) == 123


@pytest.mark.parametrize("kind", ["decodable", "header_only"])
def test_huge_declared_size_refused_from_the_header(tmp_path, kind):
    path = tmp_path / "bomb.png"
    if kind == "decodable":
        write_blank_png(path, 12000, 12000)
        assert path.stat().st_size < 100_000  # 144 megapixels in a few KB
    else:
        write_header_only_png(path, 12000, 12000)  # decoding it would fail differently
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not fire
        with pytest.raises(ImageTooLargeError) as info:
            load_image(path)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert str(path) in message
    assert "12000x12000 = 144.0 megapixels" in message
    assert "89.5 megapixels (89478485 pixels)" in message
    for how in ("max_pixels", MAX_PIXELS_ENV, "data.max_image_pixels"):
        assert how in message
    assert isinstance(info.value, ImageReadError) and isinstance(info.value, UserError)


def test_limit_refuses_and_raised_limit_opens(tmp_path):
    path = write_blank_png(tmp_path / "big.png", 2000, 2000)
    with pytest.raises(ImageTooLargeError,
                       match=r"2000x2000 = 4\.0 megapixels, over the limit of 1\.0 megapixels"):
        load_image(path, max_pixels=1_000_000)
    for limit in (4_000_000, 0, -1):  # at the limit, no limit
        image = load_image(path, max_pixels=limit)
        assert image.shape == (3, 2000, 2000) and image.dtype == torch.uint8
        assert int(image.max()) == 0


def test_decode_image_reads_a_stream_as_load_image_reads_the_file(tmp_path):
    """The one decoder behind files and uploads: same pixels, the size and limit on the
    error, formats limited on request, the broken image's cause kept."""
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    assert torch.equal(decode_image(io.BytesIO(data), "the upload", 0), load_image(path))
    with pytest.raises(ImageTooLargeError, match="image the upload is 30x40") as info:
        decode_image(io.BytesIO(data), "the upload", 1199)
    assert (info.value.size, info.value.limit) == ((30, 40), 1199)
    with pytest.raises(ImageFormatError, match="cannot identify image file 'the upload'"):
        decode_image(io.BytesIO(data), "the upload", 0, formats=("JPEG",))
    with pytest.raises(ImageFormatError, match="'the upload'"):
        decode_image(io.BytesIO(b"no image"), "the upload", 0)
    with pytest.raises(ImageReadError, match="cannot read image the upload") as broken:
        decode_image(io.BytesIO(data[: len(data) // 2]), "the upload", 0)
    assert not isinstance(broken.value, ImageFormatError) and broken.value.__cause__ is not None


def test_limit_from_the_environment(tmp_path, monkeypatch):
    path = write_blank_png(tmp_path / "big.png", 2000, 2000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000000")
    with pytest.raises(ImageTooLargeError, match=r"limit of 1\.0 megapixels"):
        load_image(path)
    assert load_image(path, max_pixels=0).shape == (3, 2000, 2000)  # the argument wins
    monkeypatch.setenv(MAX_PIXELS_ENV, " 0 ")
    assert load_image(path).shape == (3, 2000, 2000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "")
    assert resolve_max_pixels() == DEFAULT_MAX_IMAGE_PIXELS

    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(UserError, match=rf"{MAX_PIXELS_ENV}='lots' is not an integer") as info:
        load_image(path)
    assert not isinstance(info.value, ImageReadError)  # a setting, not a bad image to skip
    with pytest.raises(UserError, match=MAX_PIXELS_ENV):
        CocoDetection(tmp_path / "never-read.json", tmp_path)  # checked before the json


@pytest.mark.parametrize("bad", ["big", 1.5, True])
def test_max_pixels_argument_must_be_an_integer(tmp_path, bad):
    path = write_blank_png(tmp_path / "a.png", 8, 8)
    with pytest.raises(UserError, match=rf"max_pixels must be an integer .*got {bad!r}"):
        load_image(path, max_pixels=bad)


def test_pils_global_check_does_not_override_ours(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(np.full((100, 100), 200, np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2x: PIL's error
    with pytest.raises(Image.DecompressionBombError), Image.open(path):
        pass  # the premise: PIL alone refuses it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path, max_pixels=20_000)
        assert image.shape == (3, 100, 100) and int(image[0, 0, 0]) == 200
        with pytest.raises(ImageTooLargeError, match="over the limit") as info:
            load_image(path, max_pixels=5000)
    assert "decompression bomb" not in str(info.value).lower()
    assert Image.MAX_IMAGE_PIXELS == 1000  # the global is left as it was

    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(10):
                load_image(path, max_pixels=0)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and Image.MAX_IMAGE_PIXELS == 1000


def test_dataset_passes_the_limit_and_skips_refused_images(tmp_path, monkeypatch):
    write_blank_png(tmp_path / "big.png", 300, 200)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "big.png"}],
                               "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    ds = CocoDetection(ann, tmp_path, max_pixels=50_000)
    assert ds.max_pixels == 50_000
    with pytest.warns(UserWarning, match=r"big\.png: ImageTooLargeError: .*300x200"):
        sample = ds[0]
    assert isinstance(sample, SkippedImage) and "over the limit" in sample.reason
    with pytest.raises(DataError, match=r"big\.png.*over the limit"):
        CocoDetection(ann, tmp_path, strict=True, max_pixels=50_000)[0]
    assert CocoDetection(ann, tmp_path, max_pixels=60_000)[0][0].shape == (3, 200, 300)

    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")  # read once, when the dataset is made
    ds = CocoDetection(ann, tmp_path)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert ds.max_pixels == 1000
    with pytest.warns(UserWarning, match="over the limit"):
        assert isinstance(ds[0], SkippedImage)


# -- 16-bit files ---------------------------------------------------------------------------


def _ramp16(h: int = 40, w: int = 56) -> np.ndarray:
    """uint16 values over the whole range (so clipping at 255 would whiten ~99.6 %)."""
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 65535 // (h * w - 1)).astype(
        np.uint16)


def _write_16bit(tmp_path: Path, kind: str) -> tuple[Path, np.ndarray]:
    grey = _ramp16()
    if kind == "grey":
        path = tmp_path / "grey16.png"
        Image.fromarray(grey).save(path)  # PIL writes I;16 as a 16-bit PNG
        with Image.open(path) as im:
            assert im.mode == "I;16"
        return path, np.broadcast_to(grey, (3, *grey.shape))
    rgb = np.stack([grey, grey[::-1], 65535 - grey], axis=-1)
    return write_png16(tmp_path / "rgb16.png", rgb), rgb.transpose(2, 0, 1)


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_16bit_files_are_scaled_not_clipped(tmp_path, kind):
    path, values16 = _write_16bit(tmp_path, kind)
    image = load_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 56)
    expected = torch.from_numpy(np.rint(values16 / 257.0))
    # grey: exactly v / 257; RGB: PIL keeps the high byte (v >> 8), at most 1 below.
    assert float((image.double() - expected).abs().max()) <= (0 if kind == "grey" else 1)
    assert float((image == 255).double().mean()) < 0.02  # the bug whitened 99.5 %


def test_16bit_arrays_match_the_16bit_file(tmp_path):
    path, values16 = _write_16bit(tmp_path, "grey")
    from_file = load_image(path)
    assert torch.equal(load_image(values16[0].copy()), from_file)  # numpy uint16 HW
    with Image.open(path) as im:
        assert torch.equal(load_image(im), from_file)  # a PIL I;16 image


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_16bit_decoded_alike_in_training_evaluation_and_prediction(tmp_path, kind):
    from dinodet.predict import ImageFiles

    path, _ = _write_16bit(tmp_path, kind)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": path.name}],
                               "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    reference = load_image(path)

    plain, _ = CocoDetection(ann, tmp_path)[0]  # float in [0, 1]
    assert torch.equal((plain * 255).round().to(torch.uint8), reference)

    # Evaluation and prediction: the same EvalTransform of the same decoded image.
    cfg = TransformConfig(eval_size=40, max_size=56)
    evaluated, _ = CocoDetection(ann, tmp_path, transforms=build_transforms(False, cfg))[0]
    eval_transform = EvalTransform(40, 56)
    assert torch.equal(evaluated, eval_transform(reference))
    predicted, meta = ImageFiles([path], eval_transform)[0]
    assert torch.equal(predicted, evaluated) and meta["orig_size"] == (40, 56)

    # Training, with every random step made the identity: flip off, full-image crop, the
    # multi-scale resize to the image's own size; what is left is the normalisation.
    train_cfg = TransformConfig(scales=(40,), max_size=56, crop_resize_scales=(40,),
                                crop_min=56, crop_max=56, eval_size=40, hflip_prob=0.0)
    train_set = CocoDetection(ann, tmp_path, transforms=build_transforms(True, train_cfg))
    for _ in range(4):  # both branches of the random choice
        trained, _ = train_set[0]
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        torch.testing.assert_close(trained * std + mean, reference.float() / 255,
                                   atol=1e-5, rtol=0)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
def test_error_names_the_file_for_undecodable_bytes(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert str(info.value) == f"cannot read image {path}: cannot identify image file {str(path)!r}"
    assert type(info.value.__cause__).__name__ == "UnidentifiedImageError"
