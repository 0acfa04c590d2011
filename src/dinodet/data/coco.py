"""COCO-format detection datasets: an annotation json and a folder of images.

Category ids become contiguous labels ``0..K-1`` (sorted by id) unless
``keep_category_ids=True`` keeps the raw id, as the original COCO checkpoints do (91
slots, unused ids named ``unused-<id>``; ids up to :data:`MAX_CATEGORY_ID`); the table
travels in checkpoints (:meth:`CocoDetection.class_table`).

The json is checked at load time: a structural problem (a missing key, an image or
category id that is not an integer, a duplicate id, a ``file_name`` that is empty, absolute
or leads out of the image folder with ``..``) is a :class:`~dinodet.errors.DataError` that
names the file and the item. Bad annotations (unknown image or category, ids or ``bbox``
values that are not numbers, booleans included, ``iscrowd`` other than 0 or 1, empty
boxes) are reported once and left out (``strict=True``: an error). An image that cannot be
read (missing, not a regular file, over the pixel limit, undecodable) gives a
:class:`SkippedImage` marker that the collate function lists in ``Batch.skipped`` (so the
count survives worker processes).

In place of the json's path, :class:`CocoDetection` takes the COCO dict itself, or a
:class:`~dinodet.data.source.DatasetSource` (what the YOLO and Pascal VOC readers give,
:func:`dinodet.data.formats.open_dataset`): the same checks apply, and what they report
names the source's own files (``labels/a.txt:4: ...``) where it knows them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert, clip_boxes_to_image
from torchvision.transforms.v2 import functional as F

from dinodet.data.images import ImageReadError, load_image, resolve_max_pixels
from dinodet.data.source import DatasetSource
from dinodet.errors import DataError
from dinodet.settings import is_finite_number, is_int

__all__ = ["MAX_CATEGORY_ID", "AnnotationWarning", "CocoDetection", "Sample", "SkippedImage",
           "SkippedImageWarning"]

#: A transform applied to ``(image, target)``; see :func:`dinodet.data.build_transforms`.
Transform = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]
#: What ``CocoDetection[i]`` gives for a readable image: ``(image [3, H, W] float, target)``.
Sample = tuple[Tensor, dict[str, Any]]

_REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
_MAX_LISTED = 20  # bad annotations named in the load-time warning
_MAX_IN_ERROR = 5  # ... and in the strict-mode error
#: How messages name a COCO dict given in place of a json file.
DICT_NAME = "<COCO dict>"
#: The largest category id that ``keep_category_ids=True`` accepts: it makes one class per
#: id from 0 to the largest (COCO's go to 90), so a stray id of 10**12 would otherwise
#: allocate a classifier of 10**12 outputs.
MAX_CATEGORY_ID = 100_000


class AnnotationWarning(UserWarning):
    """Annotations of a COCO json were left out because they are invalid."""


class SkippedImageWarning(UserWarning):
    """An image file could not be read and its sample was skipped."""


@dataclass(frozen=True)
class SkippedImage:
    """Marker returned by ``CocoDetection[i]`` in place of an unreadable image.

    The collate function drops it and lists ``path`` in ``Batch.skipped``.
    """

    path: str
    reason: str


def _read_json(ann_file: Path) -> dict[str, Any]:
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{ann_file}: not a valid JSON file ({exc})") from exc
    return _check_structure(data, ann_file)


def _check_structure(data: object, ann_file: Path) -> dict[str, Any]:
    """``data`` if it has COCO's three lists of objects with their keys; a DataError names
    ``ann_file`` and the item otherwise."""
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object, got {type(data).__name__}")
    for key, item_keys in _REQUIRED_KEYS.items():
        if key not in data:
            raise DataError(f"{ann_file}: missing key {key!r}")
        if not isinstance(data[key], list):
            raise DataError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict):
                raise DataError(f"{ann_file}: {key}[{i}] is not an object")
            missing = [k for k in item_keys if k not in item]
            if missing:
                raise DataError(f"{ann_file}: {key}[{i}] is missing key {missing[0]!r}")
    return data


def _outside(file_name: str) -> str | None:
    """How ``file_name`` leaves the folder it is relative to, or None when it stays inside.

    Pure path arithmetic (nothing is resolved, symlinks are not followed): an anchor (a
    root or drive) makes it absolute; after normalisation, a leading ``..`` leaves.
    """
    if PurePath(file_name).anchor:
        return "is an absolute path"
    parts = PurePath(os.path.normpath(file_name)).parts
    if parts and parts[0] == "..":
        return "leads out of it with '..'"
    return None


def _annotation_problem(ann: dict, image_ids: set, category_ids: set) -> str | None:
    """Why an annotation is unusable, or None when it is fine."""
    if not is_int(ann["image_id"]):
        return f"image_id must be an integer, got {ann['image_id']!r}"
    if ann["image_id"] not in image_ids:
        return "unknown image"
    if not is_int(ann["category_id"]):
        return f"category_id must be an integer, got {ann['category_id']!r}"
    if ann["category_id"] not in category_ids:
        return f"unknown category {ann['category_id']}"
    bbox = ann["bbox"]
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(map(is_finite_number, bbox))):
        return f"malformed bbox {bbox!r}"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"non-positive box size (w={bbox[2]}, h={bbox[3]})"
    iscrowd = ann.get("iscrowd", 0)
    if not is_int(iscrowd) or iscrowd not in (0, 1):
        return f"iscrowd must be 0 or 1, got {iscrowd!r}"
    return None


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    ``dataset[i]`` is ``(image, target)`` with ``image`` a float tensor ``[3, H, W]``
    (the output of ``transforms``; without transforms, RGB in ``[0, 1]``) and ``target``::

        labels     int64 [n]      class indices (see ``keep_category_ids``)
        boxes      float32 [n, 4] normalised cxcywh w.r.t. the returned image
        image_id   int            the json's image id
        orig_size  int64 [2]      (h, w) of the decoded image
        size       int64 [2]      (h, w) of the returned image

    or a :class:`SkippedImage` when the file is missing or cannot be decoded.
    Crowd boxes (``iscrowd=1``) are not targets but stay in :attr:`coco` for evaluation.

    Args:
        ann_file: the annotation json; or its content, a COCO dict (messages name it
            ``<COCO dict>``); or a :class:`~dinodet.data.source.DatasetSource` (a YOLO or
            VOC dataset read into COCO format; messages name its files).
        image_dir: folder that ``file_name`` of each image is relative to (for a
            ``DatasetSource``, None: its own ``image_dir``).
        transforms: called as ``transforms(image, target)`` on a ``tv_tensors.Image``
            (uint8) and ``{"boxes": BoundingBoxes (XYXY pixels), "labels": int64 [n]}``.
        keep_category_ids: use raw category ids as labels (``num_classes = max id + 1``;
            ids above :data:`MAX_CATEGORY_ID` are a DataError).
        strict: raise :class:`~dinodet.errors.DataError` (a ``ValueError``) on bad
            annotations and unreadable images instead of warning and skipping them.
        max_pixels: the pixel limit of an image file, checked from its header before it is
            decoded; an image over it is skipped like an unreadable one. None: the
            environment variable ``DINODET_MAX_IMAGE_PIXELS``, else
            :data:`~dinodet.data.images.DEFAULT_MAX_IMAGE_PIXELS`, read once here; 0 or
            less: no limit (:func:`~dinodet.data.images.resolve_max_pixels`).
        allow_outside_image_dir: accept a ``file_name`` that is absolute or leads out of
            ``image_dir`` with ``..`` (by default a DataError naming it).

    The json's structure is checked here: a DataError names the file and the item.
    """

    def __init__(
        self,
        ann_file: str | Path | Mapping[str, Any] | DatasetSource,
        image_dir: str | Path | None = None,
        transforms: Transform | None = None,
        keep_category_ids: bool = False,
        strict: bool = False,
        max_pixels: int | None = None,
        allow_outside_image_dir: bool = False,
    ) -> None:
        #: the YOLO or VOC dataset this was read from (None: a COCO json or dict)
        self.source: DatasetSource | None = None
        #: ``"coco"``, ``"yolo"`` or ``"voc"``: the format of the files read
        self.format = "coco"
        if isinstance(ann_file, DatasetSource):
            self.source, self.format = ann_file, ann_file.format
            self.ann_file = ann_file.path
            image_dir = ann_file.image_dir if image_dir is None else image_dir
        elif isinstance(ann_file, Mapping):
            self.ann_file = Path(DICT_NAME)
        else:
            self.ann_file = Path(ann_file)
        if image_dir is None:
            raise TypeError("CocoDetection needs image_dir, the folder of the images")
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.keep_category_ids = keep_category_ids
        self.strict = strict
        self.max_pixels = resolve_max_pixels(max_pixels)  # 0: no limit
        self.allow_outside_image_dir = allow_outside_image_dir

        if self.source is not None:
            data = _check_structure(self.source.coco, self.ann_file)
        elif isinstance(ann_file, Mapping):
            data = _check_structure(dict(ann_file), self.ann_file)
        else:
            data = _read_json(self.ann_file)
        origins = self.source.origins if self.source is not None else {}
        images = self._check_images(data["images"])
        categories = self._check_categories(data["categories"])
        self._build_class_table(categories)

        valid, problems = [], []
        image_id_set, category_id_set = set(images), set(categories)
        for ann in data["annotations"]:
            problem = _annotation_problem(ann, image_id_set, category_id_set)
            if problem is None:
                valid.append(ann)
            elif is_int(ann["id"]) and ann["id"] in origins:  # the label file and line
                problems.append(f"{origins[ann['id']]}: {problem}")
            else:
                problems.append(f"annotation {ann['id']!r} (image {ann['image_id']!r}): "
                                f"{problem}")
        self._report_problems(problems)

        self.image_ids: list[int] = sorted(images)
        self._file_names = {i: images[i]["file_name"] for i in self.image_ids}
        self._targets = self._group_targets(valid)
        self.coco = self._build_coco(data, valid)

    # -- images and categories -------------------------------------------------------------

    def _check_images(self, items: list[dict]) -> dict[int, dict]:
        """image id -> image entry; a DataError names a bad id or ``file_name``."""
        images: dict[int, dict] = {}
        for i, img in enumerate(items):
            image_id, name = img["id"], img["file_name"]
            where = f"{self.ann_file}: images[{i}]"
            if not is_int(image_id):
                raise DataError(f"{where}.id must be an integer, got {image_id!r}")
            if image_id in images:
                raise DataError(f"{where}: duplicate image id {image_id}")
            if not isinstance(name, str) or not name:
                raise DataError(f"{where}.file_name must be a non-empty string, got {name!r}")
            if "\x00" in name:
                raise DataError(f"{where}.file_name {name!r} contains a NUL character")
            how = None if self.allow_outside_image_dir else _outside(name)
            if how is not None:
                raise DataError(f"{where}.file_name {name!r} {how}, outside the image folder "
                                f"{self.image_dir}; pass allow_outside_image_dir=True to "
                                "read it anyway")
            images[image_id] = img
        return images

    def _check_categories(self, items: list[dict]) -> dict[int, dict]:
        """category id -> category entry; a DataError names a bad id."""
        categories: dict[int, dict] = {}
        for i, cat in enumerate(items):
            cat_id = cat["id"]
            where = f"{self.ann_file}: categories[{i}]"
            if not is_int(cat_id) or cat_id < 0:
                raise DataError(f"{where}.id must be an integer ≥ 0, got {cat_id!r}")
            if cat_id in categories:
                raise DataError(f"{where}: duplicate category id {cat_id}")
            if self.keep_category_ids and cat_id > MAX_CATEGORY_ID:
                raise DataError(
                    f"{where}.id {cat_id} is above {MAX_CATEGORY_ID}, the largest id that "
                    "keep_category_ids=True accepts (it makes one class per id from 0 to the "
                    "largest); renumber the categories or use contiguous labels "
                    "(keep_category_ids=False)")
            categories[cat_id] = cat
        return categories

    def _build_class_table(self, categories: dict[int, dict]) -> None:
        ids = sorted(categories)
        if self.keep_category_ids:
            self.num_classes = (max(ids) + 1) if ids else 0
            self.label_to_category_id = list(range(self.num_classes))
            self.class_names = [
                categories[i]["name"] if i in categories else f"unused-{i}"
                for i in range(self.num_classes)
            ]
            self.category_id_to_label = {i: i for i in ids}
        else:
            self.num_classes = len(ids)
            self.label_to_category_id = ids
            self.class_names = [categories[i]["name"] for i in ids]
            self.category_id_to_label = {cid: label for label, cid in enumerate(ids)}

    def class_table(self) -> list[dict[str, Any]]:
        """``[{"label", "category_id", "name"}, ...]`` for every class index (JSON-ready)."""
        return [
            {"label": label, "category_id": int(cid), "name": str(name)}
            for label, (cid, name) in enumerate(zip(self.label_to_category_id, self.class_names))
        ]

    # -- annotations -----------------------------------------------------------------------

    def _report_problems(self, problems: list[str]) -> None:
        if not problems:
            return
        n = len(problems)
        if self.strict:
            listed = "; ".join(problems[:_MAX_IN_ERROR])
            more = f"; and {n - _MAX_IN_ERROR} more" if n > _MAX_IN_ERROR else ""
            raise DataError(f"{self.ann_file}: {n} invalid annotations: {listed}{more}")
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
        warnings.warn(
            f"{self.ann_file}: ignoring {n} invalid annotations:\n  {listed}{more}",
            AnnotationWarning,
            stacklevel=3,
        )

    def _group_targets(self, annotations: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes xyxy float32 [n, 4], labels int64 [n]), crowd boxes left out."""
        grouped: dict[int, tuple[list, list]] = {}
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            boxes, labels = grouped.setdefault(ann["image_id"], ([], []))
            boxes.append((x, y, x + w, y + h))
            labels.append(self.category_id_to_label[ann["category_id"]])
        return {
            image_id: (np.asarray(b, np.float32).reshape(-1, 4), np.asarray(lab, np.int64))
            for image_id, (b, lab) in grouped.items()
        }

    def _build_coco(self, data: dict[str, Any], annotations: list[dict]) -> COCO:
        """A pycocotools index of the valid annotations (crowd included) for evaluation."""
        anns = []
        for ann in annotations:
            if "area" not in ann or "iscrowd" not in ann:
                # COCOeval reads both; fill them in rather than fail at evaluation time.
                ann = {"area": float(ann["bbox"][2] * ann["bbox"][3]), "iscrowd": 0, **ann}
            anns.append(ann)
        dataset = {**data, "annotations": anns}
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    # -- samples ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._file_names[self.image_ids[index]]

    def __getitem__(self, index: int) -> Sample | SkippedImage:
        image_id = self.image_ids[index]
        path = self.image_path(index)
        try:
            image = tv_tensors.Image(load_image(path, self.max_pixels))
        except ImageReadError as exc:
            cause = exc.__cause__ or exc  # the decoder's own error, or the missing file
            reason = f"{type(cause).__name__}: {cause}"
            if self.strict:
                raise DataError(f"cannot read image {path}: {reason}") from exc
            warnings.warn(f"skipping image {path}: {reason}", SkippedImageWarning, stacklevel=2)
            return SkippedImage(str(path), reason)

        h, w = image.shape[-2:]
        boxes, labels = self._targets.get(
            image_id, (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        )
        boxes = clip_boxes_to_image(torch.from_numpy(boxes), (h, w))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(labels)[keep],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return _finalise(image, target, image_id, (h, w))


def _finalise(image: Tensor, target: dict[str, Any], image_id: int, orig_size: tuple) -> Sample:
    """Plain tensors out: float image, normalised cxcywh float32 boxes, sizes."""
    image = image.as_subclass(Tensor)
    if not image.is_floating_point():
        image = F.to_dtype(image, torch.float32, scale=True)
    h, w = image.shape[-2:]
    boxes = target["boxes"]
    xyxy = F.convert_bounding_box_format(boxes, new_format="XYXY").as_subclass(Tensor)
    cxcywh = box_convert(xyxy.float(), "xyxy", "cxcywh")
    cxcywh = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
    return image, {
        "labels": target["labels"].to(torch.int64),
        "boxes": cxcywh,
        "image_id": int(image_id),
        "orig_size": torch.tensor(orig_size, dtype=torch.int64),
        "size": torch.tensor([h, w], dtype=torch.int64),
    }
