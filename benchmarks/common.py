"""What the benchmarks share: their JSON output, their timing summary, and the baseline.

* :func:`write_json` writes a benchmark's results with a common ``meta`` block (date,
  versions, machine, threads, CUDA device, git commit), atomically.
* :func:`timed`, :func:`stats`, :func:`summarize` and :func:`print_table`: seconds of one
  call, the median / min / max of repeated runs (with their ratio to a baseline), and the
  table of them that the CPU benchmarks print; :func:`ort_session_options`, onnxruntime
  set up to alternate with PyTorch.
* :func:`original_style_ms_deform_attn` and :func:`original_attention`: the original DINO's
  pure-PyTorch deformable-attention algorithm, and a context manager that runs it inside a
  dinodet model, as the baseline of ``bench_inference.py`` and ``bench_train.py``.

The scripts import this module as ``from common import ...``: running
``python benchmarks/X.py`` puts ``benchmarks/`` first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinodet.model.dino import DINO

__all__ = [
    "REPO_ROOT",
    "git_commit",
    "meta",
    "original_attention",
    "original_style_ms_deform_attn",
    "ort_session_options",
    "print_table",
    "stats",
    "summarize",
    "timed",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- JSON output


def _version(module_name: str) -> str | None:
    """``module.__version__`` if the module imports, else None."""
    try:
        module = __import__(module_name)
    except Exception:  # not installed, or broken: either way there is no version to report
        return None
    return getattr(module, "__version__", None)


def git_commit(root: str | Path = REPO_ROOT) -> str | None:
    """``git rev-parse HEAD`` of the repository at ``root``, or None if that fails."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


def meta() -> dict[str, Any]:
    """Where and with what a benchmark ran: UTC date, versions of Python, torch,
    torchvision, dinodet, onnxruntime and triton (None when not importable), the platform,
    torch's thread count, the CUDA device (None without CUDA) and the git commit (None
    outside a git checkout)."""
    import dinodet

    now = datetime.datetime.now(datetime.timezone.utc)
    cuda = torch.cuda.is_available()
    return {
        "date": now.date().isoformat(),
        "time": now.time().isoformat(timespec="seconds"),
        "datetime_utc": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dinodet": getattr(dinodet, "__version__", None),
        "onnxruntime": _version("onnxruntime"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }


def write_json(path: str | Path, benchmark: str, settings: Mapping[str, Any],
               results: Mapping[str, Any] | Sequence[Any]) -> None:
    """Write ``{"benchmark", "meta", "settings", "results"}`` to ``path`` as JSON and print
    ``wrote PATH``.

    ``meta`` is :func:`meta` at the time of writing; ``settings`` and ``results`` are the
    benchmark's own (values JSON does not know, such as paths, are written as strings).
    The file is written to a temporary file next to ``path``, then renamed over it, so a
    reader never sees half a file and an interrupted run leaves the old one in place.
    """
    path = Path(path)
    payload = {"benchmark": benchmark, "meta": meta(), "settings": dict(settings),
               "results": results}
    text = json.dumps(payload, indent=2, default=str) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)  # read the umask (setting it is the only way), then put it back
    os.umask(umask)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's file is private; as open() would
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------- timing


def timed(run: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def stats(seconds: Sequence[float]) -> dict[str, Any]:
    """``median_s``, ``min_s``, ``max_s`` and ``runs_s`` (all of them) of repeated runs."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "runs_s": list(seconds)}


def summarize(times: Mapping[str, Sequence[float]], baseline: str | None = None
              ) -> dict[str, dict[str, Any]]:
    """Per implementation: :func:`stats` of its runs and ``ratio_vs_baseline`` (its median
    over the median of ``baseline``; None without one)."""
    results = {name: stats(ts) for name, ts in times.items()}
    base = results[baseline]["median_s"] if baseline is not None else None
    for res in results.values():
        res["ratio_vs_baseline"] = res["median_s"] / base if base else None
    return results


def print_table(results: Mapping[str, Mapping[str, Any]], median_label: str = "median s",
                extra: Mapping[str, Callable[[Mapping[str, Any]], str]] | None = None,
                name_width: int = 34) -> None:
    """The table of :func:`summarize`'s results: median, min, max, ratio to the baseline,
    then one column per ``extra`` entry (header -> formatter of a result)."""
    extra = extra or {}
    header = (f"{'implementation':<{name_width}} {median_label:>12} {'min':>7} {'max':>7} "
              f"{'vs baseline':>11}")
    header += "".join(f" {title:>9}" for title in extra)
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        ratio = res.get("ratio_vs_baseline")
        line = (f"{name:<{name_width}} {res['median_s']:>12.2f} {res['min_s']:>7.2f} "
                f"{res['max_s']:>7.2f} {f'{ratio:.2f}x' if ratio else '-':>11}")
        line += "".join(f" {fmt(res):>9}" for fmt in extra.values())
        print(line)


def ort_session_options(threads: int) -> Any:
    """onnxruntime ``SessionOptions`` for timing next to PyTorch: ``threads`` intra-op
    threads that do not spin. The pool's threads spin for a while after each run, waiting
    for work: in alternating runs they would take the CPU from PyTorch's next run (the
    Detector then measured 1.6x slower than alone). Without spinning each side runs as it
    does alone."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# --------------------------------------------------------------------------- baseline


def original_style_ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The original's pure-PyTorch deformable attention algorithm, same signature as
    :func:`dinodet.model.ms_deform_attn.ms_deform_attn`.

    Per level: values to [N·M, D, H, W], grids to [N·M, Lq, P, 2] in [-1, 1], one
    ``grid_sample``; then the per-level samples are stacked on a new dimension, flattened to
    L·P, multiplied by the attention weights as [N·M, 1, Lq, L·P], summed over the points,
    viewed as [N, M·D, Lq] and transposed to [N, Lq, M·D].
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        # [N, H·W, M, D] -> [N, H·W, M·D] -> [N, M·D, H·W] -> [N·M, D, H, W]
        v = per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N, M, Lq, P, 2] -> [N·M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [N, Lq, M, L, P] -> [N, M, Lq, L, P] -> [N·M, 1, Lq, L·P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    # samples: L × [N·M, D, Lq, P] -> [N·M, D, Lq, L, P] -> [N·M, D, Lq, L·P]
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def original_attention(model: DINO) -> Iterator[None]:
    """Run the original's algorithm in every MSDeformAttn of ``model`` (as their backend)
    inside the block; the backend they had is restored after."""
    saved = model.attention_backend
    model.set_attention_backend(original_style_ms_deform_attn)
    try:
        yield
    finally:
        model.set_attention_backend(saved)


if __name__ == "__main__":  # print the meta block, e.g. to check what a run would record
    json.dump(meta(), sys.stdout, indent=2)
    print()
