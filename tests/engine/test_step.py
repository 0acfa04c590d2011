"""train_step and TrainState: gradient accumulation, NaN handling, the checkpoint layout."""

from __future__ import annotations

import warnings

import pytest
import torch

from dinodet.config import BackboneConfig, DINOConfig
from dinodet.data.collate import Batch
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.checkpoint import load_checkpoint
from dinodet.engine.config import OptimConfig, load_train_config
from dinodet.engine.step import TrainState, train_step, window_num_boxes
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
pytestmark = [pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)`"),
              pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)`")]


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

    def diverged(outputs, targets, num_boxes=None):
        losses = criterion(outputs, targets, num_boxes)
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
            "step", "samples_done", "skipped_images", "bad_steps", "history"} <= set(saved)
    other = _state(_model())
    other.load_state_dict(saved)
    assert other.progress.step == 1
    for (name, a), b in zip(state.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.scheduler.last_epoch == state.scheduler.last_epoch


def _frozen_model() -> DINO:
    """No randomness in training mode: frozen BatchNorm (batch statistics would depend on
    the batch split), no denoising (random queries), dropout 0; float64."""
    torch.manual_seed(0)
    return DINO(DINOConfig(num_classes=3, backbone=BackboneConfig(name="resnet18"),
                           hidden_dim=64, num_heads=4, enc_layers=1, dec_layers=2,
                           dim_feedforward=64, num_queries=10, denoising="off",
                           num_select=10)).double()


def test_total_batch_16_as_2_images_x_8_steps_is_one_batch_of_16():
    """The window's gradient is that of one batch of all its images: every batch's loss is
    normalised by the GT count of the whole window (images with 1 to 4 boxes, so a
    per-batch normaliser would weigh them differently)."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 64, generator=g, dtype=torch.float64) for _ in range(16)]
    targets = []
    for i in range(16):
        n = 1 + i % 4
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        targets.append({"labels": torch.randint(0, 3, (n,), generator=g),
                        "boxes": torch.cat([centre, torch.full((n, 2), 0.2,
                                                               dtype=torch.float64)], 1)})
    whole = Batch(ImageBatch.from_images(images), targets)
    parts = [Batch(ImageBatch.from_images(images[i:i + 2]), targets[i:i + 2])
             for i in range(0, 16, 2)]

    one = _state(_frozen_model())
    seen_one = _grads_at_step(one)
    assert train_step(one, whole).stepped
    accumulated = _state(_frozen_model())
    seen_acc = _grads_at_step(accumulated)
    num_boxes = window_num_boxes(parts, accumulated.device)
    assert num_boxes == sum(len(t["labels"]) for t in targets) / 8
    for i, part in enumerate(parts):
        result = train_step(accumulated, part, window=8, closes_window=i == 7,
                            num_boxes=num_boxes)
        assert result.stepped == (i == 7)
    assert len(seen_one) == len(seen_acc) == 1 and set(seen_one[0]) == set(seen_acc[0])
    for name, grad in seen_one[0].items():
        torch.testing.assert_close(seen_acc[0][name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # the per-batch normaliser gives another gradient: the test can tell them apart
    naive = _state(_frozen_model())
    seen_naive = _grads_at_step(naive)
    for i, part in enumerate(parts):
        train_step(naive, part, window=8, closes_window=i == 7)
    weight = "class_head.weight"
    assert not torch.allclose(seen_naive[0][weight], seen_one[0][weight], rtol=1e-6)


def _run(tmp_path, data, name, *sets, **kw):
    cfg = load_train_config(
        "cpu-small", None, [*TINY, "eval_every_epochs=0", "log_every=1", *sets],
        out_dir=str(tmp_path / name), train_ann=str(data["train_ann"]),
        train_images=str(data["train_images"]), **kw)
    return cfg


def test_an_epoch_is_whole_total_batches_and_the_run_says_so(tmp_path, capsys):
    """7 images, total batch 4 = 2 images x 2 batches: one step an epoch (the 3 images
    left over are not a total batch), and the run prints how the total is made."""
    data = make_synthetic_coco(tmp_path / "data", num_train=7, num_val=2, image_size=(64, 64),
                               max_objects=2, seed=5)
    summary = train(_run(tmp_path, data, "run", epochs=2, batch_size=2, total_batch_size=4),
                    progress=False)
    assert summary["steps"] == 2
    assert "total batch 4 = 1 process x 2 images x 2 steps; 1 steps per epoch" in (
        capsys.readouterr().out)
    ckpt = load_checkpoint(summary["latest_checkpoint"])
    assert ckpt["scheduler"]["lr_lambdas"][0]["steps_per_epoch"] == 1
    with pytest.raises(ValueError, match="total_batch_size: must be a multiple of "
                                         "batch_size=4, got 6"):
        _run(tmp_path, data, "bad", batch_size=4, total_batch_size=6)
    paper = load_train_config("r50-4scale")
    assert paper.describe_batch(8) == "total batch 16 = 8 processes x 2 images x 1 step"
    with pytest.raises(ValueError, match=r"total_batch_size=16 is not a multiple of "
                                         r"batch_size=2 x 3 process\(es\)"):
        paper.accumulation(3)


def test_resuming_with_another_split_of_the_total_batch_keeps_order_and_schedule(tmp_path):
    """Total batch 4 as 1 image x 4 batches, stopped after 2 steps, resumed as 2 images x 2
    batches: the run goes on at step 3 of the same epoch, with the samples it had not seen,
    and the schedule of 3 steps an epoch."""
    data = make_synthetic_coco(tmp_path / "data", num_train=12, num_val=2,
                               image_size=(64, 64), max_objects=2, seed=6)
    first = train(_run(tmp_path, data, "run", epochs=2, batch_size=1, total_batch_size=4),
                  max_steps=2, progress=False)
    assert first["steps"] == 2
    ckpt = load_checkpoint(first["latest_checkpoint"])
    assert ckpt["samples_done"] == 8 and ckpt["epoch"] == 0
    resumed = train(_run(tmp_path, data, "run", epochs=2, batch_size=2, total_batch_size=4),
                    resume="auto", progress=False)
    assert resumed["steps"] == 6 and resumed["epochs"] == 2
    last = load_checkpoint(resumed["latest_checkpoint"])
    assert last["scheduler"]["lr_lambdas"][0]["steps_per_epoch"] == 3


def test_a_window_of_unreadable_images_only_takes_no_step():
    """A batch whose images were all unreadable (B = 0) closing a window with nothing to
    step on: no optimiser, scaler, schedule or EMA step (fp16's scaler would fail)."""
    for amp in ("off", "fp16"):
        state = TrainState.create(_model(), OptimConfig(), steps_per_epoch=4, epochs=1,
                                  amp=amp, ema_decay=0.9)
        if amp == "fp16":  # a scale this model's gradients fit in: a real step (2**16 skips)
            state.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
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


def test_an_fp16_step_whose_gradients_overflow_moves_nothing():
    """fp16: the scaler skips a step whose scaled gradients overflow and halves its scale;
    then no weight, schedule, EMA or step count moves, LambdaLR sees no schedule step
    without an optimiser step, and it is not a bad (non-finite loss) step. At a scale the
    gradients fit, the next window steps."""
    state = TrainState.create(_model(), OptimConfig(), steps_per_epoch=4, epochs=1,
                              amp="fp16", ema_decay=0.9)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # overflows
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LambdaLR's "lr_scheduler.step() before ..."
        result = train_step(state, _batch(1), window=1, closes_window=True)
    assert result.finite and not result.stepped and result.losses
    assert state.scaler.get_scale() == 2.0**126
    assert state.progress.step == 0 and state.progress.bad_steps == 0
    assert state.scheduler.last_epoch == 0
    assert state.ema is not None and state.ema.updates == 0
    assert all(torch.equal(p, before[n]) for n, p in state.model.named_parameters())
    assert all(p.grad is None for p in state.model.parameters())
    state.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    assert train_step(state, _batch(2), window=1, closes_window=True).stepped
    assert state.progress.step == 1 and state.scheduler.last_epoch == 1
    assert state.ema.updates == 1
    assert not all(torch.equal(p, before[n]) for n, p in state.model.named_parameters())
