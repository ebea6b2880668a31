"""How PyTorch's CPU threads wait: set before torch is imported, where the project starts work.

OpenMP's default lets an idle thread spin for a while before it sleeps. On a
machine whose cores are shared (Colab, CI runners, a laptop running anything
else), the spinning threads take the cores the working ones need: on 2 shared
cores the Sinkhorn step took 7x the CPU time with the default wait policy than
with ``OMP_WAIT_POLICY=PASSIVE`` or one thread (``benchmarks/bench_sinkhorn.py
--threads-table [--busy]`` measures the three). PASSIVE keeps every thread and only changes how an idle
one waits, so an idle machine loses little.
"""
from __future__ import annotations

import os
import sys

__all__ = ["WAIT_POLICY", "passive_threads"]

WAIT_POLICY = "PASSIVE"


def passive_threads() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy; True when it takes effect.

    OpenMP reads the variable once, when torch loads it: after ``import torch``
    this changes nothing (and returns False).
    """
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return os.environ["OMP_WAIT_POLICY"] == WAIT_POLICY
