"""Training that loses nothing and never hangs: signals to the whole process group, one
run per directory, resumes that fail cleanly, numeric guards, unusable data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dinodet.cli import main
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.checkpoint import CheckpointManager, load_checkpoint
from dinodet.engine.rundir import RunDirLock
from dinodet.engine.train import _StopSignal

TINY = ["model.hidden_dim=64", "model.num_heads=4", "model.enc_layers=1", "model.dec_layers=2",
        "model.dim_feedforward=128", "model.num_queries=20", "model.dn_number=10",
        "model.num_select=20", "log_every=1", "data.transform.scales=[96]",
        "data.transform.max_size=192", "data.transform.crop_resize_scales=[96]",
        "data.transform.crop_min=96", "data.transform.crop_max=96",
        "data.transform.eval_size=96"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return make_synthetic_coco(root, num_train=8, num_val=2, image_size=(96, 96),
                               max_objects=3, seed=5)


def train_args(data, out, *sets, epochs=1, workers=0, val=False, images=None):
    args = ["train", "--preset", "cpu-small", "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "2", "--train-ann", str(data["train_ann"]),
            "--train-images", str(images or data["train_images"]), "--no-progress"]
    if val:
        args += ["--val-ann", str(data["val_ann"]), "--val-images", str(data["val_images"])]
    for item in [*TINY, f"data.num_workers={workers}", *sets]:
        args += ["--set", item]
    return args


def cli(*args, **kw):
    """``dinodet ARGS`` in a new process (and a new process group)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "dinodet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env, **kw)


def wait_for(predicate, proc, seconds=240):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"the run ended first ({proc.returncode}): {err[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out")


def has_step(run: Path) -> bool:
    log = run / "log.jsonl"
    return log.is_file() and '"type": "step"' in log.read_text()


# -- signals to the whole process group -----------------------------------------------------


