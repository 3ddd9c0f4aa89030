"""Checkpoints: written by rank 0 atomically, loaded with ``weights_only=True``.

``last.pt`` every epoch and ``best.pt`` at the lowest validation KL hold: model, optimizer,
scaler, scheduler (and EMA) state dicts, ``epoch`` (epochs completed), ``step``, RNG states,
``best_val_kl``, ``config`` (a plain dict), ``manifest_sha256``. Tensors and plain types only.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from shard_tools.errors import InputError

LAST, BEST = "last.pt", "best.pt"


def save_atomic(state: dict, path) -> None:
    """torch.save to a temporary name in the same folder, fsync, rename: never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise InputError(f"{path}: not a dist_lc checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path}: not a dist_lc checkpoint (no model/config entries)")
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate()[1],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def strip_compile_prefix(state_dict: dict) -> dict:
    """State dict keys without torch.compile's ``_orig_mod.`` prefix."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
