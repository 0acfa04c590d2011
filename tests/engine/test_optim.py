from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import dinodet
from dinodet.config import BackboneConfig, DINOConfig
from dinodet.engine.config import OptimConfig
from dinodet.engine.ema import ModelEMA
from dinodet.engine.optim import (
    LRFactor,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    param_groups,
)


def tiny_config() -> DINOConfig:
    return DINOConfig(num_classes=3, hidden_dim=64, num_heads=4, enc_layers=1, dec_layers=2,
                      dim_feedforward=128, num_queries=20, dn_number=10, num_select=20,
                      backbone=BackboneConfig(name="resnet18", frozen_batchnorm=False,
                                              freeze_stem=False))


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return dinodet.build_model(tiny_config())


def roundtrip(obj):
    """torch.save -> torch.load(weights_only=True), as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_param_groups_split_backbone(tiny_model):
    groups = param_groups(tiny_model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 1e-5 and by_name["transformer"]["lr"] == 1e-4
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # decay on every parameter
    named = dict(tiny_model.named_parameters())
    backbone_ids = {id(p) for n, p in named.items() if n.startswith("backbone.")}
    assert {id(p) for p in by_name["backbone"]["params"]} == backbone_ids
    assert len(by_name["backbone"]["params"]) + len(by_name["transformer"]["params"]) == len(
        [p for p in named.values() if p.requires_grad])


def test_param_groups_skip_frozen_and_unwrap(tiny_model):
    tiny_model.backbone.requires_grad_(False)
    try:
        groups = param_groups(nn.DataParallel(tiny_model), 1e-4, 1e-5, 1e-4)
    finally:
        tiny_model.backbone.requires_grad_(True)
    assert [g["name"] for g in groups] == ["transformer"]


def test_build_optimizer(tiny_model):
    opt = build_optimizer(tiny_model, OptimConfig(lr=2e-4, lr_backbone=2e-5, betas=(0.8, 0.9)))
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted(g["lr"] for g in opt.param_groups) == [2e-5, 2e-4]
    assert opt.defaults["betas"] == (0.8, 0.9) and not opt.defaults["fused"]
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimConfig())


def toy_optimizer() -> torch.optim.AdamW:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", nn.Linear(3, 3))
    model.add_module("head", nn.Linear(3, 1))
    return build_optimizer(model, OptimConfig())


def lrs_over(scheduler, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append(list(scheduler.get_last_lr()))
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_step_drop():
    opt = toy_optimizer()
    sched = build_scheduler(opt, OptimConfig(warmup_steps=10), steps_per_epoch=4, epochs=12)
    lrs = lrs_over(sched, 48)
    head = [lr[0] for lr in lrs]
    assert head[0] == pytest.approx(1e-4 * 0.001)
    assert head[5] == pytest.approx(1e-4 * (0.001 + 0.999 * 0.5))
    assert head[10] == pytest.approx(1e-4)
    assert head[43] == pytest.approx(1e-4) and head[44] == pytest.approx(1e-5)  # epoch 11
    assert [lr[1] for lr in lrs][44] == pytest.approx(1e-6)  # the backbone drops too


def test_multistep_and_cosine_factors():
    f = LRFactor("multistep", steps_per_epoch=10, total_steps=100, milestones=(2, 4), gamma=0.5)
    assert [f(s) for s in (0, 19, 20, 39, 40, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    f = LRFactor("cosine", steps_per_epoch=10, total_steps=110, warmup_steps=10,
                 min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.001) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    f = LRFactor("step", steps_per_epoch=5, total_steps=60, milestones=(3, 7), gamma=0.1)
    assert f(14) == 1.0 and f(15) == pytest.approx(0.1) and f(59) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        LRFactor("linear", 1, 1)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_resume_gives_identical_lrs(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=5, lr_drop_epochs=(3,), min_lr_ratio=0.01)
    opt = toy_optimizer()
    sched = build_scheduler(opt, cfg, steps_per_epoch=4, epochs=6)
    lrs_over(sched, 7)
    saved = roundtrip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    expected = lrs_over(sched, 17)

    opt2 = toy_optimizer()
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=4, epochs=6)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    assert lrs_over(sched2, 17) == expected


def test_clip_gradients():
    model = nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = [p.grad.clone() for p in model.parameters()]
    assert clip_gradients(model, 0.0) is None
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
    norm = clip_gradients(model.parameters(), 0.1)
    assert norm.item() == pytest.approx(3.0 * math.sqrt(20))
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert after.item() == pytest.approx(0.1, rel=1e-4)


def test_ema_update_maths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup=False)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(4, 2))  # moves the BatchNorm statistics and its counter
    ema.update(model)
    now = model.state_dict()
    for key, avg in ema.module.state_dict().items():
        if avg.dtype.is_floating_point:
            torch.testing.assert_close(avg, 0.9 * start[key] + 0.1 * now[key])
        else:
            assert torch.equal(avg, now[key])  # num_batches_tracked is copied
    assert ema.updates == 1


def test_ema_warmup_ramp_and_state(tmp_path):
    model = nn.Linear(3, 1)
    ema = ModelEMA(nn.DataParallel(model), decay=0.9997)  # wrapped models are unwrapped
    assert ema.current_decay(1) == pytest.approx(0.9997 * (1 - math.exp(-1 / 2000)))
    assert ema.current_decay(2000) == pytest.approx(0.9997 * (1 - math.exp(-1)))
    assert ema.current_decay(100_000) == pytest.approx(0.9997)
    assert 1 - ema.current_decay(1) > 0.999  # the first update nearly copies the model
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.5)
        ema.update(model)
    state = roundtrip(ema.state_dict())
    other = ModelEMA(nn.Linear(3, 1))
    other.load_state_dict(state)
    assert other.updates == 3
    torch.testing.assert_close(other.module.weight, ema.module.weight)
