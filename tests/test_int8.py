"""int8 on the CPU: quantize_int8 converts every Linear (dinodet's subclass included),
Detector / predict / eval take it, it keeps the detections of a trained model, and it
refuses CUDA, MPS and non-float32 dtypes."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from torch import nn
from torchvision.ops import box_iou

import dinodet
from dinodet.cli import main
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.config import load_train_config
from dinodet.engine.evaluate import evaluate_checkpoint, evaluate_results
from dinodet.engine.train import train
from dinodet.errors import UserError
from dinodet.model import quantize
from dinodet.model.linear import Linear
from dinodet.model.quantize import (
    Int8Conv2d,
    Int8Counts,
    Int8Warning,
    int8_counts,
    quantize_int8,
    safe_weight_bits,
)
from dinodet.predict import Detector

nnqd = pytest.importorskip("torch.ao.nn.quantized.dynamic")

SIZE = 64
TINY = ["model.hidden_dim=64", "model.num_heads=4", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=128", "model.num_queries=20",
        "model.dn_number=10", "model.num_select=20", "optim.lr=2e-3",
        "optim.lr_backbone=2e-3", "optim.schedule=cosine", "optim.warmup_steps=10",
        "eval_every_epochs=1000", "log_every=1000", "data.num_workers=0",
        *(f"data.transform.{key}={value}" for key, value in (
            ("scales", [SIZE]), ("max_size", 2 * SIZE), ("crop_resize_scales", [SIZE]),
            ("crop_min", SIZE), ("crop_max", SIZE), ("eval_size", SIZE)))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained 40 steps on 4 synthetic images (AP50 about 0.75 on them)."""
    root = tmp_path_factory.mktemp("int8")
    data = make_synthetic_coco(root / "data", num_train=4, num_val=2,
                               image_size=(SIZE, SIZE), max_objects=3, seed=3)
    cfg = load_train_config(
        "cpu-small", None, TINY, epochs=20, batch_size=2, out_dir=str(root / "run"),
        train_ann=str(data["train_ann"]), train_images=str(data["train_images"]))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more; a busy machine loses
    try:
        summary = train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {**data, "checkpoint": Path(summary["latest_checkpoint"])}


