"""``dinodet plot RUNDIR``: loss and AP curves of a run, drawn from its ``log.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a dinodet run directory?")
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a last line cut short by a kill: keep the rest
            if n != len(lines):
                raise ValueError(f"{path}:{n} is not valid JSON") from None
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
        raise ValueError(f"{run_dir}/log.jsonl has no step or epoch records yet")
    return out
