"""Load a trained or converted model by path and evaluate it on a COCO-format dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinodet.convert import CheckpointError, from_original, load_into, load_pretrained
from dinodet.model.dino import DINO


@dataclass
class LoadedModel:
    model: DINO
    classes: list[dict[str, Any]] | None  # label, category_id, name (None: class = id)
    eval_size: int | None  # the shorter side it was trained/evaluated at, if known
    kind: str


def load_model(path: str | Path, variant: str | None = None) -> LoadedModel:
    """A model in eval mode from a dinodet training checkpoint (EMA weights when present),
    a model directory, or an original DINO ``.pth`` (with ``variant``)."""
    path = Path(path)
    if path.is_dir():
        import json

        meta = json.loads((path / "config.json").read_text()) if (
            path / "config.json").is_file() else {}
        return LoadedModel(load_pretrained(path), meta.get("classes"), meta.get("eval_size"),
                           "dinodet model directory")
    from dinodet.engine.checkpoint import load_checkpoint

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = load_checkpoint(path)
    except Exception:  # not a dinodet checkpoint (e.g. an original .pth with a Namespace)
        ckpt = None
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        from dinodet.config import DINOConfig

        model = DINO(DINOConfig.from_dict(ckpt["model_config"]))
        weights = ckpt["ema"]["module"] if ckpt.get("ema") else ckpt["model"]
        load_into(model, weights, str(path))
        eval_size = ckpt.get("config", {}).get("data", {}).get("eval_size")
        return LoadedModel(model.eval(), ckpt.get("classes"), eval_size, "dinodet checkpoint")
    if variant is None:
        raise CheckpointError(f"{path} is not a dinodet checkpoint; for an original DINO "
                              "checkpoint give its --variant (e.g. r50-4scale)")
    return LoadedModel(from_original(path, variant), None, None, "original DINO checkpoint")


def evaluate_checkpoint(checkpoint: str | Path, ann: str | Path, images: str | Path,
                        out: str | Path | None = None, variant: str | None = None,
                        batch_size: int = 2, eval_size: int | None = None,
                        keep_category_ids: bool = False, num_workers: int = 2,
                        device: str = "auto") -> Any:
    """COCO metrics of a checkpoint; writes COCO-format detections to ``out`` if given."""
    from dinodet.data.coco import CocoDetection
    from dinodet.data.collate import build_loader
    from dinodet.data.transforms import TransformConfig, build_transforms
    from dinodet.engine.distributed import resolve_device
    from dinodet.engine.evaluate import evaluate, write_results

    loaded = load_model(checkpoint, variant)
    # The original checkpoints index classes by raw COCO id.
    keep_ids = keep_category_ids or loaded.classes is None
    size = eval_size or loaded.eval_size or 800
    tcfg = TransformConfig(eval_size=size, max_size=max(size, round(size * 1333 / 800)))
    dataset = CocoDetection(ann, images, build_transforms(False, tcfg),
                            keep_category_ids=keep_ids)
    label_to_id = dataset.label_to_category_id
    names = dataset.class_names
    if loaded.classes is not None:
        label_to_id = [c["category_id"] for c in loaded.classes]
        names = [c["name"] for c in loaded.classes]
        unknown = sorted(set(dataset.label_to_category_id) - set(label_to_id))
        if unknown:
            raise ValueError(f"{ann} has categories {unknown[:10]} the checkpoint was not "
                             "trained on")
    if loaded.model.num_classes < len(label_to_id):
        raise ValueError(f"the model predicts {loaded.model.num_classes} classes but "
                         f"{ann} needs {len(label_to_id)}")
    dev = resolve_device(device)
    model = loaded.model.to(dev)
    loader = build_loader(dataset, batch_size, train=False, num_workers=num_workers)
    result, results = evaluate(model, loader, dev, label_to_id, dataset.coco,
                               num_select=model.cfg.num_select, class_names=names)
    if out is not None:
        write_results(out, results)
    return result
