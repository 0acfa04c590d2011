"""One way to open a detection dataset, whatever its format: COCO, YOLO or Pascal VOC.

:func:`open_dataset` is what training, evaluation and export verification call: it tells
the format from the layout (:func:`detect_format`) unless told, reads a YOLO or VOC split
into COCO format in memory (:func:`read_source`) and gives a
:class:`~dinodet.data.coco.CocoDetection` of it, so the COCO checks, samples and
evaluation are the same for all three. :func:`convert_dataset` writes those COCO dicts as
json files, one per split, for other tools.

Formats and what names them:

* ``coco``: an annotation ``.json`` and its image folder.
* ``yolo``: a ``data.yaml``, or a folder with a ``data.yaml`` or ``labels/``
  (:mod:`dinodet.data.yolo`).
* ``voc``: a folder with ``Annotations/`` and ``JPEGImages/`` (:mod:`dinodet.data.voc`).

A YOLO or VOC layout may have splits (a data.yaml's ``train`` / ``val`` / ``test``; VOC's
``ImageSets/Main/<split>.txt``; YOLO's ``images/<split>/``): then ``split`` picks one and
is required; a layout without splits is read whole and takes no ``split``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal, cast

from dinodet.data.coco import CocoDetection, Transform
from dinodet.data.source import DatasetSource
from dinodet.data.voc import is_voc_layout, read_voc, voc_splits
from dinodet.data.yolo import find_yolo_layout, is_yolo_layout, read_yolo
from dinodet.errors import DataError, UserError

__all__ = ["FORMATS", "DataFormat", "common_format", "convert_dataset", "dataset_splits",
           "detect_format", "open_dataset", "read_source"]

#: The dataset formats read, in the order ``--format`` lists them.
FORMATS = ("coco", "yolo", "voc")
DataFormat = Literal["auto", "coco", "yolo", "voc"]


def detect_format(path: str | Path) -> str:
    """``"coco"``, ``"yolo"`` or ``"voc"`` from the layout at ``path``: a ``.json`` file is
    COCO; a ``.yaml`` file, or a folder with a ``data.yaml`` or ``labels/``, is YOLO; a
    folder with ``Annotations/`` and ``JPEGImages/`` is VOC. Anything else is a DataError
    that says what was looked for."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise DataError(f"{path}: cannot tell the dataset format from the file: expected a "
                        "COCO .json or a YOLO data.yaml (or give --format)")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if is_voc_layout(path):
        return "voc"
    if is_yolo_layout(path):
        return "yolo"
    raise DataError(f"{path}: cannot tell the dataset format of the folder: expected "
                    "Annotations/ and JPEGImages/ (Pascal VOC), or a data.yaml or labels/ "
                    "(YOLO); a COCO dataset is named by its annotation .json")


def _resolve(path: str | Path, format: str) -> str:
    if format == "auto":
        return detect_format(path)
    if format not in FORMATS:
        raise UserError(f"format must be auto or one of {', '.join(FORMATS)}, got {format!r}")
    return format


def dataset_splits(path: str | Path, format: str = "auto") -> list[str]:
    """The splits of a YOLO or VOC layout (empty: read whole; COCO: always empty)."""
    found = _resolve(path, format)
    if found == "yolo":
        return find_yolo_layout(path).split_names
    if found == "voc":
        return voc_splits(path)
    return []


def read_source(path: str | Path, format: str = "auto", split: str | None = None
                ) -> DatasetSource:
    """A YOLO or VOC dataset (``split`` of it, see the module's doc) in COCO format."""
    found = _resolve(path, format)
    if found == "yolo":
        return read_yolo(path, split)
    if found == "voc":
        return read_voc(path, split)
    raise UserError(f"{path}: a COCO dataset is read as it is (CocoDetection); read_source "
                    "reads YOLO and VOC datasets")