def _linears(model: nn.Module) -> tuple[int, int]:
    """Distinct nn.Linear layers of ``model``: outside and inside nn.MultiheadAttention."""
    in_mha = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention)
              for m in mha.modules() if isinstance(m, nn.Linear)}
    every = {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    return len(every - in_mha), len(in_mha)


def test_every_linear_but_attentions_is_converted_and_the_original_kept():
    model = dinodet.build_model("cpu-small").eval()
    outside, inside = _linears(model)
    assert outside > 40 and inside == model.cfg.dec_layers  # one out_proj per decoder layer
    q = quantize_int8(model)
    counts = int8_counts(q)
    assert counts.int8 == outside and counts.float == inside
    assert not any(type(m) is Linear for m in q.modules())
    dynamic = [m for m in q.modules() if isinstance(m, nnqd.Linear)]
    assert len(dynamic) == outside
    assert all(m.weight().dtype == torch.qint8 for m in dynamic)
    assert int8_counts(model).int8 == 0 and isinstance(model.class_head, Linear)  # a copy
    inplace = quantize_int8(model, inplace=True)
    assert inplace is model and int8_counts(model) == counts


def test_a_shared_layer_stays_shared():
    shared = Linear(8, 8)
    q = quantize_int8(nn.Sequential(shared, nn.ReLU(), shared))
    assert isinstance(q[0], nnqd.Linear) and q[2] is q[0]
    assert int8_counts(q).int8 == 1


def test_same_as_quantize_dynamic_on_a_plain_linear():
    """For the nn.Linear that quantize_dynamic converts, the conversion is its own; on
    dinodet's Linear subclass quantize_dynamic converts nothing (the reason for this one)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10, bias=False))
    x = torch.randn(7, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantize_dynamic(plain, {nn.Linear: per_channel_dynamic_qconfig})
        skipped = quantize_dynamic(nn.Sequential(Linear(64, 8)), {nn.Linear})
    ours = quantize_int8(plain)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert (ours(x) - plain(x)).abs().max() > 0  # it is quantised
    assert int8_counts(skipped).int8 == 0


def _match(f: dict, q: dict, min_score: float) -> tuple[int, int]:
    """(float detections >= min_score, those with an int8 detection of the same label,
    IoU > 0.5 and a score within 0.05)."""
    keep = f["scores"] >= min_score
    fb, fs, fl = f["boxes"][keep], f["scores"][keep], f["labels"][keep]
    if not len(fs) or not len(q["scores"]):
        return len(fs), 0
    iou = box_iou(fb, q["boxes"])
    ok = ((iou > 0.5) & (fl[:, None] == q["labels"][None])
          & ((fs[:, None] - q["scores"][None]).abs() < 0.05))
    return len(fs), int(ok.any(1).sum())


def test_int8_detector_keeps_the_float32_detections_of_a_trained_model(trained):
    files = sorted(trained["train_images"].glob("*.jpg"))
    fp32 = Detector.from_pretrained(trained["checkpoint"])
    with pytest.warns(Int8Warning, match=r"dinodet eval --int8"):
        int8 = Detector.from_pretrained(trained["checkpoint"], int8=True)
    assert int8.int8 and int8_counts(int8.model).int8 > 0
    assert int8_counts(fp32.model).int8 == 0  # the float detector is its own model
    total = matched = 0
    differs = False
    for f, q in zip(fp32(files, threshold=0.05), int8(files, threshold=0.05)):
        n, m = _match(vars(f), vars(q), min_score=0.3)
        total, matched = total + n, matched + m
        differs |= f.scores.shape != q.scores.shape or not torch.equal(f.scores, q.scores)
    assert total >= 4, "the trained model should find objects"
    assert matched >= 0.8 * total, (matched, total)
    assert differs  # int8 really ran


def test_eval_int8_scores_close_to_float32(trained, tmp_path, capsys):
    """``dinodet eval --int8`` against float32 evaluate_checkpoint on the same images."""
    args = (trained["checkpoint"], trained["train_ann"], trained["train_images"])
    fp32 = evaluate_checkpoint(*args, num_workers=0, device="cpu").metrics
    results = tmp_path / "int8.json"
    assert main(["eval", "--checkpoint", str(trained["checkpoint"]),
                 "--ann", str(trained["train_ann"]), "--images", str(trained["train_images"]),
                 "--workers", "0", "--int8", "--out", str(results)]) == 0
    out = capsys.readouterr()
    assert "AP50" in out.out and out.err.count("--int8") == 2
    int8 = evaluate_results(COCO(str(trained["train_ann"])),
                            json.loads(results.read_text())).metrics
    assert fp32["AP50"] > 0.3
    assert abs(int8["AP50"] - fp32["AP50"]) < 0.1 and abs(int8["AP"] - fp32["AP"]) < 0.1
    with pytest.raises(UserError, match=r"int8 runs on the CPU only, not on device 'cuda'"):
        evaluate_checkpoint(*args, int8=True, num_workers=0, device="cuda")


def test_cli_predict_int8_says_so_once(trained, tmp_path, capsys):
    image = sorted(trained["train_images"].glob("*.jpg"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8Warning)  # the CLI says it itself, in one line
        assert main(["predict", str(trained["checkpoint"]), str(image),
                     "--out", str(tmp_path / "out"), "--int8"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8:" in err[0]
    assert re.search(r"\d+ Linear layers and \d+ convolutions in int8", err[0]), err[0]
    assert "dinodet eval --int8" in err[0]
    assert json.loads((tmp_path / "out" / "detections.json").read_text())[0]["detections"]


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cuda"}, r"^int8 runs on the CPU only, not on device cuda"),
    ({"device": "mps"}, r"^int8 runs on the CPU only, not on device mps"),
    ({"dtype": torch.bfloat16}, r"^int8 needs dtype float32, not bfloat16"),
])
def test_int8_refuses_other_devices_and_dtypes(kwargs, message, tmp_path):
    model = dinodet.build_model("cpu-small")
    with pytest.raises(UserError, match=message):
        Detector(model, int8=True, **kwargs)
    # from_pretrained says so before reading the file
    with pytest.raises(UserError, match=message):
        Detector.from_pretrained(tmp_path / "missing.pt", int8=True, **kwargs)


def test_quantize_int8_names_a_layer_that_is_not_float32():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    with pytest.raises(UserError, match=r"^int8 needs a float32 model on the CPU; "
                                        r"0\.weight is bfloat16 on cpu"):
        quantize_int8(model)


def test_the_engine_is_set_for_the_conversion_only():
    before = torch.backends.quantized.engine
    other = next(e for e in ("onednn", "fbgemm", "x86")
                 if e in torch.backends.quantized.supported_engines and e != before)
    x = torch.randn(5, 16)
    a = quantize_int8(nn.Sequential(nn.Linear(16, 8)), engine=other)
    assert torch.backends.quantized.engine == before
    assert a(x).shape == (5, 8)  # the packed weights run whatever the engine now
    assert isinstance(quantize_int8(Linear(16, 8), inplace=True), nnqd.Linear)
    with pytest.raises(UserError, match=r"^int8 engine 'nope' is not in this torch build"):
        quantize_int8(nn.Linear(4, 4), engine="nope")
    assert torch.backends.quantized.engine == before


# --------------------------------------------------------------------------- convolutions

def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bits", [None, 7])
@pytest.mark.parametrize("cin, cout, k, stride, groups", [
    (3, 16, 7, 2, 1), (32, 48, 3, 1, 1), (32, 64, 3, 2, 4), (64, 32, 1, 1, 1)])
def test_int8_conv_is_close_to_the_float_conv(bits, cin, cout, k, stride, groups):
    """Close for signed and for non-negative inputs (PyTorch's own dynamic Conv2d is
    about 70 % off on the latter), this CPU's default bits (8 with VNNI, else 7) and 7,
    groups, strides."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups).eval()
    q = Int8Conv2d(conv, bits)
    assert q.weight_bits == (bits or safe_weight_bits())
    for x in (torch.randn(2, cin, 23, 30), torch.randn(2, cin, 23, 30).relu()):
        with torch.no_grad():
            y, ref = q(x), conv(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert _relerr(y, ref) < (0.02 if q.weight_bits == 8 else 0.04)
        assert not torch.equal(y, ref)


def test_int8_conv_warns_of_8_bits_without_vnni_and_refuses_other_widths(monkeypatch):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    monkeypatch.setattr(quantize, "_has_vnni", lambda: False)
    with pytest.warns(UserWarning, match=r"weight_bits=8 on a CPU without VNNI"):
        assert Int8Conv2d(conv, 8).weight_bits == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Int8Conv2d(conv).weight_bits == 7
        monkeypatch.setattr(quantize, "_has_vnni", lambda: True)
        assert Int8Conv2d(conv).weight_bits == 8
        assert Int8Conv2d(conv, 8).weight_bits == 8
    with pytest.raises(ValueError, match=r"weight_bits must be 7 or 8, got 4"):
        Int8Conv2d(conv, 4)


@pytest.mark.parametrize("norm_type", ["frozen", "batchnorm"])
def test_int8_conv_folds_its_norm_and_fuses_relu_and_the_residual(norm_type):
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(1)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False).eval()
    norm = FrozenBatchNorm2d(32) if norm_type == "frozen" else nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 3)
    q = Int8Conv2d(conv, norm=norm)
    x, residual = torch.randn(1, 16, 20, 20), torch.randn(1, 32, 20, 20)
    with torch.no_grad():
        plain = norm(conv(x))
        assert _relerr(q(x), plain) < 0.02
        assert _relerr(q(x, relu=True), plain.relu()) < 0.02
        mine = residual.clone(memory_format=torch.channels_last)
        out = q(x, relu=True, residual=mine)
        assert _relerr(out, (plain + residual).relu()) < 0.02
        torch.testing.assert_close(mine, out, rtol=0, atol=0)  # computed in its memory
    assert "norm folded" in repr(q)


