"""Checkpoints: written by rank 0 atomically, loaded with ``weights_only=True``, resumed on every rank.

``last.pt`` every epoch and ``best.pt`` at the lowest score hold: model, EMA, optimizer, scheduler
and scaler state dicts, ``epoch`` (epochs completed), ``step``, RNG states, ``best_val_kl``,
``early_stop_reference``, ``config`` (a plain dict), ``manifest_identity`` (what the shards hold, see
:attr:`Manifest.identity`; checkpoints of earlier releases hold ``manifest_sha256``) and the layout it was trained on (``world_size``,
``device``). Tensors and plain types only.
"""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lc_common.atomic import fsync_dir, write_atomic
from lc_common.errors import InputError, WriteError, said

from . import distributed
from .config import normalized, to_dict, yaml_value

LAST, BEST = "last.pt", "best.pt"
NEXT_BEST = ".best.next.pt"   # an epoch's best.pt until its last.pt is written (see Checkpointer.save_best)

# The config keys that may differ between a run and the last.pt it resumes: where and how it runs,
# never what it trains ("section.*": the whole section). Any other change is refused, because the
# optimizer and scheduler states loaded from last.pt would silently override the new value, a
# change of optim.name or schedule.name would not even load, and the others (the validation fold,
# the batch, the loss, the data) would make the resumed epochs another training than the first.
RESUMABLE_CHANGES = (
    "data.shards",                  # the same tiles elsewhere: their manifest identity is checked
    "data.workers", "data.wait_timeout_s",
    "train.epochs",                 # a longer or shorter run: train.follow_epochs refits its schedule
    "train.micro_batch_size", "train.memory_limit_gb",   # accumulation keeps the batch exact
    "train.channels_last", "train.compile", "train.compile_mode", "train.deterministic", "optim.implementation",
    "train.device", "train.dist_timeout_s",
    "train.precision",              # the autocast dtype: auto changes it with the device anyway
    "train.time_limit", "train.fit_schedule",           # the fitted length is kept in last.pt
    "train.loggers", "train.mlflow_uri", "train.experiment", "train.plot_every", "train.plot_tiles",
    "launcher.*", "cv.*",           # how jobs are run, and what a CV does after training
)


def resumable_change(key: str) -> bool:
    return key in RESUMABLE_CHANGES or f"{key.split('.', 1)[0]}.*" in RESUMABLE_CHANGES


def changed_keys(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, value in ``saved``, value in ``now``) of every key of two normalized configs that
    differs and may not differ on resume."""
    return [(f"{section}.{key}", saved.get(section, {}).get(key), value)
            for section, keys in now.items() for key, value in keys.items()
            if saved.get(section, {}).get(key) != value and not resumable_change(f"{section}.{key}")]


def saved_config(path, state: dict) -> dict:
    """The config of checkpoint ``state`` (read from ``path``) as this version reads it; one line
    naming ``path`` when this version cannot read it."""
    config = state["config"]
    try:
        if not isinstance(config, dict):
            raise InputError(f"a mapping of sections was expected, not {type(config).__name__}")
        return normalized(config)
    except InputError as exc:
        raise InputError(f"{path}: its config cannot be read by this version ({exc}); "
                         "use a fresh --run-dir") from None


def load_scaler(scaler: torch.amp.GradScaler, saved: dict) -> str | None:
    """Load the gradient scaler's state; a note when an fp16 run starts from a checkpoint that holds
    none: train.precision auto chose bf16 or fp32 where it was written (another GPU) and fp16 here,
    and the scaler starts from its initial scale (torch refuses an empty state)."""
    if scaler.is_enabled() and not saved:
        return (f"fp16 gradient scaler: the checkpoint holds no scaler state (it was trained without fp16); "
                f"starting from a fresh scale of {scaler.get_scale():g}")
    scaler.load_state_dict(saved)
    return None


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
        first = said(exc, empty="(no message: an empty or cut file?)")   # a 0-byte file: EOFError()
        if first.startswith("Weights only load failed"):   # torch's advice to load it unsafely: not ours to give
            first = "Weights only load failed: it holds more than tensors and plain types, as no dist_lc checkpoint does"
        raise InputError(f"{path}: not a dist_lc checkpoint ({type(exc).__name__}: {first})") from None
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
    since the score last beat the early-stopping reference, that reference, and the epochs planned
    when the schedule was fitted to a time limit (None: train.epochs), and the dearest validation's
    seconds (None before the first)."""
    epoch: int = 0
    step: int = 0
    best: float = float("inf")
    stale: int = 0
    planned: int | None = None
    reference: float = float("inf")
    validation_s: float | None = None

    def judge(self, score: float | None, min_delta: float) -> bool:
        """Count one epoch's score (None: not validated); True when it is the best so far (best.pt).

        Early stopping counts validations that do not beat ``reference`` by more than ``min_delta``.
        The reference moves only when it is beaten so: had it followed every better score, gains
        each just under ``min_delta`` would never count however much they add up to."""
        if score is None:
            return False
        improved = score < self.best
        self.best = min(self.best, score)
        if score < self.reference - min_delta:
            self.reference, self.stale = score, 0
        else:
            self.stale += 1
        return improved


