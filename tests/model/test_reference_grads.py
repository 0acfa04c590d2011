"""dinodet's backward pass against one training step recorded from the original (float64).

The record (see tests/fixtures/dino_r50_4scale.grads.pt) is of the original built without
denoising: dinodet is called in training mode without targets, so no denoising queries
exist. Equal gradients show that look-forward-twice, the detached two-stage anchors and
the shared heads train as in the original, and the same set of parameters trains.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dinodet
from dinodet.convert import rename_key

from reference_weights import load_manifest, make_state_dict

GRADS = Path(__file__).parents[1] / "fixtures" / "dino_r50_4scale.grads.pt"
GRAD_TOL = 1e-6  # relative to the gradient's largest magnitude
LOSS_TOL = 1e-10


@pytest.fixture(scope="module")
def record() -> dict:
    return torch.load(GRADS, weights_only=True)


@pytest.fixture(scope="module")
def step(record):
    """One training-mode forward and backward of the converted stand-in weights."""
    sd = make_state_dict(load_manifest("dino_r50_4scale"))
    model = dinodet.from_original(sd, "r50-4scale").double().train()
    out = model(record["images"])  # no targets: no denoising queries
    assert "dn_outputs" not in out
    losses = dinodet.build_criterion(91)(out, record["targets"])
    losses["loss"].backward()
    return model, losses


def _dinodet_name(original: str) -> str:
    name = rename_key(original)
    assert name is not None, f"the converter does not know {original}"
    return name


def test_loss_is_the_recorded_weighted_total(step, record):
    _, losses = step
    assert losses["loss"].dtype == torch.float64
    assert losses["loss"].item() == pytest.approx(record["weighted_loss_total"], rel=LOSS_TOL)
    for key in record["loss_weights"]:
        assert key in losses, f"the criterion has no {key}"


def test_every_recorded_gradient(step, record):
    model, _ = step
    params = dict(model.named_parameters())
    failures = []
    for original, want in record["grads"].items():
        name = _dinodet_name(original)
        p = params[name]
        # A parameter that takes part in no loss term gets None: the original's zeros.
        grad = (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
        head, tail = want["head"], want["tail"]
        assert head.shape == grad[:4096].shape and tail.shape == grad[-4096:].shape, name
        scale = max(float(grad.abs().max()), float(head.abs().max()), float(tail.abs().max()))
        tol = GRAD_TOL * scale
        errors = {
            "norm": abs(float(grad.norm()) - want["norm"]),
            "sum": abs(float(grad.sum()) - want["sum"]),
            "head": float((grad[:4096] - head).abs().max()),
            "tail": float((grad[-4096:] - tail).abs().max()),
        }
        bad = {k: v for k, v in errors.items() if v > tol}
        if bad:
            failures.append(f"{original} ({name}): {bad} > {tol:.3g}")
    assert not failures, "\n".join(failures)


def test_shared_heads_are_one_parameter_for_every_alias(step, record):
    """The original lists each shared head under the names of all decoder layers (and
    ``transformer.decoder.*``); they map to one dinodet parameter, recorded equal."""
    by_name: dict[str, list[str]] = {}
    for original in record["grads"]:
        by_name.setdefault(_dinodet_name(original), []).append(original)
    shared = {n: keys for n, keys in by_name.items() if len(keys) > 1}
    assert set(shared) == {f"{head}.{leaf}" for head in ["class_head", "box_head.layers.0",
                                                         "box_head.layers.1", "box_head.layers.2"]
                           for leaf in ["weight", "bias"]}
    for keys in shared.values():
        assert len(keys) == 12  # class_embed.0-5 and transformer.decoder.class_embed.0-5
        first = record["grads"][keys[0]]
        for key in keys[1:]:
            assert record["grads"][key]["norm"] == first["norm"]
            assert torch.equal(record["grads"][key]["head"], first["head"])


def test_the_same_parameters_train(step, record):
    model, _ = step
    params = dict(model.named_parameters())
    trained = {_dinodet_name(k) for k in record["grads"]}
    frozen = {_dinodet_name(k) for k in record["frozen"]}
    assert trained <= params.keys() and frozen <= params.keys()
    assert not trained & frozen
    assert [n for n in sorted(trained) if not params[n].requires_grad] == []
    assert [n for n in sorted(frozen) if params[n].requires_grad] == []
    assert sorted(set(params) - trained - frozen) == []
