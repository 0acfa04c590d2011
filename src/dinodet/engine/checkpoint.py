"""Checkpoints: atomic saves, ``weights_only`` loads, keep-last-K plus best, RNG state.

A checkpoint is one ``torch.save`` of a plain dict (its layout:
:meth:`dinodet.engine.step.TrainState.state_dict`, plus RNG states, run config, class
table and, from a run with validation, per-class score thresholds
(:func:`with_class_thresholds`)) that ``torch.load(weights_only=True)`` reads;
:func:`save_checkpoint` refuses, naming the key, anything else. Saving writes a temporary
file beside the target, fsyncs and ``os.replace`` s it: a full disk or a kill leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch

from dinodet.weights import (
    CLASS_THRESHOLDS_KEY,
    CheckpointError,
    check_class_thresholds,
    class_thresholds_json,
    read_torch_file,
)

__all__ = ["CheckpointError", "CheckpointLoadError", "CheckpointManager", "CheckpointSaveError",
           "capture_rng_state", "load_checkpoint", "read_class_thresholds", "restore_rng_state",
           "save_checkpoint", "with_class_thresholds"]


# One error type for every checkpoint problem (dinodet.weights.CheckpointError, a
# ValueError); saving has its own subclass so that callers can tell a failed write.
CheckpointLoadError = CheckpointError


class CheckpointSaveError(CheckpointError):
    """Saving failed; the file previously at the target path (if any) is untouched."""


# --------------------------------------------------------------------------------------
# Atomic save / safe load
# --------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path.

    Raises :class:`CheckpointSaveError` naming the path and the cause ("disk full", a key
    whose value ``weights_only`` loading would refuse, ...); the temporary file is removed
    and whatever was at ``path`` before is left as it was.
    """
    path = Path(path)
    _check_loadable(state, "state")
    atomic_write(path, lambda f: torch.save(dict(state), f))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``, onto the CPU by default.

    Raises :class:`~dinodet.weights.CheckpointError` naming the file (a
    ``FileNotFoundError`` too when it is missing).
    """
    state = read_torch_file(path, map_location=map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, "
                              "expected a dict")
    return state


def with_class_thresholds(state: Mapping[str, Any], thresholds: Mapping[int, float] | None
                          ) -> dict[str, Any]:
    """A copy of the checkpoint dict ``state`` (it holds ``model_config``) carrying the
    per-class score thresholds ``thresholds`` (class index -> score in [0, 1], e.g. those
    that maximise F1 on the validation set) under ``"class_thresholds"``, which
    ``Detector(..., threshold="auto")`` applies; ``None`` leaves none. They are checked
    against the model's classes here, so a bad table fails the save, not a later load."""
    out = {k: v for k, v in state.items() if k != CLASS_THRESHOLDS_KEY}
    if thresholds is None:
        return out
    config = state.get("model_config")
    num_classes = config.get("num_classes") if isinstance(config, Mapping) else None
    if not isinstance(num_classes, int):
        raise CheckpointSaveError("the checkpoint state has no model_config.num_classes to "
                                  "check the class thresholds against")
    found = check_class_thresholds(thresholds, num_classes, "checkpoint state")
    assert found is not None
    out[CLASS_THRESHOLDS_KEY] = class_thresholds_json(found)
    return out


def read_class_thresholds(state: Mapping[str, Any], where: str = "checkpoint"
                          ) -> dict[int, float] | None:
    """The per-class score thresholds of a loaded checkpoint dict (None: it has none),
    checked as on any load; errors name ``where`` (e.g. the file) and the entry."""
    config = state.get("model_config")
    num_classes = config.get("num_classes") if isinstance(config, Mapping) else None
    if not isinstance(num_classes, int):
        raise CheckpointError(f"{where}: no model_config.num_classes")
    return check_class_thresholds(state.get(CLASS_THRESHOLDS_KEY), num_classes, where)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], what: str = "checkpoint"
                 ) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, then ``os.replace`` onto it."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with contextlib.suppress(OSError):  # mkstemp's 0600 -> what open() would give
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except Exception as e:
        raise CheckpointSaveError(f"could not save {what} {path}: {_cause(e, path.parent)}; "
                                  "the previous file, if any, is untouched") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_ERRNO_WORDS = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EIO: "I/O error",
}


def _cause(e: BaseException, directory: Path) -> str:
    """A short human reason for a failed write, looking through chained exceptions."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _ERRNO_WORDS:
            return _ERRNO_WORDS[seen.errno]
        seen = seen.__cause__ or seen.__context__
    text = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(directory).free < 16 * 2**20:
            return f"{text} (the disk looks full)"
    return text


# Exact types: subclasses such as numpy.float64 (a float) or defaultdict (a dict) are
# pickled by their own class, which weights_only loading refuses.
_SCALARS = {str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device,
            torch.Size}
_MAPPINGS = {dict, OrderedDict}
_SEQUENCES = {list, tuple, set}


def _check_loadable(obj: Any, where: str) -> None:
    """Refuse, naming the key, anything ``torch.load(weights_only=True)`` would not read."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor) or kind in _SCALARS:
        return
    if kind in _MAPPINGS:
        for key, value in obj.items():
            if type(key) not in _SCALARS and type(key) is not tuple:
                raise CheckpointSaveError(f"{where} has a key of type {type(key).__name__} "
                                          f"({key!r}) that weights_only loading refuses")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCES:
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    raise CheckpointSaveError(f"{where} holds a {kind.__module__}.{kind.__qualname__}, which "
                              "torch.load(weights_only=True) refuses; store tensors, plain "
                              "numbers, strings, lists or dicts")


