"""Experiment trackers: a run's numbers, config and files also sent to TensorBoard, Weights &
Biases or MLflow, each through its own library (an optional extra of dinodet).

``trackers: [wandb, mlflow]`` (and ``tensorboard=true``, the same as naming ``tensorboard``)
opens one :class:`Tracker` per name on rank 0; :class:`~dinodet.engine.train.RunLog` hands
each the scalars it writes to ``log.jsonl`` (``step/loss``, ``epoch/AP``, ... at the
record's optimiser step), the whole config once at the start, and at the end the run's
files: ``config.yaml``, ``log.jsonl`` and every ``*.png`` under the run directory (the
``dinodet plot`` curves, drawn first when matplotlib is there, and any evaluation report).

Where each one writes is its library's own choice, steered by its environment variables:

* ``tensorboard``: event files in ``<out_dir>/tensorboard`` (no config, no files).
* ``wandb``: ``WANDB_MODE`` (``offline``: no network; ``wandb sync`` uploads later),
  ``WANDB_DIR`` (default ``<out_dir>``, which gets ``wandb/``), ``WANDB_ENTITY``; the
  project is ``tracker_project``.
* ``mlflow``: ``MLFLOW_TRACKING_URI`` (a server, ``sqlite:///...`` or ``file:...``), the
  experiment is ``tracker_project``.

A resumed run goes on in the W&B / MLflow run it started (their ids are kept in
``<out_dir>/trackers.json``). A tracker that fails while the run trains is warned about
once and the training goes on: ``log.jsonl`` keeps every number.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from dinodet.engine.checkpoint import atomic_write
from dinodet.errors import UserError

__all__ = ["TRACKERS", "MlflowTracker", "TensorBoardTracker", "Tracker", "TrackerError",
           "TrackerUnavailableError", "WandbTracker", "check_available", "draw_plots",
           "flatten_config",
           "open_trackers", "run_files"]

Status = Literal["finished", "failed", "killed"]

IDS_FILE = "trackers.json"
"""The run directory's record of the W&B / MLflow run ids, for a resumed run to go on in."""

# Directories under a run directory that trackers write, whose files are not the run's own.
_TRACKER_DIRS = frozenset({"wandb", "mlruns", "tensorboard"})


class TrackerError(UserError):
    """A tracker could not start its run (a bad project name, no login, an unreachable
    tracking server, ...); the message names the tracker and its library's reason."""


class TrackerUnavailableError(TrackerError, ImportError):
    """The library of a tracker is not installed; the message names the extra to install.
    Also an ``ImportError``, as a missing optional package is elsewhere."""


class Tracker(abc.ABC):
    """One experiment tracker of a run, written to by rank 0 only.

    ``name`` is its entry in ``trackers``; ``takes_files`` says whether :meth:`log_files`
    keeps anything (when none does, the run draws no plots for them).
    """

    name: ClassVar[str]
    takes_files: ClassVar[bool] = True

    @abc.abstractmethod
    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's whole config (the nested :meth:`TrainConfig.to_dict` tree)."""

    @abc.abstractmethod
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (name -> number) at optimiser step ``step``."""

    @abc.abstractmethod
    def log_files(self, paths: Sequence[Path]) -> None:
        """Keep copies of ``paths`` (files of the run directory) with the run."""

    @abc.abstractmethod
    def close(self, status: Status = "finished") -> None:
        """End the tracker's run as ``status``; called once."""

    def run_id(self) -> str | None:
        """An id to reopen this run with when the training resumes; None: no such thing."""
        return None


