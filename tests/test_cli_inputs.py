"""What the command line refuses before doing any slow work, and what it keeps when a run
goes wrong: option values, output paths, inputs among the outputs, thin images, failures
half way, malformed run logs."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinodet
from dinodet.cli import main
from dinodet.engine.plot import read_log
from dinodet.errors import UserError
from dinodet.predict import Detector
from test_cli import _config  # the same tiny two-class network

CLASSES = [{"label": 0, "category_id": 1, "name": "circle"},
           {"label": 1, "category_id": 3, "name": "square"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "m"
    dinodet.save_pretrained(dinodet.build_model(_config()).eval(), out,
                            extra={"classes": CLASSES}, transform=dinodet.EvalTransform(64))
    return out


def _save(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    _save(folder / "a.png", 40, 60, 1)
    _save(folder / "b.png", 50, 40, 2)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _no_model_load(monkeypatch) -> None:
    """Fail the test if any command gets as far as reading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("dinodet.weights.load_model", refuse)
    monkeypatch.setattr("dinodet.predict.load_model", refuse)
    monkeypatch.setattr("dinodet.weights.from_original", refuse)


# ---------------------------------------------------------------- option values

@pytest.mark.parametrize(("argv", "option"), [
    (["predict", "m", "x.png", "--out", "o", "--threshold", "2"], "--threshold"),
    (["predict", "m", "x.png", "--out", "o", "--threshold", "-1"], "--threshold"),
    (["predict", "m", "x.png", "--out", "o", "--threshold", "nan"], "--threshold"),
    (["predict", "m", "x.png", "--out", "o", "--threshold", "inf"], "--threshold"),
    (["predict", "m", "x.png", "--out", "o", "--threshold", "high"], "--threshold"),
    (["predict", "m", "x.png", "--out", "o", "--size", "0"], "--size"),
    (["predict", "m", "x.png", "--out", "o", "--size", "31"], "--size"),
    (["predict", "m", "x.png", "--out", "o", "--size", "1000000"], "--size"),
    (["predict", "m", "x.png", "--out", "o", "--max-size", "0"], "--max-size"),
    (["predict", "m", "x.png", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["predict", "m", "x.png", "--out", "o", "--workers", "-1"], "--workers"),
    (["eval", "--checkpoint", "m", "--ann", "a", "--images", "i", "--batch-size", "0"],
     "--batch-size"),
    (["eval", "--checkpoint", "m", "--ann", "a", "--images", "i", "--eval-size", "0"],
     "--eval-size"),
    (["eval", "--checkpoint", "m", "--ann", "a", "--images", "i", "--max-size", "-5"],
     "--max-size"),
    (["eval", "--checkpoint", "m", "--ann", "a", "--images", "i", "--workers", "-1"],
     "--workers"),
    (["export", "m", "--size", "0", "96"], "--size"),
    (["export", "m", "--size", "96", "32"], "--size"),
    (["export", "m", "--opset", "16"], "--opset"),
    (["convert", "c.pth", "out", "--variant", "r50-4scale", "--num-classes", "0"],
     "--num-classes"),
    (["convert", "c.pth", "out", "--variant", "r50-4scale", "--num-classes", "1000000000"],
     "--num-classes"),
    (["demo", "--detect-only", "--height", "3"], "--height"),
    (["demo", "--detect-only", "--top", "-1"], "--top"),
])
def test_numeric_options_are_checked_by_argparse_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


def test_valid_option_values_parse():
    from dinodet.cli import build_parser

    args = build_parser().parse_args(["predict", "m", "x.png", "--out", "o", "--threshold",
                                      "0", "--size", "32", "--max-size", "64",
                                      "--batch-size", "1", "--workers", "0"])
    assert (args.threshold, args.size, args.max_size, args.batch_size, args.workers) == (
        0.0, 32, 64, 1, 0)
    assert build_parser().parse_args(["predict", "m", "x", "--out", "o", "--threshold",
                                      "1"]).threshold == 1.0


def test_max_size_below_size_is_refused_before_loading(images, tmp_path, capsys,
                                                        monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["predict", "m", str(images), "--out", str(tmp_path / "o"), "--size", "64",
                 "--max-size", "48"]) == 2
    assert "--max-size 48 is smaller than --size 64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- predict --out

@pytest.mark.parametrize("where", ["same", "dot-dot"])
def test_predict_refuses_an_out_folder_holding_the_inputs(images, where, capsys,
                                                           monkeypatch):
    _no_model_load(monkeypatch)
    before = _snapshot(images)
    out = str(images) if where == "same" else str(images / ".." / images.name)
    assert main(["predict", "no-such-model", str(images), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and out in err and "holds input images" in err
    assert _snapshot(images) == before  # nothing written, nothing overwritten


def test_predict_refuses_out_holding_one_input_given_as_a_file(images, tmp_path, capsys,
                                                                monkeypatch):
    _no_model_load(monkeypatch)
    other = tmp_path / "other.png"
    _save(other, 30, 30)
    before = _snapshot(images)
    assert main(["predict", "m", str(other), str(images / "b.png"), "--out",
                 str(images)]) == 2
    assert "b.png" in capsys.readouterr().err
    assert _snapshot(images) == before


def test_predict_may_write_into_a_parent_of_the_input_folder(model_dir, images, capsys):
    out = images.parent  # the inputs are in images/, the outputs land beside it
    assert main(["predict", str(model_dir), str(images), "--out", str(out)]) == 0
    assert (out / "a.png").is_file() and (out / "detections.json").is_file()
    assert sorted(p.name for p in images.iterdir()) == ["a.png", "b.png"]


def test_predict_refuses_unusable_out_before_loading_the_model(images, tmp_path, capsys,
                                                               monkeypatch):
    _no_model_load(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    for out, why in [(a_file, "is a file, not a folder"),
                     (a_file / "sub", f"{a_file} is a file, not a folder")]:
        assert main(["predict", "m", str(images), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and why in err
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_predict_refuses_an_out_that_cannot_be_written(images, tmp_path, capsys,
                                                       monkeypatch):
    _no_model_load(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["predict", "m", str(images), "--out", str(locked / "o")]) == 2
        assert f"cannot write in {locked}" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- thin images, failures

def test_thin_images_among_normal_ones_are_all_detected(model_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = {"a": (40, 60), "thin_h": (3, 2000), "thin_w": (2000, 3), "b": (50, 40),
             "dot": (1, 1)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        _save(folder / f"{name}.png", h, w, i)
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(folder), "--out", str(out), "--threshold",
                 "0", "--batch-size", "2"]) == 0
    records = {Path(r["file"]).stem: r for r in
               json.loads((out / "detections.json").read_text())}
    assert set(records) == set(sizes)
    for name, (h, w) in sizes.items():
        record = records[name]
        assert (record["height"], record["width"]) == (h, w)
        assert record["detections"], name
        for d in record["detections"]:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (w, h)


def test_a_failing_image_is_named_and_the_others_are_written(model_dir, tmp_path, capsys,
                                                             monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["a", "bad", "c", "d"]):
        _save(folder / f"{name}.png", 40 + (7 if name == "bad" else 0), 60, i)
    real = Detector.detect_batch

    def fails_on_bad(self, images, sizes, threshold=0.3):
        if any(tuple(int(v) for v in s) == (47, 60) for s in sizes):
            raise RuntimeError("model exploded")
        return real(self, images, sizes, threshold)

    monkeypatch.setattr(Detector, "detect_batch", fails_on_bad)
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(folder), "--out", str(out),
                 "--batch-size", "2"]) == 2
    captured = capsys.readouterr()
    assert f"detection failed on {folder / 'bad.png'}: RuntimeError: model exploded" in \
        captured.err
    assert "3 image(s)" in captured.out and "1 failed" in captured.out
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["a.png", "c.png", "d.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "d.png",
                                                     "detections.json"]


def test_a_run_stopped_half_way_keeps_the_detections_of_the_images_done(
        model_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        _save(folder / f"{i}.png", 40, 60, i)
    import dinodet.visualize

    real = dinodet.visualize.save_detections
    calls = []

    def disk_full_on_third(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dinodet.visualize, "save_detections", disk_full_on_third)
    out = tmp_path / "out"
    assert main(["predict", str(model_dir), str(folder), "--out", str(out)]) == 2
    assert "2.png: No space left on device" in capsys.readouterr().err
    records = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["0.png", "1.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


def test_no_image_at_all_is_an_error_before_loading(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    assert main(["predict", "m", str(tmp_path / "none*.png"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "no image to detect" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- eval --out

@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, Path]:
    from dinodet.data.synthetic import make_synthetic_coco

    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=1, num_val=2,
                               image_size=(48, 64), num_classes=2, max_objects=2, seed=1)


def _eval_args(model: str | Path, coco: dict[str, Path], out: Path) -> list[str]:
    return ["eval", "--checkpoint", str(model), "--ann", str(coco["val_ann"]), "--images",
            str(coco["val_images"]), "--out", str(out), "--workers", "0"]


def test_eval_refuses_an_unusable_out_before_evaluating(coco, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    for out, why in [(a_file / "results.json", f"{a_file} is a file, not a folder"),
                     (tmp_path, "is a folder")]:
        assert main(_eval_args("no-such-model", coco, out)) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and why in err


def test_eval_prints_the_metrics_even_when_writing_out_fails(model_dir, coco, tmp_path,
                                                            capsys, monkeypatch):
    out = tmp_path / "res" / "results.json"

    def disk_full(path, write, what="checkpoint"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("dinodet.engine.checkpoint.atomic_write", disk_full)
    assert main(_eval_args(model_dir, coco, out)) == 2
    captured = capsys.readouterr()
    assert "AP50" in captured.out and "circle" in captured.out  # the table came first
    assert f"{out}: No space left on device" in captured.err
    assert not out.exists()


def test_eval_writes_its_results_atomically(model_dir, coco, tmp_path, capsys):
    out = tmp_path / "new" / "results.json"
    assert main(_eval_args(model_dir, coco, out)) == 0
    assert f"wrote detections to {out}" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3}
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]


# ---------------------------------------------------------------- export --out

def test_export_refuses_an_unusable_out_before_loading(tmp_path, model_dir, capsys,
                                                       monkeypatch):
    _no_model_load(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    for out, why in [(tmp_path, "is a folder"),
                     (a_file / "m.onnx", f"{a_file} is a file, not a folder")]:
        assert main(["export", str(model_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and why in err
    # the default output, next to the model directory, is checked too
    (model_dir.parent / "m.onnx").mkdir()
    try:
        assert main(["export", str(model_dir)]) == 2
        assert f"output file {model_dir.parent / 'm.onnx'} is a folder" in \
            capsys.readouterr().err
    finally:
        (model_dir.parent / "m.onnx").rmdir()


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_a_failing_export_leaves_no_temporary_file(fmt, tmp_path, monkeypatch):
    from dinodet.export import export_model

    model = dinodet.build_model(_config()).eval()
    if fmt == "onnx":
        pytest.importorskip("onnxscript")

        class HalfSaved:  # an exported program whose save fails half way, side file and all
            def __init__(self):
                self.model = type("Model", (), {"metadata_props": {}, "graph": []})()

            def save(self, path):
                Path(path).write_bytes(b"partial")
                Path(f"{path}.data").write_bytes(b"weights")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: HalfSaved())
        # the stand-in program's graph is empty: no corner sum to chunk, nothing to optimise
        monkeypatch.setattr("dinodet.export.optimize_onnx", lambda model: None)
    else:
        def half_written(program, path, **kwargs):  # write some bytes, then fail
            Path(path).write_bytes(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(torch.export, "export", lambda *a, **k: object())
        monkeypatch.setattr(torch.export, "save", half_written)
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt2'}"
    with pytest.raises((RuntimeError, OSError)):
        export_model(model, out, fmt, example_size=(96, 96))
    assert list(tmp_path.iterdir()) == []


def test_export_writes_through_a_unique_temporary_folder(tmp_path, monkeypatch):
    from dinodet.export import export_model

    seen = []

    def save(program, path, **kwargs):
        seen.append(Path(path))
        assert Path(path).parent != tmp_path and Path(path).parent.parent == tmp_path
        Path(path).write_bytes(b"archive")

    monkeypatch.setattr(torch.export, "export", lambda *a, **k: object())
    monkeypatch.setattr(torch.export, "save", save)
    (tmp_path / "model.pt2.tmp").write_text("someone else's")  # the old fixed name: untouched
    out = export_model(dinodet.build_model(_config()).eval(), tmp_path / "model.pt2",
                       "torch-export", example_size=(96, 96))
    assert out.read_bytes() == b"archive" and seen[0].name == "model.pt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "model.pt2.tmp"]
    assert (tmp_path / "model.pt2.tmp").read_text() == "someone else's"


# ---------------------------------------------------------------- convert

def test_convert_refuses_an_unusable_out_dir_before_reading(tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    for out, why in [(a_file, "is a file, not a folder"),
                     (a_file / "model", f"{a_file} is a file, not a folder")]:
        assert main(["convert", "missing.pth", str(out), "--variant", "r50-4scale"]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out}" in err and why in err and "Traceback" not in err


def test_convert_refuses_a_folder_it_cannot_write_in(tmp_path, capsys, monkeypatch):
    """A read-only file system (or a folder without write permission, which root ignores):
    os.access says no, as it does there."""
    _no_model_load(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr("dinodet.weights.os.access",
                        lambda path, mode: False if Path(path) == locked else real(path, mode))
    for out in (locked, locked / "new" / "model"):
        assert main(["convert", "missing.pth", str(out), "--variant", "r50-4scale"]) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out}: cannot write in {locked}" in err
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------- plot

def _step(n: int, **changes) -> dict:
    return {"type": "step", "epoch": 1, "step": n, "lr": 1e-4, "loss": 2.0 / n, **changes}


def _write_log(run: Path, lines: list) -> Path:
    run.mkdir(exist_ok=True)
    (run / "log.jsonl").write_text("".join(
        (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return run


@pytest.mark.parametrize(("line", "message"), [
    ([1, 2, 3], r"log\.jsonl:2: expected a JSON object \(a log record\), got list"),
    ("42", r"log\.jsonl:2: expected a JSON object"),
    ({"type": "step", "step": 2, "lr": 1e-4}, r"log\.jsonl:2: step record has no 'loss'"),
    ({"type": "step", "loss": 1.0, "lr": 1e-4}, r"log\.jsonl:2: step record has no 'step'"),
    (_step(2, lr="fast"), r"log\.jsonl:2: step record's 'lr' must be a number, got 'fast'"),
    (_step(2, loss=None), r"log\.jsonl:2: step record's 'loss' must be a number, got None"),
    (_step(2, step=2.5), r"log\.jsonl:2: step record's 'step' must be an integer, got 2\.5"),
    (_step(2, step=True), r"log\.jsonl:2: step record's 'step' must be an integer"),
    ({"type": "epoch", "epoch": 1, "AP": 0.1, "AP50": "x", "AP75": 0.0},
     r"log\.jsonl:2: epoch record's 'AP50' must be a number"),
    ({"type": 3}, r"log\.jsonl:2: 'type' must be a string"),
    ('{"type": "step", "step": 2, garbage', r"log\.jsonl:2 is not valid JSON"),
])
def test_a_malformed_log_names_the_line_and_the_key(tmp_path, line, message, capsys):
    run = _write_log(tmp_path / "run", [_step(1), line, _step(3)])
    with pytest.raises(UserError, match=message):
        read_log(run)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert "log.jsonl:2" in err and "Traceback" not in err


def test_a_last_line_cut_short_is_tolerated(tmp_path):
    run = _write_log(tmp_path / "run", [_step(1), _step(2), '{"type": "step", "ep'])
    assert [r["step"] for r in read_log(run)] == [1, 2]
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").is_file()
