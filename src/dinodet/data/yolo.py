"""YOLO detection datasets (the Ultralytics layout), read into COCO format in memory.

A YOLO dataset is images and, per image, a text file of its objects, one per line::

    class cx cy w h        # class id, box centre and size as fractions of the image (0..1)

The label file of ``.../images/<rest>/a.jpg`` is ``.../labels/<rest>/a.txt`` (the last
``images`` folder of the path becomes ``labels``; without one, ``a.txt`` beside the image).
**An image without a label file is an image without objects**, as in YOLO itself (that
is how YOLO datasets hold negatives; a split where no image has one gets a
:class:`~dinodet.data.source.NoLabelsWarning`, as that is rather a misplaced folder); a
label file without its image is a DataError, and so
is every line that cannot be read: a wrong number of fields, a class id that is not an
integer or not in the class names, a coordinate that is not a number or lies outside
[0, 1] by more than :data:`COORDINATE_TOLERANCE` (the box's edges too), an empty box. Each
names the file and line (``labels/a.txt:4: ...``). Nothing is dropped.

The dataset is named by one of:

* an Ultralytics ``data.yaml``: ``path`` (the dataset folder; relative to the yaml's
  folder; default: that folder), ``train`` / ``val`` / ``test`` (each a folder of images,
  searched recursively, or a ``.txt`` list of image paths relative to the list's folder,
  or a list of those; ``../x`` that does not exist is tried as ``x``, as Ultralytics does
  for Roboflow's exports), ``names`` (a list, or a ``{id: name}`` mapping) and optionally
  ``nc`` (checked against ``names``). Its splits are the keys given.
* a dataset folder holding a ``data.yaml`` (read as above), or ``images/`` and ``labels/``:
  its splits are the subfolders of ``images/`` (``images/train``, ``images/val``), or none
  when ``images/`` holds image files itself (one set, read whole). Class names come from
  ``classes.txt`` (one name per line; line ``n`` names class ``n - 1``) in the folder or
  in its ``labels/``, else from the ``names`` of a ``data.yaml`` or a ``classes.txt`` in
  the folder above (Roboflow's ``train/``, ``valid/`` beside one ``data.yaml``).

Image sizes are read from the image headers, without decoding (EXIF rotation counted, as
decoding applies it). Boxes become COCO ``[x, y, w, h]`` in pixels, clipped to the image;
category id = the YOLO class id, name = its name. Image ids are 1, 2, ... in the split's
order (sorted paths within a folder, the list's order within a list), ``file_name`` is
relative to the deepest folder holding all of the split's images.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dinodet.data.images import IMAGE_EXTENSIONS
from dinodet.data.source import (
    DatasetSource,
    common_folder,
    header_size,
    is_image_file,
    read_text,
    warn_no_labels,
)
from dinodet.errors import DataError
from dinodet.settings import is_int

__all__ = ["COORDINATE_TOLERANCE", "YoloLayout", "find_yolo_layout", "is_yolo_layout",
           "read_yolo"]

#: How far a normalised coordinate (and a box edge) may lie outside [0, 1]: what rounding
#: to a few decimals gives, not a box drawn past the image; boxes are then clipped to it.
COORDINATE_TOLERANCE = 1e-3
#: The keys of a data.yaml that name splits.
SPLIT_KEYS = ("train", "val", "test")
YAML_NAMES = ("data.yaml", "data.yml")
CLASS_FILE = "classes.txt"
_FIELDS = ("cx", "cy", "w", "h")


@dataclass(frozen=True)
class _Entry:
    """A folder of images or a ``.txt`` list of them, and how messages name it."""

    path: Path
    where: str


@dataclass(frozen=True)
class YoloLayout:
    """Where a YOLO dataset's parts are.

    Attributes:
        path: what was given: a ``data.yaml`` or a dataset folder.
        names: class id -> name.
        names_from: the file the names were read from.
        splits: split name -> its folders / lists of images; for a layout without splits,
            one entry under the name None.
    """

    path: Path
    names: dict[int, str]
    names_from: Path
    splits: dict[str | None, tuple[_Entry, ...]]

    @property
    def split_names(self) -> list[str]:
        """The splits, in the order given; empty for a layout read whole."""
        return [s for s in self.splits if s is not None]


def is_yolo_layout(path: Path) -> bool:
    """A ``.yaml`` file, or a folder with a ``data.yaml`` or a ``labels/`` folder."""
    if path.is_file():
        return path.suffix.lower() in (".yaml", ".yml")
    return path.is_dir() and (any((path / n).is_file() for n in YAML_NAMES)
                              or (path / "labels").is_dir())


def find_yolo_layout(path: str | Path) -> YoloLayout:
    """The layout of the YOLO dataset at ``path`` (see the module's doc); a DataError says
    what is missing."""
    path = Path(path)
    if path.is_file():
        return _yaml_layout(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder (a YOLO data.yaml or dataset folder)")
    for name in YAML_NAMES:
        if (path / name).is_file():
            return _yaml_layout(path / name)
    images = path / "images"
    if not images.is_dir():
        raise DataError(f"{path}: not a YOLO dataset: it has neither a data.yaml nor an "
                        "images/ folder (with labels/ beside it)")
    names, names_from = _folder_names(path)
    subfolders = sorted(p for p in images.iterdir() if p.is_dir())
    if subfolders and not any(is_image_file(p) for p in images.iterdir()):
        splits: dict[str | None, tuple[_Entry, ...]] = {
            p.name: (_Entry(p, str(p)),) for p in subfolders}
    else:
        splits = {None: (_Entry(images, str(images)),)}
    return YoloLayout(path, names, names_from, splits)


def _folder_names(root: Path) -> tuple[dict[int, str], Path]:
    """Class names of a dataset folder without a data.yaml (see the module's doc)."""
    for candidate in (root / CLASS_FILE, root / "labels" / CLASS_FILE):
        if candidate.is_file():
            return _read_class_file(candidate), candidate
    parent = root.absolute().parent
    for name in YAML_NAMES:
        if (parent / name).is_file():
            data = _load_yaml(parent / name)
            if "names" in data:
                return _names(data, parent / name), parent / name
    if (parent / CLASS_FILE).is_file():
        return _read_class_file(parent / CLASS_FILE), parent / CLASS_FILE
    raise DataError(f"{root}: no class names for this YOLO dataset: write them in "
                    f"{root / CLASS_FILE} (one per line, class 0 first) or in a data.yaml "
                    "('names: [...]')")


def _read_class_file(path: Path) -> dict[int, str]:
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names: dict[int, str] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            raise DataError(f"{path}:{i + 1}: empty class name (line n names class n - 1, "
                            "so a blank line would shift the ids after it)")
        names[i] = line.strip()
    if not names:
        raise DataError(f"{path}: no class names in it")
    return names


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping of keys (path, train, val, names), got "
                        f"{type(data).__name__}")
    return data


def _names(data: dict[str, Any], path: Path) -> dict[int, str]:
    """``names`` of a data.yaml (a list, or ``{id: name}``) as id -> name, checked."""
    raw = data.get("names")
    if isinstance(raw, list):
        names = {i: str(name) for i, name in enumerate(raw)}
    elif isinstance(raw, dict):
        names = {}
        for key, name in raw.items():
            if isinstance(key, str) and key.strip().isdigit():
                key = int(key)
            if not is_int(key) or key < 0:
                raise DataError(f"{path}: names: class id {key!r} must be an integer >= 0")
            names[key] = str(name)
    else:
        raise DataError(f"{path}: names must be a list of class names or a mapping "
                        f"{{id: name}}, got {raw!r}")
    if not names:
        raise DataError(f"{path}: names is empty")
    nc = data.get("nc")
    if nc is not None and (not is_int(nc) or nc != len(names)):
        raise DataError(f"{path}: nc is {nc!r} but names lists {len(names)} classes")
    return names


def _yaml_layout(path: Path) -> YoloLayout:
    data = _load_yaml(path)
    if "names" not in data:
        raise DataError(f"{path}: missing key 'names' (the class names)")
    names = _names(data, path)
    root = path.parent
    given = data.get("path")
    if given not in (None, ""):
        if not isinstance(given, str):
            raise DataError(f"{path}: path must be a folder name, got {given!r}")
        root = root / Path(given).expanduser()  # an absolute path replaces the yaml's folder
    splits: dict[str | None, tuple[_Entry, ...]] = {}
    for key in SPLIT_KEYS:
        value = data.get(key)
        if value in (None, "", []):
            continue
        items = value if isinstance(value, list) else [value]
        entries = []
        for item in items:
            if not isinstance(item, str) or not item:
                raise DataError(f"{path}: {key}: expected a folder or .txt list of images, "
                                f"got {item!r}")
            where = f"{path}: {key}: {item}"
            entry = root / Path(item).expanduser()
            if not entry.exists() and item.startswith("../") and (root / item[3:]).exists():
                entry = root / item[3:]
            if not (entry.is_dir() or (entry.is_file() and entry.suffix.lower() == ".txt")):
                raise DataError(f"{where}: no such folder or .txt list of images "
                                f"(looked for {entry})")
            entries.append(_Entry(entry, where))
        splits[key] = tuple(entries)
    if not splits:
        raise DataError(f"{path}: no split: give at least one of {', '.join(SPLIT_KEYS)}")
    return YoloLayout(path, names, path, splits)


# -- images and label files ----------------------------------------------------------------

def label_path(image: Path) -> Path:
    """The label file of ``image``: its last ``images`` folder becomes ``labels``, the
    extension ``.txt``; without an ``images`` folder, the ``.txt`` beside it."""
    parts = image.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")
    return image.with_suffix(".txt")


def _image_folder_of(label_dir: Path) -> Path:
    """The inverse of :func:`label_path` for a folder: its last ``labels`` becomes ``images``."""
    parts = label_dir.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            return Path(*parts[:i], "images", *parts[i + 1:])
    return label_dir


def _entry_images(entry: _Entry) -> list[tuple[Path, str]]:
    """The images of a folder (recursive, sorted) or a list, each with how to name it."""
    if entry.path.is_dir():
        found = sorted(p for p in entry.path.rglob("*") if is_image_file(p))
        if not found:
            raise DataError(f"{entry.where}: no images in {entry.path} (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        return [(p, f"{entry.where}: {p}") for p in found]
    listed = []
    for number, line in enumerate(read_text(entry.path).splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        where = f"{entry.path}:{number}"
        image = Path(text).expanduser()
        if not image.is_absolute():
            image = entry.path.parent / image
        if not image.is_file():
            raise DataError(f"{where}: {text}: no such image file (looked for {image})")
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{where}: {text}: not an image file (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        listed.append((image, where))
    if not listed:
        raise DataError(f"{entry.where}: the list {entry.path} names no image")
    return listed


def _label_folders(entries: tuple[_Entry, ...], images: list[Path]) -> list[tuple[Path, bool]]:
    """The folders that hold the split's label files: ``(folder, recursive)``."""
    folders: dict[Path, bool] = {}
    for entry in entries:
        if entry.path.is_dir():
            folder = label_path(entry.path / "x").parent
            folders[folder] = True
    for image in images:
        folders.setdefault(label_path(image).parent, False)
    return [(f, recursive) for f, recursive in folders.items() if f.is_dir()]


def _check_orphans(entries: tuple[_Entry, ...], images: list[Path]) -> None:
    """A label file in the split's label folders whose image does not exist is an error."""
    stems: dict[Path, set[str]] = {}
    for folder, recursive in _label_folders(entries, images):
        files = folder.rglob("*.txt") if recursive else folder.glob("*.txt")
        for label in sorted(files):
            if label.name == CLASS_FILE or not label.is_file():
                continue
            image_dir = _image_folder_of(label.parent)
            if image_dir not in stems:
                stems[image_dir] = ({p.stem for p in image_dir.iterdir() if is_image_file(p)}
                                    if image_dir.is_dir() else set())
            if label.stem not in stems[image_dir]:
                raise DataError(f"{label}: a label file without its image: no "
                                f"{label.stem}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}> "
                                f"in {image_dir}")


# -- label lines ---------------------------------------------------------------------------

def _parse_line(fields: list[str], names: dict[int, str], names_from: Path
                ) -> tuple[int, list[float]]:
    """``(class id, [cx, cy, w, h])`` of one line's fields; a ValueError says what is wrong."""
    if len(fields) != 5:
        polygon = " (segmentation polygons are not read)" if len(fields) > 5 else ""
        raise ValueError(f"expected 5 fields 'class cx cy w h', got {len(fields)}{polygon}")
    try:
        number = float(fields[0])
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number.is_integer()):
        raise ValueError(f"class id {fields[0]!r} is not an integer")
    class_id = int(number)
    if class_id not in names:
        raise ValueError(f"class id {class_id} is not among the {len(names)} classes of "
                         f"{names_from} (ids {min(names)}..{max(names)})")
    values = []
    for name, text in zip(_FIELDS, fields[1:]):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} {text!r} is not a finite number")
        if not -COORDINATE_TOLERANCE <= value <= 1 + COORDINATE_TOLERANCE:
            raise ValueError(f"{name} {text} is outside [0, 1] (YOLO coordinates are "
                             "fractions of the image's width and height)")
        values.append(value)
    cx, cy, w, h = values
    if w <= 0 or h <= 0:
        raise ValueError(f"empty box: w {fields[3]}, h {fields[4]} (both must be > 0)")
    for axis, centre, size in (("x", cx, w), ("y", cy, h)):
        low, high = centre - size / 2, centre + size / 2
        if low < -COORDINATE_TOLERANCE or high > 1 + COORDINATE_TOLERANCE:
            raise ValueError(f"the box spans {axis} {low:.6g}..{high:.6g}, outside [0, 1]")
    return class_id, values


def _read_labels(label: Path, names: dict[int, str], names_from: Path, width: int,
                 height: int) -> list[tuple[int, list[float], str]]:
    """The objects of one label file as ``(class id, COCO bbox in pixels, origin)``."""
    objects = []
    for number, line in enumerate(read_text(label).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label}:{number}"
        try:
            class_id, (cx, cy, w, h) = _parse_line(fields, names, names_from)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}: {line.strip()!r}") from None
        x0, x1 = max(0.0, (cx - w / 2) * width), min(float(width), (cx + w / 2) * width)
        y0, y1 = max(0.0, (cy - h / 2) * height), min(float(height), (cy + h / 2) * height)
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{where}: the box lies outside the {width}x{height} image: "
                            f"{line.strip()!r}")
        objects.append((class_id, [x0, y0, x1 - x0, y1 - y0], where))
    return objects


