"""``dinodet plot RUNDIR``: loss and AP curves of a run, drawn from its ``log.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dinodet.errors import UserError

# What the plots read from each record type, and the JSON type each must have.
_STEP_KEYS: tuple[tuple[str, str], ...] = (("step", "an integer"), ("loss", "a number"),
                                           ("lr", "a number"))
_EPOCH_KEYS: tuple[tuple[str, str], ...] = (("epoch", "an integer"), ("AP", "a number"),
                                            ("AP50", "a number"), ("AP75", "a number"))


def _is(kind: str, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "an integer" else isinstance(value, (int, float))


def _check_record(record: Any, where: str) -> None:
    """A record the plots can draw, or a :class:`UserError` naming ``path:line`` and the key."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object (a log record), got "
                        f"{type(record).__name__}")
    kind = record.get("type")
    if kind is not None and not isinstance(kind, str):
        raise UserError(f"{where}: 'type' must be a string, got {kind!r}")
    if kind == "step":
        keys = _STEP_KEYS
    elif kind == "epoch" and "AP" in record:
        keys = _EPOCH_KEYS
    else:
        return  # other records (summary, epochs without evaluation) are not drawn
    for key, what in keys:
        if key not in record:
            raise UserError(f"{where}: {kind} record has no {key!r}")
        value = record[key]
        if not _is(what, value):
            text = repr(value)
            raise UserError(f"{where}: {kind} record's {key!r} must be {what}, got "
                            f"{text if len(text) <= 40 else text[:37] + '...'}")
        if what == "an integer" and value < 0:
            raise UserError(f"{where}: {kind} record's {key!r} must be >= 0, got {value}")
        if key == "lr" and math.isfinite(value) and value < 0:
            raise UserError(f"{where}: step record's 'lr' must be >= 0, got {value}")


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl``, each checked for what the plots read (a
    :class:`~dinodet.errors.UserError` names ``path:line`` and the key). A last line cut
    short (a run killed while writing) is left out; anything else that is not JSON is an
    error."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a dinodet run directory?")
    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # a last line cut short by a kill
            if n != last:
                raise UserError(f"{path}:{n} is not valid JSON") from None
            continue
        _check_record(record, f"{path}:{n}")
        records.append(record)
    return records


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (training loss and learning rate by step) and, when the run was
    evaluated, ``ap.png`` (AP and AP50 by epoch) into the run directory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("dinodet plot needs matplotlib: pip install 'dinodet[plot]'") from e
    records = read_log(run_dir)
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch" and "AP" in r]
    out: list[Path] = []
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("weighted loss")
        ax.set_yscale("log")
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:orange",
                   alpha=0.6, label="lr")
        lr_ax.set_ylabel("learning rate")
        fig.legend(loc="upper right")
        fig.tight_layout()
        out.append(Path(run_dir) / "loss.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("AP", "AP50", "AP75"):
            ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], marker="o",
                    label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("COCO box metric")
        ax.set_ylim(0, 1)
        ax.legend()
        fig.tight_layout()
        out.append(Path(run_dir) / "ap.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    if not out:
        raise UserError(f"{run_dir}/log.jsonl has no step or epoch records yet")
    return out
