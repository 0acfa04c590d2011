"""A picture of sliced detection: a large generated image with small and large white
squares, the tile grid drawn in grey, the merged boxes of a sliced ``Detector`` in colour,
and the plain (unsliced) detections listed beside for comparison.

By default the model is a deterministic stand-in, not a trained DINO: it has DINO's output
interface and "detects" the bright blobs of at least 6 pixels in its input (after the
Detector's resize), so the picture shows what slicing does for small objects, with the real
preprocessing, tiling, box mapping and merging, in seconds and without weights.

With ``--checkpoint CKPT --images DIR`` it uses a trained model instead: the large image is
a ``--grid`` × ``--grid`` mosaic of DIR's images (e.g. the validation images of
``make demo``), which the plain Detector shrinks to its evaluation size, and the picture
shows the unsliced detections (left) beside the sliced ones (right), tiles of the model's
evaluation size.

    python benchmarks/sliced_example.py sliced.png
    python benchmarks/sliced_example.py sliced.png --tile 320 --overlap 0.3 --merge wbf --full
    python benchmarks/sliced_example.py sliced.jpg --checkpoint runs/demo/run/best.pt \
        --images runs/demo/data/val --grid 3
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import torch
from PIL import ImageDraw
from scipy import ndimage
from torch import Tensor, nn

from dinodet.predict import Detections, Detector
from dinodet.slicing import Slicing, tile_grid
from dinodet.structures import ImageBatch
from dinodet.visualize import draw_detections

MIN_SIDE = 6  # input pixels a blob needs to be seen


class BrightBlobs(nn.Module):
    """DINO's outputs (``pred_logits`` [B, Q, 1], ``pred_boxes`` [B, Q, 4] normalised
    cxcywh) for the bright blobs of every input with both sides >= ``MIN_SIDE``."""

    def __init__(self, queries: int = 50) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(num_classes=1, num_select=queries)
        self.queries = queries

    def forward(self, images: ImageBatch) -> dict[str, Tensor]:
        b = len(images)
        logits = torch.full((b, self.queries, 1), -20.0)
        boxes = torch.full((b, self.queries, 4), 0.5)
        bright = (images.tensors.mean(1) > 1.0) & ~images.mask
        for i, (h, w) in enumerate(images.image_sizes):
            labelled, _ = ndimage.label(bright[i, :h, :w].numpy(), structure=np.ones((3, 3)))
            q = 0
            for ys, xs in ndimage.find_objects(labelled):
                if q == self.queries or min(xs.stop - xs.start, ys.stop - ys.start) < MIN_SIDE:
                    continue
                logits[i, q, 0] = 4.0
                boxes[i, q] = torch.tensor([(xs.start + xs.stop) / 2 / w,
                                            (ys.start + ys.stop) / 2 / h,
                                            (xs.stop - xs.start) / w, (ys.stop - ys.start) / h])
                q += 1
        return {"pred_logits": logits, "pred_boxes": boxes}


def scene(height: int, width: int, seed: int) -> Tensor:
    """uint8 [3, H, W]: dark noise, many small white squares and a few large ones."""
    rng = np.random.default_rng(seed)
    image = rng.integers(10, 60, (3, height, width), dtype=np.uint8)
    for side, count in ((12, 40), (20, 20), (160, 3)):
        for _ in range(count):
            y, x = rng.integers(0, height - side), rng.integers(0, width - side)
            image[:, y:y + side, x:x + side] = 255
    return torch.from_numpy(image)


def mosaic(image_dir: str, grid: int, side: int) -> Tensor:
    """uint8 [3, grid·side, grid·side]: the first grid² images of ``image_dir``, each
    resized to side × side, in rows."""
    from pathlib import Path

    from dinodet.predict import load_image

    files = sorted(f for f in Path(image_dir).iterdir()
                   if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:grid * grid]
    if len(files) < grid * grid:
        raise SystemExit(f"{image_dir} has {len(files)} images; --grid {grid} needs "
                         f"{grid * grid}")
    out = torch.zeros(3, grid * side, grid * side, dtype=torch.uint8)
    for k, f in enumerate(files):
        tile = torch.nn.functional.interpolate(load_image(f)[None].float(), size=(side, side),
                                               mode="bilinear", antialias=True)[0]
        y, x = divmod(k, grid)
        out[:, y * side:(y + 1) * side, x * side:(x + 1) * side] = tile.round().clamp(0, 255)
    return out


def trained(args: argparse.Namespace) -> None:
    from PIL import Image

    det = Detector.from_pretrained(args.checkpoint)
    side = args.tile or det.transform.size
    image = mosaic(args.images, args.grid, side)
    plain = det(image, threshold=args.threshold)
    sliced = det(image, threshold=args.threshold,
                 slice=Slicing(side, args.overlap, args.merge, full=args.full, batch_size=8))
    assert isinstance(plain, Detections) and isinstance(sliced, Detections)
    panels = []
    for name, found in (("unsliced", plain), (f"sliced ({side} px tiles)", sliced)):
        drawn = draw_detections(image, found.boxes, found.labels, found.scores,
                                found.class_names, width=2)
        ImageDraw.Draw(drawn).text((8, 8), f"{name}: {len(found)} detections >= "
                                   f"{args.threshold}", fill=(255, 255, 0))
        panels.append(drawn)
    w, h = panels[0].size
    both = Image.new("RGB", (2 * w + 16, h), (255, 255, 255))
    both.paste(panels[0], (0, 0))
    both.paste(panels[1], (w + 16, 0))
    both.save(args.out)
    print(f"wrote {args.out}: {len(plain)} detections unsliced, {len(sliced)} sliced")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--size", type=int, nargs=2, default=(1200, 1600), metavar=("H", "W"))
    p.add_argument("--eval-size", type=int, default=256, help="the Detector's resize")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--merge", choices=["nms", "wbf"], default="nms")
    p.add_argument("--full", action="store_true", help="add the full-image pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="a trained model instead of the stand-in")
    p.add_argument("--images", help="with --checkpoint: the images of the mosaic")
    p.add_argument("--grid", type=int, default=3, help="with --checkpoint: images per side")
    p.add_argument("--threshold", type=float, default=0.3)
    args = p.parse_args()
    if args.checkpoint:
        if not args.images:
            p.error("--checkpoint needs --images")
        if args.tile == p.get_default("tile"):
            args.tile = 0  # the model's evaluation size
        trained(args)
        return

    image = scene(*args.size, args.seed)
    det = Detector(BrightBlobs(), [{"label": 0, "name": "square"}], eval_size=args.eval_size)
    plain = det(image, threshold=0.5)
    sliced = det(image, threshold=0.5, slice=Slicing(args.tile, args.overlap, args.merge,
                                                     full=args.full, batch_size=16))
    assert isinstance(plain, Detections) and isinstance(sliced, Detections)
    drawn = draw_detections(image, sliced.boxes, sliced.labels, sliced.scores,
                            sliced.class_names, width=2)
    pen = ImageDraw.Draw(drawn)
    for x0, y0, x1, y1 in tile_grid(*args.size, args.tile, args.overlap):
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(140, 140, 140), width=1)
    pen.text((8, 8), f"sliced ({args.tile} px, overlap {args.overlap}, {args.merge}): "
             f"{len(sliced)} found; unsliced: {len(plain)}", fill=(255, 255, 0))
    drawn.save(args.out)
    print(f"wrote {args.out}: {len(sliced)} detections sliced, {len(plain)} unsliced")


if __name__ == "__main__":
    main()