def _require(module: str, name: str) -> Any:
    """Import ``module`` for tracker ``name``, or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        key = "tensorboard=true / trackers" if name == "tensorboard" else "trackers"
        raise TrackerUnavailableError(
            f"{key}: {name!r} needs the {name} package ({e}): "
            f"pip install 'dinodet[{name}]'") from e


class TensorBoardTracker(Tracker):
    """Event files in ``<run_dir>/tensorboard`` through ``torch.utils.tensorboard`` (the
    config is in the run directory's ``config.yaml`` beside them; files are not kept)."""

    name = "tensorboard"
    takes_files = False

    def __init__(self, run_dir: Path) -> None:
        module = _require("torch.utils.tensorboard", self.name)
        self.writer = module.SummaryWriter(str(run_dir / "tensorboard"))

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass  # config.yaml lies beside the event files

    def log_files(self, paths: Sequence[Path]) -> None:
        pass

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: Status = "finished") -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A Weights & Biases run in project ``project``, through ``wandb``.

    The scalars go to ``run.log`` at their step (W&B ignores, with a warning, a step lower
    than one it already has: a resumed run's first steps after its checkpoint). The files
    are saved with the run, the PNGs also shown as images (``files/<name>``).
    """

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str,
                 resume_id: str | None = None) -> None:
        wandb = _require("wandb", self.name)
        self._wandb = wandb
        self.run_dir = run_dir.resolve()
        options: dict[str, Any] = {"project": project, "name": run_name}
        if not os.environ.get("WANDB_DIR"):
            options["dir"] = str(self.run_dir)
        if resume_id is not None:
            options.update(id=resume_id, resume="allow")
        self.run = wandb.init(**options)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_files(self, paths: Sequence[Path]) -> None:
        images = {}
        for path in paths:
            path = path.resolve()
            base = self.run_dir if path.is_relative_to(self.run_dir) else path.parent
            self.run.save(str(path), base_path=str(base), policy="now")
            if path.suffix.lower() == ".png":
                key = path.relative_to(base).with_suffix("").as_posix()
                images[f"files/{key}"] = self._wandb.Image(str(path))
        if images:
            self.run.log(images)

    def close(self, status: Status = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)

    def run_id(self) -> str | None:
        return str(self.run.id)


_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_MLFLOW_BATCH = 100  # params per log_batch call: MLflow's limit
_MLFLOW_PARAM_CHARS = 6000  # the longest parameter value MLflow stores


class MlflowTracker(Tracker):
    """An MLflow run in experiment ``project`` (made when missing), through
    ``mlflow.tracking.MlflowClient`` at MLflow's tracking URI (``MLFLOW_TRACKING_URI``).

    The config becomes parameters with dotted keys (``optim.lr``); the scalars metrics at
    their step; the files artifacts, at their path in the run directory. A resumed run
    adds the parameters it lacks (MLflow refuses changing one; a changed one is warned
    about, the run's ``config.yaml`` artifact has the new value).
    """

    name = "mlflow"

    def __init__(self, run_dir: Path, project: str, run_name: str,
                 resume_id: str | None = None) -> None:
        mlflow = _require("mlflow", self.name)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        self.run_dir = run_dir.resolve()
        try:
            self.client = MlflowClient()
        except Exception as e:
            raise TrackerError(
                f"trackers: mlflow cannot use its tracking URI {mlflow.get_tracking_uri()!r} "
                f"({type(e).__name__}: {str(e).strip()[:300]}); set MLFLOW_TRACKING_URI to a "
                "server (http://...), sqlite:///FILE.db (needs the full mlflow package) or "
                "file:DIR") from e
        run = None
        if resume_id is not None:
            with contextlib.suppress(Exception):  # deleted, or another tracking URI now
                run = self.client.get_run(resume_id)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(project))
            run = self.client.create_run(experiment_id, run_name=run_name,
                                         tags={"dinodet.run_dir": str(self.run_dir)})
        self.id: str = run.info.run_id
        self._params: dict[str, str] = dict(run.data.params)

    def log_config(self, config: Mapping[str, Any]) -> None:
        flat = {key: str(value)[:_MLFLOW_PARAM_CHARS]
                for key, value in flatten_config(config).items()}
        changed = sorted(k for k, v in flat.items() if self._params.get(k, v) != v)
        if changed:
            warnings.warn(f"mlflow run {self.id} keeps its earlier value of "
                          f"{', '.join(changed)} (MLflow parameters cannot change)",
                          stacklevel=2)
        new = [self._param(k, v) for k, v in flat.items() if k not in self._params]
        for i in range(0, len(new), _MLFLOW_BATCH):
            self.client.log_batch(self.id, params=new[i:i + _MLFLOW_BATCH])
        self._params.update((p.key, p.value) for p in new)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self._metric(k, float(v), now, int(step))
                                                for k, v in scalars.items()])

    def log_files(self, paths: Sequence[Path]) -> None:
        for path in paths:
            path = path.resolve()
            folder = None
            if path.is_relative_to(self.run_dir):
                parent = path.parent.relative_to(self.run_dir).as_posix()
                folder = None if parent == "." else parent
            self.client.log_artifact(self.id, str(path), artifact_path=folder)

    def close(self, status: Status = "finished") -> None:
        self.client.set_terminated(self.id, status=_MLFLOW_STATUS[status])

    def run_id(self) -> str | None:
        return self.id


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker,
                                      "wandb": WandbTracker, "mlflow": MlflowTracker}
"""Tracker name (an entry of ``trackers``) -> its class."""

_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_available(names: Iterable[str]) -> None:
    """Raise :class:`TrackerUnavailableError` naming the extra for the first tracker of
    ``names`` whose library is missing (every rank calls this before the run starts, so
    that all of them stop, not rank 0 alone)."""
    for name in names:
        _require(_MODULES[name], name)


def open_trackers(names: Sequence[str], run_dir: Path, project: str, run_name: str,
                  config: Mapping[str, Any], resume: bool = False) -> list[Tracker]:
    """Start the trackers ``names`` and log ``config`` to each; ``resume``: reopen the
    W&B / MLflow runs recorded in ``run_dir/trackers.json``, when there.

    A tracker that cannot start is a :class:`TrackerError` naming it (the ones started
    before it are closed as failed).
    """
    ids = _read_ids(run_dir) if resume else {}
    opened: list[Tracker] = []
    try:
        for name in names:
            cls = TRACKERS[name]
            try:
                if cls is TensorBoardTracker:
                    tracker: Tracker = TensorBoardTracker(run_dir)
                else:
                    tracker = cls(run_dir, project, run_name,  # type: ignore[call-arg]
                                  resume_id=ids.get(name))
                tracker.log_config(config)
            except TrackerError:
                raise
            except Exception as e:
                raise TrackerError(f"trackers: could not start the {name} run "
                                   f"({type(e).__name__}: {e})") from e
            opened.append(tracker)
    except BaseException:
        for tracker in opened:
            with contextlib.suppress(Exception):
                tracker.close("failed")
        raise
    ids.update({t.name: i for t in opened if (i := t.run_id()) is not None})
    if ids:
        text = json.dumps(ids, indent=2).encode()
        atomic_write(run_dir / IDS_FILE, lambda f: f.write(text), what="tracker run ids")
    return opened


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, str)}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_files(run_dir: Path) -> list[Path]:
    """The run's files a tracker keeps at the end: ``config.yaml``, ``log.jsonl`` and every
    ``*.png`` under ``run_dir`` (not under the trackers' own directories or hidden ones)."""
    found = [run_dir / name for name in ("config.yaml", "log.jsonl")
             if (run_dir / name).is_file()]
    for path in sorted(run_dir.rglob("*.png")):
        parts = path.relative_to(run_dir).parts
        if parts[0] in _TRACKER_DIRS or any(p.startswith(".") for p in parts):
            continue
        if path.is_file():
            found.append(path)
    return found


def draw_plots(run_dir: Path) -> None:
    """Draw ``dinodet plot``'s curves into ``run_dir`` for the trackers to keep; without
    matplotlib (the ``plot`` extra) or records, there are none."""
    from dinodet.engine.plot import plot_run

    with contextlib.suppress(ImportError, UserError, FileNotFoundError):
        plot_run(run_dir)