def test_sigterm_to_the_process_group_saves_and_exits_143_then_resumes(data, tmp_path):
    """SLURM preemption / ``kill -- -PGID``: DataLoader workers get the signal too."""
    run = tmp_path / "run"
    proc = cli(*train_args(data, run, epochs=1000, workers=2))
    wait_for(lambda: has_step(run), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped by" in out and "SIGTERM" in out
    latest = CheckpointManager(run).latest()
    assert latest is not None
    step = load_checkpoint(latest)["step"]
    assert step >= 1
    resumed = cli(*train_args(data, run, epochs=1000, workers=2), "--resume", "auto")
    wait_for(lambda: f'"step": {step + 1},' in (run / "log.jsonl").read_text(), resumed)
    os.killpg(resumed.pid, signal.SIGINT)  # Ctrl-C in a terminal: the group gets SIGINT
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130, err[-3000:]
    assert f"resumed from {latest}" in out
    assert load_checkpoint(CheckpointManager(run).latest())["step"] > step


def test_a_second_ctrl_c_stops_at_once_and_repeated_sigterm_does_not():
    with pytest.raises(KeyboardInterrupt), _StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    with _StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


# -- one run per directory --------------------------------------------------------------------


_HOLD = textwrap.dedent("""
    import sys, time
    from dinodet.engine.rundir import RunDirLock
    with RunDirLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_run_on_a_busy_directory_is_refused_naming_the_holder(data, tmp_path,
                                                                       capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(train_args(data, run)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and os.uname().nodename in err
        assert "in use by another run" in err
        assert not (run / "config.yaml").exists() and not (run / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the kernel dropped its lock; the next run takes
    # the directory over and says so.
    assert main(train_args(data, run)) == 0
    out = capsys.readouterr().out
    assert f"(pid {holder.pid} on" in out and "is gone" in out
    assert RunDirLock(run).path.read_text() == ""  # released at the end


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / RunDirLock.FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": "x"}))
    with RunDirLock(run) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == int(dead.stdout)
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            RunDirLock(run).acquire()  # a second lock, even from this process, is refused


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_cannot_be_a_folder_is_refused_before_any_work(data, tmp_path, capsys, where):
    (tmp_path / "f").write_text("user data")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    assert main(train_args(data, out)) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "user data"


# -- resuming ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished")
    assert main(train_args(data, run, "optim.lr=4e-4", "optim.lr_backbone=4e-4")) == 0
    return run


def _corrupt(kind: str, good: Path, tmp: Path) -> Path:
    path = tmp / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "foreign":  # a plain state dict, as torchvision or another project saves
        torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    elif kind == "mis-shaped":  # a run of another network (other widths)
        ckpt = load_checkpoint(good)
        ckpt["model"] = {k: torch.zeros(*[s + 1 for s in v.shape]) if v.ndim else v
                         for k, v in ckpt["model"].items()}
        torch.save(ckpt, path)
    elif kind == "missing-keys":
        ckpt = load_checkpoint(good)
        ckpt["model"] = dict(list(ckpt["model"].items())[:3])
        torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign", "mis-shaped",
                                  "missing-keys"])
def test_resume_from_a_bad_checkpoint_is_one_clear_error_and_changes_nothing(
        data, finished, tmp_path, capsys, kind):
    good = CheckpointManager(finished).latest()
    assert good is not None
    bad = _corrupt(kind, good, tmp_path)
    config_before = (finished / "config.yaml").read_bytes()
    files_before = sorted(p.name for p in finished.iterdir())
    assert main([*train_args(data, finished, epochs=2), "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert len(err) < 2000  # a missing-keys failure names a few keys, not hundreds
    assert (finished / "config.yaml").read_bytes() == config_before
    assert sorted(p.name for p in finished.iterdir()) == files_before


def test_resume_takes_the_learning_rate_of_the_new_command(data, finished, tmp_path, capsys):
    run = tmp_path / "run"
    latest = CheckpointManager(finished).latest()
    args = train_args(data, run, "optim.lr=1e-4", "optim.lr_backbone=1e-5", epochs=2)
    assert main([*args, "--resume", str(latest)]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0004 in the checkpoint, 0.0001 now" in out
    ckpt = load_checkpoint(CheckpointManager(run).latest())
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-4, 1e-5]
    assert ckpt["scheduler"]["base_lrs"] == [1e-4, 1e-5]
    assert ckpt["step"] == 8  # 4 steps per epoch, 2 epochs
    from dinodet.engine.optim import LRFactor

    factor = LRFactor(**ckpt["scheduler"]["lr_lambdas"][0])(ckpt["scheduler"]["last_epoch"])
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * factor)


# -- numbers that go bad ----------------------------------------------------------------------


def test_an_absurd_learning_rate_is_refused_up_front(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path / "run", "optim.lr=1e30")) == 2
    assert "optim.lr: must be in (0, 1]" in capsys.readouterr().err


def test_the_matcher_matches_diverged_predictions_so_the_step_is_skipped():
    from dinodet.loss.matcher import HungarianMatcher

    logits = torch.full((1, 5, 3), float("nan"))
    boxes = torch.rand(1, 5, 4)
    boxes[0, 0] = float("inf")
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4) * 0.5 + 0.25}]
    (rows, cols), = HungarianMatcher()(logits, boxes, targets)
    assert len(rows) == len(cols) == 2


def _state(lr=1e-4):
    from dinodet.config import BackboneConfig, DINOConfig
    from dinodet.engine.config import OptimConfig
    from dinodet.engine.step import TrainState
    from dinodet.model.dino import DINO

    torch.manual_seed(0)
    model = DINO(DINOConfig(num_classes=3, backbone=BackboneConfig(name="resnet18"),
                            hidden_dim=32, num_heads=2, enc_layers=1, dec_layers=1,
                            dim_feedforward=64, num_queries=10, num_select=10, dn_number=4))
    return TrainState.create(model, OptimConfig(lr=lr, lr_backbone=lr), 10, 1)


def _batch():
    from dinodet.data.collate import collate_fn

    g = torch.Generator().manual_seed(0)
    return collate_fn([(torch.rand(3, 64, 64, generator=g),
                        {"labels": torch.tensor([1]), "boxes": torch.tensor([[.5, .5, .3, .3]]),
                         "image_id": i, "orig_size": torch.tensor([64, 64]),
                         "size": torch.tensor([64, 64])}) for i in range(2)])


def test_non_finite_gradients_skip_the_step_and_leave_the_weights():
    from dinodet.engine.step import train_step

    state = _state()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    param = next(p for p in state.model.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: g * float("nan"))
    result = train_step(state, _batch())
    handle.remove()
    assert not result.finite and not result.stepped and state.progress.bad_steps == 1
    assert state.progress.step == 0
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_step_that_makes_the_weights_non_finite_stops_training():
    from dinodet.engine.step import NonFiniteWeightsError, train_step

    state = _state()
    step = state.optimizer.step
    param = next(p for p in state.model.parameters() if p.requires_grad)

    def overflowing_step(*args, **kwargs):  # an update that overflows one weight
        out = step(*args, **kwargs)
        with torch.no_grad():
            param.view(-1)[0] = float("inf")
        return out

    state.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteWeightsError, match="non-finite at optimizer step 1"):
        train_step(state, _batch())


# -- data that cannot train -------------------------------------------------------------------


def _copy_images(data, tmp_path, broken=(), fifo=()):
    images = tmp_path / "images"
    images.mkdir()
    coco = json.loads(Path(data["train_ann"]).read_text())
    names = [im["file_name"] for im in coco["images"]]
    for i, name in enumerate(names):
        if i in fifo:
            os.mkfifo(images / name)
        elif i in broken:
            (images / name).write_bytes(b"not an image")
        else:
            (images / name).write_bytes((Path(data["train_images"]) / name).read_bytes())
    return images, names


def test_a_run_without_one_readable_image_is_an_error(data, tmp_path, capsys):
    images, names = _copy_images(data, tmp_path, broken=range(8))
    run = tmp_path / "run"
    assert main(train_args(data, run, images=images)) == 2
    err = capsys.readouterr().err
    assert "took no optimizer step" in err and "skipped_images.txt" in err
    assert CheckpointManager(run).latest() is None
    listed = (run / "skipped_images.txt").read_text()
    assert all(name in listed for name in names)


def test_skipped_images_are_named_whatever_the_warnings_filter(data, tmp_path):
    """And a FIFO among the images neither hangs the run nor the signal handler."""
    images, names = _copy_images(data, tmp_path, broken=[2], fifo=[5])
    run = tmp_path / "run"
    proc = cli(*train_args(data, run, images=images, workers=1),
               env={"PYTHONWARNINGS": "ignore"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    for i in (2, 5):
        assert names[i] in out
        assert names[i] in (run / "skipped_images.txt").read_text()
    summary = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()][-1]
    assert summary["skipped_images"] == 2


def test_num_classes_follows_the_data_and_a_contradicting_one_is_refused(data, tmp_path,
                                                                        capsys):
    assert main(train_args(data, tmp_path / "bad", "model.num_classes=7")) == 2
    err = capsys.readouterr().err
    assert "model.num_classes=7" in err and str(data["train_ann"]) in err
    assert not (tmp_path / "bad" / "config.yaml").exists()
    assert main(train_args(data, tmp_path / "ok")) == 0
    recorded = (tmp_path / "ok" / "config.yaml").read_text()
    classes = len(json.loads(Path(data["train_ann"]).read_text())["categories"])
    assert f"num_classes: {classes}\n" in recorded


def test_a_missing_gpu_is_a_clear_error(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path / "run", "device=cuda:63")) == 2
    err = capsys.readouterr().err
    assert "cuda:63" in err and "CUDA device" in err


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(data, finished, tmp_path,
                                                              capsys, monkeypatch):
    import errno
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    latest = CheckpointManager(run).latest()
    before = latest.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert main([*train_args(data, run, epochs=2), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err and err.count("\n") == 1
    assert latest.read_bytes() == before


# -- torchrun ---------------------------------------------------------------------------------


def torchrun(*args, restarts=0, script=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "--max-restarts", str(restarts),
                "--monitor-interval", "0.5"]
    target = [script] if script else ["-m", "dinodet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([*launcher, *target, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x]


def test_torchrun_two_processes_agree_to_stop_on_sigterm_and_rank_0_saves(data, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*train_args(data, run, "device=cpu", epochs=1000))
    wait_for(lambda: has_step(run), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    # torchrun itself prints its SignalException; no frame of dinodet's may appear.
    assert not [line for line in err.splitlines()
                if line.lstrip().startswith("File") and "dinodet" in line], err[-3000:]
    summary = records(run)[-1]
    assert summary["type"] == "summary" and summary["stopped_by"] == "signal SIGTERM", err
    ckpt = load_checkpoint(CheckpointManager(run).latest())
    assert ckpt["step"] == summary["steps"] >= 1 and len(ckpt["rng"]) == 2


def test_a_torchrun_restart_resumes_from_the_newest_checkpoint_by_itself(data, tmp_path,
                                                                         capsys, monkeypatch):
    """What ``torchrun --max-restarts`` does after a killed rank: the same command again
    with TORCHELASTIC_RESTART_COUNT raised. Without --resume it goes on from the newest
    checkpoint; the first attempt (count 0) would start afresh."""
    run = tmp_path / "run"
    args = train_args(data, run, "checkpoint_every_steps=1", epochs=2)
    assert main(args) == 0
    done = load_checkpoint(CheckpointManager(run).latest())["step"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*train_args(data, run, "checkpoint_every_steps=1", epochs=3)]) == 0
    out = capsys.readouterr().out
    assert "torchrun restart 1: resuming from the newest checkpoint" in out
    assert f"step {done})" in out
    assert load_checkpoint(CheckpointManager(run).latest())["step"] == done + 4
