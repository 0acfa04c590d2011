"""Draw detections on images: boxes, class names and scores that stay readable."""

from __future__ import annotations

import colorsys
import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes


def class_colour(label: int) -> tuple[int, int, int]:
    """A saturated colour per class, spread around the hue circle (golden-ratio steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Tensor | Image.Image, boxes: Tensor, labels: Tensor, scores: Tensor,
                    class_names: Sequence[str] | None = None, width: int = 3) -> Image.Image:
    """Annotated copy of ``image`` (uint8 [3, H, W] tensor or PIL) with xyxy pixel ``boxes``.

    Each box gets its class colour; the caption (``name score``) is drawn by torchvision on
    a filled box of that colour, so it stays readable on any background.
    """
    if isinstance(image, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        pixels = pil_to_tensor(image.convert("RGB"))
    else:
        pixels = image
    if pixels.dtype != torch.uint8:
        raise TypeError(f"draw_detections needs a uint8 image, got {pixels.dtype}")
    names = [class_names[int(lab)] if class_names is not None and int(lab) < len(class_names)
             else str(int(lab)) for lab in labels]
    captions = [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
    colours = [class_colour(int(lab)) for lab in labels]
    if len(boxes):
        pixels = draw_bounding_boxes(pixels, boxes.float().cpu(), labels=captions,
                                     colors=colours, width=width, fill_labels=True,
                                     label_colors="black")
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def save_detections(path: str | Path, image: Tensor | Image.Image, boxes: Tensor,
                    labels: Tensor, scores: Tensor, class_names: Sequence[str] | None = None
                    ) -> Path:
    """Write :func:`draw_detections`' copy to ``path`` (format by its suffix), atomically: a
    temporary file beside it, then ``os.replace``, so that ``path`` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_detections(image, boxes, labels, scores, class_names)
    # A unique name (O_EXCL) with the usual permissions (0o666 less the umask; mkstemp's
    # would be 0o600).
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            drawn.save(f, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
