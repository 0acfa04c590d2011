"""Seconds per training step of a preset's recipe as it is, through ``dinodet train``.

Generates a COCO-format dataset of images 256–320 px on a side (the generator of
``make demo``), then runs the command a user would, ``dinodet train --preset cpu-small``
with the data paths only (no size, batch or optimiser option), for one epoch, and reads the
training log: each step record holds the images per second since the previous one, so the
seconds per step of the recipe's batch are ``batch / images_per_s``. The first logged step
(model warm-up, the loader's first fetch) is left out. The recipe's own augmentation,
loader (its ``num_workers``) and evaluation size apply; evaluation is switched off so that
only training is timed.

    python benchmarks/bench_recipe.py --preset cpu-small --images 96 --json recipe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import stats, write_json
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.config import load_train_config


def step_seconds(log_file: Path, batch: int) -> list[float]:
    """Seconds per step of ``batch`` images from ``log.jsonl``'s step records (the first
    left out); the logger writes one record per ``log_every`` steps, so with
    ``log_every=1`` this is every step."""
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if r["type"] == "step"][1:]
    return [batch / s for s in speeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--images", type=int, default=96, help="training images (one epoch)")
    parser.add_argument("--min-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    recipe = load_train_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = ((args.min_size, args.max_size), (args.min_size, args.max_size))
        data = make_synthetic_coco(Path(tmp) / "data", num_train=args.images, num_val=1,
                                   image_size=sizes, seed=0)
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "dinodet", "train", "--preset", args.preset,
                   "--train-ann", str(data["train_ann"]),
                   "--train-images", str(data["train_images"]), "--out", str(run),
                   "--epochs", "1", "--set", "log_every=1", "--set", "eval_every_epochs=0",
                   "--no-progress"]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        seconds = step_seconds(run / "log.jsonl", recipe.batch_size)
    result = stats(seconds)
    t = recipe.data.transform
    print(f"{args.preset}: {statistics.median(seconds):.2f} s per step of {recipe.batch_size} "
          f"images (median of {len(seconds)} steps; min {result['min_s']:.2f}, max "
          f"{result['max_s']:.2f}); images {args.min_size}-{args.max_size} px, training "
          f"scales {min(t.scales)}-{max(t.scales)}, evaluation {t.eval_size}")
    if args.json:
        write_json(args.json, "recipe_step", {
            "preset": args.preset, "images": args.images, "batch_size": recipe.batch_size,
            "image_px": [args.min_size, args.max_size], "scales": list(t.scales),
            "num_workers": recipe.data.num_workers}, result)


if __name__ == "__main__":
    main()
