"""Ablations of DINO's parts at equal budgets, on the hard synthetic dataset.

Trains ``cpu-small`` as its recipe is, once per variant and seed, through the real
:func:`dinodet.engine.train.train`, and prints AP and AP50 (mean ± sample std over seeds)
of every variant with its difference to ``full`` (paired by seed: mean ± std of the
per-seed differences)::

    full               the preset as it is
    no_denoising       model.denoising=off
    positives_only     model.denoising=positives_only   (DN without the negative queries)
    static_queries     model.query_selection=static     (learned anchors, no encoder top-k)
    look_forward_once  model.look_forward_twice=false

Every run gets the same recipe (``load_train_config("cpu-small", ...)`` with only the data
paths, ``out_dir``, ``epochs`` and ``seed``, plus the variant's one ``--set``), the same
images (one dataset for all, from ``--data-seed``) and the same number of epochs; the
training seed changes the initialisation, data order and augmentation. Two bookkeeping
settings that do not change training are added: ``eval_every_epochs=0`` (evaluate once, at
the end) and ``keep_last=1``; ``--set`` adds recipe overrides to every variant.

Resumable: each finished (variant, seed) is appended to ``OUT/runs.jsonl`` under a key of
its whole resolved config and the data's annotation files, so a rerun with the same
settings skips it (and an interrupted run continues from its last epoch checkpoint);
changed settings or a changed recipe make new runs. Checkpoints of finished runs are
deleted unless ``--keep-checkpoints``. Seeds run in the outer loop, so a partial run
already has paired comparisons.

Reproduce (2 CPU cores; the script prints an ETA after every run). The whole protocol is
15 runs of the recipe. On the 2-core Zen 2 EPYC of 2026-12-02 a run of 128 images x 12
epochs took 22-29 min with one torch thread while a second run used the other core (two
such runs side by side get more done than one run on both cores); at 400 images, three
times that. It can be spent in pieces: Ctrl-C saves a checkpoint and a rerun resumes from
it, and two processes can share one ``--out`` if they train different variants or seeds::

    .venv/bin/python benchmarks/ablation.py --threads 1 --seeds 0 1 2 \\
        --variants full no_denoising positives_only --num-train 128 --num-val 100 \\
        --image-size 256 --data runs/hard128 --out runs/ablation-hard &
    .venv/bin/python benchmarks/ablation.py --threads 1 --seeds 0 1 2 \\
        --variants static_queries look_forward_once --num-train 128 --num-val 100 \\
        --image-size 256 --data runs/hard128 --out runs/ablation-hard

(the dataset must exist before the second starts: generate it with the first, or with
``make_hard_coco``; it is the same on every CPU). All 15 runs (seeds 0, 1, 2 of every
variant) are recorded in ``benchmarks/results/ablation-hard128-runs.jsonl``: copied to
``runs/ablation-hard/runs.jsonl``, the commands above print the table without training.
On a 2-core AVX-512 EPYC (Zen 5) a run took 9-11 min in the same two-process layout.

A screen of about 40 minutes (one seed, half the images, half the epochs: no spread to
judge differences by, so read it as a smoke test of the protocol, not as a result)::

    .venv/bin/python benchmarks/ablation.py --threads 2 --seeds 0 --epochs 6 \\
        --num-train 200 --num-val 50 --image-size 256 --out runs/ablation-screen

Smoke run (seconds): ``--num-train 4 --num-val 2 --image-size 64 --epochs 1 --seeds 0
--variants full no_denoising --set batch_size=2 --set data.num_workers=0
--set "data.transform={scales: [64], crop_resize_scales: [64], crop_min: 48,
crop_max: 64, eval_size: 64, max_size: 64}"``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from common import print_table, summarize, write_json

#: Variant name -> its ``--set`` strings on top of the recipe.
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_denoising": ["model.denoising=off"],
    "positives_only": ["model.denoising=positives_only"],
    "static_queries": ["model.query_selection=static"],
    "look_forward_once": ["model.look_forward_twice=false"],
}

#: Added to every run before ``--set``: they change what is saved and evaluated, not training.
BOOKKEEPING = ["eval_every_epochs=0", "keep_last=1"]

METRICS = ("AP", "AP50")


# --------------------------------------------------------------------------- data


@contextlib.contextmanager
def hard_data(data_dir: str | None, num_train: int, num_val: int, image_size: int,
              seed: int) -> Iterator[dict[str, Path]]:
    """The dataset's paths: ``data_dir`` if it already holds COCO files (generated here
    with the same settings, or a dataset of your own), else the hard dataset generated
    into ``data_dir`` (kept) or into a temporary folder (deleted after)."""
    from dinodet.data.synthetic_hard import make_hard_coco

    wanted = {"generator": "make_hard_coco", "num_train": num_train, "num_val": num_val,
              "image_size": image_size, "seed": seed}
    if data_dir is None:
        with tempfile.TemporaryDirectory(prefix="dinodet-hard-") as tmp:
            print(f"generating the hard dataset ({num_train} train / {num_val} val, "
                  f"{image_size} px, seed {seed}) in {tmp}", flush=True)
            yield make_hard_coco(tmp, num_train, num_val, (image_size, image_size), seed)
        return
    root = Path(data_dir)
    paths = {"root": root,
             "train_ann": root / "annotations" / "instances_train.json",
             "train_images": root / "train",
             "val_ann": root / "annotations" / "instances_val.json",
             "val_images": root / "val"}
    marker = root / "hard_data.json"
    if marker.exists():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise SystemExit(f"{root} holds the hard dataset made with {found}, not {wanted}; "
                             "give another --data folder or matching options")
        yield paths
        return
    if paths["train_ann"].exists() and paths["val_ann"].exists():
        print(f"using the COCO dataset in {root} as it is", flush=True)
        yield paths
        return
    print(f"generating the hard dataset in {root}", flush=True)
    paths = make_hard_coco(root, num_train, num_val, (image_size, image_size), seed)
    marker.write_text(json.dumps(wanted))
    yield paths


def data_overrides(paths: dict[str, Path]) -> dict[str, Any]:
    """The ``load_train_config`` keywords naming the dataset's files."""
    return {key: str(paths[key]) for key in ("train_ann", "train_images", "val_ann",
                                             "val_images")}


