"""Helpers shared by the test files: the run-folder tests' settings, exact comparisons, damaged files.

The corpus and the uninterrupted run these settings make are session fixtures (``tests/conftest.py``:
``cedar_corpus``, ``reference_run``), built once for every file that compares a run with them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from module.run.config import FinetuneConfig


def run_config(corpus: Path | str, folder: Path | str, **changes: Any) -> FinetuneConfig:
    """The run-folder tests' run: 64 px, 2 epochs of 16 pairs a batch at lr 1e-2 on the CPU, keep_last=1 (the newest
    epoch checkpoint, and the best one, which must never be pruned). ``finetune.py train`` with ``RUN_FLAGS``.

    The backbone is the seed's alone (``data_init`` off): its validation EER improves in epoch 1, so the best
    epoch is one the run trained; initialised from the training scans it is already the start (epoch 0)."""
    settings = dict(data_root=str(corpus), ckpt_dir=str(folder), image_size=64, epochs=2, batch_size=16, lr=1e-2,
                    device="cpu", keep_last=1, data_init=False)
    return FinetuneConfig(**{**settings, **changes})


# The same settings as ``finetune.py train`` flags.
RUN_FLAGS = ["--image-size", "64", "--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--device", "cpu",
             "--keep-last", "1", "--no-data-init"]


def assert_equal_values(actual: Any, expected: Any, where: str) -> None:
    """Every tensor ``torch.equal``, every other value ``==``, through dicts and lists; wall times ("seconds") and
    the run folder's own path ("ckpt_dir") aside."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in set(expected) - {"seconds", "ckpt_dir"}:
            assert_equal_values(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, pair in enumerate(zip(actual, expected)):
            assert_equal_values(*pair, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def flip_middle_bytes(path: Path, width: int) -> None:
    """Flip every bit of ``width`` bytes in the middle of the file: a damaged file of the same size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + width] = bytes(byte ^ 0xFF for byte in data[middle:middle + width])
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- the training-loop tests

class Interrupt(KeyboardInterrupt):
    """Stands in for Ctrl-C or a Colab disconnect after an epoch's checkpoint is written."""


def interrupt_after(epoch: int):
    """An ``on_epoch_end`` callback of ``fit`` that raises ``Interrupt`` once ``epoch`` is committed."""
    def callback(run, metrics) -> None:
        if run.epoch == epoch:
            raise Interrupt

    return callback


def final_weights(ckpt_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The trained tensors of ``ckpt_dir``'s checkpoint of ``epoch``."""
    return torch.load(ckpt_dir / f"epoch_{epoch:04d}.pt", weights_only=True)["trained_state_dict"]


# --------------------------------------------------------------------------- finetune.py in this process

def main_printing_warnings(args: list[str]) -> tuple[int, str]:
    """``finetune.main(args)`` in this process: its exit status, and the warnings it gave as the command prints them
    on stderr (``warning: ...``; pytest would otherwise keep them for its summary)."""
    import finetune

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = finetune.main(args)
    return code, "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
