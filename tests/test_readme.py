"""The README's examples, run as written, in README order, in one scratch directory.

Every ```python and ```bash block of README.md must appear in PLAN, keyed by its first
line: it either runs (Python blocks with exec, shell blocks line by line with `dinodet`
on the PATH), runs with the listed substitutions (only to make a full-size job small:
a CPU preset, one epoch, small images), or is skipped with the reason. A new block that
is not planned fails the suite, so the README cannot grow untested examples.

The scratch directory holds what the examples name: a COCO-format dataset in
``data/`` (the synthetic generator, 128 px), a stand-in for the released
``checkpoint0011_4scale.pth`` (the original's key layout, deterministic weights), and
``photo.jpg``, ``a.jpg``, ``b.png``, ``images/``, ``more/``. Later blocks use what earlier
ones wrote (``runs/mine/best.pt`` from the training example, ``model.onnx`` from export).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinodet.data.synthetic import make_synthetic_coco

from reference_weights import load_manifest, make_state_dict

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
SIZE = 128
SMALL_DATA = " ".join([
    f"--image-size {SIZE}",
    "--set data.num_workers=0", "--no-progress"])

SKIP, RUN = "skip", "run"
# One namespace for all Python blocks, as a reader running them in one session has.
SESSION: dict[str, object] = {"__name__": "__readme__"}
PLAN: dict[str, tuple[str, object]] = {
    "make demo": (SKIP, "`make test` is what runs this suite; `make demo` trains for minutes "
                        "(its parts are tested in tests/data and tests/engine/test_train.py)"),
    "dinodet train --preset r50-4scale \\": (RUN, {
        "--preset r50-4scale": "--preset cpu-small",
        "--epochs 12": f"--epochs 1 {SMALL_DATA}"}),
    "dinodet train --preset cpu-small \\": (RUN, {
        "--out runs/small": f"--out runs/small --epochs 1 {SMALL_DATA}"}),
    "dinodet eval --checkpoint runs/mine/best.pt": (RUN, {}),
    "torchrun --nproc_per_node=8": (SKIP, "needs GPUs and machines; two-process DDP is "
                                          "tested in tests/engine/test_distributed.py"),
    "import torch": (RUN, {}),
    'model = dinodet.from_original("checkpoint0011_4scale.pth"': (RUN, {}),
    "dinodet convert checkpoint0011_4scale.pth": (RUN, {}),
    "import dinodet": (RUN, {}),
    "dinodet predict runs/mine/best.pt": (RUN, {}),
    "dinodet export runs/mine/best.pt": (RUN, {}),
    "import onnxruntime as ort": (RUN, {}),
    "python benchmarks/bench_inference.py": (SKIP, "benchmarks time full-size models"),
    "python benchmarks/bench_vs_original.py": (SKIP, "needs a checkout of the original DINO; "
                                                     "its errors are tested in "
                                                     "tests/test_benchmarks.py"),
    "python benchmarks/bench_small_data.py": (SKIP, "trains for an hour; smoke-tested in "
                                                    "tests/test_benchmarks.py"),
    "python benchmarks/ablation.py": (SKIP, "trains for hours; smoke-tested in "
                                            "tests/test_benchmarks.py"),
    "from dinodet.model import ms_deform_attn": (RUN, {}),
    "python benchmarks/bench_ms_deform_attn_gpu.py": (SKIP, "needs a CUDA device"),
    "dinodet serve runs/mine/best.pt --port 8000": (SKIP, "a server runs until stopped; it "
                                                          "is tested over HTTP in "
                                                          "tests/test_serve.py"),
    "curl -F file=@photo.jpg": (SKIP, "needs the server above running (tests/test_serve.py)"),
    'sliced = dinodet.Detector.from_pretrained("runs/mine/best.pt"': (RUN, {}),
    "dinodet predict runs/mine/best.pt photo.jpg --out sliced": (RUN, {}),
    "dinodet predict runs/mine/best.pt clip.mp4": (SKIP, "video input is tested on generated "
                                                         "videos in tests/test_video.py"),
    'detector = dinodet.Detector.from_pretrained("OWNER/NAME")': (
        SKIP, "needs the network; Hub loading is tested offline in tests/test_hub.py"),
    "dinodet predict OWNER/NAME images/": (SKIP, "needs the network and a Hub login; "
                                                 "tested offline in tests/test_hub.py"),
}


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line number, language, code) of every python / bash block."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
            for m in BLOCK.finditer(text)]


def _plan(code: str) -> tuple[str, object]:
    first = code.strip().splitlines()[0]
    # The longest key that starts the line: "dinodet predict X clip.mp4" before "... X".
    for key in sorted(PLAN, key=len, reverse=True):
        if first.startswith(key.rstrip("\\").rstrip()):
            return PLAN[key]
    raise AssertionError(f"README block starting {first!r} is not in tests/test_readme.py's "
                         "PLAN: say how it is tested")


def test_every_block_is_planned():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    firsts = [code.strip().splitlines()[0] for _, _, code in blocks]
    for key in PLAN:  # and no plan is left over from a block that is gone
        assert any(f.startswith(key.rstrip("\\").rstrip()) for f in firsts), key
    for _, _, code in blocks:
        _plan(code)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    paths = make_synthetic_coco(root / "data", num_train=8, num_val=4, image_size=(SIZE, SIZE),
                                seed=3)
    sd = {k: v.float() for k, v in make_state_dict(load_manifest("dino_r50_4scale")).items()}
    torch.save({"model": sd, "epoch": 11,
                "args": argparse.Namespace(num_classes=91, backbone="resnet50")},
               root / "checkpoint0011_4scale.pth")
    val = sorted(paths["val_images"].iterdir())
    shutil.copy(val[0], root / "photo.jpg")
    shutil.copy(val[1], root / "a.jpg")
    Image.open(val[2]).save(root / "b.png")
    (root / "images").mkdir()
    (root / "more").mkdir()
    for i, src in enumerate(val):
        shutil.copy(src, (root / "images" if i % 2 else root / "more") / src.name)
    return root


def _shell_commands(code: str) -> list[str]:
    lines = code.replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def _runnable() -> list[tuple[int, str, str]]:
    """The blocks that run (the others are listed in PLAN with the reason they don't)."""
    out = []
    for block in readme_blocks():
        try:
            if _plan(block[2])[0] == RUN:
                out.append(block)
        except AssertionError:  # reported by test_every_block_is_planned
            pass
    return out


@pytest.mark.parametrize("line, lang, code", _runnable(),
                         ids=[f"README.md:{n}" for n, _, _ in _runnable()])
def test_readme_example(line, lang, code, workspace, monkeypatch):
    detail = _plan(code)[1]
    monkeypatch.chdir(workspace)
    if lang == "python":
        exec(compile(code, f"README.md:{line}", "exec"), SESSION)
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for command in _shell_commands(code):
        for old, new in dict(detail).items():
            command = command.replace(old, new)
        done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"README.md:{line}: {command}\n{done.stdout}\n{done.stderr}"


def test_every_test_the_reliability_section_names_exists():
    """The README's reliability guarantees cite tests by name: each one must be there."""
    text = README.read_text()
    section = text[text.index("## Reliability"):text.index("## Python API")]
    cited = set(re.findall(r"`(test_\w+)`", section))
    assert len(cited) >= 20
    defined = {m for path in (README.parent / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert sorted(cited - defined) == []
