"""train_step and TrainState: gradient accumulation, NaN handling, the checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.collate import Batch
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.checkpoint import load_checkpoint
from dinodet.engine.config import OptimConfig, load_train_config
from dinodet.engine.step import TrainState, train_step
from dinodet.engine.train import train
from dinodet.loss.criterion import build_criterion
from dinodet.model.dino import DINO
from dinodet.structures import ImageBatch

TINY = ["model.hidden_dim=64", "model.num_heads=4", "model.enc_layers=1",
        "model.dec_layers=1", "model.dim_feedforward=64", "model.num_queries=10",
        "model.dn_number=4", "model.num_select=10", "data.num_workers=0",
        *(f"data.transform.{key}={value}" for key, value in [
            ("scales", "[64]"), ("max_size", 128), ("crop_resize_scales", "[64]"),
            ("crop_min", 64), ("crop_max", 64), ("eval_size", 64)])]


# The tests wrap optimizer.step to record gradients, which LambdaLR notices.
# fp16's scaler skips a first step whose scaled gradients overflow, which LambdaLR notices too.
pytestmark = [pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)`"),
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")]


def _model() -> DINO:
    torch.manual_seed(0)
    return DINO(DINOConfig(num_classes=3, backbone=BackboneConfig(
        name="resnet18", frozen_batchnorm=False, freeze_stem=False), hidden_dim=64,
        num_heads=4, enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=10,
        dn_number=4, num_select=10))


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [{"labels": torch.tensor([seed % 3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])},
               {"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}]
    return Batch(ImageBatch.from_images(images), targets)


def _state(model: DINO) -> TrainState:
    return TrainState.create(model, OptimConfig(clip_max_norm=0.0), steps_per_epoch=4,
                             epochs=1)


def _grads_at_step(state: TrainState) -> list[dict[str, torch.Tensor]]:
    """Record the gradients the optimiser sees each time it steps."""
    seen: list[dict[str, torch.Tensor]] = []
    step = state.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in state.model.named_parameters()
                     if p.grad is not None})
        return step(*args, **kwargs)

    state.optimizer.step = recording_step  # type: ignore[method-assign]
    return seen


def _single_grads(model: DINO, seed: int, batch: Batch) -> dict[str, torch.Tensor]:
    """The gradient of one batch's loss, computed by hand (``model`` at its initial
    weights)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the denoising queries are random
    out = model.train()(batch.images, batch.targets)
    build_criterion(model.num_classes)(out, batch.targets)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_window_steps_on_the_mean_gradient_of_its_batches():
    b1, b2, b3 = _batch(1), _batch(2), _batch(3)
    state = _state(_model())
    seen = _grads_at_step(state)
    torch.manual_seed(11)
    first = train_step(state, b1, window=2, closes_window=False)
    assert first.finite and not first.stepped and state.progress.step == 0
    torch.manual_seed(12)
    second = train_step(state, b2, window=2, closes_window=True)
    assert second.stepped and state.progress.step == 1
    assert all(p.grad is None for p in state.model.parameters())  # nothing carried over
    # A window of one batch (the short last window of an epoch) is not divided by 2.
    reference = _model()
    g1, g2 = _single_grads(reference, 11, b1), _single_grads(reference, 12, b2)
    for name, grad in seen[0].items():
        torch.testing.assert_close(grad, (g1[name] + g2[name]) / 2, atol=1e-5, rtol=1e-4)
    assert set(seen[0]) == set(g1) | set(g2)
    state2 = _state(_model())
    seen2 = _grads_at_step(state2)
    torch.manual_seed(13)
    assert train_step(state2, b3, window=1, closes_window=True).stepped
    g3 = _single_grads(reference, 13, b3)
    for name, grad in seen2[0].items():
        torch.testing.assert_close(grad, g3[name], atol=1e-5, rtol=1e-4)


def test_a_non_finite_loss_drops_the_window_and_takes_no_step():
    state = _state(_model())
    seen = _grads_at_step(state)
    train_step(state, _batch(1), window=2, closes_window=False)
    criterion = state.criterion

    def diverged(outputs, targets):
        losses = criterion(outputs, targets)
        return {**losses, "loss": losses["loss"] * float("nan")}

    state.criterion = diverged  # type: ignore[assignment]
    result = train_step(state, _batch(2), window=2, closes_window=True)
    assert not result.finite and not result.stepped and seen == []
    assert state.progress.bad_steps == 1 and state.progress.step == 0
    assert all(p.grad is None for p in state.model.parameters())


def test_state_dict_round_trip_is_the_checkpoint_layout():
    state = _state(_model())
    train_step(state, _batch(1))
    saved = state.state_dict()
    assert {"model", "model_config", "optimizer", "scheduler", "scaler", "ema", "epoch",
            "step", "batches_done", "skipped_images", "bad_steps", "history"} <= set(saved)
    other = _state(_model())
    other.load_state_dict(saved)
    assert other.progress.step == 1
    for (name, a), b in zip(state.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.scheduler.last_epoch == state.scheduler.last_epoch


def test_an_epoch_whose_batches_do_not_fill_the_last_window_still_steps(tmp_path):
    """3 batches an epoch with accumulate_steps=2: windows of 2 and 1, two steps an epoch
    (the leftover batch's gradients no longer carry into the next epoch's first step)."""
    data = make_synthetic_coco(tmp_path / "data", num_train=6, num_val=2, image_size=(64, 64),
                               max_objects=2, seed=5)
    cfg = load_train_config(
        "cpu-small", None, [*TINY, "optim.accumulate_steps=2",
                            "eval_every_epochs=0"],
        epochs=2, batch_size=2, out_dir=str(tmp_path / "run"),
        train_ann=str(data["train_ann"]), train_images=str(data["train_images"]))
    summary = train(cfg, progress=False)
    assert summary["steps"] == 4
    ckpt = load_checkpoint(summary["latest_checkpoint"])
    assert ckpt["scheduler"]["lr_lambdas"][0]["steps_per_epoch"] == 2


def test_a_window_of_unreadable_images_only_takes_no_step():
    """A batch whose images were all unreadable (B = 0) closing a window with nothing to
    step on: no optimiser, scaler, schedule or EMA step (fp16's scaler would fail)."""
    for amp in ("off", "fp16"):
        state = TrainState.create(_model(), OptimConfig(), steps_per_epoch=4, epochs=1,
                                  amp=amp, ema_decay=0.9)
        empty = Batch(ImageBatch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.bool)),
                      [], ["broken.jpg"])
        result = train_step(state, empty, window=1, closes_window=True)
        assert result.finite and not result.stepped and result.losses == {}
        assert state.progress.step == 0 and state.scheduler.last_epoch == 0
        assert state.ema is not None and state.ema.updates == 0
        # a window of a real batch and an empty one steps on the real batch's gradients
        train_step(state, _batch(1), window=2, closes_window=False)
        assert train_step(state, empty, window=2, closes_window=True).stepped, amp
        assert state.progress.step == 1