def read_yolo(path: str | Path, split: str | None = None) -> DatasetSource:
    """Read a split of the YOLO dataset at ``path`` (a data.yaml or dataset folder) into
    COCO format; ``split`` is None for a layout without splits, and must name one of a
    layout with them. Every problem is a DataError naming the file and line."""
    layout = find_yolo_layout(path)
    if split is None and layout.split_names:
        raise DataError(f"{layout.path} has the splits {', '.join(layout.split_names)}: "
                        "choose one")
    if split is not None and split not in layout.splits:
        has = (f"it has: {', '.join(layout.split_names)}" if layout.split_names else
               "it has none: its images are read as one set, without a split")
        raise DataError(f"{layout.path} has no split {split!r} ({has})")
    entries = layout.splits[split]

    images: list[tuple[Path, str]] = []
    seen: dict[Path, str] = {}
    labels_seen: dict[Path, Path] = {}
    for entry in entries:
        for image, where in _entry_images(entry):
            key = Path(os.path.abspath(image))
            if key in seen:
                raise DataError(f"{where}: {image} is in the split twice (first: "
                                f"{seen[key]})")
            seen[key] = where
            label_key = label_path(key)
            if label_key in labels_seen:
                raise DataError(f"{where}: {image} and {labels_seen[label_key]} share the "
                                f"label file {label_path(image)}; rename one of them")
            labels_seen[label_key] = image
            images.append((image, where))
    files = [image for image, _ in images]
    _check_orphans(entries, files)

    image_dir = common_folder(files, layout.path)
    labelled = [image for image in files if label_path(image).is_file()]
    if not labelled:
        folders = sorted({str(label_path(image).parent) for image in files})
        warn_no_labels(f"{layout.path}" + (f" (split {split})" if split else ""), len(files),
                       ", ".join(folders[:3]) + (" ..." if len(folders) > 3 else ""))
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    origins: dict[int, str] = {}
    for image_id, image in enumerate(files, 1):
        width, height = header_size(image)
        coco_images.append({"id": image_id, "width": width, "height": height,
                            "file_name": Path(os.path.relpath(image, image_dir)).as_posix()})
        label = label_path(image)
        if not label.is_file():
            continue  # no label file: an image without objects, as YOLO has it
        for class_id, bbox, where in _read_labels(label, layout.names, layout.names_from,
                                                  width, height):
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": class_id,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
            origins[ann_id] = where
    categories = [{"id": i, "name": layout.names[i]} for i in sorted(layout.names)]
    source_name = f"{layout.path}" + (f" (split {split})" if split else "")
    coco = {"info": {"description": f"YOLO dataset {source_name}, read by dinodet"},
            "images": coco_images, "annotations": annotations, "categories": categories}
    return DatasetSource(coco, image_dir, layout.path, "yolo", split, origins)
