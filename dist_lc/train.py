"""The training loop: one process per device, DDP when there are several.

Read top to bottom: :func:`train` takes the run folder's lock, sets up (:func:`build_setup`:
environment, data, model, optimiser) and resumes from its last checkpoint, then runs epochs of
:func:`train_epoch` (accumulated, mixed-precision optimizer steps) and :func:`validate`, logging
and checkpointing on rank 0 after each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lc_common.errors import InputError, WriteError, first_sentence, print_error, said
from lc_common.tiles import IMAGE_SHAPE
from shard_tools.manifest import load_manifest

from . import confusion, distributed, pixel_metrics
from .checkpoint import LAST, Checkpointer, Progress, Resumed, load, saved_config
from .compiling import agreed_compile
from .config import BatchLayout, Config, batch_layout, per_rank_batch, save_config, shard_folder
from .data import apply_views, copy_to, eval_loader, to_nchw, train_loader
from .ema import EMA
from .loading import Loader, LoaderError
from .losses import SegmentationLoss, class_weights
from .memory import fit_micro_batch, is_out_of_memory, peak_memory_mb
from .metrics import SCORED_CLASSES, has_scored_class, kl_per_sample
from .model import build_network, normalisation_stats, prior_bias, tile_proportions
from .optim import WarmupCosine, build_optimizer, build_scheduler, is_per_epoch
from .precision import agreed_precision, autocast
from .predict import Tally
from .run_dir import (RunLock, check_output_folder, clear_failures, default_run_dir, first_peer_failure,
                      record_failure)
from .run_log import RunLog
from .stopping import StopSignals

FP16_SKIPS_ALLOWED = 20   # consecutive non-finite fp16 steps the gradient scaler may skip before the run stops
SCHEDULE_MARGIN = 0.97    # of the time left that the fitted schedule plans to use
REFIT_EPOCHS = 3          # the recent epochs whose mean cost re-fits a schedule after epoch 2


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


class Diverged(TrainingError):
    """The loss is no longer finite: the recipe's outcome, not a fault of the job (its failure note
    says so, and a search prunes the trial instead of failing it)."""
    failure_kind = "diverged"


@dataclass
class Setup:
    """Everything one rank trains with."""
    cfg: Config
    env: distributed.DistEnv
    device: torch.device
    manifest: object
    train_folds: list
    val_folds: list | None
    layout: BatchLayout           # micro-batch × accumulation × ranks = train.batch_size
    net: torch.nn.Module          # the plain module (normalisation + U-Net)
    model: torch.nn.Module        # what the forward/backward goes through (DDP-wrapped when distributed)
    ema: EMA | None
    loss_fn: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None     # autocast dtype, None for fp32
    steps_per_epoch: int
    notes: list                   # set-up decisions worth a line in the log
    train_data: Loader            # its workers serve every epoch
    val_data: Loader | None       # its workers serve every validation
    compiled: bool = False        # torch.compile: its first step compiles (timed apart)
    fp16_skips: int = 0           # consecutive steps the gradient scaler skipped
    skipped_steps: int = 0        # all the steps the gradient scaler skipped
    compile_s: float | None = None   # the compiling first step's seconds, once taken

    @property
    def cuda_graphs(self) -> bool:
        return self.compiled and self.device.type == "cuda" and self.cfg.train.compile_mode in CUDA_GRAPH_MODES

    def close(self) -> None:
        """End the loader workers (they ignore SIGTERM: they must be told)."""
        for loader in (self.train_data, self.val_data):
            if loader is not None:
                loader.close()


# ----------------------------------------------------------------------------- setup

def split_folds(cfg: Config, manifest) -> tuple[list, list | None]:
    k = manifest.num_folds
    fold = cfg.data.fold
    if fold is None:
        return list(range(k)), None
    if not 0 <= fold < k:
        raise InputError(f"config key 'data.fold': {fold} is not a fold of {manifest.root}, which has folds 0..{k - 1}")
    if not manifest.class_pixels([fold])[list(SCORED_CLASSES)].any():   # its KL would be 0 at every epoch
        raise InputError(f"config key 'data.fold': fold {fold} of {manifest.root} has no pixel of a scored class "
                         f"(only no_data and clouds) to validate on")
    return [f for f in range(k) if f != fold], [fold]


def build_setup(cfg: Config, group: distributed.Group | None = None) -> Setup:
    """Everything one rank trains with, in ``group`` (default: a plain process, no launcher)."""
    group = group or distributed.single_process(cfg.train.device)
    env, device = group.env, group.device
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    manifest = load_manifest(shard_folder(cfg))
    train_folds, val_folds = split_folds(cfg, manifest)
    t = cfg.train
    weights = class_weights(manifest.class_pixels(train_folds), cfg.loss.class_weights)
    bias = prior_bias(weights) if cfg.loss.prior_correction else None
    mean, std = normalisation_stats(cfg.data.normalize, manifest)
    net = build_network(cfg.model, mean, std, bias).to(device)
    if t.channels_last:
        net = net.to(memory_format=torch.channels_last)
    dtype = agreed_precision(t.precision, device)
    loss_fn = SegmentationLoss(weights.to(device), cfg.loss.kl_weight)
    notes = []
    if t.micro_batch_size == "auto":   # the resolved config (config.yaml, checkpoints) records the choice
        micro, how = fit_micro_batch(net, loss_fn, per_rank=per_rank_batch(t, env.world_size),
                                     size=cfg.data.crop or IMAGE_SHAPE[0], device=device, dtype=dtype,
                                     channels_last=t.channels_last, limit_gb=t.memory_limit_gb,
                                     local_ranks=env.local_world_size)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=micro))
        t = cfg.train
        notes.append(f"train.micro_batch_size auto: {micro} ({how})")
    layout = batch_layout(t, env.world_size)
    if t.sync_batchnorm and env.distributed:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ema = None
    if t.ema_decay:
        ema = EMA(net, t.ema_decay)
    model = net
    compiled, note = agreed_compile(t.compile, device, sync_batchnorm=t.sync_batchnorm and env.distributed)
    notes += [note] if note else []
    if compiled:
        check_compile_mode(t, layout, device)
        # the network itself, so that validation runs compiled too; called from DDP's forward, it is
        # still compiled with DDP's graph split at the gradient buckets (dynamo sees the active DDP module)
        model.compile(mode=t.compile_mode)
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, net.parameters(), device)
    d = cfg.data
    train_data, steps = train_loader(manifest, train_folds, seed=t.seed, world=env.world_size, rank=env.rank,
                                     micro=layout.micro, accum=layout.accum, workers=d.workers, augment=d.augment,
                                     crop=d.crop, shuffle_buffer=d.shuffle_buffer, device=device,
                                     timeout_s=d.wait_timeout_s)
    val_data = None if val_folds is None else eval_loader(
        manifest, "train", val_folds, world=env.world_size, rank=env.rank, batch_size=layout.micro,
        workers=d.workers, device=device, timeout_s=d.wait_timeout_s)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Setup(cfg, env, device, manifest, train_folds, val_folds, layout, net, model, ema, loss_fn, optimizer,
                 build_scheduler(cfg, optimizer, steps), scaler, dtype, steps, notes, train_data, val_data, compiled)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(t, layout: BatchLayout, device: torch.device) -> None:
    """CUDA graphs cannot accumulate: the next micro-step's replay overwrites the gradients that the
    previous backward left in the graph's memory (torch refuses, or the gradients come out wrong)."""
    if device.type == "cuda" and t.compile_mode in CUDA_GRAPH_MODES and layout.accum > 1:
        raise InputError(f"config key 'train.compile_mode': {t.compile_mode} (CUDA graphs) cannot accumulate "
                         f"gradients, and train.batch_size {t.batch_size} is {layout.accum} micro-batches of "
                         f"{layout.micro} per rank; raise train.micro_batch_size to the batch per rank, or use "
                         f"compile_mode default or max-autotune-no-cudagraphs")


