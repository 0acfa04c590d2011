"""Data: COCO, YOLO and Pascal VOC datasets, the v2 augmentation recipe, batching, synthetic
shapes.

    open_dataset(ann, images=None, format="auto", split=None, transforms=None, ...)
        any of the three formats as a CocoDetection (YOLO / VOC read into COCO in memory)
    CocoDetection(ann_file | coco dict | DatasetSource, image_dir, transforms=None,
                  keep_category_ids=False, strict=False, max_pixels=None,
                  allow_outside_image_dir=False)
    read_yolo(path, split=None), read_voc(root, split=None) -> DatasetSource
    detect_format(path), dataset_splits(path), convert_dataset(src, out_dir, to="coco")
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
from dinodet.data.formats import (
    FORMATS,
    convert_dataset,
    dataset_splits,
    detect_format,
    open_dataset,
    read_source,
)
from dinodet.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageFormatError,
    ImageReadError,
    ImageTooLargeError,
    decode_image,
    load_image,
    resolve_max_pixels,
)
from dinodet.data.source import DatasetSource
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.data.synthetic_hard import make_hard_coco
from dinodet.data.transforms import EvalTransform, TransformConfig, build_transforms
from dinodet.data.voc import read_voc
from dinodet.data.yolo import read_yolo

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "FORMATS", "MAX_CATEGORY_ID", "AnnotationWarning", "Batch",
           "CocoDetection", "DatasetSource", "EpochSampler", "EvalTransform", "ImageFormatError",
           "ImageReadError", "ImageTooLargeError", "SkippedImage", "SkippedImageWarning",
           "TransformConfig", "build_loader", "build_transforms", "collate_fn", "convert_dataset",
           "dataset_splits", "decode_image", "detect_format", "load_image", "make_hard_coco",
           "make_synthetic_coco", "open_dataset", "read_source", "read_voc", "read_yolo",
           "resolve_max_pixels", "seed_worker"]
