from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def case() -> dict:
    return torch.load(DATA / "dino_r50_4scale.case.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
