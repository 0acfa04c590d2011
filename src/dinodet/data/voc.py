"""Pascal VOC detection datasets, read into COCO format in memory.

A VOC dataset folder (``VOCdevkit/VOC2012``) holds ``Annotations/<id>.xml``,
``JPEGImages/<id>.jpg`` and, optionally, ``ImageSets/Main/<split>.txt`` (one image id per
line): its splits are those files whose name has no ``_`` (``train``, ``val``,
``trainval``, ``test``; ``aeroplane_train.txt`` and the like are per-class lists). Without
them the dataset is read whole: every image of ``JPEGImages`` and every file of
``Annotations``.

Each ``<object>`` of an annotation gives ``<name>`` and ``<bndbox>`` with ``xmin``,
``ymin``, ``xmax``, ``ymax``: 1-based pixel indices, both ends included, as VOC writes
them, so the COCO box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (a
box may reach one pixel past the image, then it is clipped to it).

``<difficult>1</difficult>`` objects become COCO crowd boxes (``iscrowd = 1``): VOC's own
evaluation neither rewards nor penalises detections of them, and COCO's evaluation treats
a crowd box that way (a detection on it is ignored, missing it costs nothing); they are not
training targets either (:class:`~dinodet.data.coco.CocoDetection` leaves crowd boxes out),
as the VOC detectors of mmdetection and others do. ``read_voc(..., difficult="object")``
makes them ordinary objects instead.

The class names are ``classes.txt`` in the dataset folder (one per line; category id = line
number, from 1), else the 20 classes of Pascal VOC (:data:`VOC_CLASSES`). A name not among
them is a DataError, as is everything else that cannot be read: XML that does not parse,
a missing element, a coordinate that is not a number, ``xmax < xmin``, a box outside the
image, an annotation without its image, an image id of a split with neither. Each names the
file and the object (``Annotations/a.xml: <object> 2 <bndbox>: xmax 10 < xmin 20``).
**An image without an annotation file is an image without objects** (as in YOLO; a split
where no image has one gets a :class:`~dinodet.data.source.NoLabelsWarning`).
Image sizes come from the image headers (without decoding); a ``<size>`` in the XML that
disagrees with the image is a DataError. Image ids are 1, 2, ... in the split's order
(sorted ids without splits), ``file_name`` is relative to ``JPEGImages``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from dinodet.data.images import IMAGE_EXTENSIONS
from dinodet.data.source import (
    DatasetSource,
    header_size,
    is_image_file,
    read_text,
    warn_no_labels,
)
from dinodet.errors import DataError

__all__ = ["VOC_CLASSES", "is_voc_layout", "read_voc", "voc_splits"]

#: The 20 classes of Pascal VOC, in the order of its devkit.
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CLASS_FILE = "classes.txt"
_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def is_voc_layout(path: Path) -> bool:
    """A folder with ``Annotations/`` and ``JPEGImages/``."""
    return (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (a Pascal VOC dataset folder)")
    if not is_voc_layout(root):
        raise DataError(f"{root}: not a Pascal VOC dataset folder: it needs Annotations/ "
                        "and JPEGImages/")


def voc_splits(root: str | Path) -> list[str]:
    """The splits of a VOC dataset folder (``ImageSets/Main/<split>.txt``), sorted."""
    main = Path(root) / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem and p.is_file())


def _classes(root: Path) -> tuple[tuple[str, ...], str]:
    """The class names and where they come from (for messages)."""
    path = root / CLASS_FILE
    if not path.is_file():
        return VOC_CLASSES, f"the 20 Pascal VOC classes (list yours in {path})"
    names: list[str] = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DataError(f"{path}:{number}: class {name!r} is listed twice")
        names.append(name)
    if not names:
        raise DataError(f"{path}: no class names in it")
    return tuple(names), str(path)


def _split_ids(root: Path, split: str) -> list[tuple[str, str]]:
    """The image ids of ``ImageSets/Main/<split>.txt``, each with its line for messages."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    ids: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise DataError(f"{path}:{number}: expected one image id, got {len(fields)} "
                            f"fields: {line.strip()!r}")
        image_id = fields[0]
        if image_id in seen:
            raise DataError(f"{path}:{number}: image {image_id} is listed twice (first on "
                            f"line {seen[image_id]})")
        seen[image_id] = number
        ids.append((image_id, f"{path}:{number}"))
    if not ids:
        raise DataError(f"{path}: the split lists no image")
    return ids


def _image_of(root: Path, image_id: str, xml: ET.Element | None) -> Path | None:
    """``JPEGImages/<id>.<ext>``, else the XML's ``<filename>`` in ``JPEGImages``."""
    folder = root / "JPEGImages"
    for ext in IMAGE_EXTENSIONS:
        for suffix in (ext, ext.upper()):
            if (folder / f"{image_id}{suffix}").is_file():
                return folder / f"{image_id}{suffix}"
    name = xml.findtext("filename") if xml is not None else None
    name = (name or "").strip()
    if name and Path(name).name == name and is_image_file(folder / name):
        return folder / name  # a bare file name only: nothing outside JPEGImages
    return None


def _parse(path: Path) -> ET.Element:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    root = tree.getroot()
    if root.tag != "annotation":
        raise DataError(f"{path}: expected an <annotation> element, got <{root.tag}>")
    return root


def _number(element: ET.Element, tag: str, where: str) -> tuple[float, str]:
    text = element.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{where}: missing <{tag}>")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: <{tag}> {text.strip()!r} is not a finite number")
    return value, text.strip()


