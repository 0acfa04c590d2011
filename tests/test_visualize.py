"""Class colours, drawing detections on images and saving them."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.visualize import class_colour, draw_detections, save_detections

H, W = 48, 64


def _image(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Values below 100 in every channel: no background pixel can equal a saturated colour.
    return torch.randint(0, 100, (3, H, W), generator=gen, dtype=torch.uint8)


def _hue(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def test_class_colour_is_deterministic_and_in_range():
    for label in range(200):
        colour = class_colour(label)
        assert colour == class_colour(label)
        assert len(colour) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        # Saturated and bright: the largest channel is full, the smallest well below it.
        assert max(colour) == 255
        assert min(colour) <= 255 * 0.15 + 1


def test_class_colour_follows_golden_ratio_hues():
    assert class_colour(0) == (255, 38, 38)  # hue 0, saturation 0.85, value 1
    for label in (1, 2, 7, 90):
        expected = (label * 0.618033988749895) % 1.0
        assert _hue(class_colour(label)) == pytest.approx(expected, abs=0.01)


def test_neighbouring_labels_get_distinct_colours():
    for label in range(100):
        a, b = class_colour(label), class_colour(label + 1)
        assert a != b
        # Golden-ratio steps put neighbours about 0.38 apart on the hue circle.
        gap = abs(_hue(a) - _hue(b))
        assert min(gap, 1 - gap) > 0.3
    assert len({class_colour(label) for label in range(80)}) == 80


def test_draw_detections_colours_box_edges_and_keeps_far_pixels():
    image = _image()
    before = image.clone()
    boxes = torch.tensor([[10.0, 8.0, 40.0, 40.0]])
    labels = torch.tensor([3])
    out = draw_detections(image, boxes, labels, torch.tensor([0.9]), width=3)
    assert isinstance(out, Image.Image)
    assert out.size == (W, H) and out.mode == "RGB"
    px = np.asarray(out)
    colour = class_colour(3)
    # Left, right and bottom edges, below the caption in the top-left corner.
    for y, x in [(30, 10), (30, 12), (35, 40), (35, 38), (40, 25), (38, 30)]:
        assert tuple(px[y, x]) == colour, (y, x)
    # Inside the box, away from edges and caption, and well outside it: untouched.
    orig = before.permute(1, 2, 0).numpy()
    for y, x in [(30, 25), (2, 2), (45, 60), (20, 55), (45, 5)]:
        assert tuple(px[y, x]) == tuple(orig[y, x]), (y, x)
    np.testing.assert_array_equal(px[:, 45:], orig[:, 45:])
    np.testing.assert_array_equal(px[43:], orig[43:])
    # The input tensor is not drawn on.
    assert torch.equal(image, before)


def test_draw_detections_one_colour_per_class():
    image = _image(1)
    boxes = torch.tensor([[2.0, 2.0, 20.0, 40.0], [30.0, 2.0, 60.0, 40.0]])
    labels = torch.tensor([0, 1])
    px = np.asarray(draw_detections(image, boxes, labels, torch.tensor([0.5, 0.7]),
                                    class_names=["cat", "dog"], width=2))
    assert tuple(px[35, 2]) == class_colour(0)
    assert tuple(px[35, 30]) == class_colour(1)
    assert tuple(px[35, 2]) != tuple(px[35, 30])


def test_draw_detections_accepts_pil_images():
    tensor = _image(2)
    pil = Image.fromarray(tensor.permute(1, 2, 0).numpy())
    boxes, labels, scores = torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([7]), \
        torch.tensor([0.3])
    from_pil = draw_detections(pil, boxes, labels, scores)
    from_tensor = draw_detections(tensor, boxes, labels, scores)
    assert from_pil.size == (W, H)
    np.testing.assert_array_equal(np.asarray(from_pil), np.asarray(from_tensor))
    # A greyscale PIL image is converted to RGB first.
    grey = draw_detections(pil.convert("L"), boxes, labels, scores)
    assert grey.mode == "RGB" and grey.size == (W, H)
    assert tuple(np.asarray(grey)[20, 5]) == class_colour(7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_draw_detections_rejects_non_uint8(dtype):
    image = _image().to(dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        draw_detections(image, torch.tensor([[1.0, 1.0, 5.0, 5.0]]), torch.tensor([0]),
                        torch.tensor([1.0]))


def test_draw_detections_without_boxes_returns_the_image_unchanged():
    image = _image(3)
    out = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0))
    assert out.size == (W, H)
    np.testing.assert_array_equal(np.asarray(out), image.permute(1, 2, 0).numpy())


def test_save_detections_writes_png_creating_folders(tmp_path):
    image = _image(4)
    path = tmp_path / "a" / "b" / "out.png"
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0]])
    returned = save_detections(path, image, boxes, torch.tensor([2]), torch.tensor([0.8]),
                               class_names=["a", "b", "c"])
    assert returned == path and path.is_file()
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.size == (W, H)
        px = np.asarray(saved.convert("RGB"))
    np.testing.assert_array_equal(
        px, np.asarray(draw_detections(image, boxes, torch.tensor([2]), torch.tensor([0.8]),
                                       class_names=["a", "b", "c"])))
    # A string path works too.
    other = save_detections(str(tmp_path / "c" / "x.png"), image, boxes, torch.tensor([2]),
                            torch.tensor([0.8]))
    assert other.is_file()
