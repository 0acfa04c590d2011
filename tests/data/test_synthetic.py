from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dinodet.data import CocoDetection, make_synthetic_coco
from dinodet.data.synthetic import SHAPES


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(root, num_train=12, num_val=3, num_classes=5, seed=0)


def _files(paths) -> dict[str, bytes]:
    out = {}
    for split in ("train", "val"):
        out[f"{split}.json"] = paths[f"{split}_ann"].read_bytes()
        for f in sorted(paths[f"{split}_images"].iterdir()):
            out[f"{split}/{f.name}"] = f.read_bytes()
    return out


def test_deterministic_for_a_seed(synthetic, tmp_path):
    again = make_synthetic_coco(tmp_path / "a", num_train=12, num_val=3, num_classes=5, seed=0)
    assert _files(again) == _files(synthetic)
    other = make_synthetic_coco(tmp_path / "b", num_train=12, num_val=3, num_classes=5, seed=1)
    assert _files(other)["train.json"] != _files(synthetic)["train.json"]


def test_json_loads_with_pycocotools(synthetic):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(synthetic["train_ann"]))
    assert sorted(coco.getCatIds()) == [1, 3, 5, 7, 9]
    assert [c["name"] for c in coco.loadCats([1, 3, 5, 7, 9])] == [s for s, _ in SHAPES[:5]]
    assert len(coco.getImgIds()) == 12
    counts = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert min(counts) == 0 and max(counts) > 1
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["area"] == w * h
        assert w >= 8 and h >= 8 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
    with Image.open(synthetic["val_images"] / coco.imgs[1]["file_name"]) as im:
        assert im.format == "JPEG" and im.size == (320, 320)


def test_objects_carry_their_class_colour(synthetic):
    data = json.loads(synthetic["train_ann"].read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    checked = 0
    for ann in data["annotations"]:
        name, colour = SHAPES[(ann["category_id"] - 1) // 2]
        if name == "ring":  # hollow: its centre is background
            continue
        x, y, w, h = ann["bbox"]
        with Image.open(synthetic["train_images"] / files[ann["image_id"]]) as im:
            rgb = np.asarray(im.convert("RGB"), np.float32)
        cy, cx = int(y + h / 2), int(x + w / 2)
        centre = rgb[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
        assert np.abs(centre - colour).max() < 60, (ann["id"], name, centre)
        checked += 1
    assert checked > 10


def test_remapped_by_coco_detection(synthetic):
    ds = CocoDetection(synthetic["train_ann"], synthetic["train_images"])
    assert ds.num_classes == 5 and ds.label_to_category_id == [1, 3, 5, 7, 9]
    image, target = ds[0]
    assert image.shape == (3, 320, 320)
    assert target["labels"].max() < 5 if len(target["labels"]) else True


def test_image_size_range(tmp_path):
    paths = make_synthetic_coco(
        tmp_path, num_train=4, num_val=1, image_size=((40, 60), (70, 90)), max_objects=2
    )
    for im in json.loads(paths["train_ann"].read_text())["images"]:
        assert 40 <= im["height"] <= 60 and 70 <= im["width"] <= 90
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco(tmp_path, num_classes=7)
