"""Checkpoints: written by rank 0 atomically, loaded with ``weights_only=True``, resumed on every rank.

``last.pt`` every epoch and ``best.pt`` at the lowest score hold: model, EMA, optimizer, scheduler
and scaler state dicts, ``epoch`` (epochs completed), ``step``, RNG states, ``best_val_kl``,
``config`` (a plain dict), ``manifest_identity`` (what the shards hold, see
:attr:`Manifest.identity`; checkpoints of earlier releases hold ``manifest_sha256``) and the layout it was trained on (``world_size``,
``device``). Tensors and plain types only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lc_common.atomic import write_atomic
from lc_common.errors import InputError

from . import distributed
from .config import normalized, to_dict

LAST, BEST = "last.pt", "best.pt"


def save_atomic(state: dict, path) -> None:
    """torch.save through an atomic write: never a truncated file; a failed write names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))


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
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where a run stands: epochs completed, optimizer steps taken, best score so far, validations
    since the score last improved (early stopping), and the epochs planned when the schedule was
    fitted to a time limit (None: train.epochs)."""
    epoch: int = 0
    step: int = 0
    best: float = float("inf")
    stale: int = 0
    planned: int | None = None


class Checkpointer:
    """Owns the run's last/best policy: what goes into a checkpoint, when it is written, and resume.

    ``parts``: the state-dict holders (``model``, ``ema`` or None, ``optimizer``, ``scheduler``,
    ``scaler``). Only rank 0 writes; rank 0 decides whether to resume (so ranks whose shared
    filesystem disagrees cannot diverge) and every rank loads the same file.
    """

    def __init__(self, run_dir, parts: dict, cfg, manifest, world_size: int, device: torch.device):
        self.folder = Path(run_dir) / "checkpoints"
        self.parts, self.cfg, self.manifest = parts, cfg, manifest
        self.world_size, self.device = world_size, device

    @property
    def last(self) -> Path:
        return self.folder / LAST

    def state(self, p: Progress) -> dict:
        ema = self.parts["ema"]
        return {"model": self.parts["model"].state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "ema_updates": ema.updates if ema is not None else None,
                "optimizer": self.parts["optimizer"].state_dict(), "scheduler": self.parts["scheduler"].state_dict(),
                "scaler": self.parts["scaler"].state_dict(), "epoch": p.epoch, "step": p.step,
                "best_val_kl": p.best, "stale_validations": p.stale, "planned_epochs": p.planned,
                "rng": rng_state(), "config": to_dict(self.cfg),
                "manifest_identity": self.manifest.identity, "world_size": self.world_size, "device": self.device.type}

    def save_best(self, p: Progress) -> None:
        """best.pt (rank 0 only; a no-op elsewhere)."""
        if distributed.is_main():
            save_atomic(self.state(p), self.folder / BEST)

    def save_last(self, p: Progress) -> None:
        """last.pt, the point a resume starts from: written last of an epoch's files (rank 0 only)."""
        if distributed.is_main():
            save_atomic(self.state(p), self.last)

    def check_same_data(self, state: dict) -> None:
        """The run resumes only on the shards it was trained on (the same content, wherever packed)."""
        if "manifest_identity" in state:
            same = state["manifest_identity"] == self.manifest.identity
        else:   # an earlier release's checkpoint: the manifest file's own hash
            same = state.get("manifest_sha256") == self.manifest.sha256
        if not same:
            raise InputError(f"{self.last}: trained on other shards than {self.cfg.data.shards} (other tiles, "
                             f"folds, seed or shard layout); use a fresh --run-dir")

    def resume(self) -> tuple[Progress, dict | None]:
        """(progress, the checkpoint's layout) from last.pt, or a fresh start when rank 0 sees none."""
        if distributed.is_main():  # temporary files of writes a SIGKILL cut short
            for stale in self.folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        exists = distributed.broadcast_object(self.last.exists())
        if not exists:
            return Progress(), None
        state = load(self.last)
        self.check_same_data(state)
        if normalized(state["config"])["model"] != to_dict(self.cfg)["model"]:
            raise InputError(f"{self.last}: written with another model config; use a fresh --run-dir")
        self.parts["model"].load_state_dict(state["model"])
        if self.parts["ema"] is not None and state["ema"] is not None:
            updates = state.get("ema_updates")   # an earlier release saved none: one per optimizer step
            self.parts["ema"].load(state["ema"], state["step"] if updates is None else updates)
        for name in ("optimizer", "scheduler", "scaler"):
            self.parts[name].load_state_dict(state[name])
        set_rng_state(state["rng"])
        layout = {"world_size": state.get("world_size"), "device": state.get("device")}
        return Progress(state["epoch"], state["step"], state["best_val_kl"], state.get("stale_validations", 0),
                        state.get("planned_epochs")), layout
