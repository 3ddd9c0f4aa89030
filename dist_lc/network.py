"""The model as trained and predicted: input normalisation + U-Net + the prediction-time logit bias.

Normalisation statistics and the logit bias are buffers, so a checkpoint carries everything
``predict`` needs; tile proportions are computed in one place (:func:`tile_proportions`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shard_tools.format import IGNORED_CLASSES, MAX_PIXEL_VALUE, NUM_CLASSES

from .model import build_model


class LandCoverNet(nn.Module):
    def __init__(self, unet: nn.Module, mean, std, logit_bias=None):
        super().__init__()
        self.unet = unet
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        bias = torch.zeros(NUM_CLASSES) if logit_bias is None else torch.as_tensor(logit_bias, dtype=torch.float32)
        self.register_buffer("logit_bias", bias.view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Raw per-pixel logits (the training target); ``image`` in sensor units."""
        return self.unet((image - self.mean) / self.std)


def normalisation_stats(mode: str, manifest=None):
    if mode == "max":
        return [0.0] * 4, [float(MAX_PIXEL_VALUE)] * 4
    return manifest.channel_mean.tolist(), manifest.channel_std.tolist()


def prior_bias(class_weights: torch.Tensor) -> torch.Tensor:
    """−log w_c: undoes the tilt that a class-weighted cross-entropy gives the softmax."""
    bias = torch.zeros(NUM_CLASSES)
    used = class_weights > 0
    bias[used] = -torch.log(class_weights[used] / class_weights[used].mean())
    return bias


def build_network(model_cfg: dict, mean, std, logit_bias=None) -> LandCoverNet:
    return LandCoverNet(build_model(model_cfg), mean, std, logit_bias)


def tile_proportions(logits: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """Mean pixel softmax per tile, classes 0 and 1 removed, renormalised: (B, 10) float32."""
    probs = F.softmax(logits.float() + logit_bias, dim=1).mean(dim=(2, 3))
    probs[:, list(IGNORED_CLASSES)] = 0.0
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
