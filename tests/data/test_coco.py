from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.data import (
    AnnotationWarning,
    CocoDetection,
    SkippedImage,
    SkippedImageWarning,
    collate_fn,
)
from dinodet.data.coco import MAX_CATEGORY_ID
from dinodet.errors import DataError, UserError


def _by_id(ds: CocoDetection, image_id: int):
    return ds[ds.image_ids.index(image_id)]


def test_category_ids_remapped_to_contiguous_labels(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    assert ds.num_classes == 3
    assert ds.class_names == ["two", "five", "nine"]
    assert ds.label_to_category_id == [2, 5, 9]
    assert ds.category_id_to_label == {2: 0, 5: 1, 9: 2}
    assert ds.class_table() == [
        {"label": 0, "category_id": 2, "name": "two"},
        {"label": 1, "category_id": 5, "name": "five"},
        {"label": 2, "category_id": 9, "name": "nine"},
    ]
    json.dumps(ds.class_table())
    _, target = _by_id(ds, 2)
    assert target["labels"].tolist() == [1, 2]


def test_keep_category_ids_uses_raw_ids(tiny_coco):
    ds = CocoDetection(*tiny_coco, keep_category_ids=True)
    assert ds.num_classes == 10
    assert ds.class_names[2] == "two" and ds.class_names[9] == "nine"
    assert ds.class_names[0] == "unused-0" and ds.class_names[3] == "unused-3"
    assert ds.label_to_category_id == list(range(10))
    _, target = _by_id(ds, 2)
    assert target["labels"].tolist() == [5, 9]
    assert len(ds.class_table()) == 10


def test_target_format_crowd_clip_and_degenerate(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    image, target = _by_id(ds, 1)
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert image.min() >= 0.0 and image.max() <= 1.0
    # The crowd box is not a target, but stays in the COCO index for evaluation.
    assert target["labels"].tolist() == [0]
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[16 / 64, 12 / 48, 16 / 64, 8 / 48]]))
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["orig_size"].dtype == torch.int64

    # Image 2: box 3 clipped to x 48..64, y 40..48; box 4 lies outside (dropped);
    # box 5 (no iscrowd key) clipped to x 0..4.
    _, target = _by_id(ds, 2)
    expected = torch.tensor([[56 / 64, 44 / 48, 16 / 64, 8 / 48], [2 / 64, 6 / 48, 4 / 64, 4 / 48]])
    torch.testing.assert_close(target["boxes"], expected)


def test_image_without_annotations_is_kept(tiny_coco):
    ds = CocoDetection(*tiny_coco)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    _, target = _by_id(ds, 3)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert ds.image_path(2).name == "3.png"


def test_coco_index_is_silent_and_complete(tiny_coco, capsys):
    ds = CocoDetection(*tiny_coco)
    assert capsys.readouterr().out == ""
    assert sorted(ds.coco.getImgIds()) == [1, 2, 3]
    assert sorted(ds.coco.getCatIds()) == [2, 5, 9]
    assert all("area" in a for a in ds.coco.dataset["annotations"])


def _bad_annotations(tmp_path, write_image, write_coco):
    write_image(tmp_path / "1.png", 16, 16)
    images = [{"id": 1, "file_name": "1.png"}]
    categories = [{"id": 1, "name": "a"}]
    annotations = [
        {"id": 100, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
        {"id": 101, "image_id": 77, "category_id": 1, "bbox": [1, 1, 4, 4]},
        {"id": 102, "image_id": 1, "category_id": 42, "bbox": [1, 1, 4, 4]},
        {"id": 103, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 4]},
        {"id": 104, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, -2]},
    ]
    return write_coco(tmp_path / "bad.json", images, annotations, categories)


def test_bad_annotations_reported_once_with_ids(tmp_path, image_writer, coco_writer):
    ann_file = _bad_annotations(tmp_path, image_writer, coco_writer)
    with pytest.warns(AnnotationWarning) as record:
        ds = CocoDetection(ann_file, tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert "4 invalid annotations" in message and str(ann_file) in message
    assert "annotation 101 (image 77): unknown image" in message
    assert "annotation 102 (image 1): unknown category 42" in message
    assert "annotation 103 (image 1)" in message and "annotation 104 (image 1)" in message
    assert "annotation 100" not in message
    _, target = ds[0]
    assert target["labels"].tolist() == [0]
    assert ds.coco.getAnnIds() == [100]


def test_bad_annotations_strict_raises(tmp_path, image_writer, coco_writer):
    ann_file = _bad_annotations(tmp_path, image_writer, coco_writer)
    with pytest.raises(ValueError, match=r"annotation 101 \(image 77\): unknown image"):
        CocoDetection(ann_file, tmp_path, strict=True)


def test_malformed_json_files(tmp_path, coco_writer):
    missing = coco_writer(tmp_path / "a.json", [], [], [])
    data = json.loads(missing.read_text())
    del data["images"]
    missing.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"a\.json: missing key 'images'"):
        CocoDetection(missing, tmp_path)

    no_file_name = coco_writer(tmp_path / "b.json", [{"id": 1}], [], [])
    with pytest.raises(DataError, match=r"b\.json: images\[0\] is missing key 'file_name'"):
        CocoDetection(no_file_name, tmp_path)

    broken = tmp_path / "c.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=r"c\.json: not a valid JSON"):
        CocoDetection(broken, tmp_path)