# ----------------------------------------------------------------------------- steps

def to_device(s: Setup, batch: dict) -> dict:
    """The batch on the device: uint16 NCHW images (the network makes them float), masks, proportions,
    each training sample turned by the view its loader worker drew."""
    fmt = torch.channels_last if s.cfg.train.channels_last else torch.contiguous_format
    image = copy_to(batch["image"], s.device)
    out = {name: copy_to(batch[name], s.device) for name in ("mask", "props") if name in batch}
    if "views" in batch:
        image, out["mask"] = apply_views(image, out["mask"], batch["views"])
    out["image"] = to_nchw(image).contiguous(memory_format=fmt)
    return out


def micro_step(s: Setup, batch: dict, last: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; DDP synchronises gradients on the step's last only.

    The per-tile losses are divided by the rank's tiles in the whole step (micro-batch × accum), so
    the accumulated gradient is the step's mean; DDP's average over ranks then makes the update equal
    to one batch of ``train.batch_size`` tiles (with GroupNorm; BatchNorm normalises each micro-batch
    with its own statistics, as under any accumulation). The loss stays on the device: reading it
    here would make the host wait for every micro-batch's kernels instead of queueing the next one's.
    """
    sync = contextlib.nullcontext() if last or not s.env.distributed else s.model.no_sync()
    if s.cuda_graphs:   # a new step: the graphs may reuse the previous one's output memory (none is kept)
        torch.compiler.cudagraph_mark_step_begin()
    b = to_device(s, batch)
    with sync:
        with autocast(s.device, s.dtype):
            logits = s.model(b["image"])
        loss = s.loss_fn(logits, b["mask"], b["props"]).sum() / (s.layout.micro * s.layout.accum)
        s.scaler.scale(loss).backward()
    return loss.detach().double()   # summed over micro-batches as the host summed floats


def optimizer_step(s: Setup, loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """Agree on loss, NaN and stop across ranks, then step optimizer, scaler, EMA and schedule.

    A non-finite loss stops the run, except under fp16 where the gradient scaler skips the step and
    lowers its scale (as it is meant to) up to FP16_SKIPS_ALLOWED times in a row. ``loss`` (the
    rank's step loss, on the device) and its flags are read back once, summed over ranks: the step's
    one wait for the device.
    """
    fp16, clip = s.scaler.is_enabled(), s.cfg.optim.clip_grad_norm
    bad = torch.isfinite(loss).logical_not()
    if clip:
        s.scaler.unscale_(s.optimizer)   # clip the true gradients, not the fp16-scaled ones
        norm = torch.nn.utils.clip_grad_norm_(s.net.parameters(), clip)
        if not fp16:   # a finite loss with a non-finite gradient would step to NaN weights, saved at an epoch's end
            bad = bad | torch.isfinite(norm).logical_not()   # (under fp16 the scaler skips that step)
    loss_sum, bad, stop = distributed.all_reduce_sum([loss, bad, float(stop_requested)], s.device)
    if bad and (not fp16 or s.fp16_skips >= FP16_SKIPS_ALLOWED):
        raise Diverged(f"loss{'' if fp16 or not clip else ' or gradient norm'} is not finite (NaN/inf) on "
                       f"{int(bad)} rank(s)" + (f" for {s.fp16_skips + 1} steps in a row under fp16" if fp16 else "")
                       + "; nothing saved from this epoch; lower optim.lr or use train.precision=fp32")
    s.fp16_skips = s.fp16_skips + 1 if bad else 0
    scale = s.scaler.get_scale() if fp16 else None
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    skipped = bad or (fp16 and s.scaler.get_scale() < scale)   # the scaler found inf/NaN gradients
    s.skipped_steps += bool(skipped)
    if not skipped:   # a step the scaler skipped is no step: no EMA update, no schedule step
        if s.ema is not None:
            s.ema.update(s.net)
        if not is_per_epoch(s.scheduler):
            s.scheduler.step()
    return loss_sum / s.env.world_size, stop > 0


def train_step(s: Setup, micro_batches, stop_requested: bool = False) -> tuple[float, bool]:
    """One optimizer step over ``accum`` full micro-batches, each computed as it arrives.

    ``micro_batches`` is any iterable (the loader itself in :func:`train_epoch`): only one micro-batch
    is held at a time, so the effective batch costs no memory beyond the micro-batch's.
    Returns the step's mean tile loss over all ranks and whether any rank asked to stop.
    """
    total, count, micro, accum = None, 0, s.layout.micro, s.layout.accum
    for batch in micro_batches:
        if len(batch["key"]) != micro or count == accum:
            raise TrainingError(f"train_step: expected {accum} micro-batches of {micro} "
                                f"tiles, got a batch of {len(batch['key'])} after {count}")
        count += 1
        loss = micro_step(s, batch, last=count == accum)
        total = loss if total is None else total + loss
    if count != accum:
        raise TrainingError(f"train_step: the loader ended after {count} of {accum} micro-batches")
    return optimizer_step(s, total, stop_requested)


def timed(batches, waited: list):
    """The batches, adding the seconds spent waiting for each to ``waited[0]``."""
    while True:
        tick = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - tick
        yield batch


def train_epoch(s: Setup, epoch: int, step: int, stop: StopSignals, progress) -> dict:
    t, steps = s.cfg.train, s.steps_per_epoch
    s.model.train()
    losses, waited, start, skipped = [], [0.0], time.perf_counter(), s.skipped_steps
    apart = 0.0, 0   # (seconds, steps) not counted in images/s: a compiling first step
    with s.train_data.batches(epoch) as batches:
        stream = timed(batches, waited)
        for _ in range(steps):
            tick, skips = time.perf_counter(), s.skipped_steps
            loss, stopping = train_step(s, itertools.islice(stream, s.layout.accum), stop.set)
            if s.compiled and s.compile_s is None:
                s.compile_s = time.perf_counter() - tick
                apart = s.compile_s, 1
            step += 1
            if s.skipped_steps == skips:   # the loss of a step fp16's scaler skipped is often inf or NaN
                losses.append(loss)
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)   # shown by update, at tqdm's own pace
            progress.update(1)
            if stopping:
                return {"stopped": True, "step": step}
        if next(stream, None) is not None:   # (and the workers now know the pass is over)
            raise TrainingError(f"the loader yielded more than the epoch's {steps} steps of batches")
    elapsed = time.perf_counter() - start
    counted_s = max(elapsed - apart[0], 1e-9)
    return {"stopped": False, "step": step, "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "epoch_time_s": elapsed,
            "images_per_s": (steps - apart[1]) * t.batch_size / counted_s if steps > apart[1] else None,
            "data_wait_frac": waited[0] / elapsed, "compile_s": apart[0] if apart[1] else None,
            "skipped_steps": s.skipped_steps - skipped}


@torch.no_grad()
def predict_batches(s: Setup, net, loader):
    """Yields (batch as loaded, batch on the device, logits, tile proportions) through the plain
    module (no DDP collective)."""
    net.eval()
    with loader.batches() as batches:
        for batch in batches:
            if s.cuda_graphs:   # as in training: each batch's logits are read before the next one runs
                torch.compiler.cudagraph_mark_step_begin()
            b = to_device(s, batch)
            with autocast(s.device, s.dtype):
                logits = net(b["image"])
            yield batch, b, logits, tile_proportions(logits, net.logit_bias)


@dataclass
class HeldOut:
    """One validation's predictions of this rank's held-out tiles, and the fold's pixel confusion:
    the fold job writes them as its out-of-fold table when they come from the best checkpoint."""
    epoch: int
    keys: list
    props: np.ndarray
    matrix: np.ndarray


def validate(s: Setup, net, epoch: int) -> tuple[dict, dict, HeldOut]:
    """Validation loss, score and pixel metrics over the held-out fold, every tile once across ranks,
    all ranks scoring with rank 0's BatchNorm statistics (those that the checkpoint holds). The
    tiles' proportions and the confusion are gathered as prediction gathers them."""
    distributed.broadcast_buffers(net)
    kl_sum = loss_sum = n = skipped = 0.0
    tally = Tally(s.device, with_confusion=True)
    shown = {"key": [], "image": [], "mask": [], "pred": []}
    for batch, b, logits, props in predict_batches(s, net, s.val_data):
        loss_sum += s.loss_fn(logits, b["mask"], b["props"]).sum().item()
        scores = logits.float() + net.logit_bias   # argmaxed over the scored classes, as the maps are
        tally.add(batch["key"], props, scores, b["mask"])
        truth, pred = batch["props"].double().numpy(), props.double().cpu().numpy()
        scored = has_scored_class(truth)
        kl_sum += float(kl_per_sample(truth[scored], pred[scored]).sum())
        n += float(scored.sum())
        skipped += float((~scored).sum())
        keep_shown(shown, batch, scores, s.cfg.train.plot_tiles)
    kl_sum, loss_sum, n, tiles = distributed.all_reduce_sum([kl_sum, loss_sum, n, n + skipped], s.device)
    keys, props, matrix = tally.finish()
    return {"val_loss": loss_sum / max(tiles, 1), "val_kl": kl_sum / n if n else None, "val_tiles": int(tiles),
            **pixel_metrics.summary(matrix)}, shown, HeldOut(epoch, keys, props, matrix)


def keep_shown(shown: dict, batch: dict, scores: torch.Tensor, limit: int) -> None:
    """The first ``limit`` validation tiles, their masks and predicted maps (the map of the metrics and
    of ``dist-lc map``: the scored class of the highest ``scores``), for the run's plots."""
    room = limit - len(shown["key"])
    if room > 0:
        shown["key"] += batch["key"][:room]
        # copies: the batch's memory is a loader slot, written again a few batches later
        shown["image"] += list(to_nchw(batch["image"][:room]).numpy().copy())
        shown["mask"] += list(batch["mask"][:room].numpy().copy())
        ids = torch.as_tensor(SCORED_CLASSES, device=scores.device)
        shown["pred"] += list(ids[confusion.scored_argmax(scores[:room])].cpu().numpy())


# ----------------------------------------------------------------------------- the run

StopReason = Literal["finished", "stopped", "time_limit", "early_stop"]


@dataclass(frozen=True)
class Timing:
    """Where one call of :func:`train` spent its seconds (epochs resumed from earlier calls excluded)."""
    setup_s: float = 0.0          # environment, data, model, optimizer
    epochs_s: float = 0.0         # training passes
    validation_s: float = 0.0
    bookkeeping_s: float = 0.0    # checkpoints, logs, plots
    compile_s: float = 0.0        # torch.compile's first, compiling step (inside epochs_s)
    validations: int = 0
    train_call_s: float = 0.0     # the whole call


@dataclass(frozen=True)
class TrainResult:
    """What a training run knows when it returns, the same on every rank.

    ``last`` is the last epoch's metrics row of this call ({} when none ran); the ``best_*`` fields,
    ``epochs_done``, ``final_train_loss`` and ``train_s`` cover the whole run, resumed epochs included.
    """
    config: Config                  # as resolved (the micro-batch that ``auto`` chose)
    stop_reason: StopReason
    epochs_done: int
    epochs_planned: int
    last: dict
    best_epoch: int | None          # None without validation
    best_val_kl: float | None
    final_train_loss: float | None
    train_s: float                  # all epochs' training time
    timing: Timing
    best_held_out: HeldOut | None   # the validation that made best.pt, when this call ran it

    @property
    def stopped(self) -> bool:
        """A stop signal ended the run early: it resumes later from last.pt."""
        return self.stop_reason == "stopped"

def validation_costs(val_s: list, p: Progress, compiling_first: bool = False) -> list:
    """What a validation costs, for the time checks: this launch's validations, or before its first
    (a resumed run, train.val_every > 1) the dearest of the launch before, from last.pt:
    counted as free, the validation forced at the limit could overrun it. ``compiling_first``: the
    first validation compiled the network's evaluation graph (torch.compile without EMA); once
    another is measured, it no longer counts (its compile time would be charged to every epoch)."""
    if compiling_first and len(val_s) > 1:
        return val_s[1:]
    return val_s if val_s or p.validation_s is None else [p.validation_s]


def should_stop_for_time(s: Setup, started: float, train_s: list, val_s: list, validating: bool) -> bool:
    """Rank 0's clock decides, after an epoch's training: stop if this epoch's validation (when it
    is still to run) and then another epoch would not fit in train.time_limit. Another epoch costs
    the dearest training so far and a validation, as a run's last epoch is always validated;
    a validation costs the dearest one so far (nothing before the first is measured)."""
    limit = s.cfg.train.time_limit
    if not limit:
        return False
    val = max(val_s, default=0.0)
    needed = (val if validating else 0.0) + max(train_s) + val
    late = time.monotonic() - started + needed > limit * 60
    return bool(distributed.broadcast_object(late))


def unsettled_batchnorm(cfg: Config, updates: int) -> float:
    """The share of BatchNorm running statistics still at their initial (0, 1) after ``updates``
    training forward passes: (1 − momentum)^updates; 0 without BatchNorm. With train.ema_decay the
    evaluated model's buffers are averaged too, so its share is, if anything, larger."""
    if cfg.model.norm != "batch":
        return 0.0
    return (1.0 - cfg.model.bn_momentum) ** updates


def warn_if_batchnorm_unsettled(cfg: Config, runlog: RunLog, passes: int) -> None:
    left = unsettled_batchnorm(cfg, passes)
    if left > 0.05:
        runlog.info(f"warning: after {passes} training forward passes, {left:.0%} of the BatchNorm "
                    f"running statistics are still their initial values (model.bn_momentum "
                    f"{cfg.model.bn_momentum:g}); validation and prediction use them. Train longer or "
                    f"raise model.bn_momentum (0.1 settles within about 30 passes)")


def warn_if_all_warmup(cfg: Config, runlog: RunLog, last: int) -> None:
    """A cosine run that ends inside its warmup never reaches optim.lr nor anneals: legal (a quick
    trial of a recipe), but rarely what was meant, so it is said."""
    warmup = cfg.schedule.warmup_epochs
    if cfg.schedule.name == "cosine" and warmup >= last:
        runlog.info(f"warning: the run ends after epoch {last}, inside the cosine's warmup of {warmup} epoch(s) "
                    f"(schedule.warmup_epochs): the learning rate rises for the whole run and never anneals")


def follow_epochs(s: Setup, p: Progress, before: int) -> str:
    """A run resumed with another train.epochs ends after the new count. A cosine schedule's length
    was loaded from last.pt with the scheduler: it is set to the new count (a length fitted to
    train.time_limit is kept unless the new count is shorter), and the learning rate is from now on
    the new cosine's, so that the run still anneals to schedule.min_lr at its end."""
    t = s.cfg.train
    if p.planned is not None and t.epochs < p.planned:
        p.planned = t.epochs
    last = p.planned or t.epochs
    line = f"train.epochs {before} → {t.epochs}: the run ends after epoch {last}"
    shape = getattr(s.scheduler, "lr_lambdas", [None])[0]
    if isinstance(shape, WarmupCosine):
        shape.total = last * s.steps_per_epoch
        for group, base in zip(s.optimizer.param_groups, s.scheduler.base_lrs):
            group["lr"] = base * shape(s.scheduler.last_epoch)
        line += f", and the cosine schedule with it (learning rate now {s.optimizer.param_groups[0]['lr']:.3g})"
    return line


def describe_start(s: Setup, p: Progress, resumed: Resumed | None) -> str:
    line = (f"{s.env.source}: {s.env.world_size} rank(s) on {s.device}, precision {s.dtype or 'fp32'}, "
            f"{s.steps_per_epoch} steps/epoch of {s.layout.batch} tiles ({s.layout.micro} × {s.layout.accum} "
            f"accumulation × {s.env.world_size} ranks)")
    if p.epoch:
        line += f", resuming after epoch {p.epoch}"
        if resumed and resumed.world_size is not None and \
                (resumed.world_size, resumed.device) != (s.env.world_size, s.device.type):
            line += (f" (trained so far on {resumed.world_size} rank(s) on {resumed.device}: the same "
                     "batch size and schedule, a different tile order within each step)")
    return line


def batchnorm_note(s: Setup) -> str | None:
    """The loss is exactly one big batch's, BatchNorm's batch statistics are not: whose they are."""
    tiles = s.layout.micro * (s.env.world_size if s.cfg.train.sync_batchnorm else 1)
    if s.cfg.model.norm != "batch" or tiles >= s.layout.batch:
        return None
    return f"BatchNorm normalises over {tiles} tiles at a time, not the batch's {s.layout.batch} (model.norm=group " \
           "does not depend on the micro-batch)"


def train(cfg: Config, run_dir) -> TrainResult:
    """Train (or resume) in ``run_dir``, in the process group of the entry point that calls it (or
    in one of its own); returns the same :class:`TrainResult` on every rank.

    A rank that fails records why in the run folder; a peer that then fails in a collective (the
    failed rank's connection closed) raises with that cause instead of a bare network error.
    """
    started = time.monotonic()
    run_dir = Path(run_dir)
    with distributed.process_group(cfg.train.device, cfg.train.dist_timeout_s) as group:
        # the lock first: the set-up's micro-batch trials must not run on the GPU of a training
        # that already holds the folder
        with RunLock(run_dir):
            forget_earlier_failures(run_dir, group.env.is_main)
            try:
                s = build_setup(keep_chosen_micro_batch(cfg, run_dir), group)
            except LoaderError as exc:   # no room for its batches, maybe on this node alone: the peers say so
                if group.env.distributed:   # (a single process leaves no folder of its own making)
                    record_failure(run_dir, group.env.rank, exc)
                raise
            except RuntimeError as exc:   # (LoaderError is one: handled above)
                if not is_out_of_memory(exc):
                    raise
                cause = TrainingError(f"rank {group.env.rank}: out of {group.device.type} memory while setting up "
                                      f"the model and optimizer ({first_sentence(exc)}); is another process "
                                      "holding the GPU?")
                record_failure(run_dir, group.env.rank, cause)
                raise cause from exc
            setup_s = time.monotonic() - started
            note_own_exit = functools.partial(_record_own_exit, run_dir, s.env.rank)
            with StopSignals() as stop, distributed.last_words(note_own_exit):
                try:
                    result = _train(s, run_dir, stop, started)
                except Exception as exc:
                    cause = explained(exc, s, run_dir)
                    stop.say_on_termination(str(cause))   # the launcher may end this rank mid-teardown
                    if cause is exc:
                        raise
                    raise cause from exc
                finally:
                    s.close()
        if dist.is_initialized():
            dist.barrier()
    timing = dataclasses.replace(result.timing, setup_s=setup_s, train_call_s=time.monotonic() - started)
    return dataclasses.replace(result, timing=timing)


def forget_earlier_failures(run_dir: Path, main: bool) -> None:
    """Rank 0 removes the failure notes of earlier launches while every rank waits between two
    collectives: no rank of this launch can have written one yet, and a peer's note from its set-up
    (which may end after rank 0's) survives for rank 0 to report."""
    distributed.broadcast_object(None)
    if main:
        clear_failures(run_dir)
    distributed.broadcast_object(None)


def _record_own_exit(run_dir: Path, rank: int, reason: str) -> None:
    record_failure(run_dir, rank, TrainingError(reason))


def keep_chosen_micro_batch(cfg: Config, run_dir: Path) -> Config:
    """A resumed run keeps the micro-batch that ``auto`` chose when it started, as last.pt's config
    (what the resume trusts) records it, read by rank 0 for every rank."""
    if cfg.train.micro_batch_size != "auto":
        return cfg
    saved = distributed.on_main(saved_micro_batch, run_dir / "checkpoints" / LAST)
    if not isinstance(saved, int):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=saved))


