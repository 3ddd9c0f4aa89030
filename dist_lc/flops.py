"""FLOPs of the network a model config builds: the one count the benchmarks' MFU figures divide by.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` on :func:`dist_lc.model.build_network`
(convolutions, transposed convolutions, matrix products; the input normalisation, BatchNorm,
ReLU and pooling are elementwise and not counted, as usual for MFU). One image, batch 1: the
count is linear in the batch.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig
from .model import BANDS, build_network


def _image(size: int) -> torch.Tensor:
    # the raw bands, as the network takes them (model.indices derives its extra channels itself)
    return torch.zeros(1, BANDS, size, size)


def forward_flops(model: ModelConfig, size: int) -> int:
    """FLOPs of one forward pass of one ``size``×``size`` image."""
    net = build_network(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(_image(size))
    return int(counter.get_total_flops())


def training_flops(model: ModelConfig, size: int, counted: bool = False) -> int:
    """FLOPs of one training image (forward + backward; the optimizer's elementwise update is not counted).

    Default: the usual 3 × forward (the backward computes two products per forward one: the
    gradients of the activations and of the weights). ``counted``: forward + backward as
    FlopCounterMode counts them; slightly under 3 × forward, because the first convolution needs
    no gradient of its input (the image).
    """
    if not counted:
        return 3 * forward_flops(model, size)
    net = build_network(model)
    with FlopCounterMode(display=False) as counter:
        net(_image(size)).sum().backward()
    return int(counter.get_total_flops())
