from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def case() -> dict:
    return torch.load(DATA / "dino_r50_4scale.case.pt", weights_only=True)


# Under pytest-xdist (`make test` runs two workers) each worker computes on one thread of
# the two cores; alone, a test uses both.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    yield


# The longest files (exports, the README's chain of examples) start first, so that under
# pytest-xdist they run beside the rest instead of after it.
_FIRST = ("test_export.py", "test_readme.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _FIRST)