def data_fingerprint(paths: dict[str, Path]) -> str:
    """SHA-1 of both annotation files: what identifies the data in a run's key."""
    digest = hashlib.sha1()
    for key in ("train_ann", "val_ann"):
        digest.update(paths[key].read_bytes())
    return digest.hexdigest()


def run_key(cfg_dict: dict[str, Any], data_sha: str) -> str:
    """A run's identity: its resolved config (data paths and ``out_dir`` aside, which
    differ between runs of the same experiment) and its data's annotation files."""
    tree = json.loads(json.dumps(cfg_dict))
    tree.pop("out_dir", None)
    for key in ("train_ann", "train_images", "val_ann", "val_images"):
        tree.get("data", {}).pop(key, None)
    text = json.dumps({"config": tree, "data": data_sha}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def drop_checkpoints(run_dir: Path) -> None:
    """Delete the ``.pt`` files of a finished run (its log and config stay)."""
    for path in run_dir.glob("*.pt"):
        with contextlib.suppress(OSError):
            path.unlink()


def epoch_seconds(run_dir: Path) -> list[float]:
    """Seconds of each epoch, from the run's ``log.jsonl`` (its ``time`` counts from the
    start of each attempt; a resumed attempt's first epoch counts from the resume)."""
    seconds: dict[int, float] = {}
    log = run_dir / "log.jsonl"
    if not log.exists():
        return []
    previous: tuple[int, float] | None = None
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") != "epoch":
            continue
        epoch, t = int(record["epoch"]), float(record["time"])
        same_attempt = previous is not None and previous[0] == epoch - 1 and t > previous[1]
        seconds[epoch] = t - previous[1] if same_attempt and previous else t
        previous = (epoch, t)
    return [seconds[e] for e in sorted(seconds)]


# --------------------------------------------------------------------------- statistics


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value), median, min, max and all values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None,
                "runs": []}
    return {"n": len(vals), "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "runs": vals}


def fmt(s: dict[str, Any], scale: float = 100.0, signed: bool = False) -> str:
    """``"12.3 ± 1.4"`` (percent points), ``"-"`` when empty."""
    if not s["n"]:
        return "-"
    sign = "+" if signed else ""
    mean = f"{scale * s['mean']:{sign}.1f}"
    return mean if s["n"] == 1 else f"{mean} ± {scale * s['std']:.1f}"


def aggregate(records: Sequence[dict[str, Any]], variants: Sequence[str]
              ) -> dict[str, dict[str, Any]]:
    """Per variant: the spread of AP and AP50 over seeds, of the paired differences to
    ``full`` (seeds both have), and of the seconds per run."""
    by = {(r["variant"], r["seed"]): r for r in records}
    out: dict[str, dict[str, Any]] = {}
    for name in variants:
        mine = sorted((r for r in records if r["variant"] == name), key=lambda r: r["seed"])
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine], "sets": VARIANTS[name]}
        for metric in METRICS:
            entry[metric] = spread([r["metrics"][metric] for r in mine])
            pairs = [r["metrics"][metric] - by[("full", r["seed"])]["metrics"][metric]
                     for r in mine if ("full", r["seed"]) in by]
            entry[f"delta_{metric}"] = spread(pairs)
        entry["seconds"] = spread([r["seconds"] for r in mine])
        out[name] = entry
    return out


