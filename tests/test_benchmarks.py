"""The benchmark scripts run, write their JSON through ``common.write_json``, and their
baseline is the same computation as dinodet's deformable attention."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import dinodet
from dinodet.model.ms_deform_attn import ms_deform_attn

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # what `python benchmarks/X.py` does for the scripts

import common  # noqa: E402

SCRIPTS = ["bench_inference.py", "bench_train.py", "bench_detect.py", "bench_gpu.py",
           "bench_ms_deform_attn_gpu.py", "bench_vs_original.py", "bench_onnx_attention.py"]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# Runs every script as ``python benchmarks/X.py --help`` would (as ``__main__``, with
# benchmarks/ first on sys.path), one after the other in one interpreter: importing torch
# and dinodet once rather than once per script keeps this test to a few seconds.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
bench, results = sys.argv[1], {}
for script in sys.argv[2:]:
    path = f"{bench}/{script}"
    sys.argv, sys.path[0] = [path, "--help"], bench
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (exit.code is not None)
        except BaseException as error:
            code, err = -1, io.StringIO(repr(error))
    results[script] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_runs() -> dict[str, dict]:
    proc = _run("-c", HELP_DRIVER, str(BENCHMARKS), *SCRIPTS, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str, help_runs: dict[str, dict]) -> None:
    run = help_runs[script]
    assert run["code"] == 0, run["stderr"]
    assert run["stdout"].startswith("usage:") and "--json" in run["stdout"]


def test_no_bench_loads_another_by_path() -> None:
    for path in BENCHMARKS.glob("*.py"):
        text = path.read_text()
        assert "spec_from_file_location" not in text and "importlib" not in text, path.name


def test_bench_vs_original_names_what_it_needs(tmp_path: Path) -> None:
    proc = _run("benchmarks/bench_vs_original.py", timeout=120)
    assert proc.returncode == 2 and "--original" in proc.stderr
    proc = _run("benchmarks/bench_vs_original.py", "--original", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert f"{tmp_path} is not a checkout of IDEA-Research/DINO" in proc.stderr


def test_bench_train_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out" / "train.json"
    proc = _run("benchmarks/bench_train.py", "--variant", "cpu-small", "--size", "96",
                "--batch-size", "2", "--repeats", "1", "--threads", "1", "--data-images", "4",
                "--data-workers", "0", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert "vs baseline" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "bench_train"
    meta = payload["meta"]
    assert meta["torch"] == torch.__version__
    assert meta["date"][:4].isdigit() and meta["python"]
    assert meta["torch_threads"] == 1
    assert payload["settings"]["variant"] == "cpu-small"
    results = payload["results"]
    medians = results["medians"]
    assert set(medians) == {"dinodet", "baseline (original attention)"}
    assert all(m > 0 for m in medians.values())
    assert all(len(runs) == 1 for runs in results["runs"].values())
    assert results["data_images_per_s"] > 0
    assert not list(out.parent.glob("*.tmp"))  # the atomic write left no temporary file


def test_write_json_replaces_atomically(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    common.write_json(path, "demo", {"n": 1, "where": tmp_path}, {"x": [1.5]})
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "demo"
    assert payload["settings"] == {"n": 1, "where": str(tmp_path)}
    assert payload["results"] == {"x": [1.5]}
    assert {"date", "time", "python", "torch", "torchvision", "onnxruntime", "triton",
            "platform", "processor", "machine", "torch_threads", "cuda_device",
            "git_commit"} <= set(payload["meta"])
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_summarize_ratios() -> None:
    res = common.summarize({"base": [2.0, 4.0, 3.0], "new": [1.0, 1.5, 2.0]}, baseline="base")
    assert res["base"]["median_s"] == 3.0 and res["base"]["ratio_vs_baseline"] == 1.0
    assert res["new"]["min_s"] == 1.0 and res["new"]["max_s"] == 2.0
    assert res["new"]["ratio_vs_baseline"] == pytest.approx(0.5)
    assert common.summarize({"a": [1.0]})["a"]["ratio_vs_baseline"] is None


def test_original_style_matches_ms_deform_attn() -> None:
    """The baseline computes what dinodet's attention computes: same outputs in float64,
    samples outside the image (zeros) included."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 9), (3, 5), (2, 3), (1, 1)]
    n, lq, m, d, p = 2, 7, 3, 4, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64)
    loc = 1.3 * loc - 0.15  # some points fall outside [0, 1]
    weights = torch.rand(n, lq, m, len(shapes) * p, generator=g, dtype=torch.float64)
    weights = weights.softmax(-1).view(n, lq, m, len(shapes), p)
    expected = ms_deform_attn(value, shapes, loc, weights)
    got = common.original_style_ms_deform_attn(value, shapes, loc, weights)
    assert got.shape == expected.shape == (n, lq, m * d)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_original_attention_switches_backend_and_restores() -> None:
    model = dinodet.build_model("cpu-small")
    model.set_attention_backend("torch")
    with common.original_attention(model):
        assert model.attention_backend is common.original_style_ms_deform_attn
    assert model.attention_backend == "torch"
    with pytest.raises(RuntimeError), common.original_attention(model):
        raise RuntimeError("restored even on an error")
    assert model.attention_backend == "torch"


