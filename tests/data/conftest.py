from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, h: int, w: int, boxes=(), colours=(), background=(128, 128, 128)):
    """A flat image with each box (x0, y0, x1, y1) filled in its colour; PNG is lossless."""
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = background
    for (x0, y0, x1, y1), colour in zip(boxes, colours):
        arr[y0:y1, x0:x1] = colour
    Image.fromarray(arr).save(path)


def write_coco(path: Path, images, annotations, categories, **extra) -> Path:
    data = {"images": images, "annotations": annotations, "categories": categories, **extra}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def image_writer():
    return write_image


@pytest.fixture
def coco_writer():
    return write_coco


@pytest.fixture
def tiny_coco(tmp_path: Path) -> tuple[Path, Path]:
    """Three 48x64 images, categories 2/5/9; a crowd box, boxes out of bounds, one empty image."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images = []
    for i in (1, 2, 3):
        write_image(image_dir / f"{i}.png", 48, 64)
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
    categories = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [8, 8, 16, 8], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [0, 0, 64, 48], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [48, 40, 32, 16], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 9, "bbox": [70, 10, 5, 5], "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 9, "bbox": [-4, 4, 8, 4]},
    ]
    ann_file = write_coco(tmp_path / "ann.json", images, annotations, categories)
    return ann_file, image_dir
