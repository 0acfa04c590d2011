"""ModelEMA: the decay ramp, the averaged weights, buffers, state and wrappers."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from dinodet.engine.ema import ModelEMA


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()


def _perturb(model: nn.Module, step: int) -> None:
    """Move every weight and run a training batch (BatchNorm stats and step counter)."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    model.train()
    model(torch.randn(4, 3, generator=gen, dtype=torch.float64))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_decay_ramp_follows_the_formula():
    ema = ModelEMA(_model(), decay=0.9, tau=10.0)
    for n in (1, 2, 5, 10, 50, 1000):
        assert ema.current_decay(n) == pytest.approx(0.9 * (1 - math.exp(-n / 10.0)), rel=1e-12)
    assert ema.current_decay(0) == 0.0
    # Monotone and within 1 % of decay after 5 tau.
    values = [ema.current_decay(n) for n in range(1, 100)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert ema.current_decay(50) > 0.99 * 0.9
    # Without an argument: the decay of the update count so far.
    assert ema.current_decay() == 0.0
    ema.update(_model())
    assert ema.updates == 1
    assert ema.current_decay() == pytest.approx(0.9 * (1 - math.exp(-0.1)))


def test_default_settings():
    ema = ModelEMA(_model())
    assert ema.decay == 0.9997 and ema.tau == 2000.0 and ema.warmup
    assert ema.current_decay(2000) == pytest.approx(0.9997 * (1 - math.exp(-1)))


def test_without_warmup_the_decay_is_constant():
    ema = ModelEMA(_model(), decay=0.8, warmup=False, tau=5.0)
    for n in (0, 1, 7, 10_000):
        assert ema.current_decay(n) == 0.8


@pytest.mark.parametrize("warmup", [True, False])
def test_updates_are_a_lerp_sequence(warmup):
    model = _model()
    ema = ModelEMA(model, decay=0.7, warmup=warmup, tau=3.0)
    expected = _state(model)
    for step in range(1, 5):
        _perturb(model, step)
        ema.update(model)
        d = 0.7 * (1 - math.exp(-step / 3.0)) if warmup else 0.7
        current = _state(model)
        for name, avg in expected.items():
            if avg.dtype.is_floating_point:
                expected[name] = d * avg + (1 - d) * current[name]
            else:
                expected[name] = current[name].clone()
        got = ema.module.state_dict()
        assert set(got) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-12, msg=name)
    assert ema.updates == 4
    # The average lags the model: after 4 moves it differs from the latest weights.
    assert not torch.allclose(ema.module[0].weight, model[0].weight)


def test_first_update_with_warmup_nearly_copies_the_model():
    model = _model()
    ema = ModelEMA(model, decay=0.9999, tau=2000.0)
    _perturb(model, 1)
    ema.update(model)
    d = 0.9999 * (1 - math.exp(-1 / 2000.0))
    assert d < 1e-3
    torch.testing.assert_close(ema.module[0].weight, model[0].weight, rtol=0, atol=1e-2)


def test_integer_buffers_are_copied():
    model = _model()
    ema = ModelEMA(model, decay=0.9, warmup=False)
    for step in range(3):
        _perturb(model, step)
    assert int(model[1].num_batches_tracked) == 3
    ema.update(model)
    assert ema.module[1].num_batches_tracked.dtype == torch.int64
    assert int(ema.module[1].num_batches_tracked) == 3
    # Float buffers are averaged, not copied.
    expected = 0.9 * torch.zeros(2, dtype=torch.float64) + 0.1 * model[1].running_mean
    torch.testing.assert_close(ema.module[1].running_mean, expected)


def test_copy_is_frozen_in_eval_mode_and_the_model_is_untouched():
    model = _model()
    model.train()
    before = _state(model)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    assert ema.module is not model
    assert not ema.module.training
    assert all(not m.training for m in ema.module.modules())
    assert all(not p.requires_grad for p in ema.module.parameters())
    # The model keeps its mode, its gradients and its weights.
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    ema.update(model)
    for name, value in _state(model).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # A deep copy: changing the model leaves the average alone until the next update.
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(ema.module[0].weight, before["0.weight"], rtol=0, atol=0)
    # The copy stays in eval mode after updates.
    assert not ema.module.training


def test_update_casts_to_the_average_dtype():
    model = _model()  # float64
    init = model[0].weight.detach().clone()
    ema = ModelEMA(copy.deepcopy(model).float(), decay=0.5, warmup=False)
    _perturb(model, 1)
    ema.update(model)
    assert ema.module[0].weight.dtype == torch.float32
    torch.testing.assert_close(ema.module[0].weight,
                               (0.5 * init + 0.5 * model[0].weight.detach()).float())


def test_state_dict_round_trip_restores_weights_and_update_count():
    model = _model()
    ema = ModelEMA(model, decay=0.6, tau=2.0)
    for step in range(3):
        _perturb(model, step)
        ema.update(model)
    state = ema.state_dict()
    assert state["updates"] == 3
    assert state["decay"] == 0.6 and state["tau"] == 2.0 and state["warmup"] is True
    saved = {k: v.clone() for k, v in state["module"].items()}

    fresh = ModelEMA(_model(seed=5), decay=0.6, tau=2.0)
    assert fresh.updates == 0
    fresh.load_state_dict(state)
    assert fresh.updates == 3
    for name, value in fresh.module.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert fresh.current_decay() == pytest.approx(ema.current_decay())
    # Both continue identically.
    _perturb(model, 9)
    ema.update(model)
    fresh.update(model)
    for (name, a), b in zip(ema.module.state_dict().items(),
                            fresh.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_load_state_dict_keeps_the_constructed_decay_settings():
    ema = ModelEMA(_model(), decay=0.6, tau=2.0)
    other = ModelEMA(_model(), decay=0.99, warmup=False, tau=7.0)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.tau == 7.0 and not other.warmup


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match="decay") as err:
        ModelEMA(_model(), decay=decay)
    assert str(decay) in str(err.value)


@pytest.mark.parametrize("tau", [0.0, -3.0])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau") as err:
        ModelEMA(_model(), tau=tau)
    assert str(tau) in str(err.value)


def test_decay_zero_follows_the_model():
    model = _model()
    ema = ModelEMA(model, decay=0.0)
    _perturb(model, 1)
    ema.update(model)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[name], value, rtol=0, atol=0)


def test_data_parallel_wrapper_is_unwrapped():
    model = _model()
    wrapped = nn.DataParallel(model)  # constructs without GPUs (then a plain pass-through)
    ema = ModelEMA(wrapped, decay=0.5, warmup=False)
    assert isinstance(ema.module, nn.Sequential)
    assert set(ema.module.state_dict()) == set(model.state_dict())
    init = _state(model)
    _perturb(model, 1)
    ema.update(wrapped)
    for name, value in _state(model).items():
        expected = 0.5 * init[name] + 0.5 * value if value.is_floating_point() else value
        torch.testing.assert_close(ema.module.state_dict()[name], expected, msg=name)


class _Holder(nn.Module):
    """Has a ``.module`` attribute but is no DDP / DataParallel: not unwrapped."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_other_modules_with_a_module_attribute_are_kept_whole():
    holder = _Holder(_model())
    ema = ModelEMA(holder, decay=0.5, warmup=False)
    assert isinstance(ema.module, _Holder)
    assert set(ema.module.state_dict()) == {f"module.{k}" for k in _model().state_dict()}
    ema.update(holder)  # the same structure: keys match
    assert ema.updates == 1