@pytest.fixture
def unreadable_images(tmp_path, image_writer, coco_writer):
    """good.png, corrupt.jpg (random bytes), truncated.jpg (half a JPEG), missing.jpg."""
    image_writer(tmp_path / "good.png", 16, 24)
    rng = np.random.default_rng(0)
    (tmp_path / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    names = ["good.png", "corrupt.jpg", "truncated.jpg", "missing.jpg"]
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 4, 4]}]
    ann_file = coco_writer(tmp_path / "ann.json", images, anns, [{"id": 1, "name": "a"}])
    return ann_file, tmp_path


def test_unreadable_images_are_skipped_and_reported(unreadable_images):
    ds = CocoDetection(*unreadable_images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples = [ds[0]]
    for i in (1, 2, 3):
        with pytest.warns(SkippedImageWarning, match=re.escape(str(ds.image_path(i)))):
            samples.append(ds[i])
    assert not isinstance(samples[0], SkippedImage)
    assert all(isinstance(s, SkippedImage) for s in samples[1:])
    assert samples[3].reason.startswith("FileNotFoundError")

    batch = collate_fn(samples)
    assert len(batch) == 1 and batch.images.tensors.shape == (1, 3, 16, 24)
    assert batch.skipped == [str(ds.image_path(i)) for i in (1, 2, 3)]


@pytest.mark.parametrize("index", [1, 2, 3])
def test_unreadable_images_strict_raises(unreadable_images, index):
    ds = CocoDetection(*unreadable_images, strict=True)
    name = ds.image_path(index).name
    with pytest.raises(ValueError, match=rf"cannot read image .*{name}"):
        ds[index]


def test_data_errors_are_value_errors():
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


def _one_image(tmp_path, write_coco, images=None, annotations=(), categories=None, name="x.json"):
    images = [{"id": 1, "file_name": "1.png"}] if images is None else images
    categories = [{"id": 1, "name": "a"}] if categories is None else categories
    return write_coco(tmp_path / name, images, list(annotations), categories)


@pytest.mark.parametrize("bad", ["7", True, 1.5, None, [1]])
def test_image_ids_must_be_integers(tmp_path, coco_writer, bad):
    images = [{"id": 1, "file_name": "1.png"}, {"id": bad, "file_name": "2.png"}]
    ann_file = _one_image(tmp_path, coco_writer, images=images)
    with pytest.raises(DataError, match=re.escape(
            f"{ann_file}: images[1].id must be an integer, got {bad!r}")):
        CocoDetection(ann_file, tmp_path)


def test_duplicate_image_ids_name_the_item(tmp_path, coco_writer):
    images = [{"id": 4, "file_name": "1.png"}, {"id": 4, "file_name": "2.png"}]
    ann_file = _one_image(tmp_path, coco_writer, images=images)
    with pytest.raises(DataError, match=r"images\[1\]: duplicate image id 4"):
        CocoDetection(ann_file, tmp_path)


@pytest.mark.parametrize("bad", [None, "", 3, ["a.png"]])
def test_file_name_must_be_a_non_empty_string(tmp_path, coco_writer, bad):
    ann_file = _one_image(tmp_path, coco_writer, images=[{"id": 1, "file_name": bad}])
    with pytest.raises(DataError, match=re.escape(
            f"{ann_file}: images[0].file_name must be a non-empty string, got {bad!r}")):
        CocoDetection(ann_file, tmp_path)
    nul = _one_image(tmp_path, coco_writer, images=[{"id": 1, "file_name": "a\x00.png"}])
    with pytest.raises(DataError, match="NUL character"):
        CocoDetection(nul, tmp_path)


def test_file_name_outside_the_image_folder(tmp_path, image_writer, coco_writer):
    image_dir = tmp_path / "images"
    (image_dir / "sub").mkdir(parents=True)
    image_writer(tmp_path / "outside.png", 8, 12, background=(10, 20, 30))
    image_writer(image_dir / "inside.png", 8, 12, background=(40, 50, 60))
    for name, how in [("../outside.png", "leads out of it with '..'"),
                      ("sub/../../outside.png", "leads out of it with '..'"),
                      (str(tmp_path / "outside.png"), "is an absolute path")]:
        images = [{"id": 1, "file_name": "inside.png"}, {"id": 2, "file_name": name}]
        ann_file = _one_image(tmp_path, coco_writer, images=images)
        with pytest.raises(DataError, match=re.escape(
                f"{ann_file}: images[1].file_name {name!r} {how}, outside the image folder "
                f"{image_dir}; pass allow_outside_image_dir=True")):
            CocoDetection(ann_file, image_dir)
        allowed = CocoDetection(ann_file, image_dir, allow_outside_image_dir=True)
        image, _ = allowed[1]
        assert (image[:, 0, 0] * 255).round().tolist() == [10, 20, 30]

    # '..' that stays inside after normalisation is fine.
    images = [{"id": 1, "file_name": "sub/../inside.png"}, {"id": 2, "file_name": "./inside.png"}]
    ds = CocoDetection(_one_image(tmp_path, coco_writer, images=images), image_dir)
    assert (ds[0][0][:, 0, 0] * 255).round().tolist() == [40, 50, 60]
    assert (ds[1][0][:, 0, 0] * 255).round().tolist() == [40, 50, 60]


def test_booleans_and_non_integers_are_invalid_annotations(tmp_path, image_writer, coco_writer):
    image_writer(tmp_path / "1.png", 16, 16)
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 1},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [True, 1, 4, 4]},
        {"id": 4, "image_id": 1, "category_id": True, "bbox": [1, 1, 4, 4]},
        {"id": 5, "image_id": True, "category_id": 1, "bbox": [1, 1, 4, 4]},
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": True},
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 2},
        {"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": "0"},
        {"id": 9, "image_id": [1], "category_id": 1, "bbox": [1, 1, 4, 4]},
        {"id": 10, "image_id": 1, "category_id": 1.0, "bbox": [1, 1, 4, 4]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10**400, 4]},
    ]
    ann_file = _one_image(tmp_path, coco_writer, annotations=annotations)
    with pytest.warns(AnnotationWarning) as record:
        ds = CocoDetection(ann_file, tmp_path)
    message = str(record[0].message)
    assert "9 invalid annotations" in message
    for expected in ["annotation 3 (image 1): malformed bbox [True, 1, 4, 4]",
                     "annotation 4 (image 1): category_id must be an integer, got True",
                     "annotation 5 (image True): image_id must be an integer, got True",
                     "annotation 6 (image 1): iscrowd must be 0 or 1, got True",
                     "annotation 7 (image 1): iscrowd must be 0 or 1, got 2",
                     "annotation 8 (image 1): iscrowd must be 0 or 1, got '0'",
                     "annotation 9 (image [1]): image_id must be an integer, got [1]",
                     "annotation 10 (image 1): category_id must be an integer, got 1.0",
                     "annotation 11 (image 1): malformed bbox [1, 1, 1000"]:
        assert expected in message
    assert sorted(ds.coco.getAnnIds()) == [1, 2]
    _, target = ds[0]
    assert target["labels"].tolist() == [0]  # the crowd box is no target

    with pytest.raises(DataError, match=r"9 invalid annotations: annotation 3 \(image 1\)"):
        CocoDetection(ann_file, tmp_path, strict=True)


