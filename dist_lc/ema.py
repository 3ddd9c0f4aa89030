"""The exponential moving average of the network's weights (``train.ema_decay``), evaluated and saved.

Not torch's ``AveragedModel``: with a custom average it reads its update count back from the device
for every tensor, two host waits per parameter per step, and the count is not in the averaged
module's state dict, so a resumed run restarted its average from the current weights. Here the
count is a host integer, saved with the checkpoint, and an update is one foreach pass.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``module``: a copy of the network whose floating-point parameters and buffers (BatchNorm's
    running statistics too) follow the network's after each optimizer step; integer buffers are
    copied. The first update copies the weights, the n-th after it mixes in ``1 − decay(n)``."""

    def __init__(self, net: nn.Module, decay: float):
        self.module = copy.deepcopy(net)
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, 0

    def weight(self) -> float:
        """The share the averaged weights keep at the next update: ``min(decay, (1+n)/(10+n))`` after
        n updates, a warm-up so that the random initial weights do not linger in short runs
        (0.98**15 of them would remain after 15 plain steps)."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*net.parameters(), *net.buffers()]))
        mixed = [(a, c) for a, c in pairs if a.is_floating_point()] if self.updates else []
        if mixed:
            torch._foreach_lerp_([a for a, _ in mixed], [c for _, c in mixed], 1.0 - self.weight())
        for a, c in pairs:
            if not mixed or not a.is_floating_point():
                a.copy_(c)
        self.updates += 1

    def load(self, module_state: dict, updates: int) -> None:
        self.module.load_state_dict(module_state)
        self.updates = updates
