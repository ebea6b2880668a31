"""Every random state a run draws from, captured as plain data and put back, so a resumed run repeats exactly."""
from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every random state a run draws from (torch, CUDA, NumPy, Python), as tensors and plain data
    (``weights_only``-loadable). The order of the training pairs needs none: it is a function of
    ``(seed, epoch)`` (``module/data/epoch_order.py``)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "algorithm": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {
            "version": python_state[0],
            "internal": torch.tensor(python_state[1], dtype=torch.int64),
            "gauss_next": python_state[2],
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what ``capture_rng_state`` recorded (checkpoints written before the epoch order was seeded also
    hold a ``data_order`` entry, which nothing needs any more)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) != torch.cuda.device_count():
            warnings.warn(
                f"the checkpoint holds CUDA random states for {len(saved)} devices, this machine has "
                f"{torch.cuda.device_count()}; restoring the first {min(len(saved), torch.cuda.device_count())}",
                stacklevel=2,
            )
        for device_index, device_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), device_index)
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["algorithm"],
        numpy_state["keys"].cpu().numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"]))
