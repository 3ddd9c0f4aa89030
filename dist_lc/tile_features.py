"""Cheap per-tile features for the second stage (:mod:`dist_lc.second_stage`), from the pixels alone.

Per tile, on every 4th pixel of every 4th row (4,096 of 65,536): the bands as ``log(1 + DN)``,
NDVI = (NIR−R)/(NIR+R) and NDWI = (G−NIR)/(G+NIR); the tile's features are their means and standard
deviations, the 10/50/90 % quantiles of NDVI and NDWI, and a histogram of pixel types: the share of
the tile's pixels (every 8th of every 8th row) nearest to each of ``K`` k-means centres fitted,
without labels, on 256 pixels of each of at most 1,024 training tiles. No label enters them, so they are the same
whichever fold is held out. One pass over the tiles; what is kept between the passes' halves is
1,024 pixels per tile in float16 (12 KB: 290 MB for the challenge's 23,534 tiles).
"""
from __future__ import annotations

import numpy as np

from lc_common.tiles import BAND_NAMES

STRIDE = 4
K = 16
SAMPLE_PER_TILE = 256      # pixels per tile that the k-means fit draws
KMEANS_TILES = 1024        # tiles whose samples the fit uses, at most: its memory and time stay flat
KMEANS_ITERATIONS = 25
BANDS = BAND_NAMES
PIXEL_NAMES = (*(f"log_{b}" for b in BANDS), "ndvi", "ndwi")


def pixel_features(image: np.ndarray) -> np.ndarray:
    """(n, 6) float32 features of a tile's sampled pixels, from an (H, W, 4) uint16 image."""
    x = image[::STRIDE, ::STRIDE].reshape(-1, 4).astype(np.float32)
    r, g, _, nir = x.T
    ndvi = (nir - r) / np.maximum(nir + r, 1.0)
    ndwi = (g - nir) / np.maximum(g + nir, 1.0)
    return np.column_stack([np.log1p(x), ndvi, ndwi]).astype(np.float32)


def _nearest(z: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distances = (z * z).sum(1, keepdims=True) - 2 * z @ centres.T + (centres * centres).sum(1)
    return distances.argmin(axis=1)


class PixelTypes:
    """k-means centres of standardised pixel features (fitted on a sample, seeded: reproducible)."""

    def __init__(self, sample: np.ndarray, k: int = K, seed: int = 0):
        self.mean, self.std = sample.mean(axis=0), sample.std(axis=0) + 1e-6
        z = (sample - self.mean) / self.std
        rng = np.random.default_rng(seed)
        centres = z[rng.choice(len(z), size=min(k, len(z)), replace=False)]
        for _ in range(KMEANS_ITERATIONS):
            nearest = _nearest(z, centres)
            centres = np.stack([z[nearest == j].mean(axis=0) if (nearest == j).any() else centres[j]
                                for j in range(len(centres))])
        self.centres = centres

    def histogram(self, pixels: np.ndarray) -> np.ndarray:
        nearest = _nearest((pixels - self.mean) / self.std, self.centres)
        return np.bincount(nearest, minlength=len(self.centres)) / len(nearest)


def summary(pixels: np.ndarray) -> np.ndarray:
    """Means, standard deviations and the NDVI/NDWI quantiles of a tile's pixel features (18)."""
    quantiles = np.percentile(pixels[:, 4:6], [10, 50, 90], axis=0).T.ravel()
    return np.concatenate([pixels.mean(axis=0), pixels.std(axis=0), quantiles])


def names(k: int = K) -> list[str]:
    return ([f"mean_{n}" for n in PIXEL_NAMES] + [f"std_{n}" for n in PIXEL_NAMES]
            + [f"{i}_q{q}" for i in ("ndvi", "ndwi") for q in (10, 50, 90)] + [f"type_{j}" for j in range(k)])


def features(tiles, k: int = K, seed: int = 0) -> tuple[list, np.ndarray]:
    """(keys, (tiles, 18 + k) features) of ``tiles``, an iterable of ``(key, (H, W, 4) uint16 image,
    whether its pixels may fit the pixel types)``."""
    keys, summaries, kept, sample = [], [], [], []
    rng = np.random.default_rng(seed)
    for key, image, fits in tiles:
        pixels = pixel_features(image)
        keys.append(key)
        summaries.append(summary(pixels))
        kept.append(pixels.reshape(image.shape[0] // STRIDE, image.shape[1] // STRIDE, -1)[::2, ::2]
                    .reshape(-1, pixels.shape[1]).astype(np.float16))
        if fits:
            sample.append(pixels[rng.choice(len(pixels), size=min(SAMPLE_PER_TILE, len(pixels)), replace=False)])
    if not keys:
        return [], np.zeros((0, 18 + k))
    if len(sample) > KMEANS_TILES:
        sample = [sample[i] for i in np.sort(rng.choice(len(sample), size=KMEANS_TILES, replace=False))]
    types = PixelTypes(np.concatenate(sample) if sample else np.concatenate(kept).astype(np.float32), k, seed)
    histograms = [types.histogram(p.astype(np.float32)) for p in kept]
    return keys, np.column_stack([np.stack(summaries), np.stack(histograms)])