def print_results(results: dict[str, dict[str, Any]]) -> None:
    header = (f"{'variant':<18} {'seeds':>5} {'AP':>13} {'AP50':>13} {'ΔAP vs full':>13} "
              f"{'ΔAP50 vs full':>13} {'min/run':>8}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        minutes = r["seconds"]["median"] / 60 if r["seconds"]["n"] else math.nan
        delta = ("-", "-") if name == "full" else (fmt(r["delta_AP"], signed=True),
                                                   fmt(r["delta_AP50"], signed=True))
        print(f"{name:<18} {len(r['seeds']):>5} {fmt(r['AP']):>13} {fmt(r['AP50']):>13} "
              f"{delta[0]:>13} {delta[1]:>13} {minutes:>8.1f}")
    print("AP in percent points: mean ± sample std over seeds; Δ: mean ± std of the "
          "per-seed differences to full (the same seed)")


# --------------------------------------------------------------------------- runs


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                records.append(json.loads(line))
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset options of this script and bench_small_data.py (see :func:`hard_data`)."""
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256,
                        help="side of the generated square images")
    parser.add_argument("--data", default=None,
                        help="dataset folder: used if it holds COCO files, else generated "
                             "there (default: a temporary folder)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the dataset")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS), help="default: all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every run (default: the recipe's)")
    add_data_arguments(parser)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every variant (repeatable)")
    parser.add_argument("--out", default="runs/ablation",
                        help="folder of runs.jsonl, the runs and the JSON")
    parser.add_argument("--json", default=None, help="results JSON (default: OUT/ablation.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--keep-checkpoints", action="store_true")
    args = parser.parse_args(argv)

    from dinodet.engine.config import load_train_config
    from dinodet.engine.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "runs.jsonl"
    todo = [(seed, v) for seed in args.seeds for v in args.variants]
    with hard_data(args.data, args.num_train, args.num_val, args.image_size,
                   args.data_seed) as paths:
        data_sha = data_fingerprint(paths)
        keys: dict[tuple[str, int], str] = {}
        cfgs: dict[tuple[str, int], Any] = {}
        for seed, variant in todo:
            sets = [*BOOKKEEPING, *args.set, *VARIANTS[variant]]
            cfg = load_train_config("cpu-small", None, sets, epochs=args.epochs, seed=seed,
                                    out_dir="-", **data_overrides(paths))
            keys[variant, seed] = key = run_key(cfg.to_dict(), data_sha)
            cfg.out_dir = str(out / "runs" / f"{variant}-seed{seed}-{key}")
            cfgs[variant, seed] = cfg
        done = {r["key"]: r for r in read_records(jsonl)}
        pending = [(s, v) for s, v in todo if keys[v, s] not in done]
        print(f"{len(todo)} runs: {len(todo) - len(pending)} already in {jsonl}, "
              f"{len(pending)} to train", flush=True)
        spent: list[float] = []
        for i, (seed, variant) in enumerate(pending):
            cfg = cfgs[variant, seed]
            print(f"\n=== {variant} seed {seed} ({i + 1}/{len(pending)}): "
                  f"{' '.join(VARIANTS[variant]) or 'the recipe as it is'} -> {cfg.out_dir}",
                  flush=True)
            start = time.perf_counter()
            summary = train(cfg, resume="auto", progress=False)
            if summary["metrics"] is None and summary["stopped_by"] is None:
                # Finished before but not recorded (killed in between): train it again.
                shutil.rmtree(cfg.out_dir)
                summary = train(cfg, progress=False)
            if summary["metrics"] is None:
                raise SystemExit(f"{variant} seed {seed} ended without an evaluation "
                                 f"(stopped by {summary['stopped_by']})")
            record = {"key": keys[variant, seed], "variant": variant, "seed": seed,
                      "sets": VARIANTS[variant], "extra_sets": args.set,
                      "epochs": summary["epochs"], "steps": summary["steps"],
                      "seconds": summary["seconds"],
                      "epoch_seconds": epoch_seconds(Path(cfg.out_dir)),
                      "metrics": summary["metrics"], "run_dir": cfg.out_dir}
            append_record(jsonl, record)
            done[record["key"]] = record
            if not args.keep_checkpoints:
                drop_checkpoints(Path(cfg.out_dir))
            spent.append(time.perf_counter() - start)
            left = len(pending) - i - 1
            print(f"=== {variant} seed {seed}: AP {summary['metrics']['AP']:.3f}, AP50 "
                  f"{summary['metrics']['AP50']:.3f} in {spent[-1] / 60:.1f} min; {left} left, "
                  f"about {left * statistics.median(spent) / 60:.0f} min", flush=True)
        cfg0 = cfgs[todo[0][1], todo[0][0]]
        settings = {"variants": args.variants, "seeds": args.seeds,
                    "epochs": cfg0.epochs, "preset": cfg0.preset,
                    "batch_size": cfg0.batch_size, "eval_size": cfg0.data.transform.eval_size,
                    "num_train": args.num_train, "num_val": args.num_val,
                    "image_size": args.image_size, "data": args.data or "generated",
                    "data_seed": args.data_seed, "data_sha1": data_sha,
                    "extra_sets": args.set, "bookkeeping_sets": BOOKKEEPING,
                    "threads": torch.get_num_threads()}
    records = [done[keys[v, s]] for s, v in todo]
    results = aggregate(records, args.variants)
    print()
    print_results(results)
    print()
    print_table(summarize({name: [r["seconds"] for r in records if r["variant"] == name]
                           for name in args.variants},
                          baseline="full" if "full" in args.variants else None),
                median_label="median s/run", name_width=18)
    write_json(args.json or out / "ablation.json", "ablation", settings,
               {"variants": results, "runs": records})


if __name__ == "__main__":
    main(sys.argv[1:])
