"""Data: COCO-format datasets, the v2 augmentation recipe, batching, synthetic shapes.

    CocoDetection(ann_file, image_dir, transforms=None, keep_category_ids=False, strict=False,
                  max_pixels=None, allow_outside_image_dir=False)
    build_transforms(train, cfg=TransformConfig())
    build_loader(dataset, batch_size, train, num_workers, seed, rank, world_size, epoch, ...)
    EvalTransform(size, max_size), load_image(any image form, max_pixels=None)
    make_synthetic_coco(out_dir, num_train, num_val, image_size, num_classes, seed)
"""

from __future__ import annotations

from dinodet.data.coco import (
    MAX_CATEGORY_ID,
    AnnotationWarning,
    CocoDetection,
    SkippedImage,
    SkippedImageWarning,
)
from dinodet.data.collate import Batch, EpochSampler, build_loader, collate_fn, seed_worker
from dinodet.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    load_image,
    resolve_max_pixels,
)
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.data.transforms import EvalTransform, TransformConfig, build_transforms

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "MAX_CATEGORY_ID", "AnnotationWarning", "Batch",
           "CocoDetection", "EpochSampler", "EvalTransform", "ImageReadError",
           "ImageTooLargeError", "SkippedImage", "SkippedImageWarning", "TransformConfig",
           "build_loader", "build_transforms", "collate_fn", "load_image", "make_synthetic_coco",
           "resolve_max_pixels", "seed_worker"]
