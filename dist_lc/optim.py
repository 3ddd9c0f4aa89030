"""The optimizer and the learning-rate schedule of a run."""
from __future__ import annotations

import math

import torch

from .config import Config, OptimConfig, ScheduleConfig, dispatch_table, pick

# one constructor per optim.name; momentum only where the optimizer has it
OPTIMIZERS = dispatch_table(OptimConfig, "name", {
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay),
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay),
    "rmsprop": lambda params, o: torch.optim.RMSprop(params, lr=o.lr, weight_decay=o.weight_decay,
                                                     momentum=o.momentum),
    "adagrad": lambda params, o: torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay),
    "sgd": lambda params, o: torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum),
})


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    return pick(OPTIMIZERS, cfg.optim.name, "optim.name")(params, cfg.optim)


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
    shape = WarmupCosine(s.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch,
                         s.min_lr / cfg.optim.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


SCHEDULES = dispatch_table(ScheduleConfig, "name", {"plateau": _plateau, "constant": _constant, "cosine": _cosine})


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Plateau is stepped once per epoch with the validation score; the others once per step."""
    return pick(SCHEDULES, cfg.schedule.name, "schedule.name")(cfg, optimizer, steps_per_epoch)


def is_per_epoch(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
