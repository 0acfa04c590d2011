from __future__ import annotations

import copy
import errno
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import dinodet
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.engine import checkpoint as ckpt
from dinodet.engine.checkpoint import (
    CheckpointLoadError,
    CheckpointManager,
    CheckpointSaveError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dinodet.engine.config import OptimConfig, TrainConfig
from dinodet.engine.ema import ModelEMA
from dinodet.engine.optim import build_optimizer, build_scheduler


def small_state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "epoch": 0}


def no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_full_training_state_loads_with_weights_only(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(preset="cpu-small", model=DINOConfig(
        num_classes=3, hidden_dim=64, num_heads=4, enc_layers=1, dec_layers=2,
        dim_feedforward=128, num_queries=20, dn_number=10, num_select=20,
        backbone=BackboneConfig(name="resnet18", frozen_batchnorm=False, freeze_stem=False)))
    model = dinodet.build_model(cfg.model)
    optimizer = build_optimizer(model, OptimConfig(warmup_steps=3))
    scheduler = build_scheduler(optimizer, OptimConfig(warmup_steps=3), steps_per_epoch=5,
                                epochs=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ema = ModelEMA(model, decay=0.99)
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):  # a step on the big ResNet is slow on CPU
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    scheduler.step()
    ema.update(model)
    classes = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog", "supercategory": "animal"}]
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "ema": ema.state_dict(), "rng": capture_rng_state(), "epoch": 0, "step": 1,
        "config": cfg.to_dict(), "classes": classes,
    }
    path = CheckpointManager(tmp_path).save(state, epoch=0, step=1)
    loaded = load_checkpoint(path)  # weights_only=True inside

    assert TrainConfig.from_dict(loaded["config"]) == cfg
    assert loaded["classes"] == classes and (loaded["epoch"], loaded["step"]) == (0, 1)
    fresh = copy.deepcopy(model)  # quicker than a second build
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(loaded["model"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    opt2 = build_optimizer(fresh, OptimConfig(warmup_steps=3))
    sched2 = build_scheduler(opt2, OptimConfig(warmup_steps=3), steps_per_epoch=5, epochs=2)
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.get_last_lr() == scheduler.get_last_lr()
    first = next(iter(optimizer.state.values()))
    first2 = next(iter(opt2.state.values()))
    assert torch.equal(first["exp_avg"], first2["exp_avg"])
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(loaded["scaler"])
    assert scaler2.get_scale() == 1024.0
    ema2 = ModelEMA(fresh)
    ema2.load_state_dict(loaded["ema"])
    assert ema2.updates == 1
    restore_rng_state(loaded["rng"])


def test_rng_state_round_trips_exactly(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn(1)  # and numpy's
    state = capture_rng_state()

    def draw():
        return (torch.rand(5).tolist(), random.random(), random.gauss(0, 1),
                np.random.rand(3).tolist(), np.random.randn(1).tolist())

    expected = draw()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected


def test_save_refuses_what_weights_only_cannot_load(tmp_path):
    with pytest.raises(CheckpointSaveError, match=r"state\['rng'\]\['keys'\] holds a numpy"):
        save_checkpoint(tmp_path / "x.pt", {"rng": {"keys": np.zeros(3)}})
    with pytest.raises(CheckpointSaveError, match=r"state\['out'\] holds a pathlib"):
        save_checkpoint(tmp_path / "x.pt", {"out": tmp_path})
    with pytest.raises(CheckpointSaveError, match=r"state\['history'\]\[0\]\['AP'\] holds a numpy"):
        save_checkpoint(tmp_path / "x.pt", {"history": [{"AP": np.float64(0.5)}]})
    assert not (tmp_path / "x.pt").exists()


def test_disk_full_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, small_state(1.0))

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as err:
        save_checkpoint(path, small_state(2.0))
    assert "disk full" in str(err.value) and str(path) in str(err.value)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((4,), 1.0))
    assert no_temp_files(tmp_path)


def test_disk_full_at_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, small_state(1.0))

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"disk full.*untouched"):
        save_checkpoint(path, small_state(2.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((4,), 1.0))
    assert no_temp_files(tmp_path)


def test_keep_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for epoch, metric in enumerate([0.1, 0.5, 0.3, float("nan"), 0.2]):
        manager.save(small_state(epoch), epoch=epoch, step=10 * (epoch + 1), metric=metric)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-e003-s0000040.pt",
                                                       "checkpoint-e004-s0000050.pt"]
    assert manager.latest() == tmp_path / "checkpoint-e004-s0000050.pt"
    assert manager.best() == tmp_path / "best.pt" and manager.best_metric == 0.5
    assert load_checkpoint(tmp_path / "best.pt")["model"]["w"][0].item() == 1.0  # epoch 1
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert index["best"]["source"] == "checkpoint-e001-s0000020.pt"
    assert [e["file"] for e in index["checkpoints"]] == [p.name for p in manager.checkpoints()]

    resumed = CheckpointManager(tmp_path, keep_last=2)  # remembers the best metric
    assert resumed.best_metric == 0.5
    resumed.save(small_state(5), epoch=5, step=60, metric=0.4)
    assert load_checkpoint(tmp_path / "best.pt")["model"]["w"][0].item() == 1.0
    resumed.save(small_state(6), epoch=6, step=70, metric=0.9)
    assert load_checkpoint(tmp_path / "best.pt")["model"]["w"][0].item() == 6.0
    minimise = CheckpointManager(tmp_path / "loss", mode="min")
    minimise.save(small_state(0), 0, 1, metric=2.0)
    minimise.save(small_state(1), 1, 2, metric=1.0)
    assert minimise.best_metric == 1.0
    assert no_temp_files(tmp_path)


def test_latest_ignores_temp_partial_and_empty_files(tmp_path):
    manager = CheckpointManager(tmp_path)
    good = manager.save(small_state(1.0), epoch=1, step=100)
    data = good.read_bytes()
    (tmp_path / "checkpoint-e002-s0000200.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "checkpoint-e003-s0000300.pt").write_bytes(b"")
    (tmp_path / ".checkpoint-e004-s0000400.pt.abc123.tmp").write_bytes(data)
    (tmp_path / "notes-e005.pt").write_bytes(data)
    assert manager.latest() == good
    assert CheckpointManager(tmp_path / "fresh").latest() is None


def test_load_errors_name_the_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", small_state())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointLoadError, match=r"truncated\.pt is truncated or corrupt"):
        load_checkpoint(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match=r"empty\.pt is empty"):
        load_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"module": nn.Linear(1, 1)}, unsafe)  # a pickled object, not weights
    with pytest.raises(CheckpointLoadError,
                       match=r"unsafe\.pt was refused: it holds a pickled torch\.nn\.modules"):
        load_checkpoint(unsafe)


def test_resolve_resume(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    assert manager.resolve_resume("auto") is None and manager.resolve_resume(None) is None
    saved = manager.save(small_state(), epoch=0, step=5)
    assert manager.resolve_resume("auto") == saved
    assert manager.resolve_resume(str(saved)) == saved
    assert manager.resolve_resume(tmp_path / "run") == saved  # a directory -> its latest
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        manager.resolve_resume(str(tmp_path / "nowhere.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.resolve_resume(tmp_path / "empty")
