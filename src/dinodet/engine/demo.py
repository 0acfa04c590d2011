"""``make demo``: synthetic data → train ``cpu-small`` → evaluate → annotated images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.config import load_train_config
from dinodet.predict import load_image

# The data and the budget; the training recipe is the cpu-small preset's, as it is.
DEMO_SETTINGS: dict[str, Any] = {
    "image_size": 320,
    "num_train": 240,
    "num_val": 40,
    "epochs": 8,
}


def run_demo(out_dir: str | Path = "runs/demo", epochs: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the whole demo; returns the training summary (with the final metrics)."""
    from dinodet.engine.train import train

    s = DEMO_SETTINGS
    out = Path(out_dir)
    size = s["image_size"]
    paths = make_synthetic_coco(out / "data", num_train=s["num_train"], num_val=s["num_val"],
                                image_size=(size, size), seed=0)
    print(f"synthetic dataset: {s['num_train']} train / {s['num_val']} val images of "
          f"{size}x{size} in {paths['root']}")
    cfg = load_train_config("cpu-small", epochs=epochs or s["epochs"],
                            eval_every_epochs=0, out_dir=str(out / "run"),
                            train_ann=str(paths["train_ann"]),
                            train_images=str(paths["train_images"]),
                            val_ann=str(paths["val_ann"]), val_images=str(paths["val_images"]))
    summary = train(cfg, progress=progress)

    _annotate(summary["latest_checkpoint"], paths["val_images"], out / "annotated")
    metrics = summary["metrics"] or {}
    print(f"\ndemo: AP {metrics.get('AP', float('nan')):.3f}, "
          f"AP50 {metrics.get('AP50', float('nan')):.3f} after {summary['seconds'] / 60:.1f} "
          f"min; annotated validation images in {out / 'annotated'}")
    return summary


def _annotate(checkpoint: str, image_dir: Path, out_dir: Path, limit: int = 12,
              threshold: float = 0.25) -> None:
    """Draw the checkpoint's detections on the first validation images, resized the way
    evaluation resizes them (the checkpoint's EvalTransform)."""
    from dinodet.predict import Detector
    from dinodet.visualize import save_detections

    detector = Detector.from_pretrained(checkpoint)
    files = sorted(image_dir.glob("*.jpg"))[:limit]
    for file, found in detector.detect_files(files, threshold=threshold):
        if isinstance(found, Exception):
            raise found
        save_detections(out_dir / Path(file).name.replace(".jpg", ".png"),
                        load_image(file), found.boxes, found.labels, found.scores,
                        found.class_names)
