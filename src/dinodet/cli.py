"""The ``dinodet`` command line: the only place argparse lives."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [low, high]; argparse names the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _fraction(text: str) -> float:
    """An argparse ``type``: a finite number in [0, 1] (a score threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _convert(args: argparse.Namespace) -> int:
    from dinodet.weights import check_output_dir, from_original, save_pretrained

    check_output_dir(args.out_dir, "out_dir")  # before the (slow) read of the checkpoint
    model = from_original(args.checkpoint, args.variant, num_classes=args.num_classes)
    out = save_pretrained(model, args.out_dir, extra={"source": str(args.checkpoint),
                                                      "variant": args.variant})
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} "
          f"({n / 1e6:.1f}M values, {model.cfg.num_classes} classes)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if not args.detect_only:
        from dinodet.engine.demo import run_demo

        summary = run_demo(args.out, epochs=args.epochs)
        return 0 if summary["metrics"] else 1
    return _detect_demo(args)


def _detect_demo(args: argparse.Namespace) -> int:
    import torch

    import dinodet
    from dinodet.data.synthetic import synthetic_image
    from dinodet.predict import Detections, Detector

    torch.manual_seed(args.seed)
    if args.weights:
        detector = Detector.from_pretrained(args.weights)
        variant = args.weights
    else:
        detector = Detector(dinodet.build_model(args.variant))
        variant = f"{args.variant} (random weights: no pretrained file on this machine)"
    image = synthetic_image(args.height, args.width, args.seed)
    start = time.perf_counter()
    found = detector(image, threshold=0.0)
    assert isinstance(found, Detections)  # one image in, one Detections out
    seconds = time.perf_counter() - start
    h, w = detector.resized_size(args.height, args.width)
    print(f"model: {variant}")
    print(f"image: synthetic {args.height}x{args.width}, resized to {h}x{w}; detection "
          f"{seconds:.2f} s on CPU")
    print(f"{'score':>7} {'class':>6}  box (x0, y0, x1, y1) in pixels")
    for s, lab, box in zip(found.scores[:args.top], found.labels, found.boxes):
        coords = ", ".join(f"{v:7.1f}" for v in box.tolist())
        print(f"{s.item():7.3f} {lab.item():6d}  ({coords})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dinodet.engine.config import load_train_config
    from dinodet.engine.train import TrainingStopped, train

    cfg = load_train_config(
        args.preset, args.config, args.set or [], image_size=args.image_size,
        epochs=args.epochs, batch_size=args.batch_size,
        total_batch_size=args.total_batch_size, out_dir=args.out, train_ann=args.train_ann,
        train_images=args.train_images, val_ann=args.val_ann, val_images=args.val_images,
        keep_category_ids=True if args.keep_category_ids else None,
        strict=True if args.strict else None)
    from dinodet.engine.distributed import cleanup

    try:
        summary = train(cfg, resume=args.resume, init=args.init, init_weights=args.init_weights,
                        progress=not args.no_progress)
    except TrainingStopped as e:
        print(f"dinodet train: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:  # a second signal: no waiting for the step to end
        print(f"dinodet train: interrupted ({e or 'KeyboardInterrupt'}); the last checkpoint "
              f"in {cfg.out_dir} is intact: --resume auto continues from it", file=sys.stderr)
        return 130
    finally:
        cleanup()
    stopped = summary["stopped_by"] or ""
    if stopped.startswith("signal"):  # 128 + the signal's number, as a shell reports it
        # "signal peer": another rank was signalled, as supervisors do with SIGTERM
        return 128 + int(getattr(signal.Signals, stopped.split()[-1], signal.SIGTERM))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dinodet.engine.evaluate import evaluate_checkpoint, write_results
    from dinodet.weights import check_output_file

    _check_sizes(args.eval_size, args.max_size, "--eval-size")
    if args.out:  # before the model is loaded and the images evaluated
        check_output_file(args.out, "--out")
    if args.int8:
        print("--int8: Linear layers dynamically quantised to int8, on the CPU; compare "
              "with the metrics without --int8", file=sys.stderr, flush=True)
    result = evaluate_checkpoint(args.checkpoint, args.ann, args.images, out=None,
                                 variant=args.variant, batch_size=args.batch_size,
                                 eval_size=args.eval_size, max_size=args.max_size,
                                 keep_category_ids=args.keep_category_ids,
                                 num_workers=args.workers, weights=args.weights,
                                 int8=args.int8)
    print(result.format_table(), flush=True)  # the metrics, whatever happens to --out
    if args.out:
        write_results(args.out, result.detections or [])
        print(f"wrote detections to {args.out}")
    return 0


def _check_sizes(size: int | None, max_size: int | None, size_option: str) -> None:
    from dinodet.errors import UserError

    if size is not None and max_size is not None and max_size < size:
        raise UserError(f"--max-size {max_size} is smaller than {size_option} {size}")


def _plot(args: argparse.Namespace) -> int:
    from dinodet.engine.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    return 0


def _predict_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Files, folders (their images, by extension) and globs -> (image files, misses)."""
    import glob
    from pathlib import Path

    from dinodet.predict import IMAGE_EXTENSIONS

    files: list[str] = []
    missing: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [str(p) for p in sorted(path.iterdir())
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            found = [item]
        else:
            found = [p for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        if not found:
            missing.append(item)
        files += [f for f in found if f not in files]
    return files, missing


def _refuse_inputs_in(out: str, files: Sequence[str]) -> None:
    """The annotated copies and detections.json go straight into ``out``: refuse a folder
    that holds an input image, so that no output can ever land on one."""
    import os
    from pathlib import Path

    from dinodet.errors import UserError

    if not Path(out).is_dir():
        return  # created by this run: it holds nothing yet
    inside = []
    for file in files:
        try:
            if os.path.samefile(Path(file).parent, out):
                inside.append(file)
        except OSError:
            continue
    if inside:
        more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
        raise UserError(f"--out {out} holds input images ({inside[0]}{more}): the annotated "
                        "copies and detections.json would be written among them; give "
                        "another --out folder")


def _predict(args: argparse.Namespace) -> int:
    import json
    import warnings
    from pathlib import Path

    from tqdm import tqdm

    from dinodet.engine.checkpoint import atomic_write
    from dinodet.errors import UserError
    from dinodet.model.quantize import Int8Warning, int8_counts
    from dinodet.predict import Detections, Detector, ImageReadError, load_image
    from dinodet.visualize import save_detections
    from dinodet.weights import check_output_dir

    _check_sizes(args.size, args.max_size, "--size")
    files, missing = _predict_inputs(args.inputs)
    for item in missing:
        print(f"dinodet predict: no image found at {item}", file=sys.stderr)
    if not files:
        raise UserError(f"no image to detect in {', '.join(args.inputs)}")
    # Where the results go is checked before the (slow) model is loaded.
    check_output_dir(args.out, "--out")
    _refuse_inputs_in(args.out, files)
    with warnings.catch_warnings():  # --int8 says it below, in one line
        warnings.filterwarnings("ignore", category=Int8Warning)
        detector = Detector.from_pretrained(args.checkpoint, variant=args.variant,
                                            eval_size=args.size, max_size=args.max_size,
                                            weights=args.weights, int8=args.int8)
    if args.int8:
        print(f"dinodet predict: --int8: {int8_counts(detector.model).describe()}; "
              "approximate, measure the AP change on your data with `dinodet eval --int8`",
              file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    failed, used = list(missing), set()
    bar = tqdm(total=len(files), unit="image", disable=len(files) <= 4 or args.no_progress)
    finished = False
    try:
        for file, det in detector.detect_files(files, args.threshold, args.batch_size,
                                               args.workers):
            bar.update(1)
            if not isinstance(det, Detections):  # unreadable, or the model failed on it
                failed.append(file)
                bar.write(f"dinodet predict: skipped: {det}", file=sys.stderr)
                continue
            name = Path(file).stem
            n = 1
            while name in used:
                n += 1
                name = f"{Path(file).stem}_{n}"
            try:
                image = load_image(file)
            except ImageReadError as e:  # changed since it was detected
                failed.append(file)
                bar.write(f"dinodet predict: skipped: {e}", file=sys.stderr)
                continue
            used.add(name)
            save_detections(out / f"{name}.png", image, det.boxes, det.labels, det.scores,
                            det.class_names)
            records.append({
                "file": file, "output": f"{name}.png",
                "width": det.image_size[1], "height": det.image_size[0],
                "detections": [{"box": box, "score": score, "label": label, "name": cls}
                               for box, score, label, cls in zip(
                                   det.boxes.tolist(), det.scores.tolist(),
                                   det.labels.tolist(), det.names)],
            })
        finished = True
    finally:
        bar.close()
        # The images done are recorded even when a later one stops the run.
        text = json.dumps(records, indent=1).encode()
        try:
            atomic_write(out / "detections.json", lambda f: f.write(text), what="detections")
        except Exception as e:
            if finished:
                raise
            print(f"dinodet predict: {e}", file=sys.stderr)
    print(f"{len(records)} image(s) -> {out}" + (f"; {len(failed)} failed" if failed else ""))
    return 2 if failed else 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dinodet.errors import UserError
    from dinodet.export import compare_detections, export_model, read_metadata, run_exported
    from dinodet.weights import check_output_file, load_model

    # every mistake in the options is said before the (slow) export
    if (args.ann is None) != (args.images is None):
        given, missing = ("--ann", "--images") if args.ann else ("--images", "--ann")
        raise UserError(f"{given} needs {missing} too: a COCO annotation json and its image "
                        "folder go together")
    if args.ann is None:
        for option, value in (("--max-images", args.max_images),
                              ("--max-ap-drop", args.max_ap_drop)):
            if value is not None:
                raise UserError(f"{option} needs --ann and --images (the COCO dataset to "
                                "verify on)")
    elif not Path(args.ann).is_file():
        raise UserError(f"--ann {args.ann}: no such file")
    elif not Path(args.images).is_dir():
        raise UserError(f"--images {args.images}: no such folder")
    if args.int8 and args.format != "onnx":
        raise UserError(f"--int8 works with --format onnx only (onnxruntime's quantiser), "
                        f"not --format {args.format}")
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    if args.out:
        out = Path(args.out)
    else:  # next to the checkpoint: runs/x/best.pt -> runs/x/best.onnx, models/m -> m.onnx
        source = Path(args.checkpoint)
        out = (source.with_name(source.name + suffix) if source.is_dir() or not source.suffix
               else source.with_suffix(suffix))
    check_output_file(out, "--out" if args.out else "output file")  # before the slow part
    loaded = load_model(args.checkpoint, args.variant, args.weights)
    eval_size = loaded.transform.size
    if args.size:
        height, width = args.size
    else:  # the model's usual input: a 4:3 image resized to its evaluation size
        height, width = eval_size, -(-eval_size * 4 // 3 // 32) * 32
    start = time.perf_counter()
    path = export_model(loaded.model, out, args.format, example_size=(height, width),
                        dynamic=not args.static, opset=args.opset, classes=loaded.classes,
                        transform=loaded.transform, variant=args.variant, int8=args.int8)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({args.format}{' int8' if args.int8 else ''}, {size_mb:.1f} MB, "
          f"{time.perf_counter() - start:.0f} s)", flush=True)
    if args.int8:
        quantised = read_metadata(path)["int8"]["quantized_nodes"]
        check = ("compared below" if args.ann else
                 "check them with --verify --ann VAL.json --images DIR")
        print(f"int8: the weights of {quantised} MatMul/Gemm nodes quantised by onnxruntime "
              f"(QInt8, dynamic); its detections are approximate: {check}", flush=True)
    status = 0
    if args.verify or args.ann:
        from dinodet.export import ExportGraph

        # another size than the traced one (when dynamic), batch of 2; static: the traced
        batch, h, w = (1, height, width) if args.static else (2, height - 32, width + 32)
        images = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = ExportGraph(loaded.model, transform=loaded.transform)(images)
        diff = compare_detections(expected, run_exported(path, images), min_score=0.05)
        ok = args.int8 or (diff["score"] <= 1e-3 and diff["box"] <= 0.5)
        verdict = ("int8, approximate: judged by its COCO AP (--ann)" if args.int8 else
                   "ok" if ok else "MISMATCH")
        print(f"verify on {batch}x3x{h}x{w}: max score difference {diff['score']:.2e}, max "
              f"box difference {diff['box']:.3f} px: {verdict}", flush=True)
        status = 0 if ok else 1
    if args.ann:
        from dinodet.export import verify_coco

        found = verify_coco(path, loaded.model, args.ann, args.images,
                            max_images=args.max_images, progress=sys.stderr.isatty())
        status = max(status, _report_coco(args, found))
    return status


def _report_coco(args: argparse.Namespace, found: dict) -> int:
    """Print what ``export --ann`` measured (:func:`dinodet.export.verify_coco`); 1 when the
    file's AP is more than --max-ap-drop below PyTorch's."""
    from pathlib import Path

    if found["skipped"]:
        print(f"dinodet export: {len(found['skipped'])} unreadable image(s) of {args.ann} "
              f"left out, e.g. {found['skipped'][0]}", file=sys.stderr)
    torch_ap, file_ap, diff = found["pytorch"], found["exported"], found["difference"]
    name = "exported int8" if found["precision"] == "int8" else "exported"

    def number(value: float, signed: bool = False) -> str:
        if math.isnan(value) or (value < 0 and not signed):  # -1: nothing to score
            return "-"
        return f"{value:+.3f}" if signed else f"{value:.3f}"

    parts = [f"{m} PyTorch {number(torch_ap[m])}, {name} {number(file_ap[m])} "
             f"({number(diff[m], True)})" for m in ("AP50", "AP75")]
    print(f"COCO AP on {found['images']} images of {Path(args.ann).name}: PyTorch "
          f"{number(torch_ap['AP'])}, {name} {number(file_ap['AP'])} "
          f"({number(diff['AP'], True)}); " + "; ".join(parts))
    unclipped = found["pytorch_unclipped"]
    print(f"(PyTorch's boxes clipped to the image as the file's are; unclipped, as `dinodet "
          f"eval` scores them: AP {number(unclipped['AP'])}, AP50 {number(unclipped['AP50'])})")
    each = {side: found["seconds"][side] / found["images"] for side in ("pytorch", "exported")}
    print(f"time per image: PyTorch {each['pytorch']:.3f} s, {name} {each['exported']:.3f} s")
    limit = 0.01 if args.max_ap_drop is None else args.max_ap_drop
    drop = -diff["AP"]
    if drop > limit:  # nan (no ground truth to score) is no drop
        print(f"dinodet export: the {name} file's AP is {drop:.3f} below PyTorch's on these "
              f"images, more than --max-ap-drop {limit:g}", file=sys.stderr)
        return 1
    return 0


def _model_source(p: argparse.ArgumentParser, name: str) -> None:
    """The model arguments of eval, predict and export: the file, --variant, --weights."""
    from dinodet.config import PRESETS

    what = "dinodet checkpoint / model directory, or original .pth with --variant"
    if name.startswith("-"):
        p.add_argument(name, required=True, help=what)
    else:
        p.add_argument(name, help=what)
    p.add_argument("--variant", choices=sorted(PRESETS), help="for an original DINO .pth")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema",
                   help="of a run checkpoint trained with EMA: the EMA weights (default) or the "
                        "raw ones")


def build_parser() -> argparse.ArgumentParser:
    from dinodet.config import LIMITS, MAX_EVAL_MAX_SIZE, MAX_EVAL_SIZE, MIN_EVAL_SIZE, PRESETS

    eval_size = _int_in(MIN_EVAL_SIZE, MAX_EVAL_SIZE)
    eval_max_size = _int_in(MIN_EVAL_SIZE, MAX_EVAL_MAX_SIZE)

    parser = argparse.ArgumentParser(
        prog="dinodet", description="DINO object detection: convert, train, evaluate, predict.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="original DINO .pth -> safetensors + JSON config")
    p.add_argument("checkpoint", help="released checkpoint, e.g. checkpoint0011_4scale.pth")
    p.add_argument("out_dir", help="directory to write model.safetensors and config.json")
    p.add_argument("--variant", required=True, choices=sorted(PRESETS))
    p.add_argument("--num-classes", type=_int_in(1, LIMITS["num_classes"]), default=None,
                   help="re-initialise the class heads for this many classes (fine-tuning)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("train", help="train on a COCO-format dataset (torchrun for many GPUs)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="recipe: network, image sizes, optimiser, schedule, epochs and batch "
                        "(default r50-4scale, the paper's; or the config file's)")
    p.add_argument("--train-ann", help="COCO annotation json of the training split")
    p.add_argument("--train-images", help="image folder of the training split")
    p.add_argument("--val-ann", help="COCO annotation json of the validation split")
    p.add_argument("--val-images", help="image folder of the validation split")
    p.add_argument("--out", help="run directory (checkpoints, logs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--total-batch-size", type=int,
                   help="images per optimiser step, all processes and accumulated batches "
                        "together (the paper's 16; default: the preset's)")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="rescale every image size of the recipe to an evaluation size of N "
                        "(augmentation scales, crop, longer-side cap)")
    p.add_argument("--config", help="YAML file of settings (validated)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=2e-4 (repeatable)")
    p.add_argument("--resume", help="'auto' (newest checkpoint in --out) or a checkpoint")
    p.add_argument("--init", help="start from weights: a dinodet checkpoint / model "
                                  "directory, or an original DINO .pth")
    p.add_argument("--init-weights", choices=["ema", "raw"], default="ema",
                   help="with --init of a run checkpoint trained with EMA: its EMA weights "
                        "(default) or the raw ones")
    p.add_argument("--keep-category-ids", action="store_true",
                   help="use raw category ids as class indices (COCO's 91 of the original)")
    p.add_argument("--strict", action="store_true",
                   help="unreadable images and bad annotations are errors, not warnings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="COCO metrics of a checkpoint on a dataset")
    _model_source(p, "--checkpoint")
    p.add_argument("--ann", required=True, help="COCO annotation json")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--out", help="write detections here (COCO results json)")
    p.add_argument("--batch-size", type=_int_in(1), default=1,
                   help="images per forward pass; 1 (default) as the paper, where padding "
                        "cannot change the detections")
    p.add_argument("--max-size", type=eval_max_size, default=None,
                   help="cap on the longer side (default: the checkpoint's, or 1333/800 of "
                        f"--eval-size; {MIN_EVAL_SIZE} to {MAX_EVAL_MAX_SIZE})")
    p.add_argument("--eval-size", type=eval_size, default=None, help="shorter side (default: "
                   f"the checkpoint's training setting, else 800; {MIN_EVAL_SIZE} to "
                   f"{MAX_EVAL_SIZE})")
    p.add_argument("--keep-category-ids", action="store_true",
                   help="class index = category id (original DINO checkpoints on COCO)")
    p.add_argument("--workers", type=_int_in(0), default=2, help="image-reading processes")
    p.add_argument("--int8", action="store_true",
                   help="evaluate with the Linear layers quantised to int8 (CPU), to measure "
                        "what `predict --int8` costs in AP")
    p.set_defaults(func=_eval)

    p = sub.add_parser("plot", help="draw loss and AP curves of a run to PNG")
    p.add_argument("run_dir")
    p.set_defaults(func=_plot)

    p = sub.add_parser("demo", help="train cpu-small on synthetic data, evaluate, draw results")
    p.add_argument("--out", default="runs/demo", help="where data, run and images go")
    p.add_argument("--epochs", type=_int_in(1), default=None)
    p.add_argument("--detect-only", action="store_true",
                   help="only build a model and detect on one generated image")
    p.add_argument("--variant", default="r50-4scale", choices=sorted(PRESETS))
    p.add_argument("--weights", default=None, help="a directory written by `dinodet convert`")
    p.add_argument("--height", type=eval_size, default=480)
    p.add_argument("--width", type=eval_size, default=640)
    p.add_argument("--top", type=_int_in(0), default=10, help="detections to print")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("predict", help="detect objects in images, write annotated copies + JSON")
    _model_source(p, "checkpoint")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--out", required=True,
                   help="folder for annotated PNGs and detections.json (not one holding "
                        "input images)")
    p.add_argument("--threshold", type=_fraction, default=0.3,
                   help="minimum score to keep, in [0, 1]")
    p.add_argument("--batch-size", type=_int_in(1), default=4)
    p.add_argument("--size", type=eval_size, default=None,
                   help="resize the shorter side to this (default: the checkpoint's "
                        f"evaluation size, else 800; {MIN_EVAL_SIZE} to {MAX_EVAL_SIZE})")
    p.add_argument("--max-size", type=eval_max_size, default=None,
                   help="cap on the longer side after resizing (default: the checkpoint's, "
                        f"or 1333/800 of --size; {MIN_EVAL_SIZE} to {MAX_EVAL_MAX_SIZE})")
    p.add_argument("--workers", type=_int_in(0), default=0, help="image-reading processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--int8", action="store_true",
                   help="Linear layers quantised to int8: faster on the CPU, approximate "
                        "(measure with `dinodet eval --int8`)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="export a model to ONNX or a torch.export program")
    _model_source(p, "checkpoint")
    p.add_argument("--format", default="onnx", choices=["onnx", "torch-export"])
    p.add_argument("--out", help="file to write (default: next to the checkpoint, "
                                 ".onnx or .pt2)")
    p.add_argument("--size", type=_int_in(64, MAX_EVAL_MAX_SIZE), nargs=2, metavar=("H", "W"),
                   help="example input traced (default: the evaluation size, 4:3; each side "
                        "at least 64)")
    p.add_argument("--static", action="store_true",
                   help="fix batch 1 and the example size instead of dynamic axes")
    p.add_argument("--opset", type=_int_in(17), default=18, help="ONNX opset (>= 17)")
    p.add_argument("--int8", action="store_true",
                   help="ONNX only: quantise the MatMul/Gemm weights to int8 (onnxruntime's "
                        "dynamic quantiser); faster on the CPU, approximate: measure it with "
                        "--ann / --images")
    p.add_argument("--verify", action="store_true",
                   help="run the file (onnxruntime / torch.export.load) and compare it with "
                        "PyTorch on random images (exit 1 on a mismatch)")
    p.add_argument("--ann", metavar="VAL.json",
                   help="with --images: also compare the COCO box AP of the file and of "
                        "PyTorch on this dataset (implies --verify); exit 1 when the file's "
                        "AP is more than --max-ap-drop below PyTorch's")
    p.add_argument("--images", metavar="DIR", help="the image folder of --ann")
    p.add_argument("--max-images", type=_int_in(1), default=None, metavar="N",
                   help="with --ann: the first N images (by id) only (default: all)")
    p.add_argument("--max-ap-drop", type=_fraction, default=None, metavar="D",
                   help="with --ann: the largest AP (0.50:0.95, in [0, 1]) the file may lose "
                        "against PyTorch before the exit status is 1 (default 0.01)")
    p.set_defaults(func=_export)
    for command in sub.choices.values():  # `dinodet train ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def _describe_os_error(e: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``x: No space left on device``."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Mistakes in the user's input (:class:`dinodet.errors.UserError`,
    and files that cannot be read or written) print one line naming the problem and exit
    2; ``--debug`` lets them raise with their traceback."""
    args = build_parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # UserError and its subclasses first
        print(f"dinodet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission, a missing folder: no traceback
        print(f"dinodet {args.command}: error: {_describe_os_error(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
