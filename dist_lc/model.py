"""The model as trained and predicted: :class:`LandCoverNet` = input normalisation (+ NDVI/NDWI)
→ the Preligens benchmark U-Net (:class:`UNet`) → per-pixel logits, plus the prediction-time logit
bias; :func:`tile_proportions` turns logits into the tile's class proportions (the one place).

The U-Net, layer for layer, in PyTorch.

The original is Keras (preligens-lab/challenge-ens, ``framework/model.py``, ``UNet``, itself adapted
from keras-unet's ``satellite_unet``). With ``f = filters`` (64) and ``u = upconv_filters`` (96)::

    input (4) ─ Conv3x3(f) ReLU                         (no normalisation before the first conv)
    c1 = Block(f);  x = Block(f);  MaxPool2x2
    num_layers times:   x = Block(f); x = Block(f); skip_i = x; x = Block(f); MaxPool2x2
    bottom:             x = Block(f); x = Block(f); x = UpBlock(f)
    for skip_i reversed: x = concat(x, skip_i); x = Block(u); x = Block(f); x = UpBlock(f)
    x = concat(x, c1);  x = Block(u); x = Block(f)
    Conv1x1(num_classes)                                  (logits: the softmax lives in the loss)

    Block(n)   = Norm → Conv3x3(n, same padding) → ReLU
    UpBlock(n) = Norm → ConvTranspose3x3(n, stride 2, Keras 'same' + output_padding 1) → ReLU

The input is halved ``num_layers + 1`` times, so H and W must be multiples of ``2 ** (num_layers + 1)``.
With num_layers=2, filters=64, upconv_filters=96, 4 input bands and 10 classes it has 984,234
trainable parameters, as the Keras model.

Parity details: Keras ``BatchNormalization()`` defaults (momentum 0.99, epsilon 1e-3) are PyTorch
``momentum=0.01, eps=1e-3``; ``init="he_normal"`` reproduces Keras' initialisers (truncated-normal
He for the 3×3 convolutions, Glorot-uniform for the transposed and the final 1×1 convolutions, zero
biases); the transposed convolution keeps TensorFlow's 'same' alignment (see :class:`UpConv`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lc_common.tiles import IGNORED_CLASSES, MAX_PIXEL_VALUE, NUM_CLASSES

from .config import DataConfig, ModelConfig, dispatch_table, pick

# TensorFlow's truncated_normal initialisers divide the stddev by the std of a unit normal cut at ±2.
_TRUNC_STD = 0.87962566103423978


def _batch_norm(channels: int, momentum: float, eps: float, groups: int) -> nn.Module:
    return nn.BatchNorm2d(channels, momentum=momentum, eps=eps)


def _group_norm(channels: int, momentum: float, eps: float, groups: int) -> nn.Module:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by groups={groups}")
    return nn.GroupNorm(groups, channels, eps=eps)


NORMS = dispatch_table(ModelConfig, "norm", {"batch": _batch_norm, "group": _group_norm})


def _norm(kind: str, channels: int, momentum: float, eps: float, groups: int) -> nn.Module:
    return pick(NORMS, kind, "model.norm")(channels, momentum, eps, groups)


class UpConv(nn.Module):
    """Keras ``Conv2DTranspose(k=3, strides=2, padding='same', output_padding=1)``: H×W → 2H×2W.

    TensorFlow places input pixel i at output rows 2i, 2i+1, 2i+2 (the implied forward convolution
    pads only at the bottom/right); PyTorch's ``padding=1, output_padding=1`` would place it one row
    earlier. The same output is an unpadded transposed convolution (2H+1 rows) cropped to its first
    2H rows; computed here, faster, as a transposed convolution with the 3×3 kernel zero-padded to 4×4
    at the top/left and ``padding=1``, which yields exactly 2H rows (oneDNN has a fast path for
    kernel 4 stride 2; benchmarks/upconv.py compares the two forms).
    The parameters stay those of a 3×3 ``ConvTranspose2d`` (checkpoints and parameter count unchanged).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = F.pad(self.conv.weight, (1, 0, 1, 0))
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


def _keras_init(net: nn.Module) -> None:
    net._init_keras()


INITS = dispatch_table(ModelConfig, "init", {"he_normal": _keras_init, "torch": lambda net: None})   # torch's own


