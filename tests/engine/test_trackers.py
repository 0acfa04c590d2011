"""Experiment trackers: W&B (offline) and MLflow (a local file store) runs of a tiny
training, the settings, a missing library and a failing tracker. Nothing reaches the
network: W&B writes its offline run, MLflow its files, both under tmp_path."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.config import TrainConfig, load_train_config
from dinodet.engine.trackers import Tracker, TrackerUnavailableError, flatten_config, run_files
from dinodet.engine.train import RunLog, train
from dinodet.errors import UserError

from .test_train import tiny_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_coco(root, num_train=2, num_val=1, image_size=(64, 64),
                               max_objects=2, seed=7)


def _config(data, out_dir, *sets, epochs=1):
    # 2 images in batches of 1: two optimiser steps per epoch, each logged.
    return tiny_config(data, out_dir, "model.dec_layers=1", *sets, epochs=epochs, size=64,
                       batch_size=1)


def _logged(out_dir: Path) -> dict[tuple[str, int], float]:
    """(tracker name, step) -> value of every number of log.jsonl's step and epoch records."""
    found = {}
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] in ("step", "epoch"):
            for key, value in r.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch", "type"):
                    found[(f"{r['type']}/{key}", r["step"])] = value
    return found


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B without network, writing only under tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for key, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wb"),
        "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"), "WANDB_ARTIFACT_DIR": str(home / "artifacts"),
        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true",
    }.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


def _wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file: LevelDB-style log blocks of 32 KiB
    after a 7-byte header, each record's pieces with a 7-byte header (CRC, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, block, pieces, records = 7, 32768, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the zero padding of a block's end
            pos += left
            continue
        pieces.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return records


