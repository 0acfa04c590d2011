"""Data: COCO-format datasets, the v2 augmentation recipe, batching, synthetic shapes.

    CocoDetection(ann_file, image_dir, transforms=None, keep_category_ids=False, strict=False)
    build_transforms(train, cfg=TransformConfig())
    build_loader(dataset, batch_size, train, num_workers, seed, rank, world_size, epoch, ...)
    EvalTransform(size, max_size), load_image(any image form)
    make_synthetic_coco(out_dir, num_train, num_val, image_size, num_classes, seed)
"""

from __future__ import annotations

from dinodet.data.coco import (
    AnnotationWarning,
    CocoDetection,
    SkippedImage,
    SkippedImageWarning,
)
from dinodet.data.collate import Batch, EpochSampler, build_loader, collate_fn, seed_worker
from dinodet.data.images import load_image
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.data.transforms import EvalTransform, TransformConfig, build_transforms

__all__ = ["AnnotationWarning", "Batch", "CocoDetection", "EpochSampler", "EvalTransform",
           "SkippedImage", "SkippedImageWarning", "TransformConfig", "build_loader",
           "build_transforms", "collate_fn", "load_image", "make_synthetic_coco", "seed_worker"]
