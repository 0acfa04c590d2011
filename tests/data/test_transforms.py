from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from dinodet.data import CocoDetection, TransformConfig, build_transforms
from dinodet.data.transforms import shorter_side_size

RED, BLUE = (255, 0, 0), (0, 0, 255)
SMALL = TransformConfig(
    scales=(64, 80, 96),
    max_size=160,
    crop_resize_scales=(72, 96),
    crop_min=40,
    crop_max=80,
    eval_size=96,
)


@pytest.fixture
def two_boxes(tmp_path, image_writer, coco_writer):
    """One 96x128 image: a red box (label 0) and a blue box (label 1) on grey."""
    boxes = [(10, 20, 50, 60), (70, 30, 120, 90)]
    image_writer(tmp_path / "a.png", 96, 128, boxes, [RED, BLUE])
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": i + 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}
        for i, (x0, y0, x1, y1) in enumerate(boxes)
    ]
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    ann_file = coco_writer(tmp_path / "a.json", [{"id": 1, "file_name": "a.png"}], anns, cats)
    return ann_file, tmp_path


def _denormalise(image: torch.Tensor, cfg: TransformConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (image * std + mean) * 255


def _colour_mask(rgb: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """Pixels clearly of ``colour`` (one channel high, the others low)."""
    want = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)
    return ((rgb - want).abs() < 60).all(0)


def _pixel_boxes(target: dict) -> torch.Tensor:
    h, w = target["size"].tolist()
    return box_convert(target["boxes"], "cxcywh", "xyxy") * torch.tensor([w, h, w, h])


def test_train_boxes_follow_the_image(two_boxes):
    ds = CocoDetection(*two_boxes, transforms=build_transforms(True, SMALL))
    margin = 3  # resampling blurs the colour edges by a pixel or two
    dropped = kept = 0
    for seed in range(24):
        torch.manual_seed(seed)
        image, target = ds[0]
        assert image.shape[1:] == tuple(target["size"].tolist())
        rgb = _denormalise(image, SMALL)
        labels = target["labels"].tolist()
        dropped += 2 - len(labels)
        kept += len(labels)
        for label, colour in enumerate((RED, BLUE)):
            mask = _colour_mask(rgb, colour)
            if label not in labels:
                # Gone with its box: at most a sliver under 1 px before the last resize.
                assert mask.float().mean() < 0.03, seed
                continue
            x0, y0, x1, y1 = _pixel_boxes(target)[labels.index(label)].round().int().tolist()
            inside = mask[y0 + margin : y1 - margin, x0 + margin : x1 - margin]
            if inside.numel():
                assert inside.float().mean() > 0.95, seed
            outside = mask.clone()
            outside[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = False
            assert not outside.any(), seed
    assert dropped > 0 and kept > 0  # the crop both dropped and kept boxes


def test_flip_mirrors_cx(two_boxes):
    # Both resize branches and the crop are identities here, so only the flip acts.
    cfg = TransformConfig(
        scales=(96,), max_size=1000, crop_resize_scales=(96,), crop_min=999, crop_max=1000,
        eval_size=96, hflip_prob=1.0,
    )
    _, plain = CocoDetection(*two_boxes)[0]
    ds = CocoDetection(*two_boxes, transforms=build_transforms(True, cfg))
    for seed in range(4):
        torch.manual_seed(seed)
        image, flipped = ds[0]
        assert flipped["size"].tolist() == [96, 128]
        expected = plain["boxes"].clone()
        expected[:, 0] = 1 - expected[:, 0]
        torch.testing.assert_close(flipped["boxes"], expected)
        red = _colour_mask(_denormalise(image, cfg), RED)
        assert red[40, 128 - 30] and not red[40, 30]


@pytest.mark.parametrize("hw", [(96, 128), (20, 100)])
def test_train_sizes_within_scales_and_max_size(tmp_path, image_writer, coco_writer, hw):
    h, w = hw
    image_writer(tmp_path / "a.png", h, w)
    ann_file = coco_writer(tmp_path / "a.json", [{"id": 1, "file_name": "a.png"}], [], [])
    ds = CocoDetection(ann_file, tmp_path, transforms=build_transforms(True, SMALL))
    for seed in range(16):
        torch.manual_seed(seed)
        _, target = ds[0]
        short, long = sorted(target["size"].tolist())
        assert long <= SMALL.max_size
        # Either the shorter side is one of the scales, or the longer side hit the cap
        # (less the rounding down of both sides).
        assert short in SMALL.scales or long >= SMALL.max_size - long / short - 1, (seed, short)


def test_eval_resize_is_exact(tmp_path, image_writer, coco_writer):
    cfg = TransformConfig(eval_size=32, max_size=100)
    image_writer(tmp_path / "a.png", 48, 64)
    image_writer(tmp_path / "b.png", 20, 100)
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 4, 16, 20]}]
    ann_file = coco_writer(tmp_path / "a.json", images, anns, [{"id": 1, "name": "x"}])
    _, plain = CocoDetection(ann_file, tmp_path)[0]
    ds = CocoDetection(ann_file, tmp_path, transforms=build_transforms(False, cfg))
    image, target = ds[0]
    assert image.shape == (3, 32, 42) and target["size"].tolist() == [32, 42]
    assert target["orig_size"].tolist() == [48, 64]
    torch.testing.assert_close(target["boxes"], plain["boxes"], atol=0.02, rtol=0)
    image, target = ds[1]  # capped by max_size: 20x100 -> 20x100
    assert image.shape == (3, 20, 100)


def test_shorter_side_size_rule():
    assert shorter_side_size(480, 640, 800, 1333) == (800, 1066)
    assert shorter_side_size(640, 480, 800, 1333) == (1066, 800)
    assert shorter_side_size(100, 400, 800, 1333) == (333, 1332)
    assert shorter_side_size(300, 300, 128) == (128, 128)
    # Strips: the shorter side stays >= 1 px and the longer one is still capped.
    assert shorter_side_size(3, 2000, 64, 107) == (1, 107)
    assert shorter_side_size(5_000_000, 1, 800, 1333) == (1333, 1)
    assert shorter_side_size(3, 2000, 800, 1333) == (1, 666)


def test_config_validation_and_scaling():
    with pytest.raises(ValueError, match="crop_min"):
        TransformConfig(crop_min=700, crop_max=600)
    with pytest.raises(ValueError, match="scales"):
        TransformConfig(scales=())
    assert TransformConfig(scales=[256, 288]).scales == (256, 288)
    small = TransformConfig().scaled(320)
    assert small.eval_size == 320 and max(small.scales) == 320 and small.max_size == 533
    assert small.crop_resize_scales == (160, 200, 240) and (small.crop_min, small.crop_max) == (
        154, 240)
    assert TransformConfig().scaled(800) == TransformConfig()