def test_wandb_offline_run_has_the_scalars_config_and_files(tiny_data, tmp_path,
                                                            offline_wandb):
    out = tmp_path / "run"
    summary = train(_config(tiny_data, out, "trackers=wandb", "tracker_project=tiny",
                            "tracker_run_name=first"), progress=False)
    assert summary["steps"] == 2
    runs = list((offline_wandb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]
    assert runs[0].name.endswith(run_id)
    files = {p.name for p in (runs[0] / "files").iterdir()}
    assert {"config.yaml", "log.jsonl", "loss.png", "ap.png"} <= files
    records = _wandb_records(next(runs[0].glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("tiny", "first")
    config = {item.key: json.loads(item.value_json) for r in records
              if r.WhichOneof("record_type") == "config" for item in r.config.update}
    config.update({item.key: json.loads(item.value_json) for item in run.config.update})
    assert config["optim"]["lr"] == pytest.approx(4e-4)
    assert config["epochs"] == 1 and config["trackers"] == ["wandb"]
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.nested_key[0] if i.nested_key else i.key: i.value_json
                     for i in r.history.item}
            for key, value in items.items():
                if key.startswith(("step/", "epoch/")):
                    history[(key, r.history.step.num)] = json.loads(value)
    logged = _logged(out)
    assert {"step/loss", "step/lr", "epoch/AP"} <= {key for key, _ in logged}
    assert history.keys() == logged.keys()
    for key, value in logged.items():
        assert history[key] == pytest.approx(value), key


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    """MLflow with a file store under tmp_path and nothing sent anywhere."""
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    for key, value in {
        "MLFLOW_TRACKING_URI": f"file:{store}", "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
    }.items():
        monkeypatch.setenv(key, value)
    return store


def test_mlflow_local_run_has_the_scalars_params_and_artifacts_and_resumes_in_it(
        tiny_data, tmp_path, local_mlflow):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    train(_config(tiny_data, out, "trackers=[mlflow]", "tracker_project=tiny"),
          progress=False)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    # The file store's own files: params, metrics (timestamp value step), artifacts.
    run_dir = next(local_mlflow.glob(f"*/{run_id}"))
    assert (run_dir / "params" / "optim.lr").read_text() == "0.0004"
    lines = (run_dir / "metrics" / "step" / "loss").read_text().split("\n")
    assert [int(line.split()[2]) for line in lines if line] == [1, 2]
    assert {"config.yaml", "log.jsonl", "loss.png", "ap.png"} <= {
        p.name for p in (run_dir / "artifacts").iterdir()}
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params["epochs"] == "1" and run.data.params["model.hidden_dim"] == "64"
    logged = _logged(out)
    for key in {key for key, _ in logged}:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history == pytest.approx({s: v for (k, s), v in logged.items() if k == key})
    # A resumed run goes on in the same MLflow run (a changed parameter keeps its value).
    with pytest.warns(UserWarning, match="keeps its earlier value of epochs"):
        train(_config(tiny_data, out, "trackers=[mlflow]", "tracker_project=tiny",
                      epochs=2), resume="auto", progress=False)
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_id
    steps = [m.step for m in client.get_metric_history(run_id, "step/loss")]
    assert steps == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tracker_settings():
    cfg = load_train_config(None, None, ["trackers=[wandb, mlflow]", "tensorboard=true"])
    assert cfg.trackers == ("wandb", "mlflow")
    assert cfg.tracker_names() == ("tensorboard", "wandb", "mlflow")
    assert load_train_config(None, None, ["trackers=mlflow"]).trackers == ("mlflow",)
    assert TrainConfig(trackers=("tensorboard",), tensorboard=True).tracker_names() == (
        "tensorboard",)
    with pytest.raises(ValueError, match="trackers: expected a list of"):
        load_train_config(None, None, ["trackers=[neptune]"])
    with pytest.raises(ValueError, match="trackers: each tracker may be named once"):
        TrainConfig(trackers=("wandb", "wandb"))
    with pytest.raises(ValueError, match="tracker_project: must not be empty"):
        TrainConfig(tracker_project=" ")
    assert flatten_config({"a": {"b": 1, "c": [2, 3]}, "d": None}) == {
        "a.b": 1, "a.c": [2, 3], "d": None}


def test_a_missing_library_names_the_extra_before_any_work(tiny_data, tmp_path,
                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(TrackerUnavailableError,
                       match=r"'wandb' needs the wandb package.*pip install 'dinodet\[wandb\]'"):
        train(_config(tiny_data, tmp_path, "trackers=wandb"), progress=False)
    assert issubclass(TrackerUnavailableError, UserError)
    assert issubclass(TrackerUnavailableError, ImportError)
    assert not (tmp_path / "config.yaml").exists()


class _Recorder(Tracker):
    name = "recorder"

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.scalars, self.files, self.closed = fail, [], [], []

    def log_config(self, config):
        pass

    def log_scalars(self, step, scalars):
        if self.fail:
            raise ConnectionError("tracking server unreachable")
        self.scalars.append((step, dict(scalars)))

    def log_files(self, paths):
        self.files.extend(paths)

    def close(self, status="finished"):
        self.closed.append(status)


def test_runlog_fans_out_and_a_failing_tracker_only_warns(tmp_path):
    good, bad = _Recorder(), _Recorder(fail=True)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "pr_curves.png").write_bytes(b"png")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "media.png").write_bytes(b"png")
    log = RunLog(tmp_path, [bad, good])
    with pytest.warns(UserWarning, match="recorder: ConnectionError: tracking server"):
        log({"type": "step", "epoch": 1, "step": 3, "loss": 1.5, "lr": 1e-4})
    log({"type": "epoch", "epoch": 1, "step": 3, "AP": 0.25, "time": 2.0})
    log({"type": "summary", "steps": 3})
    assert good.scalars == [(3, {"step/loss": 1.5, "step/lr": 1e-4}),
                            (3, {"epoch/AP": 0.25, "epoch/time": 2.0})]
    assert bad.closed == ["failed"] and log.trackers == [good]
    log.close()
    log.close()  # only the first one acts
    assert good.closed == ["finished"]
    assert good.files == run_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in good.files] == [
        "log.jsonl", "report/pr_curves.png"]
    # A run that fails ends its trackers' runs as failed, without files.
    other = _Recorder()
    with pytest.raises(RuntimeError), RunLog(tmp_path, [other]):
        raise RuntimeError("boom")
    assert other.closed == ["failed"] and other.files == []
