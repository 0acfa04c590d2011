"""Early stopping on the validation AP: when it stops, what it keeps, and resuming."""

from __future__ import annotations

import json

import pytest

from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine import train as train_module
from dinodet.engine.checkpoint import CheckpointManager, load_checkpoint
from dinodet.engine.config import TrainConfig, load_train_config
from dinodet.engine.evaluate import METRIC_NAMES, EvalResult
from dinodet.engine.train import EarlyStopping, train
from dinodet.errors import DataError

from .test_train import tiny_config

# The AP of each evaluation (epoch 1, 2, ...): gains at epochs 1 and 2, none at 3 and 4.
APS = [0.10, 0.30, 0.20, 0.25, 0.50, 0.60]  # one per epoch of _config
REASON = "early stopping: no AP gain for 2 epochs (best 0.300 at epoch 2)"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(root, num_train=2, num_val=1, image_size=(64, 64),
                               max_objects=2, seed=5)


def _config(data, out_dir, *sets, epochs=6):
    # 2 images in batches of 1: two optimiser steps per epoch, each logged.
    return tiny_config(data, out_dir, "model.dec_layers=1", "early_stop_patience=2", *sets,
                       epochs=epochs, size=64, batch_size=1)


@pytest.fixture
def fake_ap(monkeypatch):
    """Replace the evaluation with the AP sequence ``APS``, one value per evaluation of a
    run directory (a resumed run goes on counting where the first one stopped)."""
    calls: dict[str, int] = {}

    def evaluate(cfg, model, val_set, info):
        n = calls.get(cfg.out_dir, 0)
        calls[cfg.out_dir] = n + 1
        return EvalResult({name: APS[n] for name in METRIC_NAMES})

    monkeypatch.setattr(train_module, "_evaluate", evaluate)
    return calls


def _summary_record(out_dir):
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"summary"' in line][-1]


def test_stops_after_patience_keeps_the_best_checkpoint_and_says_why(
        tiny_data, tmp_path, fake_ap, capsys):
    summary = train(_config(tiny_data, tmp_path), progress=False)
    assert summary["epochs"] == 4 and summary["steps"] == 8
    assert summary["stopped_by"] == REASON
    assert summary["best_AP"] == pytest.approx(0.30) and summary["best_epoch"] == 2
    assert fake_ap[str(tmp_path)] == 4
    # The last checkpoint is epoch 4's, best.pt epoch 2's.
    latest = CheckpointManager(tmp_path).latest()
    assert latest is not None and load_checkpoint(latest)["epoch"] == 4
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    assert best["early_stop"] == {"best_AP": 0.30, "best_epoch": 2, "bar": 0.30, "stale": 0}
    assert _summary_record(tmp_path)["stopped_by"] == REASON
    out = capsys.readouterr().out
    assert REASON in out and "best AP" in out and "0.300 (epoch 2)" in out


def test_a_resumed_run_stops_at_the_same_epoch(tiny_data, tmp_path, fake_ap):
    # Interrupted in epoch 4 (after 7 steps), with one evaluation without a gain counted:
    # without that count the resumed run would stop an epoch late.
    part = train(_config(tiny_data, tmp_path / "b"), max_steps=7, progress=False)
    assert part["stopped_by"] == "max_steps" and part["epochs"] == 3
    state = load_checkpoint(part["latest_checkpoint"])["early_stop"]
    assert state["stale"] == 1 and state["best_epoch"] == 2
    resumed = train(_config(tiny_data, tmp_path / "b"), resume="auto", progress=False)
    # As the uninterrupted run of the test above.
    assert (resumed["epochs"], resumed["steps"], resumed["stopped_by"]) == (4, 8, REASON)
    assert resumed["best_AP"] == pytest.approx(0.30) and resumed["best_epoch"] == 2
    assert fake_ap[str(tmp_path / "b")] == 4
    # Resuming a run that stopped early trains no further, unless the patience is raised.
    again = train(_config(tiny_data, tmp_path / "b"), resume="auto", progress=False)
    assert again["steps"] == 8 and again["stopped_by"] == REASON
    longer = train(_config(tiny_data, tmp_path / "b", "early_stop_patience=3"),
                   resume="auto", progress=False)
    assert longer["epochs"] == 6 and longer["stopped_by"] is None  # epoch 5 gains


def test_patience_counting_min_delta_and_the_state_from_an_old_checkpoint():
    early = EarlyStopping(patience=2, min_delta=0.05)
    for epoch, ap in enumerate([0.10, 0.30, 0.33, float("nan")], start=1):
        early.update(ap, epoch)
    # 0.33 is the best AP but no gain over 0.30 + 0.05; nan is no gain either.
    assert (early.best_AP, early.best_epoch, early.bar, early.stale) == (0.33, 3, 0.30, 2)
    assert early.triggered
    assert early.reason("evaluations") == ("early stopping: no AP gain for 2 evaluations "
                                           "(best 0.330 at epoch 3)")
    restored = EarlyStopping(patience=2, min_delta=0.05)
    restored.load_state_dict(early.state_dict())
    assert restored == early
    # A checkpoint from before early stopping: the state is rebuilt from its epoch history.
    old = EarlyStopping(patience=2, min_delta=0.05)
    old.load_state_dict(None, [{"epoch": 1, "AP": 0.10}, {"epoch": 2},
                               {"epoch": 3, "AP": 0.30}, {"epoch": 4, "AP": 0.33}])
    assert (old.best_AP, old.best_epoch, old.stale) == (0.33, 4, 1)
    assert not EarlyStopping(patience=0, stale=100).triggered


@pytest.mark.parametrize(("sets", "message"), [
    ({"early_stop_patience": -1}, "early_stop_patience: must be >= 0"),
    ({"early_stop_patience": 3, "eval_every_epochs": 0}, "set eval_every_epochs >= 1"),
    ({"early_stop_min_delta": -0.1}, "early_stop_min_delta: must be a finite"),
])
def test_bad_settings_are_named(sets, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**sets)


def test_early_stopping_without_validation_data_is_an_error(tiny_data, tmp_path):
    cfg = load_train_config("cpu-small", None, ["early_stop_patience=2"],
                            out_dir=str(tmp_path), train_ann=str(tiny_data["train_ann"]),
                            train_images=str(tiny_data["train_images"]))
    with pytest.raises(DataError, match="early_stop_patience=2 needs validation data"):
        train(cfg, progress=False)
