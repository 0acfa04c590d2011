from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dinodet.engine import distributed as d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: exercises the collectives and writes what it saw."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    info = d.init_distributed(device="cpu", timeout_s=60)
    try:
        value = torch.tensor([float(rank), 10.0 * rank])
        mean = d.all_reduce_mean(value)
        count = d.all_reduce_mean(torch.tensor(rank + 1))  # integers come back as floats
        losses = d.reduce_dict_mean({"a": torch.tensor(rank * 2.0), "b": torch.tensor(4.0)})
        gathered = d.all_gather_object({"rank": rank, "boxes": [rank] * (rank + 1)})
        d.barrier()
        result = {
            "info": [info.rank, info.world_size, info.local_rank, str(info.device), info.is_main],
            "helpers": [d.rank(), d.world_size(), d.is_main()],
            "mean": mean.tolist(), "input": value.tolist(), "count": count.item(),
            "losses": {k: v.item() for k, v in losses.items()}, "gathered": gathered,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        d.cleanup()


def test_two_process_gloo_collectives(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["info"] == [rank, 2, rank, "cpu", rank == 0]
        assert res["helpers"] == [rank, 2, rank == 0]
        assert res["mean"] == [0.5, 5.0] and res["input"] == [float(rank), 10.0 * rank]
        assert res["count"] == 1.5
        assert res["losses"] == {"a": 1.0, "b": 4.0}
        assert res["gathered"] == [{"rank": 0, "boxes": [0]}, {"rank": 1, "boxes": [1, 1]}]


def test_single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = d.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == torch.device("cpu") and not info.distributed
    assert d.world_size() == 1 and d.is_main() and d.rank() == 0
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(d.all_reduce_mean(x), x) and d.all_reduce_mean(x) is not x
    assert d.all_gather_object("a") == ["a"]
    d.barrier()
    d.cleanup()


def test_bad_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        d.init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK is not set"):
        d.init_distributed(device="cpu")


def test_resolve_device():
    assert d.resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.device_count() > 3:
        assert d.resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"'cuda:99' .* asks for cuda:99, but this machine has"):
        d.resolve_device("cuda:99")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert d.resolve_device("auto").type == expected


def test_unwrap_model():
    inner = nn.Linear(2, 2)
    assert d.unwrap_model(nn.DataParallel(inner)) is inner
    assert d.unwrap_model(inner) is inner


def _determinism() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_seed_everything():
    def draw():
        return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()

    before = _determinism()
    assert d.seed_everything(7) == 7
    first = draw()
    d.seed_everything(7)
    assert draw() == first
    assert d.seed_everything(7, rank=1) == 8
    assert draw() != first  # ranks draw different augmentations
    assert _determinism() == before  # seeding alone switches no kernels


def test_deterministic_algorithms_are_scoped():
    before = _determinism()
    with d.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert _determinism() == before  # everything it changed is back
    with d.deterministic_algorithms(False):
        assert _determinism() == before
    with pytest.raises(RuntimeError), d.deterministic_algorithms(True):
        raise RuntimeError("restored on the way out of an error too")
    assert _determinism() == before
