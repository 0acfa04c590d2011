"""A detection dataset read into COCO format in memory, and what its readers share.

:class:`DatasetSource` is what the YOLO and Pascal VOC readers (:mod:`dinodet.data.yolo`,
:mod:`dinodet.data.voc`) give: a COCO-format dict (images with width and height,
annotations with ``bbox`` ``[x, y, w, h]`` in pixels, ``area``, ``iscrowd`` and ids,
categories) with the folder its ``file_name`` entries are relative to, and where every box
came from, so that :class:`~dinodet.data.coco.CocoDetection` reads it in place of a json,
checks it as it checks a json, and names the original label file and line in what it
reports.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dinodet.data.images import IMAGE_EXTENSIONS
from dinodet.errors import DataError

__all__ = ["DatasetSource", "NoLabelsWarning", "common_folder", "header_size", "is_image_file",
           "read_text", "warn_no_labels"]

# EXIF orientations that turn the picture by 90 degrees: ``load_image`` applies them
# (``ImageOps.exif_transpose``), so the decoded image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class NoLabelsWarning(UserWarning):
    """Not one image of a YOLO / VOC split has a label file: each is read as an image
    without objects (the formats' convention), which is most likely a misplaced folder."""


def warn_no_labels(what: str, count: int, looked_in: str) -> None:
    """Warn that none of the ``count`` images of ``what`` has a label file."""
    warnings.warn(f"{what}: none of its {count} images has a label file (looked in "
                  f"{looked_in}): every image is read as one without objects",
                  NoLabelsWarning, stacklevel=3)


@dataclass(frozen=True)
class DatasetSource:
    """A dataset in COCO format, in memory, with where it came from.

    Attributes:
        coco: the COCO dict (``images``, ``annotations``, ``categories``, ``info``).
        image_dir: the folder that each image's ``file_name`` is relative to.
        path: what the dataset was read from (a ``data.yaml``, a dataset folder), named in
            messages about the dataset as a whole.
        format: ``"yolo"``, ``"voc"`` or ``"coco"``.
        split: the split read (``"train"``, ``"val"``, ...), None for a whole layout.
        origins: annotation id -> where its box was written (``labels/a.txt:4``,
            ``Annotations/a.xml: <object> 2``), named in messages about that box.
    """

    coco: dict[str, Any]
    image_dir: Path
    path: Path
    format: str
    split: str | None = None
    origins: Mapping[int, str] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """``"data.yaml (split val)"``: the dataset as messages name it."""
        return f"{self.path} (split {self.split})" if self.split else str(self.path)


def is_image_file(path: Path) -> bool:
    """A regular file with one of :data:`~dinodet.data.images.IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as :func:`~dinodet.data.images.load_image`
    decodes it, read from its header without decoding the pixels: an EXIF orientation that
    turns the picture by 90 degrees swaps the two, as decoding does.

    A file that is missing or that PIL cannot identify is a DataError naming it: without
    its size, normalised (YOLO) or pixel (VOC) boxes cannot be checked or converted.
    """
    try:
        with Image.open(path) as im:  # lazy: reads the header only
            width, height = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # a broken EXIF block: decoding ignores it too
                orientation = None
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such image file") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image's size from its header "
                        f"({type(exc).__name__}: {exc})") from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def read_text(path: Path) -> str:
    """The UTF-8 text of a label, list or class file; a DataError names a file that cannot
    be read or decoded."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def common_folder(files: list[Path], fallback: Path) -> Path:
    """The deepest folder holding every file of ``files`` (``fallback`` for none)."""
    if not files:
        return fallback
    parents = [f.parent for f in files]
    if len({p.is_absolute() for p in parents}) > 1:  # a list file mixing both kinds
        parents = [p.absolute() for p in parents]
    return Path(os.path.commonpath([str(p) for p in parents]))