def test_int8_conv_packs_per_input_shape_and_keeps_a_few():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    q = Int8Conv2d(conv)
    with torch.no_grad():
        for size in range(10, 22):
            x = torch.randn(1, 8, size, size + 3)
            assert _relerr(q(x), conv(x)) < 0.02
        assert len(q._packed) == 8 and (1, 8, 21, 24) in q._packed
        q(torch.randn(1, 8, 14, 17))  # a shape kept: no new pack
    assert len(q._packed) == 8


def test_int8_conv_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="only numeric zero padding"):
        Int8Conv2d(nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="only numeric zero padding"):
        Int8Conv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"input of shape \(4, 5, 5\)"):
        Int8Conv2d(nn.Conv2d(4, 4, 3))(torch.randn(4, 5, 5))


@pytest.mark.parametrize("frozen", [True, False])
def test_backbone_in_int8_folds_every_norm_and_stays_close(frozen):
    """Every ResNet convolution in int8 with its BatchNorm folded (frozen, or trainable in
    eval mode); the fused path (no autograd) equals the plain modules and is close to the
    float backbone."""
    from dinodet.model.backbone import ResNetBody

    torch.manual_seed(3)
    body = ResNetBody("resnet18", (1, 2, 3), frozen_batchnorm=frozen).eval()
    convs = sum(type(m) is nn.Conv2d for m in body.modules())
    q = quantize_int8(body)
    assert int8_counts(q) == Int8Counts(0, 0, convs)
    assert not any(isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d"
                   for m in q.modules())
    assert all(m.folded_norm for m in q.modules() if isinstance(m, Int8Conv2d))
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        ref, fused = body(x), q(x)
    with torch.enable_grad():
        plain = q(x)
    for r, f, p in zip(ref, fused, plain, strict=True):
        assert _relerr(f, r) < 0.06
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)
    assert int8_counts(quantize_int8(body, convs=False)).convs == 0


def test_an_int8_block_does_not_write_over_an_input_it_must_keep():
    from dinodet.model.backbone import ResNetBody

    torch.manual_seed(4)
    q = quantize_int8(ResNetBody("resnet18", (1, 2, 3), frozen_batchnorm=True).eval())
    block = q.layer1[1]  # no downsample: its sum goes into its input's memory
    x = torch.rand(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        out = q._block(block, x, keep_input=True)
        torch.testing.assert_close(x, kept, rtol=0, atol=0)
        assert not torch.equal(out, x)
        q._block(block, x)
    assert not torch.equal(x, kept)  # without keep_input it does


def test_an_int8_linear_takes_the_fused_relu_with_the_same_values():
    from dinodet.model.linear import _is_dynamic_int8, linear_relu

    torch.manual_seed(5)
    q = quantize_int8(Linear(16, 32))
    x = torch.randn(3, 7, 16)
    assert _is_dynamic_int8(q) and not _is_dynamic_int8(Linear(16, 32))
    torch.testing.assert_close(linear_relu(q, x), torch.relu(q(x)), rtol=0, atol=0)