# Tiny budgets for the training benchmarks: 4 images of 64 px, batch 2 (two steps), sizes
# of the recipe shrunk to 64 px, data loading in the main process.
TINY = ["--num-train", "4", "--num-val", "2", "--image-size", "64", "--epochs", "1",
        "--threads", "1", "--set", "batch_size=2", "--set", "data.num_workers=0",
        "--set", "data.transform={scales: [64], crop_resize_scales: [64], crop_min: 48, "
                 "crop_max: 64, eval_size: 64, max_size: 64}"]


def test_training_benchmarks_help() -> None:
    scripts = ["ablation.py", "bench_small_data.py"]
    proc = _run("-c", HELP_DRIVER, str(BENCHMARKS), *scripts, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for script in scripts:
        assert runs[script]["code"] == 0, runs[script]["stderr"]
        assert runs[script]["stdout"].startswith("usage:")
        for option in ("--epochs", "--num-train", "--num-val", "--image-size", "--threads",
                       "--json", "--set", "--seeds", "--data"):
            assert option in runs[script]["stdout"], (script, option)
    assert "--variants" in runs["ablation.py"]["stdout"]
    assert "--detector" in runs["bench_small_data.py"]["stdout"]
    assert "--batch-size" in runs["bench_small_data.py"]["stdout"]


def test_ablation_end_to_end_and_resumes(tmp_path: Path) -> None:
    """Two variants, one seed, each trained by train() and evaluated; a rerun skips both."""
    out = tmp_path / "ablation"
    args = ["benchmarks/ablation.py", *TINY, "--seeds", "0", "--variants", "full",
            "no_denoising", "--out", str(out)]
    proc = _run(*args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 runs: 0 already in" in proc.stdout
    assert "ΔAP vs full" in proc.stdout and f"wrote {out / 'ablation.json'}" in proc.stdout
    lines = (out / "runs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["variant"], r["seed"]) for r in records] == [("full", 0), ("no_denoising", 0)]
    assert records[1]["sets"] == ["model.denoising=off"]
    assert all(r["epochs"] == 1 and r["steps"] == 2 for r in records)
    assert records[0]["key"] != records[1]["key"]
    assert not list(out.glob("runs/*/*.pt"))  # finished runs drop their checkpoints
    config = (Path(records[1]["run_dir"]) / "config.yaml").read_text()
    assert "denoising: 'off'" in config or "denoising: off" in config
    payload = json.loads((out / "ablation.json").read_text())
    assert payload["benchmark"] == "ablation" and payload["meta"]["torch_threads"] == 1
    assert payload["settings"]["variants"] == ["full", "no_denoising"]
    variants = payload["results"]["variants"]
    assert set(variants) == {"full", "no_denoising"}
    for entry in variants.values():
        assert entry["seeds"] == [0] and entry["AP"]["n"] == 1
        assert 0.0 <= entry["AP"]["mean"] <= 1.0 and 0.0 <= entry["AP50"]["mean"] <= 1.0
    delta = variants["no_denoising"]["delta_AP"]
    assert delta["n"] == 1 and delta["mean"] == pytest.approx(
        records[1]["metrics"]["AP"] - records[0]["metrics"]["AP"])

    again = _run(*args, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs: 2 already in" in again.stdout and "===" not in again.stdout
    assert (out / "runs.jsonl").read_text().splitlines() == lines


def test_bench_small_data_end_to_end(tmp_path: Path) -> None:
    """dinodet and both torchvision baselines train with the same tiny budget and are
    scored by the same COCO evaluation."""
    out = tmp_path / "small.json"
    proc = _run("benchmarks/bench_small_data.py", *TINY, "--detector", "both",
                "--out", str(tmp_path / "runs"), "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout and "s/epoch" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "bench_small_data"
    settings = payload["settings"]
    assert settings["epochs"] == 1 and settings["batch_size"] == 2
    assert settings["eval_size"] == 64 and settings["train_scales"] == [64]
    results = payload["results"]
    assert list(results) == ["dinodet", "fcos", "retinanet"]
    for name, entry in results.items():
        assert entry["params"] > 1_000_000, name
        assert 0.0 <= entry["AP"]["mean"] <= 1.0 and 0.0 <= entry["AP50"]["mean"] <= 1.0
        assert entry["epoch_seconds"]["n"] == 1 and entry["epoch_seconds"]["median"] > 0
        assert set(entry["runs"][0]["metrics"]) >= {"AP", "AP50", "APs", "AR100"}
    assert results["fcos"]["runs"][0]["optimizer"] == "adamw"


def test_bench_int8_end_to_end(tmp_path: Path) -> None:
    """float32 and int8 Detectors timed side by side, two engines, with the profile split."""
    out = tmp_path / "int8.json"
    proc = _run("benchmarks/bench_int8.py", "--variant", "cpu-small", "--height", "64",
                "--width", "64", "--repeats", "1", "--threads", "1", "--engines", "x86",
                "fbgemm", "--profile", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout and "speed-up" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "bench_int8" and payload["meta"]["torch_threads"] == 1
    results = payload["results"]
    assert results["int8_layers"] > 0 and results["float_linear_layers"] >= 0
    impls = results["implementations"]
    assert list(impls) == ["float32", "int8 (x86)", "int8 (fbgemm)", "int8 Linear only"]
    assert results["int8_convolutions"] > 0
    assert impls["float32"]["speedup_vs_float32"] == 1.0
    assert all(res["median_s"] > 0 and len(res["runs_s"]) == 1 for res in impls.values())
    assert set(results["profiles"]) == set(impls)
    groups = results["profiles"]["int8 (x86)"]["groups_s"]
    assert groups["linear"] > 0 and groups["convolution"] > 0 and groups["quantise input"] > 0
    help_run = _run("benchmarks/bench_int8.py", "--help", timeout=120)
    assert help_run.stdout.startswith("usage:") and "--json" in help_run.stdout


def test_bench_onnx_attention_end_to_end(tmp_path: Path) -> None:
    """The exported layer matches PyTorch, both are timed, and the profile finds the corner
    Gather and the bytes it writes (N·Lq·M·4·L·P·D float32 values)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "attention.json"
    proc = _run("benchmarks/bench_onnx_attention.py", "--hw", "96x64", "--repeats", "2",
                "--threads", "1", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {out}" in proc.stdout and "the corner Gather wrote" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert results["level_shapes"] == [[12, 8], [6, 4], [3, 2], [2, 1]]
    queries = 12 * 8 + 6 * 4 + 3 * 2 + 2 * 1
    assert results["queries"] == queries and results["max_abs_diff"] < 1e-4
    assert results["gathered_values"] == queries * 8 * 4 * 16 * 32
    assert results["onnxruntime_profile"]["gather_bytes"] == 4 * results["gathered_values"]
    timings = results["timings"]
    assert list(timings) == ["pytorch", "onnxruntime"]
    assert timings["pytorch"]["ratio_vs_baseline"] == 1.0
    assert all(len(t["runs_s"]) == 2 and t["median_s"] > 0 for t in timings.values())
    assert results["onnxruntime_profile"]["ms"]["corner MatMul"] > 0
    assert results["pytorch_profile"]["ms"]["embedding_bag"] > 0
    bad = _run("benchmarks/bench_onnx_attention.py", "--hw", "800", timeout=120)
    assert bad.returncode == 2 and "--hw must be HxW" in bad.stderr


def test_sliced_example_draws_more_detections_sliced_than_unsliced(tmp_path):
    out = tmp_path / "sliced.png"
    proc = _run(str(BENCHMARKS / "sliced_example.py"), str(out), "--size", "600", "800",
                "--tile", "200", timeout=300)
    assert proc.returncode == 0, proc.stderr
    sliced, unsliced = (int(n) for n in re.findall(r"(\d+) detections sliced, (\d+) unsliced",
                                                    proc.stdout)[0])
    assert sliced > unsliced
    with Image.open(out) as image:
        assert image.size == (800, 600)


def test_bench_detect_names_a_bad_also_onnx(tmp_path: Path) -> None:
    missing = tmp_path / "old.onnx"
    proc = _run("benchmarks/bench_detect.py", "--also-onnx", f"old={missing}", timeout=120)
    assert proc.returncode == 2 and f"--also-onnx 'old={missing}'" in proc.stderr
    missing.write_bytes(b"")
    proc = _run("benchmarks/bench_detect.py", "--also-onnx", f"old={missing}", timeout=120)
    assert proc.returncode == 2 and "give one --models" in proc.stderr
