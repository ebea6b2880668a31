"""Shared test settings: a small thread count (CI has 2 cores and 2 test workers), threads that sleep when idle,
the fixture folder, and the corpora and uninterrupted run several files compare with (built once a worker; helpers:
tests/helpers.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# As the project's entry points do (module/core/threads.py), before torch loads: idle OpenMP threads sleep instead of
# spinning. The runs made in this process then wait on the shared cores as finetune.py's own processes do; with the
# default policy a test's two threads took the cores from each other and from the processes it starts (2.5x the time).
from module.core.threads import passive_threads  # noqa: E402

passive_threads()
import torch  # noqa: E402

# CI runs the tests in 2 pytest-xdist workers (.ci/run): the cores are shared between them, a thread each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

DATA_DIR = Path(__file__).parent / "data"

# The slowest files first, in the order a CI run with 2 workers measured them: a worker that draws a long file
# last keeps CI waiting while the other has nothing left to do.
SLOWEST_FILES = ("test_finetune_cli.py", "test_torchrun.py", "test_run_folder.py", "test_training_utils.py",
                 "test_reports_derived.py", "test_finetune_modes.py", "test_logs.py", "test_model.py",
                 "test_notebook.py", "test_pretrain.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


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


@pytest.fixture(scope="session")
def cedar_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 writers x (4 genuine + 4 forged), pair files 50/25/25 %: the run-folder tests' corpus (read only). The file
    names give writers, so every report has its per-writer files; the validation EER improves in epoch 1 (a new
    best), not in 2."""
    from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset

    root = tmp_path_factory.mktemp("cedar")
    make_synthetic_dataset(root, "cedar", n_writers=5, n_genuine=4, n_forged=4, seed=3, image_size=96, progress=False)
    generate_cedar_pairs(root, train_ratio=0.5, val_ratio=0.25)
    return root


@pytest.fixture(scope="session")
def reference_run(cedar_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of ``helpers.run_config`` on ``cedar_corpus`` (``train_and_report``): what every
    interrupted, damaged or resumed run of the run-folder tests must end with. Tests copy it, never change it."""
    from helpers import run_config

    from training_utils import train_and_report

    folder = tmp_path_factory.mktemp("reference") / "run"
    train_and_report(run_config(cedar_corpus, folder), progress=False)
    return folder


@pytest.fixture(scope="session")
def small_cedar_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 writers x (4 genuine + 3 forged), pair files 50/25/25 %: 2 training writers (36 pairs, 14 images), 1
    validation writer (18 pairs). The training-loop tests' corpus (read only)."""
    from prepare_datasets import generate_cedar_pairs, make_synthetic_dataset

    root = tmp_path_factory.mktemp("small_cedar")
    make_synthetic_dataset(root, "cedar", n_writers=4, n_genuine=4, n_forged=3, seed=0, image_size=96, progress=False)
    generate_cedar_pairs(root, train_ratio=0.5, val_ratio=0.25)
    return root
