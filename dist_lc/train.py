"""The training loop: one process per device, DDP when there are several.

Read top to bottom: :func:`train` sets up (environment, data, model, optimiser, resume), then runs
epochs of :func:`train_epoch` (accumulated, mixed-precision optimizer steps) and :func:`validate`,
logging and checkpointing on rank 0 after each.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shard_tools.errors import InputError
from shard_tools.manifest import load_manifest

from . import checkpoint as ckpt
from . import distributed
from .config import Config, normalized, save_config, to_dict
from .data import eval_loader, train_loader
from .losses import SegmentationLoss, class_weights
from .metrics import kl_per_sample
from .network import build_network, normalisation_stats, prior_bias, tile_proportions
from .run_log import RunLog

log = logging.getLogger("dist_lc.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


@dataclass
class Setup:
    """Everything one rank trains with."""
    cfg: Config
    env: distributed.DistEnv
    device: torch.device
    manifest: object
    train_folds: list
    val_folds: list | None
    net: torch.nn.Module          # the plain module (normalisation + U-Net)
    model: torch.nn.Module        # what the forward/backward goes through (DDP-wrapped when distributed)
    ema: torch.nn.Module | None
    loss_fn: SegmentationLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None     # autocast dtype, None for fp32
    accum: int
    steps_per_epoch: int


# ----------------------------------------------------------------------------- setup

def cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 natively (AVX512-BF16/AMX, or AVX512 emulation it deems fast enough)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype; ``auto``: bf16 where the device runs it natively, else fp16 (CUDA) or fp32 (CPU)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def split_folds(cfg: Config, manifest) -> tuple[list, list | None]:
    k = manifest.num_folds
    fold = cfg.data.fold
    if fold is None:
        return list(range(k)), None
    if not 0 <= fold < k:
        raise InputError(f"data.fold={fold}: {manifest.root} has folds 0..{k - 1}")
    return [f for f in range(k) if f != fold], [fold]


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    if o.name == "adagrad":
        return torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Plateau is stepped once per epoch with the validation score; the others once per step."""
    s = cfg.schedule
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.factor,
                                                          patience=s.patience, min_lr=s.min_lr)
    if s.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = s.warmup_epochs * steps_per_epoch
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    floor = s.min_lr / cfg.optim.lr

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def ema_update(decay: float):
    """EMA with a warm-up, ``min(decay, (1+n)/(10+n))`` after n updates, so that the random initial
    weights do not linger in short runs (0.98**15 of them would remain after 15 plain steps)."""
    def update(averaged, current, num_averaged):
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * d + current * (1.0 - d)
    return update