def open_dataset(
    ann: str | Path,
    images: str | Path | None = None,
    *,
    format: str = "auto",
    split: str | None = None,
    transforms: Transform | None = None,
    keep_category_ids: bool = False,
    strict: bool = False,
    max_pixels: int | None = None,
    allow_outside_image_dir: bool = False,
) -> CocoDetection:
    """The dataset at ``ann`` as a :class:`~dinodet.data.coco.CocoDetection`.

    Args:
        ann: a COCO annotation json; a YOLO ``data.yaml`` or dataset folder; a Pascal VOC
            dataset folder.
        images: the image folder of a COCO json (required for it); YOLO and VOC datasets
            name their own images, and take none.
        format: ``"auto"`` (:func:`detect_format`), ``"coco"``, ``"yolo"`` or ``"voc"``.
        split: the split of a YOLO / VOC layout with splits (required for one), None for a
            layout without; COCO takes none (a json is one split).
        transforms, keep_category_ids, strict, max_pixels, allow_outside_image_dir: as
            :class:`~dinodet.data.coco.CocoDetection` takes them.

    The result's ``format`` says which format was read. Problems are DataErrors naming
    the file and the line, object or item.
    """
    found = _resolve(ann, format)
    options: dict[str, Any] = {"transforms": transforms, "keep_category_ids": keep_category_ids,
                               "strict": strict, "max_pixels": max_pixels,
                               "allow_outside_image_dir": allow_outside_image_dir}
    if found == "coco":
        if images is None:
            raise DataError(f"{ann}: a COCO annotation json needs its image folder too")
        if split is not None:
            raise DataError(f"{ann}: a COCO json is one split; split {split!r} is for YOLO "
                            "and VOC datasets")
        return CocoDetection(ann, images, **options)
    if images is not None:
        raise DataError(f"{ann}: a {found.upper()} dataset names its own images; an image "
                        f"folder ({images}) is for a COCO json only")
    return CocoDetection(read_source(ann, found, split), **options)


def common_format(*datasets: CocoDetection | None) -> DataFormat:
    """The format the given datasets share, or ``"auto"`` when they differ: what a run's
    config records so that a resumed run reads its data the same way."""
    found = {d.format for d in datasets if d is not None}
    return cast(DataFormat, found.pop()) if len(found) == 1 else "auto"


def convert_dataset(src: str | Path, out_dir: str | Path, to: str = "coco",
                    format: str = "auto", splits: Sequence[str] | None = None
                    ) -> list[tuple[Path, DatasetSource]]:
    """Write a YOLO or VOC dataset as COCO json: ``instances_<split>.json`` per split (all of
    them, or ``splits``), ``instances.json`` for a layout without splits, each written
    atomically; ``file_name`` is relative to the split's image folder, which the json's
    ``info.image_dir`` records. Everything is read (and checked) before anything is
    written. Returns ``(json path, source)`` of each file written."""
    from dinodet.engine.checkpoint import atomic_write

    if to != "coco":
        raise UserError(f"convert_dataset writes COCO json (to='coco'), not {to!r}")
    found = _resolve(src, format)
    if found == "coco":
        raise UserError(f"{src} is a COCO dataset already")
    available = dataset_splits(src, found)
    if splits:
        if not available:
            raise DataError(f"{src} has no splits: it is converted whole, without --split")
        unknown = [s for s in splits if s not in available]
        if unknown:
            raise DataError(f"{src} has no split {unknown[0]!r} (it has: "
                            f"{', '.join(available)})")
    chosen: list[str | None] = list(dict.fromkeys(splits or available)) or [None]
    sources = [read_source(src, found, split) for split in chosen]
    for source in sources:  # COCO's checks too, before anything is written
        CocoDetection(source, strict=True)
    out = Path(out_dir)
    written = []
    for source in sources:
        name = f"instances_{source.split}.json" if source.split else "instances.json"
        coco = {**source.coco, "info": {**source.coco.get("info", {}),
                                         "image_dir": str(source.image_dir.absolute())}}
        text = json.dumps(coco).encode()

        def write(f: IO[bytes], text: bytes = text) -> None:
            f.write(text)

        atomic_write(out / name, write, what="COCO json")
        written.append((out / name, source))
    return written
