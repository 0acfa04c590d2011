"""The ``dinodet`` command line: the only place argparse lives."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dinodet.predict import Detector


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


def _positive(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a frame rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _score_threshold(text: str) -> float | str:
    """An argparse ``type``: a finite number in [0, 1], or ``auto`` (each class's own
    threshold, stored with the model)."""
    if text == "auto":
        return text
    try:
        return _fraction(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'auto', got "
                                         f"{text!r}") from None


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
        total_batch_size=args.total_batch_size, out_dir=args.out, **_train_data(args),
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


def _train_data(args: argparse.Namespace) -> dict[str, str | None]:
    """The data settings of ``train``: ``--data D`` is ``--train-ann D --val-ann D`` with
    the splits ``--train-split`` (default train) and ``--val-split`` (default val)."""
    from dinodet.errors import UserError

    data = {"train_ann": args.train_ann, "train_images": args.train_images,
            "val_ann": args.val_ann, "val_images": args.val_images, "format": args.format,
            "train_split": args.train_split, "val_split": args.val_split}
    if args.data is None:
        return data
    given = [f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann",
                                                   "val_images") if data[k] is not None]
    if given:
        raise UserError(f"--data names the training and validation data: drop "
                        f"{' and '.join(given)}")
    if args.format == "coco" or args.data.lower().endswith(".json"):
        raise UserError(f"--data {args.data}: a COCO json is one split; give it as "
                        "--train-ann (with --train-images) or --val-ann (with --val-images)")
    return {**data, "train_ann": args.data, "val_ann": args.data,
            "train_split": args.train_split or "train", "val_split": args.val_split or "val"}


def _eval_data(args: argparse.Namespace) -> tuple[str, str | None]:
    """``(dataset, split)`` of ``eval``: ``--ann`` (with ``--images`` for COCO), or
    ``--data`` (split default val); checked before the model is loaded."""
    from dinodet.errors import UserError

    ann = args.ann if args.data is None else args.data
    coco = args.format == "coco" or (args.format == "auto" and ann.lower().endswith(".json"))
    if coco and args.data is not None:
        raise UserError(f"--data {args.data}: a COCO json goes with --ann and --images")
    if coco and args.images is None:
        raise UserError(f"--ann {ann}: a COCO annotation json needs --images, its image "
                        "folder")
    return ann, args.split if args.data is None else (args.split or "val")


def _convert_dataset(args: argparse.Namespace) -> int:
    from dinodet.data.formats import convert_dataset
    from dinodet.weights import check_output_dir

    check_output_dir(args.out, "OUT")  # before the dataset is read
    for path, source in convert_dataset(args.src, args.out, args.to, args.format, args.split):
        coco = source.coco
        print(f"wrote {path}: {len(coco['images'])} images, {len(coco['annotations'])} "
              f"boxes, {len(coco['categories'])} categories; images in {source.image_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dinodet.engine.evaluate import evaluate_checkpoint, write_results
    from dinodet.weights import check_output_file

    _check_sizes(args.eval_size, args.max_size, "--eval-size")
    if args.out:  # before the model is loaded and the images evaluated
        check_output_file(args.out, "--out")
    report_options = _eval_report_options(args)
    if args.int8:
        print("--int8: Linear and convolution layers quantised to int8, on the CPU; compare "
              "with the metrics without --int8", file=sys.stderr, flush=True)
    ann, split = _eval_data(args)
    result = evaluate_checkpoint(args.checkpoint, ann, args.images, out=None,
                                 data_format=args.format, split=split,
                                 variant=args.variant, batch_size=args.batch_size,
                                 eval_size=args.eval_size, max_size=args.max_size,
                                 keep_category_ids=args.keep_category_ids,
                                 num_workers=args.workers, weights=args.weights,
                                 int8=args.int8)
    print(result.format_table(), flush=True)  # the metrics, whatever happens to --out
    if args.out:
        write_results(args.out, result.detections or [])
        print(f"wrote detections to {args.out}")
    if args.report:
        from dinodet.engine.analysis import write_eval_report

        written = write_eval_report(args.report, result, **report_options)
        print(f"wrote the evaluation report to {args.report}: "
              f"{', '.join(p.name for p in written)}")
        if not any(p.suffix == ".png" for p in written):
            print("no report figures: they need matplotlib (pip install 'dinodet[plot]')",
                  file=sys.stderr)
    return 0


def _eval_report_options(args: argparse.Namespace) -> dict[str, float]:
    """The confusion-matrix settings of ``eval --report``, checked with the report folder
    before anything is evaluated; without ``--report`` they are a mistake."""
    from dinodet.engine.analysis import (
        DEFAULT_CONFUSION_IOU,
        DEFAULT_CONFUSION_THRESHOLD,
        check_report_options,
    )
    from dinodet.errors import UserError

    given = [name for name, value in (("--confusion-iou", args.confusion_iou),
                                      ("--confusion-threshold", args.confusion_threshold))
             if value is not None]
    if not args.report:
        if given:
            raise UserError(f"{' and '.join(given)} set the report's confusion matrix: "
                            "add --report DIR")
        return {}
    options = {"confusion_iou": DEFAULT_CONFUSION_IOU if args.confusion_iou is None
               else args.confusion_iou,
               "confusion_threshold": DEFAULT_CONFUSION_THRESHOLD
               if args.confusion_threshold is None else args.confusion_threshold}
    check_report_options(args.report, options["confusion_iou"],
                         options["confusion_threshold"],
                         names=("--report", "--confusion-iou", "--confusion-threshold"))
    return options


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


def _open_detector(checkpoint: str, **options: Any) -> Detector:
    """``Detector.from_pretrained(checkpoint, **options)`` without its int8 warning, which
    the command says in one line (:func:`_say_int8`)."""
    import warnings

    from dinodet.model.quantize import Int8Warning
    from dinodet.predict import Detector

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Int8Warning)
        return Detector.from_pretrained(checkpoint, **options)


def _say_int8(command: str, detector: Detector, more: str = "") -> None:
    """The line saying what ``--int8`` made int8 and that it is approximate."""
    from dinodet.model.quantize import int8_counts

    print(f"dinodet {command}: --int8: {int8_counts(detector.model).describe()}; "
          f"approximate, measure the AP change on your data with `dinodet eval --int8`{more}",
          file=sys.stderr, flush=True)


def _predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from dinodet.engine.checkpoint import atomic_write
    from dinodet.errors import UserError
    from dinodet.predict import Detections, ImageReadError, load_image
    from dinodet.slicing import Slicing
    from dinodet.visualize import save_detections
    from dinodet.weights import check_output_dir

    _check_sizes(args.size, args.max_size, "--size")
    slicing = Slicing.from_options(args.slice, args.overlap, args.slice_merge,
                                   args.slice_iou, args.slice_full, args.batch_size)
    videos = _video_inputs(args)  # a run is all videos or all images
    files, missing = ([], []) if videos else _predict_inputs(args.inputs)
    for item in missing:
        print(f"dinodet predict: no image found at {item}", file=sys.stderr)
    if not files and not videos:
        raise UserError(f"no image to detect in {', '.join(args.inputs)}")
    # Where the results go is checked before the (slow) model is loaded.
    check_output_dir(args.out, "--out")
    _refuse_inputs_in(args.out, files)
    if videos:
        from dinodet.video import output_paths

        video_outputs = output_paths(videos, args.out)
    detector = _open_detector(args.checkpoint, variant=args.variant, eval_size=args.size,
                              max_size=args.max_size, weights=args.weights, int8=args.int8,
                              threshold=args.threshold, slice=slicing)
    if args.threshold == "auto" and detector.class_thresholds:
        table, classes = detector.class_thresholds, len(detector.class_names)
        print(f"dinodet predict: --threshold auto: the model's own thresholds for "
              f"{len(table)} of {classes} classes ({min(table.values()):.3g} to "
              f"{max(table.values()):.3g})" + ("; the classes without one keep no detection"
                                               if len(table) < classes else ""),
              file=sys.stderr, flush=True)
    if args.int8:
        _say_int8("predict", detector)
    if videos:  # for each: NAME.mp4 and NAME.jsonl in --out, and a summary line
        from dinodet.video import VideoReadError, detect_video

        def warn(message: str) -> None:
            tqdm.write(f"dinodet predict: warning: {message}", file=sys.stderr)

        if args.workers:
            warn(f"--workers {args.workers} is not used for videos: a video or a frame "
                 "folder is read in order, in this process")

        # exit 2 when a source cannot be opened or stops early (its frames before are
        # written); Ctrl-C: 130 for a file, 0 for a camera or stream (the way to end one)
        failed = []
        for source, (video, lines) in zip(videos, video_outputs):
            try:
                result = detect_video(detector, source, video, lines,
                                      batch_size=args.batch_size, threshold=args.threshold,
                                      fps=args.fps, max_frames=args.max_frames,
                                      progress=not args.no_progress, catch_interrupt=True,
                                      warn=warn)
            except VideoReadError as e:  # the others still run
                print(f"dinodet predict: error: {e}", file=sys.stderr)
                failed.append(source)
                continue
            print(result.describe(), flush=True)
            if result.end == "error":
                failed.append(source)
            elif result.end == "interrupted":
                return 2 if failed else 0 if result.live else 130
        return 2 if failed else 0
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


def _video_inputs(args: argparse.Namespace) -> list[str]:
    """predict's video INPUTs (:func:`dinodet.video.is_video_input`): all of them or none,
    since a run writes either videos or images; --video, --fps and --max-frames without a
    video are mistakes, as is a video file that is not there."""
    from pathlib import Path

    from dinodet.errors import UserError
    from dinodet.video import is_live_input, is_video_input

    videos = [item for item in args.inputs if is_video_input(item, frames=args.video)]
    if videos and len(videos) < len(args.inputs):
        image = next(item for item in args.inputs if item not in videos)
        raise UserError(f"{videos[0]} is a video and {image} is not: videos and images go "
                        "in separate runs of dinodet predict")
    if not videos:
        given = [option for option, value in (("--video", args.video or None),
                                              ("--fps", args.fps),
                                              ("--max-frames", args.max_frames))
                 if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply to video inputs (a video file, "
                            "a --video frame folder, a camera index or a stream URL)")
    for item in videos:
        if not is_live_input(item) and not Path(item).exists():
            raise UserError(f"no video file at {item}")
    return videos


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dinodet.errors import UserError
    from dinodet.export import (
        INT8_WEIGHT_TYPE,
        compare_detections,
        export_model,
        read_metadata,
        run_exported,
    )
    from dinodet.weights import check_output_file, load_model

    # every mistake in the options is said before the (slow) export
    coco = args.ann is not None and args.ann.lower().endswith(".json")
    if args.images is not None and args.ann is None:
        raise UserError("--images needs --ann too: a COCO annotation json and its image "
                        "folder go together")
    if coco and args.images is None:
        raise UserError(f"--ann {args.ann}: a COCO annotation json needs --images, its image "
                        "folder")
    if args.ann is None:
        for option, value in (("--max-images", args.max_images),
                              ("--max-ap-drop", args.max_ap_drop),
                              ("--split", args.split)):
            if value is not None:
                raise UserError(f"{option} needs --ann (the dataset to verify on)")
    elif not Path(args.ann).exists():
        raise UserError(f"--ann {args.ann}: no such file or folder")
    elif coco and not Path(args.images).is_dir():
        raise UserError(f"--images {args.images}: no such folder")
    if args.int8 and args.format != "onnx":
        raise UserError(f"--int8 works with --format onnx only (onnxruntime's quantiser), "
                        f"not --format {args.format}")
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    if args.out:
        out = Path(args.out)
    else:  # next to the checkpoint: runs/x/best.pt -> runs/x/best.onnx, models/m -> m.onnx
        source = Path(args.checkpoint)
        from dinodet.hub import hub_reference

        ref = hub_reference(args.checkpoint)
        if ref is not None:  # owner/name -> ./name.onnx
            out = Path(ref.repo_id.split("/")[-1] + suffix)
        else:
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
                        transform=loaded.transform, variant=args.variant, int8=args.int8,
                        class_thresholds=loaded.class_thresholds)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({args.format}{' int8' if args.int8 else ''}, {size_mb:.1f} MB, "
          f"{time.perf_counter() - start:.0f} s)", flush=True)
    if args.int8:
        quantised = read_metadata(path)["int8"]["quantized_nodes"]
        check = ("compared below" if args.ann else
                 "check them with --verify --ann VAL.json --images DIR")
        print(f"int8: the weights of {quantised} MatMul/Gemm nodes quantised by onnxruntime "
              f"({INT8_WEIGHT_TYPE}, dynamic); its detections are approximate: {check}",
              flush=True)
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

        found = verify_coco(path, loaded.model, args.ann, args.images, split=args.split,
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


def _serve(args: argparse.Namespace) -> int:
    import torch

    from dinodet.data.images import resolve_max_pixels
    from dinodet.errors import UserError

    try:
        from dinodet.serve import serve
    except ImportError as e:  # FastAPI / uvicorn missing: say which extra to install
        raise UserError(str(e)) from None
    try:  # every mistake in the options is said before the (slow) read of the model
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, "
                        "cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    resolve_max_pixels(args.max_image_pixels)  # a bad $DINODET_MAX_IMAGE_PIXELS, now
    _check_sizes(args.size, args.max_size, "--size")
    if args.int8 and device.type != "cpu":
        raise UserError(f"--int8 runs on the CPU only, not --device {args.device}")
    detector = _open_detector(args.checkpoint, variant=args.variant, device=device,
                              eval_size=args.size, max_size=args.max_size,
                              weights=args.weights, int8=args.int8, threshold=args.threshold)
    host = f"[{args.host}]" if ":" in args.host else args.host
    transform = detector.transform
    print(f"dinodet serve: {args.checkpoint} ({len(detector.class_names)} classes, {device}"
          f"{', int8' if args.int8 else ''}, {transform.size} px shorter side up to "
          f"{transform.max_limit}) at http://{host}:{args.port}/ (POST /detect; batches of "
          f"up to {args.max_batch}, {args.max_wait_ms} ms wait)", file=sys.stderr, flush=True)
    if args.int8:
        _say_int8("serve", detector,
                  "; a batch's images share the activations' scale (--max-batch 1: none do)")
    serve(detector, args.host, args.port, threshold=args.threshold, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, max_request_bytes=args.max_request_bytes,
          max_image_pixels=args.max_image_pixels)
    return 0


def _push(args: argparse.Namespace) -> int:
    from dinodet.hub import push_to_hub

    url = push_to_hub(args.model_dir, args.repo_id, private=args.private,
                      commit_message=args.message)
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")
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


def _size_options(p: argparse.ArgumentParser) -> None:
    """--size / --max-size: the Detector's resize (predict, serve)."""
    from dinodet.config import MAX_EVAL_MAX_SIZE, MAX_EVAL_SIZE, MIN_EVAL_SIZE

    p.add_argument("--size", type=_int_in(MIN_EVAL_SIZE, MAX_EVAL_SIZE), default=None,
                   help="resize the shorter side to this (default: the checkpoint's "
                        f"evaluation size, else 800; {MIN_EVAL_SIZE} to {MAX_EVAL_SIZE})")
    p.add_argument("--max-size", type=_int_in(MIN_EVAL_SIZE, MAX_EVAL_MAX_SIZE), default=None,
                   help="cap on the longer side after resizing (default: the checkpoint's, "
                        f"or 1333/800 of --size; {MIN_EVAL_SIZE} to {MAX_EVAL_MAX_SIZE})")


