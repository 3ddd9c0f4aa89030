"""Mixed precision: which autocast dtype a device gets, and the autocast context."""
from __future__ import annotations

import contextlib

import torch

from . import distributed
from .config import TrainConfig, dispatch_table, pick


def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 natively (AVX512-BF16/AMX, or AVX512 emulation it deems fast enough)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_native_bf16() -> bool:
    """bf16 in hardware (Ampere and later); ``is_bf16_supported()`` alone also counts emulation (V100, T4)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 had no emulation path to exclude
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None: fp32). ``auto``: native bf16, else fp16 on CUDA (with a gradient
    scaler), else fp32; an explicit choice is honoured."""
    return pick(PRECISIONS, precision, "train.precision")(device)


# auto's choices from the one every device runs to the one that needs the most of it
CAPABILITY = (None, torch.float16, torch.bfloat16)


def agreed_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """:func:`resolve_precision`, the same on every rank: ``auto`` is decided by each rank's own
    device, and ranks on different GPUs (bf16 on an A100, fp16 on a V100) take the choice of the
    least capable, as they all take the smallest micro-batch (a collective: every rank calls it)."""
    dtype = resolve_precision(precision, device)
    if precision != "auto":
        return dtype
    return CAPABILITY[int(distributed.all_reduce_min(CAPABILITY.index(dtype), device))]


def _auto(device: torch.device) -> torch.dtype | None:
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return torch.bfloat16 if cuda_has_native_bf16() else torch.float16


PRECISIONS = dispatch_table(TrainConfig, "precision", {
    "auto": _auto, "fp32": lambda device: None,
    "bf16": lambda device: torch.bfloat16, "fp16": lambda device: torch.float16})


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
