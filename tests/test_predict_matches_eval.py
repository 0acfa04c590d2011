"""`dinodet predict` and `dinodet eval` feed the model the same pixels: one EvalTransform.

For images of many odd sizes (some below the longer-side cap, some capped by it), the
detections `dinodet predict CKPT IMG --threshold 0` writes for each image equal the COCO
results `dinodet eval` writes for a COCO file holding the same images. Eval runs with
batch 1: a batch of several images is zero-padded to its largest one (as the original
does), and the padding changes what the backbone sees. Predict clips boxes to the image
(a user-facing nicety); eval writes them unclipped, as the original's evaluation does, so
the eval boxes are clipped here before comparing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinodet
from dinodet.cli import main
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.transforms import EvalTransform, build_transforms

CLASSES = [{"label": 0, "category_id": 1, "name": "cat"},
           {"label": 1, "category_id": 3, "name": "dog"},
           {"label": 2, "category_id": 7, "name": "bird"}]
TRANSFORM = EvalTransform(64, 100)
# (h, w): odd sizes, portrait and landscape, below and above the longer-side cap.
SIZES = [(37, 91), (53, 201), (65, 67), (71, 33), (97, 151), (111, 47), (123, 229),
         (139, 141), (157, 61), (201, 333), (45, 45)]


def _old_predict_size(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
    """The rule `dinodet predict` used before there was one EvalTransform."""
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agree")
    torch.manual_seed(0)
    cfg = DINOConfig(num_classes=3, backbone=BackboneConfig(
        name="resnet18", frozen_batchnorm=False, freeze_stem=False), hidden_dim=64,
        num_heads=4, enc_layers=1, dec_layers=2, dim_feedforward=128, num_queries=20,
        dn_number=10, num_select=20)
    dinodet.save_pretrained(dinodet.build_model(cfg).eval(), root / "model",
                            extra={"classes": CLASSES}, transform=TRANSFORM)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": c["category_id"], "name": c["name"]} for c in CLASSES]}
    for i, (h, w) in enumerate(SIZES, 1):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[h // 4: h // 2, w // 4: w // 2] = (240, 40, 40)
        Image.fromarray(pixels).save(images / f"im{i}.png")
        coco["images"].append({"id": i, "file_name": f"im{i}.png", "height": h, "width": w})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 3, "iscrowd": 0,
                                    "bbox": [w / 4, h / 4, w / 4, h / 4],
                                    "area": w * h / 16})
    (root / "ann.json").write_text(json.dumps(coco))
    return {"root": root, "model": root / "model", "images": images, "ann": root / "ann.json"}


def test_the_sizes_cover_both_branches_and_the_old_disagreement():
    capped = [TRANSFORM.size * max(h, w) / min(h, w) > TRANSFORM.max_limit for h, w in SIZES]
    assert 3 <= sum(capped) <= len(SIZES) - 3
    changed = [s for s in SIZES if TRANSFORM.output_size(*s) != _old_predict_size(*s, 64, 100)]
    assert len(changed) >= 2  # sizes on which the two commands used to disagree


def test_predict_and_eval_give_the_same_detections(case, tmp_path):
    predicted = {}
    for i in range(1, len(SIZES) + 1):
        out = tmp_path / f"pred{i}"
        assert main(["predict", str(case["model"]), str(case["images"] / f"im{i}.png"),
                     "--out", str(out), "--threshold", "0"]) == 0
        (record,) = json.loads((out / "detections.json").read_text())
        predicted[i] = record["detections"]
    results = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(case["model"]), "--ann", str(case["ann"]),
                 "--images", str(case["images"]), "--out", str(results), "--batch-size", "1",
                 "--workers", "0"]) == 0
    evaluated: dict[int, list] = {}
    for r in json.loads(results.read_text()):
        evaluated.setdefault(r["image_id"], []).append(r)
    category = {c["label"]: c["category_id"] for c in CLASSES}
    for i, (h, w) in enumerate(SIZES, 1):
        pred = sorted(predicted[i], key=lambda d: -d["score"])
        ev = sorted(evaluated[i], key=lambda d: -d["score"])
        assert len(pred) == len(ev) == 20, i
        np.testing.assert_allclose([d["score"] for d in pred], [d["score"] for d in ev],
                                   atol=1e-5, rtol=0, err_msg=f"image {i} ({h}x{w})")
        assert [category[d["label"]] for d in pred] == [d["category_id"] for d in ev]
        x, y, bw, bh = np.array([d["bbox"] for d in ev]).T
        ev_xyxy = np.stack([np.clip(x, 0, w), np.clip(y, 0, h), np.clip(x + bw, 0, w),
                            np.clip(y + bh, 0, h)], 1)
        np.testing.assert_allclose(np.array([d["box"] for d in pred]), ev_xyxy, atol=0.01,
                                   rtol=0, err_msg=f"image {i} ({h}x{w})")


def test_every_inference_path_uses_the_checkpoints_transform(case, tmp_path):
    det = dinodet.Detector.from_pretrained(case["model"])
    assert det.transform == TRANSFORM
    loaded = dinodet.load_model(case["model"])
    assert loaded.transform == TRANSFORM
    # evaluation's dataset transform is the same object type with the same settings
    from dinodet.data.transforms import TransformConfig

    assert build_transforms(False, TransformConfig(eval_size=64, max_size=100)) == TRANSFORM
    # --size / --max-size override it the same way in both commands
    assert det.transform.with_sizes(96) == EvalTransform(96)
    assert EvalTransform(96).max_size == 160
    assert det.transform.with_sizes(None, 80) == EvalTransform(64, 80)
    assert EvalTransform.from_metadata(TRANSFORM.metadata()) == TRANSFORM