@pytest.mark.parametrize("bad", [True, -1, "1", 2.0])
def test_category_ids_must_be_integers(tmp_path, coco_writer, bad):
    ann_file = _one_image(tmp_path, coco_writer, categories=[{"id": bad, "name": "a"}])
    with pytest.raises(DataError, match=re.escape(
            f"{ann_file}: categories[0].id must be an integer ≥ 0, got {bad!r}")):
        CocoDetection(ann_file, tmp_path)


def test_keep_category_ids_has_an_upper_limit(tmp_path, coco_writer):
    huge = _one_image(tmp_path, coco_writer, categories=[{"id": 3, "name": "a"},
                                                          {"id": 10**12, "name": "b"}])
    with pytest.raises(DataError, match=re.escape(
            f"{huge}: categories[1].id 1000000000000 is above {MAX_CATEGORY_ID}")):
        CocoDetection(huge, tmp_path, keep_category_ids=True)
    assert CocoDetection(huge, tmp_path).num_classes == 2  # contiguous labels: no problem

    at_limit = _one_image(tmp_path, coco_writer, categories=[{"id": MAX_CATEGORY_ID,
                                                              "name": "z"}], name="y.json")
    assert CocoDetection(at_limit, tmp_path, keep_category_ids=True).num_classes == (
        MAX_CATEGORY_ID + 1)
    over = _one_image(tmp_path, coco_writer, categories=[{"id": MAX_CATEGORY_ID + 1,
                                                          "name": "z"}], name="z.json")
    with pytest.raises(DataError, match=str(MAX_CATEGORY_ID + 1)):
        CocoDetection(over, tmp_path, keep_category_ids=True)


def test_strict_unreadable_image_is_a_data_error(unreadable_images):
    ds = CocoDetection(*unreadable_images, strict=True)
    with pytest.raises(DataError, match=r"cannot read image .*corrupt\.jpg"):
        ds[1]
