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
        self._tensors = None   # (net, averaged floats, current floats, averaged others, current others)

    def weight(self) -> float:
        """The share the averaged weights keep at the next update: ``min(decay, (1+n)/(10+n))`` after
        n updates, a warm-up so that the random initial weights do not linger in short runs
        (0.98**15 of them would remain after 15 plain steps)."""
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        _, avg, cur, avg_other, cur_other = self._pairs(net)
        if avg and self.updates:
            torch._foreach_lerp_(avg, cur, 1.0 - self.weight())
        elif avg:
            torch._foreach_copy_(avg, cur)
        if avg_other:
            torch._foreach_copy_(avg_other, cur_other)
        self.updates += 1

    def _pairs(self, net: nn.Module):
        """The averaged and current tensors, split into floating-point ones and the rest; listed once per
        network (training, DDP and checkpoint loads update them in place, so the lists stay valid from
        step to step; :meth:`load` lists them again)."""
        if self._tensors is None or self._tensors[0] is not net:
            pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                             [*net.parameters(), *net.buffers()]))
            floats = [p for p in pairs if p[0].is_floating_point()]
            others = [p for p in pairs if not p[0].is_floating_point()]
            self._tensors = (net, [a for a, _ in floats], [c for _, c in floats],
                             [a for a, _ in others], [c for _, c in others])
        return self._tensors

    def load(self, module_state: dict, updates: int) -> None:
        self.module.load_state_dict(module_state)
        self.updates, self._tensors = updates, None
