"""The optimizer and the learning-rate schedule of a run."""
from __future__ import annotations

import math

import torch

from lc_common.errors import InputError

from .config import Config, OptimConfig, ScheduleConfig, dispatch_table, pick

# one constructor per optim.name; momentum only where the optimizer has it
OPTIMIZERS = dispatch_table(OptimConfig, "name", {
    "adam": lambda params, o, **kw: torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **kw),
    "adamw": lambda params, o, **kw: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **kw),
    "rmsprop": lambda params, o, **kw: torch.optim.RMSprop(params, lr=o.lr, weight_decay=o.weight_decay,
                                                           momentum=o.momentum, **kw),
    "adagrad": lambda params, o, **kw: torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay, **kw),
    "sgd": lambda params, o, **kw: torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay,
                                                   momentum=o.momentum, **kw),
})


def build_optimizer(cfg: Config, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    make = pick(OPTIMIZERS, cfg.optim.name, "optim.name")
    return make(params, cfg.optim, **implementation(cfg.optim, device))


def implementation(o: OptimConfig, device: torch.device | None) -> dict:
    """The optimizer's kernels: ``fused`` (one kernel for all parameters: what pays on CUDA, where
    the per-parameter updates were a launch each), ``foreach`` (grouped tensor ops; torch's own
    default where it can) or ``for_loop``. ``auto``: fused on CUDA where this torch has the
    optimizer's fused CUDA kernel, else torch's default."""
    choice = o.implementation
    fusable = o.name in FUSABLE
    if choice == "auto":
        cuda = device is not None and device.type == "cuda"
        return {"fused": True} if fusable and cuda and has_fused_kernel(o.name, "CUDA") else {}
    if choice == "fused":
        if not fusable:
            raise InputError(f"config key 'optim.implementation': fused is not available for optim.name "
                             f"{o.name} (only {', '.join(FUSABLE)})")
        return {"fused": True}
    return {"foreach": choice == "foreach"}


FUSABLE = ("adam", "adamw", "sgd", "adagrad")   # the torch optimizers with a fused kernel


def has_fused_kernel(name: str, dispatch_key: str) -> bool:
    """Whether this torch registers ``name``'s fused kernel for a device (Adagrad's came to CUDA
    releases after Adam's: ``auto`` must not choose what the installed torch lacks)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::_fused_{name}_", dispatch_key)
    except RuntimeError:   # a torch without the operator at all
        return False


class WarmupCosine:
    """lr multiplier: linear warmup over ``warmup`` steps, then a cosine down to ``floor`` at ``total``.

    A callable object rather than a function, so that LambdaLR saves its fields with the scheduler
    state: a run whose length was set from its time budget resumes with the same schedule.
    """

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = int(warmup), max(int(total), 1), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _plateau(cfg: Config, optimizer, steps_per_epoch: int):
    s = cfg.schedule
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.factor,
                                                      patience=s.patience, min_lr=s.min_lr)


def _constant(cfg: Config, optimizer, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _cosine(cfg: Config, optimizer, steps_per_epoch: int):
    s = cfg.schedule
    # a floor above 1 would make the "annealing" raise the rate: a min_lr above optim.lr (a search
    # over optim.lr under a recipe's min_lr) holds the rate at optim.lr instead
    shape = WarmupCosine(s.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch,
                         min(s.min_lr / cfg.optim.lr, 1.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


SCHEDULES = dispatch_table(ScheduleConfig, "name", {"plateau": _plateau, "constant": _constant, "cosine": _cosine})


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Plateau is stepped once per epoch with the validation score; the others once per step."""
    return pick(SCHEDULES, cfg.schedule.name, "schedule.name")(cfg, optimizer, steps_per_epoch)


def is_per_epoch(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