# --------------------------------------------------------------------------------------
# RNG state as plain data
# --------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), Python ``random`` and numpy global RNG states.

    Only tensors, ints, floats, strings and lists, so it survives ``weights_only`` loading.
    Each process of a distributed run has its own RNGs: save this per rank if it matters.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the states from :func:`capture_rng_state` (CUDA: the devices present)."""
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]),
                     py["gauss_next"]))
    npy = state["numpy"]
    keys = np.asarray(torch.as_tensor(npy["keys"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npy["bit_generator"], keys, int(npy["pos"]), int(npy["has_gauss"]),
                         float(npy["cached_gaussian"])))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(rng, dtype=torch.uint8).cpu(), device)


# --------------------------------------------------------------------------------------
# A run directory of checkpoints
# --------------------------------------------------------------------------------------


class CheckpointManager:
    """Checkpoints of one run: the last ``keep_last`` of
    ``checkpoint-e{epoch:03d}-s{step:07d}.pt``, plus ``best.pt`` by the metric given to
    :meth:`save` (``mode="max"``: higher is better). ``checkpoints.json`` records the kept
    files and the best metric, so a resumed run keeps comparing against it. Order is by
    (epoch, step): resume an older checkpoint into a fresh directory."""

    INDEX = "checkpoints.json"
    BEST = "best.pt"
    _NAME = re.compile(r"checkpoint-e(\d+)-s(\d+)\.pt")

    def __init__(self, run_dir: str | Path, keep_last: int = 3,
                 mode: Literal["max", "min"] = "max") -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.mode = mode
        self._best: dict[str, Any] | None = self._read_index().get("best")

    # -- paths ------------------------------------------------------------------------

    def path_for(self, epoch: int, step: int) -> Path:
        return self.run_dir / f"checkpoint-e{epoch:03d}-s{step:07d}.pt"

    def checkpoints(self) -> list[Path]:
        """Every file named like a checkpoint, oldest first by (epoch, step)."""
        if not self.run_dir.is_dir():
            return []
        found = []
        for p in self.run_dir.iterdir():
            m = self._NAME.fullmatch(p.name)
            if m and p.is_file():
                found.append(((int(m[1]), int(m[2])), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest checkpoint that is complete, skipping temp files and unreadable ones."""
        for p in reversed(self.checkpoints()):
            if _looks_complete(p):
                return p
        return None

    def best(self) -> Path | None:
        p = self.run_dir / self.BEST
        return p if self._best is not None and p.is_file() else None

    @property
    def best_metric(self) -> float | None:
        return None if self._best is None else float(self._best["metric"])

    # -- saving -----------------------------------------------------------------------

    def save(self, state: Mapping[str, Any], epoch: int, step: int,
             metric: float | None = None) -> Path:
        """Save ``state`` as the (epoch, step) checkpoint, update ``best.pt`` if ``metric``
        beats the best so far, and delete checkpoints beyond the last ``keep_last``."""
        path = save_checkpoint(self.path_for(epoch, step), state)
        if metric is not None and self._is_better(float(metric)):
            _link_or_copy(path, self.run_dir / self.BEST)
            self._best = {"file": self.BEST, "source": path.name, "epoch": int(epoch),
                          "step": int(step), "metric": float(metric)}
        self._prune(keep=path)
        self._write_index()
        return path

    def resolve_resume(self, arg: str | Path | None) -> Path | None:
        """``--resume`` to a file: ``"auto"`` -> :meth:`latest` (``None`` on a fresh run);
        a directory -> its latest checkpoint; a file -> itself; ``None``/"" -> ``None``."""
        if arg is None or str(arg) == "":
            return None
        if str(arg) == "auto":
            return self.latest()
        p = Path(arg).expanduser()
        if p.is_dir():
            found = CheckpointManager(p).latest()
            if found is None:
                raise FileNotFoundError(f"--resume {arg}: no complete checkpoint in directory")
            return found
        if not p.is_file():
            raise FileNotFoundError(f"--resume {arg}: no such checkpoint file")
        return p

    # -- internals --------------------------------------------------------------------

    def _is_better(self, metric: float) -> bool:
        if not math.isfinite(metric):
            return False
        if self._best is None or not (self.run_dir / self.BEST).is_file():
            return True
        best = float(self._best["metric"])
        return metric > best if self.mode == "max" else metric < best

    def _prune(self, keep: Path) -> None:
        others = [p for p in self.checkpoints() if p != keep]
        for p in others[: max(0, len(others) - (self.keep_last - 1))]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.run_dir / self.INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # no index yet, or a damaged one: the directory listing still works
        return data if isinstance(data, dict) else {}

    def _write_index(self) -> None:
        entries = []
        for p in self.checkpoints():
            m = self._NAME.fullmatch(p.name)
            assert m is not None
            entries.append({"file": p.name, "epoch": int(m[1]), "step": int(m[2])})
        data = {"version": 1, "keep_last": self.keep_last, "mode": self.mode,
                "checkpoints": entries, "best": self._best}
        text = json.dumps(data, indent=2).encode()
        atomic_write(self.run_dir / self.INDEX, lambda f: f.write(text))


def _looks_complete(path: Path) -> bool:
    """A cheap check that a file is a whole ``torch.save`` archive (central directory present).

    A truncated zip has no end-of-archive record, so this catches interrupted copies
    without reading the tensors.
    """
    try:
        if path.stat().st_size == 0:
            return False
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("data.pkl") for name in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` the same content as ``src``: a hard link where the file
    system allows one (no extra space, survives ``src`` being pruned), else a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 * 2**20)
                fout.flush()
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except Exception as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointSaveError(f"could not save checkpoint {dst}: {_cause(e, dst.parent)}; "
                                  "the previous file, if any, is untouched") from e
