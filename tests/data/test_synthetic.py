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


# --------------------------------------------------------------------------- hard dataset

HARD = {"num_train": 40, "num_val": 6, "seed": 3}


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    from dinodet.data.synthetic_hard import make_hard_coco

    return make_hard_coco(tmp_path_factory.mktemp("hard"), **HARD)


def _hard_annotations(paths, split: str = "train") -> tuple[dict, list[dict]]:
    data = json.loads(paths[f"{split}_ann"].read_text())
    return data, data["annotations"]


def test_hard_deterministic_for_a_seed(hard, tmp_path):
    from dinodet.data.synthetic_hard import make_hard_coco

    again = make_hard_coco(tmp_path / "a", **HARD)
    assert _files(again) == _files(hard)
    other = make_hard_coco(tmp_path / "b", **{**HARD, "seed": 4})
    assert _files(other)["train.json"] != _files(hard)["train.json"]


def test_hard_scene_reproduces_the_json_and_boxes_are_tight(hard):
    """Each image is hard_scene((seed, split, id)); every box is inside the image and is
    exactly the extent of its object's visible pixels (it touches them on all four sides)."""
    from dinodet.data.synthetic_hard import hard_scene

    data, anns = _hard_annotations(hard)
    by_image: dict[int, list[dict]] = {}
    for ann in anns:
        by_image.setdefault(ann["image_id"], []).append(ann)
    contrasts = []
    for im in data["images"][:12]:
        scene = hard_scene((HARD["seed"], 0, im["id"]), im["height"], im["width"])
        assert scene.pixels.shape == (im["height"], im["width"], 3)
        with Image.open(hard["train_images"] / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
        expected = [(a["category_id"] - 1, tuple(int(v) for v in a["bbox"]))
                    for a in by_image.get(im["id"], [])]
        assert scene.objects == expected
        for k, (_, (x, y, w, h)) in enumerate(scene.objects):
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            mine = scene.owner == k + 1
            ys, xs = np.nonzero(mine)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            # The object is really drawn there: its pixels differ from the ring just
            # outside its box (the ring's background pixels only).
            x0, y0 = max(0, x - 3), max(0, y - 3)
            x1, y1 = min(im["width"], x + w + 3), min(im["height"], y + h + 3)
            ring = np.zeros_like(mine)
            ring[y0:y1, x0:x1] = True
            ring[y : y + h, x : x + w] = False
            ring &= scene.owner == 0
            if ring.sum() >= 10:
                rgb = scene.pixels.astype(np.float32)
                contrasts.append(np.abs(rgb[mine].mean(0) - rgb[ring].mean(0)).max())
    assert len(contrasts) > 20
    assert np.median(contrasts) > 20


def test_hard_objects_are_small_and_many(hard):
    data, anns = _hard_annotations(hard)
    areas = np.asarray([a["bbox"][2] * a["bbox"][3] for a in anns])
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in anns)
    assert (areas < 32**2).mean() > 0.7  # mostly COCO "small"
    assert (areas < 96**2).all()  # none "large"
    sides = np.asarray([max(a["bbox"][2], a["bbox"][3]) for a in anns])
    assert np.percentile(sides, 10) >= 6 and np.percentile(sides, 90) <= 52
    counts = np.bincount([a["image_id"] for a in anns], minlength=len(data["images"]) + 1)[1:]
    assert counts.min() >= 1 and counts.max() <= 12 and counts.mean() > 4


def test_hard_class_balance(hard):
    """Classes are drawn uniformly: over 120 images (~800 objects) each is within 30% of
    the mean count; so are the 40 images of the fixture within 50%."""
    from dinodet.data.synthetic_hard import hard_scene

    data, anns = _hard_annotations(hard)
    assert [c["name"] for c in data["categories"]] == [str(d) for d in range(10)]
    per_class = np.bincount([a["category_id"] - 1 for a in anns], minlength=10)
    assert per_class.min() >= 0.5 * per_class.mean() and per_class.max() <= 1.5 * per_class.mean()
    labels = [label for i in range(120) for label, _ in hard_scene((0, 9, i)).objects]
    per_class = np.bincount(labels, minlength=10)
    assert len(labels) > 600
    assert per_class.min() >= 0.7 * per_class.mean() and per_class.max() <= 1.3 * per_class.mean()


def test_hard_loads_with_coco_detection_without_skipped_boxes(hard):
    import warnings

    for split in ("train", "val"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an AnnotationWarning would fail here
            ds = CocoDetection(hard[f"{split}_ann"], hard[f"{split}_images"], strict=True)
        _, anns = _hard_annotations(hard, split)
        assert ds.num_classes == 10 and ds.label_to_category_id == list(range(1, 11))
        assert len(ds.coco.getAnnIds()) == len(anns)
        image, target = ds[0]
        assert image.shape == (3, 256, 256)
        assert len(target["labels"]) == sum(a["image_id"] == ds.image_ids[0] for a in anns)


def test_hard_options(tmp_path):
    from dinodet.data.synthetic_hard import make_hard_coco

    paths = make_hard_coco(tmp_path, num_train=3, num_val=1, image_size=((90, 120), (100, 140)),
                           num_classes=3, min_objects=2, max_objects=2, max_distractors=0)
    data, anns = _hard_annotations(paths)
    for im in data["images"]:
        assert 90 <= im["height"] <= 120 and 100 <= im["width"] <= 140
    assert {a["category_id"] for a in anns} <= {1, 2, 3} and len(data["categories"]) == 3
    with pytest.raises(ValueError, match="num_classes"):
        make_hard_coco(tmp_path, num_classes=11)
    with pytest.raises(ValueError, match="min_objects"):
        make_hard_coco(tmp_path, min_objects=3, max_objects=2)