def build_setup(cfg: Config) -> Setup:
    env, device = distributed.setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    manifest = load_manifest(cfg.data.shards)
    train_folds, val_folds = split_folds(cfg, manifest)
    t = cfg.train
    accum = t.batch_size // t.micro_batch_size
    if accum % env.world_size:
        raise InputError(f"config: train.batch_size {t.batch_size} is not micro_batch_size "
                         f"{t.micro_batch_size} × accumulation × {env.world_size} ranks")
    accum //= env.world_size
    weights = class_weights(manifest.class_pixels(train_folds), cfg.loss.class_weights)
    bias = prior_bias(weights) if cfg.loss.prior_correction else None
    mean, std = normalisation_stats(cfg.data.normalize, manifest)
    net = build_network(to_dict(cfg)["model"], mean, std, bias).to(device)
    if t.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if t.sync_batchnorm and env.distributed:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ema = None
    if t.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(net, avg_fn=ema_update(t.ema_decay), use_buffers=True)
    model = net
    if t.compile:
        model.compile()
    if env.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, net.parameters())
    _, steps = train_loader(manifest, train_folds, epoch=0, seed=t.seed, world=env.world_size, rank=env.rank,
                            micro=t.micro_batch_size, accum=accum, workers=0)
    dtype = resolve_precision(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Setup(cfg, env, device, manifest, train_folds, val_folds, net, model, ema,
                 SegmentationLoss(weights.to(device), cfg.loss.kl_weight), optimizer,
                 build_scheduler(cfg, optimizer, steps), scaler, dtype, accum, steps)


# ----------------------------------------------------------------------------- steps

def autocast(s: Setup):
    if s.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(s.device.type, dtype=s.dtype)


def to_device(s: Setup, batch: dict) -> dict:
    fmt = torch.channels_last if s.cfg.train.channels_last else torch.contiguous_format
    out = {"image": batch["image"].to(s.device, non_blocking=True, memory_format=fmt)}
    for name in ("mask", "props"):
        if name in batch:
            out[name] = batch[name].to(s.device, non_blocking=True)
    return out


def micro_step(s: Setup, batch: dict, last: bool) -> float:
    """Forward and backward of one micro-batch; DDP synchronises gradients on the step's last only.

    The per-tile losses are divided by the rank's tiles in the whole step (micro-batch × accum), so
    the accumulated gradient is the step's mean; DDP's average over ranks then makes the update equal
    to one batch of ``train.batch_size`` tiles.
    """
    sync = contextlib.nullcontext() if last or not s.env.distributed else s.model.no_sync()
    b = to_device(s, batch)
    with sync:
        with autocast(s):
            logits = s.model(b["image"])
        loss = s.loss_fn(logits, b["mask"], b["props"]).sum() / (s.cfg.train.micro_batch_size * s.accum)
        s.scaler.scale(loss).backward()
    return loss.item()


def optimizer_step(s: Setup, loss: float, stop_requested: bool) -> tuple[float, bool]:
    """Agree on loss, NaN and stop across ranks, then step optimizer, scaler, EMA and schedule."""
    loss_sum, bad, stop = distributed.all_reduce_sum(
        [loss, float(not math.isfinite(loss)), float(stop_requested)], s.device)
    if bad:
        raise TrainingError(f"loss is not finite (NaN/inf) on {int(bad)} rank(s); "
                            "nothing saved from this epoch; lower optim.lr or use train.precision=fp32")
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    if s.ema is not None:
        s.ema.update_parameters(s.net)
    if not isinstance(s.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        s.scheduler.step()
    return loss_sum / s.env.world_size, stop > 0


def train_step(s: Setup, micro_batches, stop_requested: bool = False) -> tuple[float, bool]:
    """One optimizer step over ``accum`` full micro-batches, each computed as it arrives.

    ``micro_batches`` is any iterable (the loader itself in :func:`train_epoch`): only one micro-batch
    is held at a time, so the effective batch costs no memory beyond the micro-batch's.
    Returns the step's mean tile loss over all ranks and whether any rank asked to stop.
    """
    total, count = 0.0, 0
    for batch in micro_batches:
        if len(batch["key"]) != s.cfg.train.micro_batch_size or count == s.accum:
            raise TrainingError(f"train_step: expected {s.accum} micro-batches of {s.cfg.train.micro_batch_size} "
                                f"tiles, got a batch of {len(batch['key'])} after {count}")
        count += 1
        total += micro_step(s, batch, last=count == s.accum)
    if count != s.accum:
        raise TrainingError(f"train_step: the loader ended after {count} of {s.accum} micro-batches")
    return optimizer_step(s, total, stop_requested)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # this process's own RSS high-water mark; ru_maxrss would include its parent's peak (kept across exec)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


class StopFlag:
    """Set by SIGUSR2/SIGTERM (preemption, time limit); ranks agree on it at each step."""

    def __init__(self):
        self.set = False

    def install(self):
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some launchers)
                pass

    def _handler(self, signum, frame):
        self.set = True


def _fault_injection(step: int) -> None:
    """Tests only: SIGKILL rank 0 once at a given global step (DIST_LC_FAULT_KILL_AT_STEP)."""
    at, marker = os.environ.get("DIST_LC_FAULT_KILL_AT_STEP"), os.environ.get("DIST_LC_FAULT_MARKER")
    if at and marker and step == int(at) and not Path(marker).exists():
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


def train_epoch(s: Setup, epoch: int, step: int, stop: StopFlag, progress) -> dict:
    t = s.cfg.train
    loader, steps = train_loader(s.manifest, s.train_folds, epoch=epoch, seed=t.seed, world=s.env.world_size,
                                 rank=s.env.rank, micro=t.micro_batch_size, accum=s.accum,
                                 workers=s.cfg.data.workers, augment_on=s.cfg.data.augment, crop=s.cfg.data.crop,
                                 shuffle_buffer=s.cfg.data.shuffle_buffer, pin=s.device.type == "cuda")
    s.model.train()
    losses, waited, start = [], [0.0], time.perf_counter()
    batches = timed(loader, waited)
    try:
        for _ in range(steps):
            loss, stopping = train_step(s, itertools.islice(batches, s.accum), stop.set)
            step += 1
            losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if stopping:
                return {"stopped": True, "step": step}
            _fault_injection(step)
    finally:
        batches.close()   # shuts the loader's workers down now, also on an error
    elapsed = time.perf_counter() - start
    return {"stopped": False, "step": step, "train_loss": float(np.mean(losses)), "epoch_time_s": elapsed,
            "images_per_s": steps * t.batch_size / elapsed, "data_wait_frac": waited[0] / elapsed}


def timed(loader, waited: list):
    """The loader's batches, adding the seconds spent waiting for each to ``waited[0]``."""
    it = iter(loader)
    while True:
        tick = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - tick
        yield batch


@torch.no_grad()
def predict_batches(s: Setup, net, loader, keep: int = 0):
    """Yields (batch, logits, proportions) for each batch, through the plain module (no DDP collective)."""
    net.eval()
    for batch in loader:
        b = to_device(s, batch)
        with autocast(s):
            logits = net(b["image"])
        yield batch, b, logits, tile_proportions(logits, net.logit_bias)


def validate(s: Setup, net) -> tuple[dict, dict]:
    """Validation loss and score over the held-out fold, every tile once across ranks."""
    loader = eval_loader(s.manifest, "train", s.val_folds, world=s.env.world_size, rank=s.env.rank,
                         batch_size=s.cfg.train.micro_batch_size, workers=s.cfg.data.workers)
    kl_sum = loss_sum = n = skipped = 0.0
    shown = {"key": [], "image": [], "mask": [], "pred": []}
    for batch, b, logits, props in predict_batches(s, net, loader):
        loss_sum += s.loss_fn(logits, b["mask"], b["props"]).sum().item()
        truth = batch["props"].double().numpy()
        scored = truth[:, 2:].sum(axis=1) > 0  # a tile of clouds/no_data only has no score
        kl_sum += float(kl_per_sample(truth[scored], props.double().cpu().numpy()[scored]).sum())
        n += float(scored.sum())
        skipped += float((~scored).sum())
        room = s.cfg.train.plot_tiles - len(shown["key"])
        if room > 0:
            shown["key"] += batch["key"][:room]
            shown["image"] += list(batch["image"][:room].numpy())
            shown["mask"] += list(batch["mask"][:room].numpy())
            shown["pred"] += list(logits[:room].argmax(1).cpu().numpy())
    kl_sum, loss_sum, n, tiles = distributed.all_reduce_sum([kl_sum, loss_sum, n, n + skipped], s.device)
    return {"val_loss": loss_sum / max(tiles, 1), "val_kl": kl_sum / max(n, 1), "val_tiles": int(tiles)}, shown


# ----------------------------------------------------------------------------- checkpoints

def state_dict(s: Setup, epoch: int, step: int, best: float) -> dict:
    return {"model": ckpt.strip_compile_prefix(s.net.state_dict()),
            "ema": s.ema.module.state_dict() if s.ema is not None else None,
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "epoch": epoch, "step": step, "best_val_kl": best,
            "rng": ckpt.rng_state(), "config": to_dict(s.cfg), "manifest_sha256": s.manifest.sha256}


def resume(s: Setup, path: Path) -> tuple[int, int, float]:
    state = ckpt.load(path)
    if state["manifest_sha256"] != s.manifest.sha256:
        raise InputError(f"{path}: trained on other shards than {s.manifest.root}; use a fresh --run-dir")
    if normalized(state["config"])["model"] != to_dict(s.cfg)["model"]:
        raise InputError(f"{path}: written with another model config; use a fresh --run-dir")
    s.net.load_state_dict(state["model"])
    if s.ema is not None and state["ema"] is not None:
        s.ema.module.load_state_dict(state["ema"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    s.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    return state["epoch"], state["step"], state["best_val_kl"]


# ----------------------------------------------------------------------------- the run

def should_stop_for_time(s: Setup, started: float, epoch_times: list) -> bool:
    """Rank 0's clock decides: stop if another epoch (the longest so far, validation included)
    would not fit in train.time_limit."""
    limit = s.cfg.train.time_limit
    if not limit:
        return False
    late = time.monotonic() - started + max(epoch_times) > limit * 60
    return bool(distributed.broadcast_object(late))


def unsettled_batchnorm(cfg: Config, updates: int) -> float:
    """The share of BatchNorm running statistics still at their initial (0, 1) after ``updates``
    training forward passes: (1 − momentum)^updates; 0 without BatchNorm. With train.ema_decay the
    evaluated model's buffers are averaged too, so its share is, if anything, larger."""
    if cfg.model.norm != "batch":
        return 0.0
    return (1.0 - cfg.model.bn_momentum) ** updates


def warn_if_batchnorm_unsettled(cfg: Config, runlog: RunLog, step: int, accum: int) -> None:
    left = unsettled_batchnorm(cfg, step * accum)
    if left > 0.05:
        runlog.info(f"warning: after {step * accum} training forward passes, {left:.0%} of the BatchNorm "
                    f"running statistics are still their initial values (model.bn_momentum "
                    f"{cfg.model.bn_momentum:g}); validation and prediction use them. Train longer or "
                    f"raise model.bn_momentum (0.1 settles within about 30 passes)")


def train(cfg: Config, run_dir) -> dict:
    """Train (or resume) in ``run_dir``; returns the final epoch's metrics on every rank."""
    started = time.monotonic()
    run_dir = Path(run_dir)
    s = build_setup(cfg)
    main = s.env.is_main
    last_path, best_path = run_dir / "checkpoints" / ckpt.LAST, run_dir / "checkpoints" / ckpt.BEST
    epoch, step, best = 0, 0, math.inf
    if last_path.exists():
        epoch, step, best = resume(s, last_path)
    runlog = RunLog(run_dir, enabled=main, resume_epoch=epoch)
    if main:
        save_config(cfg, run_dir / "config.yaml")
        runlog.info(f"{s.env.source}: {s.env.world_size} rank(s) on {s.device}, precision "
                    f"{s.dtype or 'fp32'}, {s.steps_per_epoch} steps/epoch of {cfg.train.batch_size} tiles "
                    f"({cfg.train.micro_batch_size} × {s.accum} accumulation × {s.env.world_size} ranks)"
                    + (f", resuming after epoch {epoch}" if epoch else ""))
    stop = StopFlag()
    stop.install()
    epoch_times, row, stopped = [], {}, False
    while epoch < cfg.train.epochs:
        epoch_started = time.monotonic()
        with runlog.progress(s.steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}") as bar:
            result = train_epoch(s, epoch, step, stop, bar)
        step = result["step"]
        if result["stopped"]:
            stopped = True
            runlog.info(f"stop requested during epoch {epoch + 1}; last.pt holds epoch {epoch}")
            break
        epoch += 1
        out_of_time = should_stop_for_time(s, started, epoch_times + [time.monotonic() - epoch_started])
        val, shown = {}, None
        if s.val_folds is not None and (epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs or out_of_time):
            val, shown = validate(s, s.ema.module if s.ema is not None else s.net)
        score = val.get("val_kl", result["train_loss"] if s.val_folds is None else None)
        if score is not None and isinstance(s.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            s.scheduler.step(score)
        row = {"epoch": epoch, "step": step, "train_loss": result["train_loss"], **val,
               "lr": s.optimizer.param_groups[0]["lr"], "epoch_time_s": result["epoch_time_s"],
               "images_per_s": result["images_per_s"],
               "data_wait_frac": result["data_wait_frac"], "peak_mem_mb": peak_memory_mb(s.device)}
        improved = score is not None and score < best
        best = min(best, score) if score is not None else best
        if main:
            state = state_dict(s, epoch, step, best)
            ckpt.save_atomic(state, last_path)
            if improved:
                ckpt.save_atomic(state, best_path)
            runlog.epoch(row, best=improved)
            if shown and cfg.train.plot_every and epoch % cfg.train.plot_every == 0:
                runlog.plot(epoch, shown)
        epoch_times.append(time.monotonic() - epoch_started)
        if out_of_time:
            runlog.info(f"train.time_limit {cfg.train.time_limit} min: stopping after epoch {epoch}")
            break
    if not stopped:  # a preempted run resumes; its statistics are judged when it ends
        warn_if_batchnorm_unsettled(cfg, runlog, step, s.accum)
    if dist.is_initialized():
        dist.barrier()
    runlog.close()
    return row


def default_run_dir(config_path) -> Path:
    """``runs/<recipe>-<id>``, the same on every rank: torchrun's run id, the Slurm job id, or the time."""
    run_id = (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
              or time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{Path(config_path or 'default').stem}-{run_id}"


def run(args) -> int:
    """CLI entry: ``dist-lc train --config X.yaml [--set k=v ...] [--run-dir DIR]``."""
    from .config import load_config

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.run_dir or default_run_dir(args.config))
    try:
        train(cfg, run_dir)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    return 0