def _int8_option(p: argparse.ArgumentParser) -> None:
    """--int8: the Detector's int8 layers (predict, serve)."""
    p.add_argument("--int8", action="store_true",
                   help="Linear and convolution layers in int8: faster on the CPU, approximate "
                        "(measure with `dinodet eval --int8`)")


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

    p = sub.add_parser(
        "train", help="train on a COCO, YOLO or Pascal VOC dataset (torchrun for many GPUs)",
        description="Train DINO. The data: --data DATASET for a YOLO or VOC dataset with "
                    "splits (e.g. --data data.yaml, whose train and val keys name them; "
                    "--data VOCdevkit/VOC2012, whose ImageSets/Main/train.txt and val.txt "
                    "do), or --train-ann / --val-ann, each a COCO json (with --train-images / "
                    "--val-images) or a YOLO / VOC dataset (the --train-split / --val-split "
                    "of one with splits; one without is read whole). The format is told "
                    "from the layout (a .json: COCO; a data.yaml or a folder with labels/: "
                    "YOLO; a folder with Annotations/ and JPEGImages/: VOC) unless --format "
                    "says it, and is recorded in the run's config.yaml.")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="recipe: network, image sizes, optimiser, schedule, epochs and batch "
                        "(default r50-4scale, the paper's; or the config file's)")
    p.add_argument("--data", metavar="DATASET",
                   help="a YOLO data.yaml / dataset folder or a Pascal VOC folder, with "
                        "splits: train on its --train-split (default train), validate on its "
                        "--val-split (default val); instead of --train-ann and --val-ann")
    p.add_argument("--train-ann", help="training data: a COCO annotation json (with "
                                       "--train-images), or a YOLO / VOC dataset")
    p.add_argument("--train-images", help="image folder of the COCO json --train-ann")
    p.add_argument("--val-ann", help="validation data: a COCO annotation json (with "
                                     "--val-images), or a YOLO / VOC dataset")
    p.add_argument("--val-images", help="image folder of the COCO json --val-ann")
    p.add_argument("--train-split", metavar="SPLIT",
                   help="the training split of a YOLO / VOC dataset with splits (a data.yaml "
                        "key, ImageSets/Main/SPLIT.txt, images/SPLIT/)")
    p.add_argument("--val-split", metavar="SPLIT",
                   help="the validation split of a YOLO / VOC dataset with splits")
    p.add_argument("--format", choices=["auto", "coco", "yolo", "voc"], default=None,
                   help="the dataset format (default auto: told from the layout)")
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

    p = sub.add_parser(
        "eval", help="COCO metrics of a checkpoint on a COCO, YOLO or Pascal VOC dataset",
        description="COCO box metrics of a checkpoint. The data: --ann A.json --images DIR "
                    "(COCO), or --data DATASET (a YOLO data.yaml / folder or a VOC folder: its "
                    "--split, default val), or --ann DATASET (a YOLO / VOC dataset: its "
                    "--split when it has splits, else all of it). The format is told from "
                    "the layout unless --format says it.")
    _model_source(p, "--checkpoint")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--ann", help="COCO annotation json (with --images), or a YOLO / VOC "
                                    "dataset")
    data.add_argument("--data", metavar="DATASET",
                      help="a YOLO data.yaml / dataset folder or a VOC folder: evaluate on "
                           "its --split (default val)")
    p.add_argument("--images", help="image folder of the COCO json --ann")
    p.add_argument("--split", help="the split of a YOLO / VOC dataset with splits")
    p.add_argument("--format", choices=["auto", "coco", "yolo", "voc"], default="auto",
                   help="the dataset format (default auto: told from the layout)")
    p.add_argument("--out", help="write detections here (COCO results json)")
    p.add_argument("--report", metavar="DIR",
                   help="write the evaluation report into DIR (created if missing): "
                        "precision-recall curves, a confusion matrix and F1-optimal per-class "
                        "score thresholds, as JSON and PNG (the PNGs need dinodet[plot]); "
                        "default: no report")
    p.add_argument("--confusion-iou", type=_fraction, default=None, metavar="IOU",
                   help="with --report: the IoU at which a detection matches ground truth in "
                        "the confusion matrix (in (0, 1]; default 0.5)")
    p.add_argument("--confusion-threshold", type=_fraction, default=None, metavar="S",
                   help="with --report: the confusion matrix counts detections scoring >= S "
                        "(in [0, 1]; default 0.3, predict's default)")
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
                   help="evaluate with the Linear and convolution layers in int8 (CPU), to measure "
                        "what `predict --int8` costs in AP")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "convert-dataset", help="write a YOLO or Pascal VOC dataset as COCO json",
        description="Read a YOLO or Pascal VOC dataset (checked as training reads it) and "
                    "write OUT/instances_<split>.json for each split (instances.json for a "
                    "layout without splits), atomically. file_name is relative to the "
                    "split's image folder, which is printed and kept in the json's "
                    "info.image_dir.")
    p.add_argument("src", metavar="SRC", help="a YOLO data.yaml / dataset folder, or a VOC "
                                              "dataset folder")
    p.add_argument("out", metavar="OUT", help="folder to write the json files into")
    p.add_argument("--to", choices=["coco"], default="coco", help="the format to write")
    p.add_argument("--format", choices=["auto", "yolo", "voc"], default="auto",
                   help="the format of SRC (default auto: told from the layout)")
    p.add_argument("--split", action="append", metavar="SPLIT",
                   help="convert only this split (repeatable; default: every split)")
    p.set_defaults(func=_convert_dataset)

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
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders or globs; or videos (needs dinodet[video]): "
                        "video files, frame folders with --video, a camera index (0) or a "
                        "stream URL (rtsp://, http://...)")
    p.add_argument("--out", required=True,
                   help="folder for annotated PNGs and detections.json (not one holding "
                        "input images); for a video NAME: NAME.mp4 (annotated) and "
                        "NAME.jsonl (a JSON line per frame)")
    p.add_argument("--threshold", type=_score_threshold, default=0.3,
                   help="minimum score to keep, in [0, 1], or 'auto': each class's own, "
                        "stored with the model by training with a validation set")
    p.add_argument("--batch-size", type=_int_in(1), default=4)
    _size_options(p)
    p.add_argument("--workers", type=_int_in(0), default=0,
                   help="image-reading processes (images; not used for videos)")
    p.add_argument("--video", action="store_true",
                   help="read every folder INPUT as the frames of one video, in natural "
                        "name order (without it, a folder is a set of images)")
    p.add_argument("--fps", type=_positive, default=None,
                   help="frame rate of a --video frame folder (default 25), and of the "
                        "annotated videos (default: the source's)")
    p.add_argument("--max-frames", type=_int_in(1), default=None, metavar="N",
                   help="videos: stop after N frames (a camera or stream: else until Ctrl-C)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _int8_option(p)
    p.add_argument("--slice", type=_int_in(32), default=None, metavar="TILE",
                   help="detect on overlapping TILE x TILE pixel tiles of every image and "
                        "merge their boxes: small objects in large images; --batch-size "
                        "is then also the tiles per model call")
    p.add_argument("--overlap", type=_fraction, default=None, metavar="F",
                   help="with --slice: share of a tile its neighbour covers, in [0, 1) "
                        "(default 0.2)")
    p.add_argument("--slice-merge", choices=["nms", "wbf"], default=None,
                   help="with --slice: merge the tiles' boxes by class-aware NMS (default) "
                        "or weighted box fusion")
    p.add_argument("--slice-iou", type=_fraction, default=None,
                   help="with --slice: IoU above which boxes merge (default 0.5)")
    p.add_argument("--slice-full", action=argparse.BooleanOptionalAction, default=None,
                   help="with --slice: also detect on the whole image, for objects larger "
                        "than a tile (default: no)")
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
    p.add_argument("--ann", metavar="DATASET",
                   help="also compare the COCO box AP of the file and of PyTorch on a "
                        "dataset: a COCO json (with --images), or a YOLO data.yaml / folder "
                        "or a Pascal VOC folder (with --split where it has splits); implies "
                        "--verify; exit 1 when the file's AP is more than --max-ap-drop below "
                        "PyTorch's")
    p.add_argument("--images", metavar="DIR", help="the image folder of a COCO --ann")
    p.add_argument("--split", default=None,
                   help="with a YOLO / VOC --ann that has splits: the one to verify on "
                        "(e.g. val)")
    p.add_argument("--max-images", type=_int_in(1), default=None, metavar="N",
                   help="with --ann: the first N images (by id) only (default: all)")
    p.add_argument("--max-ap-drop", type=_fraction, default=None, metavar="D",
                   help="with --ann: the largest AP (0.50:0.95, in [0, 1]) the file may lose "
                        "against PyTorch before the exit status is 1 (default 0.01)")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "serve", help="serve a model over HTTP: POST /detect, a page to try it at /",
        description="Serve a model over HTTP (needs dinodet[serve]): POST /detect takes an "
                    "image (a multipart file field 'file' or 'image', or the raw body as "
                    "image/* or application/octet-stream; ?threshold=S) and answers JSON "
                    "boxes; GET / is a page to drop an image on, GET /health, GET /stats. "
                    "Concurrent requests share batched model calls.")
    _model_source(p, "checkpoint")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; "
                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="(default 8000)")
    p.add_argument("--threshold", type=_score_threshold, default=0.3,
                   help="minimum score when a request gives none, in [0, 1], or 'auto': "
                        "each class's own, stored with the model (default 0.3)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, "
                                                   "cuda:1, ...")
    _size_options(p)
    _int8_option(p)
    p.add_argument("--max-batch", type=_int_in(1, 1024), default=8,
                   help="most images of concurrent requests run as one batch (default 8)")
    p.add_argument("--max-wait-ms", type=_int_in(0, 60_000), default=10,
                   help="how long the first queued image waits for others to batch with "
                        "(default 10 ms)")
    p.add_argument("--max-request-bytes", type=_int_in(1), default=20 * 1024 * 1024,
                   help="largest request body read; a bigger one is a 413 (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=_int_in(0), default=None, metavar="N",
                   help="largest width x height of an uploaded image, checked from its "
                        "header before decoding; a bigger one is a 413 (default: "
                        "$DINODET_MAX_IMAGE_PIXELS, else about 89.5 megapixels; 0 = no "
                        "limit)")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "push", help="upload a model directory to the Hugging Face Hub",
        description="Upload a model directory (config.json, model.safetensors and its model "
                    "card README.md; nothing else) to a Hugging Face Hub model repo, created "
                    "if needed. Needs dinodet[hub] and a login with write access (`hf auth "
                    "login`, or HF_TOKEN). Load it anywhere with "
                    "Detector.from_pretrained(\"OWNER/NAME\") or `dinodet predict OWNER/NAME`.")
    p.add_argument("model_dir", help="a model directory of `dinodet convert` / save_pretrained "
                                     "(or a run checkpoint, saved as one first)")
    p.add_argument("repo_id", help="OWNER/NAME of the Hub repo")
    p.add_argument("--private", action="store_true", default=None,
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=_push)
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