def saved_micro_batch(last: Path):
    """The micro-batch recorded in ``last`` (a number, or "auto" from a run that never chose), or
    None when there is no ``last``."""
    return saved_config(last, load(last))["train"]["micro_batch_size"] if last.is_file() else None


def explained(exc: Exception, s: Setup, run_dir: Path) -> Exception:
    """The exception to raise: this rank's own, or the first failed peer's cause when this one is
    only the consequence (a collective that failed because the peer is gone or stuck). A collective
    that timed out with no peer's cause on record says so, naming this rank and the limit; a device
    out of memory names the setting to lower."""
    own_cause = out_of_memory(exc, s) or compile_failure(exc, s)
    if own_cause is not None:   # this rank's own cause, whatever its peers recorded since
        record_failure(run_dir, s.env.rank, own_cause)
        return own_cause
    own = collective_timeout(exc, s)
    record_failure(run_dir, s.env.rank, own or exc)
    if not s.env.distributed or isinstance(exc, (InputError, TrainingError, LoaderError, WriteError)):
        return exc
    peer = first_peer_failure(run_dir, s.env.rank, wait_s=3.0 if through_torch_collectives(exc) else 0.0)
    if peer is None:
        return own or exc
    rank, kind, message = peer
    return (InputError if kind == "input" else TrainingError)(f"rank {rank} failed first: {message}")


