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
    with pytest.raises(ValueError, match=r"a\.json: missing key 'images'"):
        CocoDetection(missing, tmp_path)

    no_file_name = coco_writer(tmp_path / "b.json", [{"id": 1}], [], [])
    with pytest.raises(ValueError, match=r"b\.json: images\[0\] is missing key 'file_name'"):
        CocoDetection(no_file_name, tmp_path)

    broken = tmp_path / "c.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"c\.json: not a valid JSON"):
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
