"""The optimizer and the learning-rate schedule of a run."""
from __future__ import annotations

import math

import torch

from .config import Config


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


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Plateau is stepped once per epoch with the validation score; the others once per step."""
    s = cfg.schedule
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.factor,
                                                          patience=s.patience, min_lr=s.min_lr)
    if s.name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    shape = WarmupCosine(s.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch,
                         s.min_lr / cfg.optim.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


def is_per_epoch(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
