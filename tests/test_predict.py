"""The user-facing Detector: every input form, EXIF, COCO/JSON output, bf16, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.cli import main
from dinodet.predict import Detections, Detector, ImageReadError
from tiny_models import save_tiny_model

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 3, "name": "dog"},
           {"label": 2, "category_id": 7, "name": "bird"}]
H, W = 60, 90  # the test picture, landscape


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"), CLASSES)


@pytest.fixture(scope="module")
def det(model_dir) -> Detector:
    return Detector.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    img[10:40, 20:60] = (250, 30, 30)
    return img


def _check(d: Detections, size: tuple[int, int]) -> None:
    assert isinstance(d, Detections)
    assert d.image_size == size
    assert len(d) > 0  # threshold 0 keeps num_select
    assert d.boxes.shape == (len(d), 4) and d.labels.dtype == torch.int64
    h, w = size
    assert (d.boxes[:, 0::2] >= 0).all() and (d.boxes[:, 0::2] <= w).all()
    assert (d.boxes[:, 1::2] >= 0).all() and (d.boxes[:, 1::2] <= h).all()
    assert (d.boxes[:, 2:] >= d.boxes[:, :2]).all()


def _same(a: Detections, b: Detections) -> None:
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.boxes, b.boxes, atol=1e-4, rtol=0)


def test_same_picture_in_every_form_gives_the_same_detections(det, rgb, tmp_path):
    path = tmp_path / "pic.png"
    Image.fromarray(rgb).save(path)
    forms = [str(path), path, Image.fromarray(rgb), Image.fromarray(rgb).convert("RGBA"), rgb,
             torch.from_numpy(rgb).permute(2, 0, 1),
             torch.from_numpy(rgb).permute(2, 0, 1).float() / 255]
    ref = det(forms[0], threshold=0.0)
    _check(ref, (H, W))
    for form in forms[1:]:
        _same(ref, det(form, threshold=0.0))


def test_greyscale_palette_and_16_bit_inputs(det, rgb):
    grey = np.array(Image.fromarray(rgb).convert("L"))
    ref = det(grey, threshold=0.0)
    _check(ref, (H, W))
    _same(ref, det(Image.fromarray(grey), threshold=0.0))
    _same(ref, det(torch.from_numpy(grey)[None], threshold=0.0))
    # 16-bit: the full range maps onto 8 bits (v * 257 -> v), nothing is clipped to white
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    assert wide.mode.startswith("I;16")
    _same(ref, det(wide, threshold=0.0))
    _check(det(Image.fromarray(rgb).convert("P"), threshold=0.0), (H, W))


def test_list_of_mixed_inputs_batches_and_keeps_order(det, rgb, tmp_path):
    path = tmp_path / "pic.jpg"
    Image.fromarray(rgb).save(path)
    tall = np.ascontiguousarray(rgb.transpose(1, 0, 2))
    items = [path, Image.fromarray(tall), tall[:, :, 0], torch.from_numpy(rgb).permute(2, 0, 1),
             Image.fromarray(rgb).convert("P")]
    out = det(items, threshold=0.0, batch_size=2)
    assert isinstance(out, list) and len(out) == 5
    for d, size in zip(out, [(H, W), (W, H), (W, H), (H, W), (H, W)]):
        _check(d, size)
    assert det([], threshold=0.0) == []
    # the threshold filters by score
    full = det(rgb, threshold=0.0)
    thr = float(full.scores[2])
    high = det(rgb, threshold=thr)
    assert 3 <= len(high) == int((full.scores >= thr).sum()) < len(full)
    assert (high.scores >= thr).all()


def test_exif_rotated_jpeg_is_detected_upright(det, rgb, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif)
    _check(det(path, threshold=0.0), (W, H))
    with Image.open(path) as im:
        _check(det(im, threshold=0.0), (W, H))


def test_errors_name_the_problem(det, tmp_path):
    with pytest.raises(TypeError, match="unsupported image type"):
        det(3.5)
    with pytest.raises(TypeError, match="unsupported image type"):
        det([np.zeros((4, 4, 3), np.uint8), {"not": "an image"}])
    with pytest.raises(ValueError, match="shape"):
        det(np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        det(torch.zeros(5, 8, 8))
    with pytest.raises(ImageReadError, match="not found"):
        det(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"bad\.jpg"):
        det(bad)


def test_to_dict_and_to_coco_are_json_with_category_ids(det, rgb):
    d = det(rgb, threshold=0.0)
    as_dict = json.loads(json.dumps(d.to_dict()))
    assert as_dict["image_size"] == [H, W] and len(as_dict["boxes"]) == len(d)
    assert set(as_dict["names"]) <= {"cat", "dog", "bird"}
    coco = json.loads(json.dumps(d.to_coco(image_id=42)))
    ids = {0: 1, 1: 3, 2: 7}
    assert [r["category_id"] for r in coco] == [ids[int(lb)] for lb in d.labels]
    x0, y0, x1, y1 = d.boxes[0].tolist()
    assert coco[0]["image_id"] == 42
    assert coco[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    override = d.to_coco(1, label_to_category_id={0: 10, 1: 11, 2: 12})
    assert {r["category_id"] for r in override} <= {10, 11, 12}


def test_bfloat16_runs(model_dir, rgb):
    d = Detector.from_pretrained(model_dir, dtype=torch.bfloat16)(rgb, threshold=0.0)
    _check(d, (H, W))
    assert d.boxes.dtype == torch.float32 and d.scores.dtype == torch.float32


def test_cli_folder_with_a_corrupt_file_and_a_glob(model_dir, rgb, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(rgb).save(images / "a.jpg")
    Image.fromarray(rgb[:, :50]).save(images / "b.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["predict", str(model_dir), str(images), "--out", str(out),
               "--threshold", "0", "--batch-size", "2"])
    assert rc == 2
    assert "broken.jpg" in capsys.readouterr().err
    for stem, size in (("a", (W, H)), ("b", (50, H))):
        with Image.open(out / f"{stem}.png") as im:
            assert im.size == size
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["a.jpg", "b.png"]
    assert records[1]["width"] == 50 and records[1]["height"] == H
    first = records[0]["detections"][0]
    assert set(first) == {"box", "score", "label", "name"} and len(first["box"]) == 4

    out2 = tmp_path / "out2"
    rc = main(["predict", str(model_dir), str(images / "*.png"), "--out", str(out2)])
    assert rc == 0
    records = json.loads((out2 / "detections.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["b.png"]
    assert (out2 / "b.png").is_file()


def test_very_large_images_are_resized_as_configured(model_dir):
    det = Detector.from_pretrained(model_dir, max_size=80)  # eval_size 64 from the model
    assert det.resized_size(3000, 4000) == (60, 80)  # the longer side capped
    assert Detector.from_pretrained(model_dir).resized_size(3000, 4000) == (64, 85)
    seen = []
    det.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].tensors[0].shape))
    big = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    found = det(big, threshold=0.0)
    assert tuple(seen[0]) == (3, 60, 80)
    assert found.image_size == (3000, 4000) and len(found) > 0
    assert found.boxes[:, 0::2].max() <= 4000 and found.boxes[:, 1::2].max() <= 3000
    assert found.boxes[:, 2].max() > 1000  # scaled back to the original pixels
    with pytest.raises(ValueError, match="max_size 50"):
        Detector.from_pretrained(model_dir, max_size=50)


@pytest.mark.parametrize(("h", "w"), [(3, 2000), (2000, 3), (1, 500), (1, 1)])
def test_very_thin_images_are_detected(det, h, w):
    """The shorter side shrinks to 1 px to keep the longer one near max_size; every
    stride of the backbone keeps at least one row, so the model still sees the image."""
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    found = det(image, threshold=0.0)
    _check(found, (h, w))
    assert min(det.resized_size(h, w)) >= 1
    # in a batch with a normal picture the thin one is padded: the same detections
    both = det([image, np.zeros((H, W, 3), np.uint8)], threshold=0.0, batch_size=2)
    _check(both[0], (h, w))
    _check(both[1], (H, W))


def test_detect_files_reports_a_model_failure_per_image(det, rgb, tmp_path, monkeypatch):
    from dinodet.predict import DetectionError

    files = []
    for i, width in enumerate((W, W - 7, W)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb[:, :width]).save(files[-1])
    real = Detector.detect_batch

    def fails_on_narrow(self, images, sizes, threshold=0.3):
        if any(int(s[1]) == W - 7 for s in sizes):
            raise RuntimeError("CUDA out of memory")
        return real(self, images, sizes, threshold)

    monkeypatch.setattr(Detector, "detect_batch", fails_on_narrow)
    found = dict(det.detect_files(files, threshold=0.0, batch_size=2))
    assert isinstance(found[str(files[1])], DetectionError)
    assert str(found[str(files[1])]) == (f"detection failed on {files[1]}: RuntimeError: "
                                         "CUDA out of memory")
    for i in (0, 2):  # the image sharing the failed batch was detected alone, unpadded
        _check(found[str(files[i])], (H, W))
    _same(found[str(files[0])], det(files[0], threshold=0.0))