class UNet(nn.Module):
    """The benchmark U-Net; ``forward(x: N×C×H×W float) -> logits N×num_classes×H×W``."""

    def __init__(self, in_channels: int = 4, num_classes: int = 10, num_layers: int = 2,
                 filters: int = 64, upconv_filters: int = 96, norm: str = "batch",
                 bn_momentum: float = 0.01, bn_eps: float = 1e-3, groups: int = 8,
                 init: str = "he_normal"):
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.num_layers = num_layers
        self._norm_args = (norm, bn_momentum, bn_eps, groups)
        f, u = filters, upconv_filters

        self.stem = nn.Sequential(nn.Conv2d(in_channels, f, 3, padding=1), nn.ReLU(inplace=True))
        self.c1 = self._block(f, f)
        self.stem_out = self._block(f, f)
        self.down = nn.ModuleList(
            nn.ModuleList([nn.Sequential(self._block(f, f), self._block(f, f)), self._block(f, f)])
            for _ in range(num_layers)
        )
        self.bottom = nn.Sequential(self._block(f, f), self._block(f, f), self._up_block(f, f))
        self.up = nn.ModuleList(
            nn.Sequential(self._block(2 * f, u), self._block(u, f), self._up_block(f, f))
            for _ in range(num_layers)
        )
        self.head = nn.Sequential(self._block(2 * f, u), self._block(u, f))
        self.classifier = nn.Conv2d(f, num_classes, 1)
        self.pool = nn.MaxPool2d(2, 2)
        pick(INITS, init, "model.init")(self)

    def _block(self, cin: int, cout: int) -> nn.Sequential:
        """Norm → Conv3x3 (same padding) → ReLU."""
        return nn.Sequential(_norm(self._norm_args[0], cin, *self._norm_args[1:]),
                             nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))

    def _up_block(self, cin: int, cout: int) -> nn.Sequential:
        """Norm → ConvTranspose3x3 stride 2 (Keras 'same') → ReLU."""
        return nn.Sequential(_norm(self._norm_args[0], cin, *self._norm_args[1:]),
                             UpConv(cin, cout), nn.ReLU(inplace=True))

    @torch.no_grad()
    def _init_keras(self) -> None:
        """Keras initialisers: he_normal (truncated) for 3×3 convs, glorot_uniform elsewhere, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                fan_in = m.weight[0].numel()
                std = math.sqrt(2.0 / fan_in) / _TRUNC_STD
                nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight)
            else:
                continue
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** (self.num_layers + 1)
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"UNet(num_layers={self.num_layers}) needs H and W divisible by {multiple}, "
                             f"got {tuple(x.shape[-2:])}")
        c1 = self.c1(self.stem(x))
        x = self.pool(self.stem_out(c1))
        skips = []
        for pair, last in self.down:
            x = pair(x)
            skips.append(x)
            x = self.pool(last(x))
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([x, skip], dim=1))
        x = self.head(torch.cat([x, c1], dim=1))
        return self.classifier(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- around the U-Net

RED, GREEN, NIR = 0, 1, 3   # band order of the challenge tiles: R, G, B, NIR
INDEX_CHANNELS = 2         # NDVI, NDWI
BANDS = 4


def spectral_indices(image: torch.Tensor) -> torch.Tensor:
    """NDVI = (NIR−R)/(NIR+R) and NDWI = (G−NIR)/(G+NIR) per pixel, (B, 2, H, W), 0 where both bands are 0."""
    r, g, nir = image[:, RED:RED + 1], image[:, GREEN:GREEN + 1], image[:, NIR:NIR + 1]
    return torch.cat([(nir - r) / (nir + r).clamp_min(1.0), (g - nir) / (g + nir).clamp_min(1.0)], dim=1)


class LandCoverNet(nn.Module):
    """Sensor units in, logits out. Normalisation statistics and the logit bias are buffers, so a
    checkpoint carries everything ``predict`` needs."""

    def __init__(self, unet: nn.Module, mean, std, logit_bias=None, indices: bool = False):
        super().__init__()
        self.unet = unet
        self.indices = indices
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        bias = torch.zeros(NUM_CLASSES) if logit_bias is None else torch.as_tensor(logit_bias, dtype=torch.float32)
        self.register_buffer("logit_bias", bias.view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Raw per-pixel logits (the training target); ``image`` in sensor units, any dtype."""
        x = (image.float() - self.mean) / self.std
        if self.indices:
            layout = torch.channels_last if image.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            x = torch.cat([x, spectral_indices(image.float())], dim=1).contiguous(memory_format=layout)
        return self.unet(x)


NORMALISERS = dispatch_table(DataConfig, "normalize", {
    "max": lambda manifest: ([0.0] * BANDS, [float(MAX_PIXEL_VALUE)] * BANDS),
    "manifest": lambda manifest: (manifest.channel_mean.tolist(), manifest.channel_std.tolist()),
})


def normalisation_stats(mode: str, manifest=None):
    """(mean, std) per band that the network subtracts and divides by."""
    return pick(NORMALISERS, mode, "data.normalize")(manifest)


def prior_bias(class_weights: torch.Tensor) -> torch.Tensor:
    """−log w_c: undoes the tilt that a class-weighted cross-entropy gives the softmax."""
    bias = torch.zeros(NUM_CLASSES)
    used = class_weights > 0
    bias[used] = -torch.log(class_weights[used] / class_weights[used].mean())
    return bias


def build_network(model: ModelConfig, mean=(0.0,) * BANDS, std=(1.0,) * BANDS, logit_bias=None) -> LandCoverNet:
    """The U-Net of the config's model section behind the input transform (``indices``: 2 more inputs)."""
    unet = UNet(in_channels=BANDS + (INDEX_CHANNELS if model.indices else 0), num_classes=NUM_CLASSES,
                num_layers=model.num_layers, filters=model.filters, upconv_filters=model.upconv_filters,
                norm=model.norm, bn_momentum=model.bn_momentum, bn_eps=model.bn_eps, groups=model.groups,
                init=model.init)
    return LandCoverNet(unet, mean, std, logit_bias, model.indices)


def pixel_probabilities(logits: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """Per-pixel softmax (B, 10, H, W) float32, with the prediction-time logit bias."""
    return F.softmax(logits.float() + logit_bias, dim=1)


def drop_unscored(mean_probs: torch.Tensor) -> torch.Tensor:
    """Mean probabilities (B, 10) → proportions: classes 0 and 1 removed, the rest renormalised."""
    probs = mean_probs.clone()
    probs[:, list(IGNORED_CLASSES)] = 0.0
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


def tile_proportions(logits: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """Mean pixel softmax per tile, classes 0 and 1 removed, renormalised: (B, 10) float32."""
    return drop_unscored(pixel_probabilities(logits, logit_bias).mean(dim=(2, 3)))