def _check_size(xml: ET.Element, path: Path, image: Path, width: int, height: int) -> None:
    """A ``<size>`` that disagrees with the image (either way round) is a DataError."""
    size = xml.find("size")
    if size is None:
        return
    try:
        given = (int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0)))
    except ValueError:
        raise DataError(f"{path}: <size>: width and height must be numbers") from None
    if min(given) > 0 and given not in ((width, height), (height, width)):
        raise DataError(f"{path}: <size> is {given[0]}x{given[1]} but {image} is "
                        f"{width}x{height}")


def _objects(xml: ET.Element, path: Path, classes: dict[str, int], classes_from: str,
             width: int, height: int, difficult: str) -> list[tuple[int, list[float], int, str]]:
    """``(category id, COCO bbox, iscrowd, origin)`` of every ``<object>``."""
    found = []
    for k, obj in enumerate(xml.findall("object"), 1):
        where = f"{path}: <object> {k}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{where}: missing <name>")
        if name not in classes:
            raise DataError(f"{where}: unknown class name {name!r}, not among "
                            f"{classes_from}")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise DataError(f"{where}: <difficult> must be 0 or 1, got {flag!r}")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{where}: missing <bndbox>")
        where = f"{where} <bndbox>"
        (xmin, xmin_t), (ymin, ymin_t), (xmax, xmax_t), (ymax, ymax_t) = (
            _number(box, tag, where) for tag in _CORNERS)
        for low, low_t, high, high_t, axis in ((xmin, xmin_t, xmax, xmax_t, "x"),
                                               (ymin, ymin_t, ymax, ymax_t, "y")):
            if high < low:
                raise DataError(f"{where}: {axis}max {high_t} < {axis}min {low_t}")
        # 1-based, both ends included -> 0-based edges; one pixel of slack, then clipped
        x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax
        if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
            raise DataError(f"{where}: ({xmin_t}, {ymin_t}, {xmax_t}, {ymax_t}) is outside "
                            f"the {width}x{height} image (VOC pixels run from 1 to the size)")
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{where}: ({xmin_t}, {ymin_t}, {xmax_t}, {ymax_t}) leaves no "
                            f"area inside the {width}x{height} image")
        crowd = 1 if flag == "1" and difficult == "crowd" else 0
        found.append((classes[name], [x0, y0, x1 - x0, y1 - y0], crowd, f"{path}: <object> {k}"))
    return found


def read_voc(root: str | Path, split: str | None = None,
             difficult: Literal["crowd", "object"] = "crowd") -> DatasetSource:
    """Read a split (``ImageSets/Main/<split>.txt``) of the Pascal VOC dataset folder
    ``root`` into COCO format; ``split`` is None for a folder without splits and must name
    one of a folder with them. ``difficult``: ``"crowd"`` (default) makes difficult objects
    crowd boxes, ``"object"`` ordinary ones (see the module's doc). Every problem is a
    DataError naming the file and the object."""
    root = Path(root)
    _check_root(root)
    if difficult not in ("crowd", "object"):
        raise ValueError(f"difficult must be 'crowd' or 'object', got {difficult!r}")
    splits = voc_splits(root)
    annotations_dir, images_dir = root / "Annotations", root / "JPEGImages"
    if split is None and splits:
        raise DataError(f"{root} has the splits {', '.join(splits)} (ImageSets/Main): "
                        "choose one")
    if split is not None and split not in splits:
        has = (f"it has: {', '.join(splits)}" if splits else
               "it has no ImageSets/Main/<split>.txt: read it whole, without a split")
        raise DataError(f"{root} has no split {split!r} ({has})")
    if split is not None:
        ids = _split_ids(root, split)
    else:
        stems = {p.stem for p in annotations_dir.glob("*.xml") if p.is_file()}
        stems |= {p.stem for p in images_dir.iterdir() if is_image_file(p)}
        if not stems:
            raise DataError(f"{root}: no annotation in Annotations/ and no image in "
                            "JPEGImages/")
        ids = [(s, str(annotations_dir / f"{s}.xml")) for s in sorted(stems)]

    if not any((annotations_dir / f"{stem}.xml").is_file() for stem, _ in ids):
        warn_no_labels(f"{root}" + (f" (split {split})" if split else ""), len(ids),
                       str(annotations_dir))
    names, classes_from = _classes(root)
    classes = {name: i for i, name in enumerate(names, 1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    origins: dict[int, str] = {}
    for image_id, (stem, where) in enumerate(ids, 1):
        path = annotations_dir / f"{stem}.xml"
        xml = _parse(path) if path.is_file() else None
        image = _image_of(root, stem, xml)
        if image is None:
            if xml is None:
                raise DataError(f"{where}: image {stem}: neither {path} nor an image "
                                f"{stem}.<ext> in {images_dir}")
            raise DataError(f"{path}: an annotation without its image: no {stem}.<ext> "
                            f"nor its <filename> in {images_dir}")
        width, height = header_size(image)
        images.append({"id": image_id, "file_name": image.name, "width": width,
                       "height": height})
        if xml is None:
            continue  # no annotation file: an image without objects
        _check_size(xml, path, image, width, height)
        for category_id, bbox, crowd, origin in _objects(xml, path, classes, classes_from,
                                                         width, height, difficult):
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": image_id,
                                "category_id": category_id, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": crowd})
            origins[ann_id] = origin
    categories = [{"id": i, "name": name} for name, i in classes.items()]
    name = f"{root}" + (f" (split {split})" if split else "")
    coco = {"info": {"description": f"Pascal VOC dataset {name}, read by dinodet"},
            "images": images, "annotations": annotations, "categories": categories}
    return DatasetSource(coco, images_dir, root, "voc", split, origins)
