"""Shared test settings: small thread count (CI has 2 cores) and the fixture folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the reference numbers copied from the authors' code (``tests/data``)."""
    return DATA_DIR


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: many tiny ops, where a second thread waiting for a busy core costs more than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