# where a peer's failure surfaces in this rank: a collective, or DDP's all-reduce run inside backward
COLLECTIVE_CODE = ("torch/distributed/", "torch/nn/parallel/", "torch/autograd/")


def through_torch_collectives(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, came up through torch's distributed or
    autograd code: only then can it be the consequence of a peer's failure whose note is still to
    come (on a shared file system, seconds later), worth waiting for. An error raised by this rank's
    own code path is its own cause, said at once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if any(part in frame.f_code.co_filename.replace("\\", "/") for part in COLLECTIVE_CODE):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_memory(exc: Exception, s: Setup) -> TrainingError | None:
    """A TrainingError naming the setting to change for a device that ran out of memory, else None."""
    if not is_out_of_memory(exc):
        return None
    return TrainingError(f"rank {s.env.rank}: out of {s.device.type} memory at train.micro_batch_size "
                         f"{s.layout.micro} ({first_sentence(exc)}); lower "
                         "train.micro_batch_size, or set it to auto (the largest that fits, the batch kept exact)")


def compile_failure(exc: Exception, s: Setup) -> TrainingError | None:
    """A TrainingError for torch.compile's backend failing in a compiled run (a compiler that does not
    work, an op inductor cannot lower), naming the setting that trains without it; else None. Errors
    of the model's own code that dynamo only passes on (a shape mismatch) are left as they are."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError

    if not s.compiled or not isinstance(exc, (BackendCompilerFailed, InternalTorchDynamoError)):
        return None
    inner = getattr(exc, "inner_exception", None) or exc
    if is_out_of_memory(inner):   # inductor's autotuning ran out: the micro-batch's
        return out_of_memory(inner, s)
    return TrainingError(f"rank {s.env.rank}: torch.compile failed ({type(inner).__name__}: "
                         f"{said(inner, empty='no message')}); "
                         "set train.compile=false to train eager")


def collective_timeout(exc: Exception, s: Setup) -> TrainingError | None:
    """A TrainingError for a collective (gloo, NCCL) that gave up waiting for the peers, else None."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or isinstance(exc, (TrainingError, LoaderError)) or \
            not re.search(r"Timed out waiting|timed out|before timing out", text):   # gloo's, NCCL's
        return None
    return TrainingError(f"rank {s.env.rank}: the other ranks did not answer in a collective within "
                         f"train.dist_timeout_s = {s.cfg.train.dist_timeout_s} s "
                         f"({said(exc, last=True, limit=160)})")


def _train(s: Setup, run_dir: Path, stop: StopSignals, started: float) -> dict:
    cfg = s.cfg
    ckpt = Checkpointer(run_dir, {"model": s.net, "ema": s.ema, "optimizer": s.optimizer,
                                  "scheduler": s.scheduler, "scaler": s.scaler},
                        cfg, s.manifest, s.env.world_size, s.device)
    p, resumed = ckpt.resume()
    runlog = open_runlog(run_dir, p, cfg)
    status = "FAILED"
    try:
        rank0_agreed(save_config, cfg, run_dir / "config.yaml")
        runlog.info(describe_start(s, p, resumed))
        for note in [batchnorm_note(s), *s.notes, *(resumed.notes if resumed else [])]:
            if note:
                runlog.info(note)
        if resumed and resumed.epochs != cfg.train.epochs:
            runlog.info(follow_epochs(s, p, resumed.epochs))
        warn_if_all_warmup(cfg, runlog, p.planned or cfg.train.epochs)
        result = run_epochs(s, p, ckpt, runlog, stop, started)
        status = "KILLED" if result.stopped else "FINISHED"   # a stopped run resumes later
        return result
    except Exception:
        runlog.failure()
        raise
    finally:
        runlog.close(status)


def validates(t, epoch: int, last: int) -> bool:
    """Whether an epoch ends with a validation: the first (a measure of its cost, and a sanity check),
    every train.val_every-th from train.val_from × the planned epochs on, and the last."""
    return epoch == 1 or epoch == last or (epoch >= t.val_from * last and epoch % t.val_every == 0)


def validated_share(t) -> float:
    """The share of the epochs still to come that validate (for the cost of an epoch)."""
    return 1.0 - t.val_from


def refit_length(t, epoch: int, planned: int, recent_train_s: list, val_s: list, left_s: float) -> int:
    """The schedule's length after epoch ``epoch`` of ``planned``: shortened, never lengthened, so
    that the epochs still to come (at the mean cost of the recent ones) and the validations the
    plan puts among them fit in ``left_s`` seconds. Keeps at least one epoch to come, so that the
    run still ends with a validated epoch at the end of its schedule."""
    train_epoch = float(np.mean(recent_train_s))
    val_cost = float(np.mean(val_s)) if val_s else 0.0
    budget = max(left_s, 0.0) * SCHEDULE_MARGIN
    last = planned
    while last > epoch + 1:
        todo = range(epoch + 1, last + 1)
        if len(todo) * train_epoch + sum(validates(t, e, last) for e in todo) * val_cost <= budget:
            break
        last -= 1
    return last


def fit_schedule_to_time(s: Setup, p: Progress, started: float, train_s: list, val_s: list, runlog: RunLog,
                         stopping: bool) -> None:
    """Fit a cosine schedule into train.time_limit from the measured cost of its epochs: after each
    of the first two epochs to the time left (training + the share of validation), after every later
    one shortened again if the recent epochs say its end would not fit (a node that slows down,
    validations dearer than the first). A late schedule is never lengthened: its annealing would
    restart. The length is kept in the scheduler's state and the checkpoint, so a resumed run keeps it.
    A run ``stopping`` for time after this epoch ends its schedule here (a resume of it then has
    nothing left to train, rather than a schedule lengthened past what it trained)."""
    t = s.cfg.train
    shape = getattr(s.scheduler, "lr_lambdas", [None])[0]
    if not (t.time_limit and t.fit_schedule and isinstance(shape, WarmupCosine)):
        return
    left = t.time_limit * 60 - (time.monotonic() - started)
    if stopping:
        per_epoch, fits = float(np.mean(train_s[-REFIT_EPOCHS:])), p.epoch
    elif p.epoch <= 2:
        per_epoch = train_s[-1] + (np.mean(val_s) / t.val_every if val_s else 0.0) * validated_share(t)
        # never ends at the epoch just trained: its validation was planned against the old end
        more = int(max(left, 0.0) * SCHEDULE_MARGIN // per_epoch)
        fits = max(min(p.epoch + 1, t.epochs), min(t.epochs, p.epoch + more))
    else:
        per_epoch = float(np.mean(train_s[-REFIT_EPOCHS:]))
        fits = refit_length(t, p.epoch, p.planned or t.epochs, train_s[-REFIT_EPOCHS:], val_s, left)
    planned = int(distributed.broadcast_object(fits))
    if planned != p.planned:
        shape.total = planned * s.steps_per_epoch
        p.planned = planned
        runlog.info(f"train.time_limit {t.time_limit:g} min: the cosine schedule now ends after epoch {planned} "
                    f"({per_epoch:.1f} s per epoch measured)")
        warn_if_all_warmup(s.cfg, runlog, planned)


def run_epochs(s: Setup, p: Progress, ckpt: Checkpointer, runlog: RunLog, stop: StopSignals,
               started: float) -> TrainResult:
    cfg, t = s.cfg, s.cfg.train
    train_s, val_s, row, reason = [], [], {}, "finished"
    cost_s = []        # train_s without compilation, with checkpoints: what the coming epochs will cost
    best_held = None   # the held-out predictions of best.pt, when this process validated it
    other_s, compile_s = 0.0, 0.0   # checkpoints, logs, plots; compilation
    if t.early_stop and p.stale >= t.early_stop:   # a rerun of a run that stopped early
        reason = "early_stop"
        runlog.info(f"train.early_stop {t.early_stop}: this run already stopped early after epoch {p.epoch} "
                    f"(no better score in {p.stale} validations); nothing left to train")
    elif p.epoch >= (p.planned or t.epochs):   # inside one Slurm job, launches share a default run folder
        runlog.info(f"this run folder's run has already trained its {p.epoch} epochs; nothing left to train "
                    "(another training needs another --run-dir)")
    while reason == "finished" and p.epoch < (p.planned or t.epochs):
        epoch_started = time.monotonic()
        last = p.planned or t.epochs
        with runlog.progress(s.steps_per_epoch, f"epoch {p.epoch + 1}/{last}") as bar:
            result = train_epoch(s, p.epoch, p.step, stop, bar)
        p.step = result["step"]
        compiling = result.get("compile_s") or 0.0
        if compiling:
            compile_s += compiling
            runlog.info(f"torch.compile: the first step took {compiling:.1f} s (compilation); "
                        f"not counted in images_per_s nor in the epoch's cost for train.time_limit")
        if result["stopped"]:
            reason = "stopped"
            runlog.info(f"stop requested during epoch {p.epoch + 1}; last.pt holds epoch {p.epoch}")
            break
        check_weights_finite(s, p.epoch + 1)
        p.epoch += 1
        if result.get("skipped_steps"):
            runlog.info(f"epoch {p.epoch}: the fp16 gradient scaler skipped {result['skipped_steps']} of "
                        f"{s.steps_per_epoch} steps (non-finite gradients); train_loss is the mean of the others")
        train_s.append(time.monotonic() - epoch_started)
        cost_s.append(max(train_s[-1] - compiling, 0.0) + other_s / max(len(cost_s), 1))
        validating = s.val_folds is not None and validates(t, p.epoch, last)
        compiling_first = s.compiled and s.ema is None   # EMA validates an uncompiled copy
        val_costs = validation_costs(val_s, p, compiling_first)
        late = should_stop_for_time(s, started, cost_s, val_costs, validating)
        # the schedule's last epoch ends the run anyway: "time_limit" is for a run the limit cut short
        out_of_time = late and p.epoch < last
        val, shown = {}, None
        if s.val_folds is not None and (validating or out_of_time):
            val_started = time.monotonic()
            val, shown, held = validate(s, s.ema.module if s.ema is not None else s.net, p.epoch)
            val_s.append(time.monotonic() - val_started)
            val_costs = validation_costs(val_s, p, compiling_first)
            p.validation_s = max(val_costs)
            # this validation's cost is measured now (the first one's was not known): does another epoch fit?
            late = late or should_stop_for_time(s, started, cost_s, val_costs, False)
            out_of_time = late and p.epoch < last
        score = val.get("val_kl", result["train_loss"] if s.val_folds is None else None)
        if score is not None and is_per_epoch(s.scheduler):
            s.scheduler.step(score)
        row = {"epoch": p.epoch, "step": p.step, "train_loss": result["train_loss"], **val,
               "lr": s.optimizer.param_groups[0]["lr"], "epoch_time_s": result["epoch_time_s"],
               "val_time_s": val_s[-1] if val else None,
               "images_per_s": result["images_per_s"],
               "data_wait_frac": result["data_wait_frac"], "peak_mem_mb": peak_memory_mb(s.device)}
        # before last.pt is written: the fitted length must be in the checkpoint a resume reads
        fit_schedule_to_time(s, p, started, cost_s, val_costs, runlog, stopping=late)
        bookkeeping = time.monotonic()
        improved = p.judge(score, t.early_stop_min_delta)
        rank0_agreed(record_epoch, ckpt, runlog, p, row, improved)
        if improved and val:
            best_held = held
        if shown and t.plot_every and p.epoch % t.plot_every == 0:
            rank0_agreed(runlog.plot, p.epoch, shown)
        other_s += time.monotonic() - bookkeeping
        if out_of_time:
            reason = "time_limit"
            runlog.info(f"train.time_limit {t.time_limit:g} min: stopping after epoch {p.epoch}")
            break
        if t.early_stop and p.stale >= t.early_stop:
            reason = "early_stop"
            runlog.info(f"train.early_stop {t.early_stop}: no better score in {p.stale} validations; "
                        f"stopping after epoch {p.epoch} (best {p.best:.5g})")
            break
    if reason != "stopped":  # a preempted run resumes; its statistics are judged when it ends
        warn_if_batchnorm_unsettled(cfg, runlog, p.step * s.layout.accum)
    timing = Timing(epochs_s=float(sum(train_s)), validation_s=float(sum(val_s)), bookkeeping_s=other_s,
                    compile_s=compile_s, validations=len(val_s))
    return TrainResult(cfg, reason, p.epoch, p.planned or t.epochs, row, **run_history(runlog),
                       timing=timing, best_held_out=best_held)


def check_weights_finite(s: Setup, epoch: int) -> None:
    """Without ``optim.clip_grad_norm`` no step looks at the gradients: a finite loss with non-finite
    gradients turns the weights NaN, which the next step's loss reports, except after an epoch's last
    step, whose weights would be validated and saved into last.pt for every resume to start from.
    One pass over the weights (and the EMA's) an epoch, its outcome agreed by all ranks."""
    nets = [s.net] + ([s.ema.module] if s.ema is not None else [])
    tensors = [t for net in nets for t in itertools.chain(net.parameters(), net.buffers()) if t.is_floating_point()]
    bad = torch.stack([t.detach().isfinite().all() for t in tensors]).logical_not().any()
    bad, = distributed.all_reduce_sum([bad], s.device)
    if bad:
        raise Diverged(f"the weights are not finite (NaN/inf) after epoch {epoch} on {int(bad)} rank(s) under a "
                       "finite loss (non-finite gradients); nothing saved from this epoch; set "
                       "optim.clip_grad_norm (it checks every step), lower optim.lr or use train.precision=fp32")


def record_epoch(ckpt: Checkpointer, runlog: RunLog, p: Progress, row: dict, improved: bool) -> None:
    """best.pt (under a name of its own), then the metrics row, then last.pt (and best.pt takes its
    name): last.pt is what a resume starts from, so a failure at any of these writes (a full disk)
    makes the resume redo the whole epoch: the best.pt of the epoch lost is dropped, best.pt is
    written again when the redo improves again, and the metrics row, dropped past last.pt's epoch on
    resume, is there once."""
    if improved:
        ckpt.save_best(p)
    runlog.epoch(row, best=improved)
    ckpt.save_last(p)


def rank0_agreed(fn, *args):
    """``fn(*args)`` by rank 0 alone (the run's files are its), its outcome heard by every rank before
    they go on: after a failed write (a full disk) or a log that cannot be opened (a damaged
    metrics.csv, an MLflow server that does not answer) the others would start the next epoch and
    wait in its all-reduce for a rank that is gone, until the collective timeout (under srun or
    submitit with NCCL, nothing else ends them)."""
    try:
        return distributed.on_main(fn, *args)
    except (WriteError, InputError) as exc:
        if distributed.is_main():
            raise
        raise TrainingError(f"rank 0 failed first: {type(exc).__name__}: {exc}") from None


def open_runlog(run_dir: Path, p: Progress, cfg) -> RunLog:
    """The run's log: rank 0's writes its files (opened as :func:`rank0_agreed` runs it), the others' is
    disabled."""
    opened = []
    rank0_agreed(lambda: opened.append(RunLog(run_dir, enabled=True, resume_epoch=p.epoch, cfg=cfg)))
    return opened[0] if opened else RunLog(run_dir, enabled=False, resume_epoch=p.epoch, cfg=cfg)


def run_history(runlog: RunLog) -> dict:
    """The whole run's best epoch and score, epochs done, final train loss and training time, from
    its metrics log (rank 0 holds it; every rank gets rank 0's answer)."""
    return distributed.on_main(lambda: summarise_rows(runlog.rows()) if runlog.enabled else None)


def summarise_rows(rows: list[dict]) -> dict:
    # train.val_every may skip epochs; a NaN score (an fp16 overflow) would stay the min: min keeps the first
    validated = [r for r in rows if r.get("val_kl") is not None and math.isfinite(r["val_kl"])]
    best = min(validated, key=lambda r: r["val_kl"]) if validated else None
    return {"best_epoch": best and int(best["epoch"]), "best_val_kl": best and float(best["val_kl"]),
            "final_train_loss": float(rows[-1]["train_loss"]) if rows else None,
            "train_s": float(sum(r["epoch_time_s"] for r in rows))}


def run(args) -> int:
    """CLI entry: ``dist-lc train --config X.yaml [--set k=v ...] [--run-dir DIR] [--print-config]``."""
    from .config import describe, load_config

    cfg = load_config(args.config, args.set)
    if args.print_config:
        print(describe(cfg))
        return 0
    if args.run_dir:
        check_output_folder(Path(args.run_dir))
    try:
        with distributed.process_group(cfg.train.device, cfg.train.dist_timeout_s):
            run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
            check_output_folder(run_dir)
            train(cfg, run_dir)
    except (TrainingError, LoaderError, WriteError) as exc:
        print_error(exc)
        return 1
    return 0
