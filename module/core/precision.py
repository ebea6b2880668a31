"""Precision policy: mixed precision (autocast) for the backbone on CUDA, and where a model's tensors are.

The backbone may run under autocast (float16 with a gradient scaler, or
bfloat16 without one); everything after it (``model.compare``) runs in
float32, and the EMD's Sinkhorn iterations in float64 in evaluation.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from models.errors import InputError
from module.core.wording import option

__all__ = ["AMP_DTYPES", "autocast", "autocast_dtype", "model_device"]

# Mixed precision for the backbone on CUDA: float16 (needs a gradient scaler), or bfloat16 (the range of
# float32, so no scaler; Ampere and newer GPUs). The EMD always runs in float64.
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter."""
    return next(model.parameters()).device


def autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The backbone's autocast dtype: ``None`` (full precision) unless ``amp`` and CUDA; ``amp`` is ``True``
    (float16), or an ``AMP_DTYPES`` name. On the CPU mixed precision would only slow the backbone."""
    if not amp or device.type != "cuda":
        return None
    dtype = AMP_DTYPES["float16" if amp is True else amp]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise InputError(f"{option('amp_dtype', 'bfloat16')}: {torch.cuda.get_device_name(device)} has no bfloat16 "
                         f"arithmetic (Ampere and newer GPUs have it; Colab's T4 does not): use "
                         f"{option('amp_dtype', 'float16')}")
    return dtype


def autocast(device: torch.device, amp: bool | str) -> AbstractContextManager:
    """``torch.autocast`` of the backbone for ``autocast_dtype(amp, device)`` (off when that is ``None``)."""
    dtype = autocast_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