@dataclass
class Resumed:
    """What a resume found in last.pt besides the progress: the layout it was trained on, the
    train.epochs it was planned for, and notes for the run's log."""
    world_size: int | None
    device: str | None
    epochs: int
    notes: list


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
                "early_stop_reference": p.reference, "validation_s": p.validation_s,
                "rng": rng_state(), "config": to_dict(self.cfg),
                "manifest_identity": self.manifest.identity, "world_size": self.world_size, "device": self.device.type,
                "written": uuid.uuid4().hex}   # tells apart two files of the same epoch (see :meth:`resume`)

    def save_best(self, p: Progress) -> None:
        """The epoch's best.pt, under a name of its own until :meth:`save_last` has written the epoch's
        last.pt (rank 0 only): after a crash in between, the resume redoes the epoch from the previous
        last.pt, and a best.pt of the epoch lost would stand beside a history without it (the redo
        need not improve again: another validation plan, nondeterministic kernels)."""
        if distributed.is_main():
            try:
                save_atomic(self.state(p), self.folder / NEXT_BEST)
            except WriteError as exc:   # the user knows the file as best.pt
                raise exc.naming(self.folder / BEST) from exc

    def save_last(self, p: Progress) -> None:
        """last.pt, the point a resume starts from, then the epoch's best.pt under its name (rank 0 only)."""
        if distributed.is_main():
            save_atomic(self.state(p), self.last)
            self._promote_best()

    def _promote_best(self) -> None:
        pending = self.folder / NEXT_BEST
        if pending.exists():
            try:
                os.replace(pending, self.folder / BEST)
                fsync_dir(self.folder)
            except OSError as exc:
                raise WriteError(self.folder / BEST, exc) from exc

    def _settle_best(self) -> None:
        """A best.pt that was waiting for its last.pt when the run stopped: named best.pt when that
        last.pt was written (of the same epoch), else dropped with the epoch (rank 0)."""
        pending = self.folder / NEXT_BEST
        if not pending.exists():
            return
        try:
            same = self.last.exists() and load(pending)["epoch"] == load(self.last)["epoch"]
        except InputError:
            same = False
        if same:
            self._promote_best()
        else:
            pending.unlink(missing_ok=True)

    def check_same_data(self, state: dict) -> None:
        """The run resumes only on the shards it was trained on (the same content, wherever packed)."""
        if "manifest_identity" in state:
            same = state["manifest_identity"] == self.manifest.identity
        else:   # an earlier release's checkpoint: the manifest file's own hash
            same = state.get("manifest_sha256") == self.manifest.sha256
        if not same:
            raise InputError(f"{self.last}: trained on other shards than {self.cfg.data.shards} (other tiles, "
                             f"folds, seed or shard layout); use a fresh --run-dir")

    def check_same_config(self, saved: dict) -> None:
        """The run resumes only with the config it was trained with, but for RESUMABLE_CHANGES."""
        changed = changed_keys(saved, to_dict(self.cfg))
        if changed:
            key, before, now = changed[0]
            more = f"; {len(changed) - 1} other key(s) differ too" if len(changed) > 1 else ""
            raise InputError(f"{self.last}: written with another {key.split('.')[0]} config ({key}: "
                             f"{yaml_value(before)} there, {yaml_value(now)} now{more}); resume with the "
                             "config it was trained with, or use a fresh --run-dir")

    def resume(self) -> tuple[Progress, Resumed | None]:
        """(progress, what else last.pt says) from last.pt, or a fresh start when rank 0 sees none."""
        if not self.tidied_up():
            return Progress(), None
        state = self.load_same_on_every_rank()
        self.check_same_data(state)
        saved = saved_config(self.last, state)
        self.check_same_config(saved)
        self.parts["model"].load_state_dict(state["model"])
        if self.parts["ema"] is not None and state["ema"] is not None:
            updates = state.get("ema_updates")   # an earlier release saved none: one per optimizer step
            self.parts["ema"].load(state["ema"], state["step"] if updates is None else updates)
        load_optimizer(self.parts["optimizer"], state["optimizer"])
        self.parts["scheduler"].load_state_dict(state["scheduler"])
        notes = [note for note in [load_scaler(self.parts["scaler"], state["scaler"])] if note]
        set_rng_state(state["rng"])
        resumed = Resumed(state.get("world_size"), state.get("device"), saved["train"]["epochs"], notes)
        # checkpoints of earlier releases hold no early-stopping reference: it followed the best score
        return Progress(state["epoch"], state["step"], state["best_val_kl"], state.get("stale_validations", 0),
                        state.get("planned_epochs"), state.get("early_stop_reference", state["best_val_kl"]),
                        state.get("validation_s")), resumed

    def tidied_up(self) -> bool:
        """Whether there is a last.pt to resume, as rank 0 finds it after removing what a killed run
        left (temporary files, a best.pt waiting for its last.pt); its failure raises on every rank."""
        return distributed.on_main(self._tidy_up)

    def _tidy_up(self) -> bool:
        try:
            for stale in self.folder.glob(".*.tmp"):   # writes a SIGKILL cut short
                stale.unlink(missing_ok=True)
            self._settle_best()
            return self.last.exists()
        except OSError as exc:
            raise WriteError(self.folder, exc) from exc

    def load_same_on_every_rank(self) -> dict:
        """last.pt, loaded by every rank, and the same file on every rank: on a folder that is not
        shared (node-local disk, a stale network view after a requeue) the ranks would load different
        epochs, train apart and then wait in different collectives. Every rank hears the outcome, a
        rank that could not load its copy included, and raises it in one line."""
        try:
            state = load(self.last)
            mine = (state["epoch"], state["step"], state.get("written"))
        except InputError as exc:
            state, mine = None, str(exc)
        seen = distributed.all_gather_objects(mine)
        if state is None:
            raise InputError(mine)
        failed = [(rank, text) for rank, text in enumerate(seen) if isinstance(text, str)]
        if failed:
            raise InputError(f"rank {failed[0][0]} failed first: {failed[0][1]}")
        if len(set(seen)) > 1:
            found = ", ".join(f"rank {r}: epoch {e}" for r, (e, _, _) in enumerate(seen))
            raise InputError(f"{self.last}: the ranks read different checkpoints ({found}); the run folder must "
                             "be one that every node shares (--run-dir on a shared filesystem)")
        return state


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The optimizer's saved state, run by the kernels this launch chose (``optim.implementation``,
    fused on CUDA): loading the state dict would bring back the saved run's along with it."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    # into the saved groups, before the load: torch places each parameter's step counter by them
    # (on the parameter's device for the fused kernel, on the CPU for the others)
    groups = [{**group, **chosen} for group, chosen in zip(saved["param_groups"], kernels)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    # each state tensor in its parameter's memory layout: a resume may change train.channels_last,
    # load_state_dict keeps the saved layout, and the fused kernels refuse parameters, gradients and
    # state of different layouts ("must have same dtype, device, and layout")
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
