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


RED, GREEN, NIR = 0, 1, 3   # band order of the challenge tiles: R, G, B, NIR
INDEX_CHANNELS = 2         # NDVI, NDWI


def spectral_indices(image: torch.Tensor) -> torch.Tensor:
    """NDVI = (NIR−R)/(NIR+R) and NDWI = (G−NIR)/(G+NIR) per pixel, (B, 2, H, W), 0 where both bands are 0."""
    r, g, nir = image[:, RED:RED + 1], image[:, GREEN:GREEN + 1], image[:, NIR:NIR + 1]
    return torch.cat([(nir - r) / (nir + r).clamp_min(1.0), (g - nir) / (g + nir).clamp_min(1.0)], dim=1)


class LandCoverNet(nn.Module):
    def __init__(self, unet: nn.Module, mean, std, logit_bias=None, indices: bool = False):
        super().__init__()
        self.unet = unet
        self.indices = indices
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        bias = torch.zeros(NUM_CLASSES) if logit_bias is None else torch.as_tensor(logit_bias, dtype=torch.float32)
        self.register_buffer("logit_bias", bias.view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Raw per-pixel logits (the training target); ``image`` in sensor units."""
        x = (image - self.mean) / self.std
        if self.indices:
            layout = torch.channels_last if image.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            x = torch.cat([x, spectral_indices(image.float())], dim=1).contiguous(memory_format=layout)
        return self.unet(x)


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
    """The U-Net of ``model_cfg`` behind the input transform (``indices``: 2 more input channels)."""
    cfg = dict(model_cfg)
    indices = bool(cfg.pop("indices", False))
    if indices:
        cfg["in_channels"] = cfg.get("in_channels", len(mean)) + INDEX_CHANNELS
    return LandCoverNet(build_model(cfg), mean, std, logit_bias, indices)


def tile_proportions(logits: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """Mean pixel softmax per tile, classes 0 and 1 removed, renormalised: (B, 10) float32."""
    probs = F.softmax(logits.float() + logit_bias, dim=1).mean(dim=(2, 3))
    probs[:, list(IGNORED_CLASSES)] = 0.0
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
