"""A realistic synthetic dataset in the challenge's folder layout.

    dist-lc synth --out DIR [--train N] [--test N] [--seed S]

Each tile draws a landscape (farmland, bocage, broadleaf or coniferous forest, pasture, town,
lake or coast, mountain) and a class composition around it, then builds a land-cover mask in layers:
water (lakes, coastlines, ponds, meandering rivers), artificial (hamlets and towns, roads),
natural surfaces and snow (high ground), forests (broadleaf/coniferous blobs), and rectilinear field
parcels (cultivated or herbaceous); rare clouds on top; boundaries roughened like the S2GLC labels.

Pixels follow the per-class spectra of ``constants.json`` (estimated from real tiles by
:mod:`dist_lc.synth.derive_constants`) in ``log(DN + offset)``: class mean + a per-tile shift +
a per-patch shift (per parcel for fields, a smooth field elsewhere) + texture (smooth) and sensor
noise (white), with the real covariances of each level; pixels on class boundaries are mixed with
their neighbours; values are clipped to 1..24356.

Every tile is drawn from its own generator seeded by ``(seed, id)``: the output depends on the seed
only, not on the number of workers.
"""
from __future__ import annotations

import csv
import ctypes
import json
import os
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.fft
import tifffile

from lc_common.errors import InputError
from lc_common.resources import usable_cores
from lc_common.tiles import CLASS_NAMES, IMAGE_DTYPE, IMAGE_SHAPE, MASK_DTYPE, MAX_PIXEL_VALUE, NUM_CLASSES, class_proportions

CONSTANTS_PATH = Path(__file__).with_name("constants.json")
SIZE = IMAGE_SHAPE[0]
N_PIXELS = SIZE * SIZE
PAD = 48  # noise fields are drawn on a larger square (the FFT wraps around) and cropped
CLOUDS, ARTIFICIAL, CULTIVATED, BROADLEAF, CONIFEROUS, HERBACEOUS, NATURAL, SNOW, WATER = range(1, 10)
PARCEL_CLASSES = (CULTIVATED, HERBACEOUS)  # their patch-level spectral shift is one per field parcel

# Landscapes: (weight, mean composition, Dirichlet concentration). The weights are fitted so that the
# expected pixel frequencies (after rivers, roads and boundary roughening) match the full training
# set's (constants.json "target_frequencies"); tests/test_synth.py checks the result.
LANDSCAPES = {
    "farmland": (0.345, {CULTIVATED: .64, HERBACEOUS: .17, BROADLEAF: .10, CONIFEROUS: .02,
                         ARTIFICIAL: .045, WATER: .01}, 7.0),
    "bocage": (0.21, {CULTIVATED: .30, HERBACEOUS: .31, BROADLEAF: .28, CONIFEROUS: .06,
                      ARTIFICIAL: .04, WATER: .01}, 9.0),
    "broadleaf_forest": (0.13, {BROADLEAF: .70, CONIFEROUS: .10, HERBACEOUS: .11, CULTIVATED: .06,
                                ARTIFICIAL: .02, WATER: .01}, 7.0),
    "coniferous_forest": (0.06, {CONIFEROUS: .55, BROADLEAF: .18, HERBACEOUS: .17, CULTIVATED: .05,
                                 ARTIFICIAL: .02, WATER: .02, NATURAL: .01}, 7.0),
    "pasture": (0.16, {HERBACEOUS: .62, CULTIVATED: .14, BROADLEAF: .15, CONIFEROUS: .03,
                       ARTIFICIAL: .035, WATER: .01}, 7.0),
    "town": (0.043, {ARTIFICIAL: .45, HERBACEOUS: .19, CULTIVATED: .15, BROADLEAF: .14,
                     CONIFEROUS: .02, WATER: .05}, 8.0),
    "water": (0.017, {WATER: .50, HERBACEOUS: .16, CULTIVATED: .14, BROADLEAF: .11, ARTIFICIAL: .05,
                      NATURAL: .03, CONIFEROUS: .01}, 6.0),
    "mountain": (0.035, {NATURAL: .22, CONIFEROUS: .34, HERBACEOUS: .30, BROADLEAF: .09,
                         ARTIFICIAL: .01, WATER: .04}, 6.0),
}
GOLDEN = (np.sqrt(5) - 1) / 2  # landscape sequence step (see landscape_for)
FLOOR = 0.1         # share of a tile's composition pinned to its landscape's mean
MINOR_ABSENT = 0.3  # chance that a minor class of the landscape is absent from a tile
CLOUD_TILE_PROB = 0.005  # tiles with a cloud; the cloud's size follows the target cloud frequency
SNOW_TILE_PROB = 0.2     # mountain tiles with a snow patch; its size follows the target snow frequency
RIVER_PROB, ROAD_RATE = 0.25, 0.7  # tiles with a river; mean number of roads per tile
PARCEL_SEGMENTS, PARCEL_IDS = 64, 4096  # parcel id = strip * 64 + segment, below 4096 in one field system
PATCH_SCALE = 24.0  # pixels: scale of the smooth patch shifts of the non-parcel classes
JITTER_PROB, DISPLACEMENT = 0.35, 1.6  # boundary roughening: pixel jitter rate, smooth shift (pixels)


# --------------------------------------------------------------------------------------- constants

@dataclass(frozen=True)
class Spectra:
    """Per-class spectral model in y = log(DN + offset): arrays indexed by class."""
    offset: float
    texture_sigma: float
    mean: np.ndarray         # (10, 4)
    chol_tile: np.ndarray    # (10, 4, 4) Cholesky factors of the covariances of each level
    chol_patch: np.ndarray
    chol_texture: np.ndarray
    chol_white: np.ndarray


def _cholesky(cov) -> np.ndarray:
    cov = np.asarray(cov, dtype=np.float64)
    return np.linalg.cholesky(cov + 1e-9 * np.eye(len(cov)))


@lru_cache(maxsize=4)
def load_constants(path: str | None = None) -> dict:
    return json.loads(Path(path or CONSTANTS_PATH).read_text())


def spectra_from(constants: dict) -> Spectra:
    classes = [constants["classes"][name] for name in CLASS_NAMES]

    def chol(key: str) -> np.ndarray:
        return np.stack([_cholesky(c[key]) for c in classes])

    return Spectra(
        offset=float(constants["log_offset"]),
        texture_sigma=float(constants["texture_sigma"]),
        mean=np.array([c["log_mean"] for c in classes]),
        chol_tile=chol("cov_tile"),
        chol_patch=chol("cov_patch").astype(np.float32),   # the pixel levels are rendered in float32
        chol_texture=chol("cov_texture").astype(np.float32),
        chol_white=chol("cov_white").astype(np.float32),
    )


@dataclass(frozen=True)
class RarePatches:
    """Pixel areas of the rare classes, set so that their expected frequency matches the target."""
    cloud_area: int
    snow_area: int


def rare_patches(constants: dict) -> RarePatches:
    target = constants["target_frequencies"]
    mountain_share = _landscape_weights()[list(LANDSCAPES).index("mountain")]
    return RarePatches(
        cloud_area=int(round(target[CLOUDS] / CLOUD_TILE_PROB * N_PIXELS)),
        snow_area=int(round(target[SNOW] / (mountain_share * SNOW_TILE_PROB) * N_PIXELS)),
    )


def _landscape_weights() -> np.ndarray:
    w = np.array([spec[0] for spec in LANDSCAPES.values()])
    return w / w.sum()


# ------------------------------------------------------------------------------------ noise fields

def _fft_size(pad: float) -> int:
    """SIZE plus padding on both sides, rounded up to a multiple of 32 (fast FFT sizes)."""
    return int(np.ceil((SIZE + 2 * pad) / 32) * 32)


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 standard normal draws by the Box–Muller transform of uniform draws.

    A tile takes a normal draw per pixel and band several times over. numpy's own sampler makes
    them one element at a time; the transform is a few whole-array operations (log, sqrt, cos, sin),
    which is faster. The radius comes from a float64 uniform so that the tails are not cut short."""
    count = int(np.prod(shape))
    half = (count + 1) // 2
    radius = np.sqrt(-2.0 * np.log1p(-rng.random(half))).astype(np.float32)
    angle = np.float32(2 * np.pi) * rng.random(half, dtype=np.float32)
    out = np.empty(2 * half, np.float32)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle), out=out[half:])
    return out[:count].reshape(shape)


def _standardised(fields: np.ndarray) -> np.ndarray:
    """The fields (count×SIZE×SIZE, float32), each with zero mean and unit variance, in place when
    they are contiguous (a crop is copied once). The variance is one dot product per field:
    ``np.std`` makes three passes."""
    flat = np.ascontiguousarray(fields).reshape(len(fields), -1)
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.sqrt(np.einsum("ij,ij->i", flat, flat) / flat.shape[1])[:, None] + np.float32(1e-12)
    return flat.reshape(len(fields), SIZE, SIZE)


KEPT_AMPLITUDE = 1e-2  # spectrum bins below this share of the peak amplitude are not drawn


@lru_cache(maxsize=64)
def _spectrum_block(n: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of an n×n half spectrum that a block of ``keep`` frequencies per axis takes, and the
    radial frequency of each of its bins (the same for every field of that size)."""
    rows = np.arange(n) if 2 * keep - 1 >= n else np.r_[0:keep, n - keep + 1:n]
    radius = np.hypot(np.fft.fftfreq(n)[rows, None], np.fft.rfftfreq(n)[None, :keep])
    return rows, radius.astype(np.float32)


def _filtered_noise(rng: np.random.Generator, count: int, n: int, amplitude) -> np.ndarray:
    """``count`` standardised SIZE×SIZE fields of stationary Gaussian noise with the radial amplitude
    spectrum ``amplitude(f)`` (f in cycles per pixel), drawn directly in Fourier space on an n×n
    square (the FFT wraps) and cropped.

    Only the low-frequency block where the amplitude is at least ``KEPT_AMPLITUDE`` of its peak is
    drawn (the rest holds a negligible share of a smooth field's variance) and the inverse FFT skips
    the zero columns and the cropped rows: a field of 50-pixel blobs needs a small share of the bins.
    """
    fx = np.fft.rfftfreq(n)
    keep = max(int(np.count_nonzero(amplitude(fx) >= KEPT_AMPLITUDE * amplitude(0.0))), 2)
    rows, radius = _spectrum_block(n, keep)
    draws = standard_normal(rng, (count, len(rows), keep, 2))
    spectrum = np.zeros((count, n, keep), np.complex64)
    spectrum[:, rows] = draws.view(np.complex64)[..., 0] * amplitude(radius).astype(np.float32)
    pad = (n - SIZE) // 2
    columns = scipy.fft.ifft(spectrum, axis=1)[:, pad:pad + SIZE]
    return _standardised(scipy.fft.irfft(columns, n=n, axis=2)[:, :, pad:pad + SIZE])


def gaussian_kernel(sigma: float, half: int) -> np.ndarray:
    """The unnormalised 1-D Gaussian exp(-x²/2σ²) at x = -half..half."""
    return np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)


SHORT_KERNEL = 1.5  # σ (pixels) up to which a Gaussian field is filtered in space rather than by FFT


def gaussian_fields(rng: np.random.Generator, count: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (correlation exp(-d²/4σ²)).

    A small σ keeps nearly the whole spectrum, so the FFT route would draw every bin: there the
    white noise is convolved in space with the short separable kernel (±4σ) instead."""
    if sigma > SHORT_KERNEL:
        return _filtered_noise(rng, count, _fft_size(3 * sigma),
                               lambda f: np.exp(-2 * (np.pi * sigma * np.asarray(f)) ** 2))
    radius = int(np.ceil(4 * sigma))
    kernel = gaussian_kernel(sigma, radius).astype(np.float32)
    white = standard_normal(rng, (count, SIZE + 2 * radius, SIZE + 2 * radius))
    rows = np.zeros((count, SIZE + 2 * radius, SIZE), np.float32)
    for i, weight in enumerate(kernel):
        rows += weight * white[:, :, i:i + SIZE]
    fields = np.zeros((count, SIZE, SIZE), np.float32)
    for i, weight in enumerate(kernel):
        fields += weight * rows[:, i:i + SIZE]
    return _standardised(fields)


def fractal_fields(rng: np.random.Generator, count: int, scale: float, beta: float = 3.0) -> np.ndarray:
    """Power-law noise flattened below 1/scale: blobs of about ``scale`` pixels with rough edges."""
    return _filtered_noise(rng, count, _fft_size(min(PAD, scale)),
                           lambda f: (1.0 + (np.asarray(f) * scale) ** 2) ** (-beta / 2))


def take_top(field: np.ndarray, free: np.ndarray, n: int) -> np.ndarray:
    """Boolean map of the ``n`` free pixels where ``field`` is largest."""
    chosen = np.zeros(field.shape, bool)
    idx = np.flatnonzero(free)
    n = int(min(max(n, 0), idx.size))
    if n == 0:
        return chosen
    values = field.ravel()[idx]
    top = np.argpartition(values, idx.size - n)[idx.size - n:]
    chosen.ravel()[idx[top]] = True
    return chosen


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as a column and a row, which broadcast to the tile."""
    axis = np.arange(SIZE, dtype=np.float64)
    return axis[:, None], axis[None, :]


# ------------------------------------------------------------------------------------- composition

def landscape_for(seed: int, sid: int) -> str:
    """The landscape of tile ``sid``: a golden-ratio sequence over the weights' cumulative shares, so
    that any run of consecutive ids holds the landscapes in about their weights (few dozen tiles
    already have the target class frequencies) while the order looks random."""
    start = np.random.default_rng([seed, 0]).random()
    u = (start + sid * GOLDEN) % 1.0
    index = np.searchsorted(np.cumsum(_landscape_weights()), u, side="right")
    return list(LANDSCAPES)[min(index, len(LANDSCAPES) - 1)]


def sample_composition(rng: np.random.Generator, landscape: str) -> np.ndarray:
    """The tile's target class proportions (10,) in its landscape.

    A Dirichlet draw around the landscape's mean, mixed with a ``FLOOR`` share of the mean itself;
    a minor class (mean share under 5 %) is left out of a tile with probability ``MINOR_ABSENT``.
    """
    _, mean_share, concentration = LANDSCAPES[landscape]
    mean = np.zeros(NUM_CLASSES)
    for c, share in mean_share.items():
        mean[c] = share
    mean /= mean.sum()
    present = (mean >= 0.05) | ((mean > 0) & (rng.random(NUM_CLASSES) >= MINOR_ABSENT))
    draw = np.zeros(NUM_CLASSES)
    draw[present] = rng.dirichlet(concentration * mean[present])
    target = (1 - FLOOR) * draw + FLOOR * mean * present
    return target / target.sum()


# ------------------------------------------------------------------------------------- mask layers

def _smooth_series(rng: np.random.Generator, n: int, correlation: float) -> np.ndarray:
    """A standardised 1-D Gaussian series correlated over about ``correlation`` steps."""
    half = int(3 * correlation)
    kernel = gaussian_kernel(correlation, half)
    series = np.convolve(rng.standard_normal(n + 2 * half), kernel, mode="valid")
    return series / np.sqrt((kernel ** 2).sum())


def draw_path(rng: np.random.Generator, meander: float, width: float) -> np.ndarray:
    """Boolean map of a line crossing the tile whose heading wanders ``meander`` radians around a
    mean direction (meandering river: ~1; road: ~0.1)."""
    steps = 2 * SIZE
    y0, x0 = rng.uniform(0.25 * SIZE, 0.75 * SIZE, size=2)
    heading = rng.uniform(0, 2 * np.pi) + meander * _smooth_series(rng, steps, rng.uniform(8, 20))
    dy, dx = np.sin(heading), np.cos(heading)
    py = y0 + np.concatenate([-np.cumsum(dy[:SIZE][::-1])[::-1], np.cumsum(dy[SIZE:])])
    px = x0 + np.concatenate([-np.cumsum(dx[:SIZE][::-1])[::-1], np.cumsum(dx[SIZE:])])
    out = np.zeros((SIZE, SIZE), bool)
    r = width / 2
    span = np.arange(-int(np.ceil(r)), int(np.ceil(r)) + 1)
    for oy in span:
        for ox in span:
            if oy * oy + ox * ox <= r * r + 0.25:
                iy, ix = np.rint(py + oy).astype(int), np.rint(px + ox).astype(int)
                ok = (iy >= 0) & (iy < SIZE) & (ix >= 0) & (ix < SIZE)
                out[iy[ok], ix[ok]] = True
    return out


def water_layer(rng: np.random.Generator, landscape: str, share: float) -> np.ndarray:
    """Lakes, a coastline or ponds covering ``share`` of the tile, plus sometimes a river."""
    yy, xx = _grid()
    if landscape == "water" and rng.random() < 0.5:  # coast: the sea fills one side, wavy shore
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (xx - SIZE / 2) + np.sin(angle) * (yy - SIZE / 2)) / (SIZE / 4)
        field = ramp + 0.6 * fractal_fields(rng, 1, 40.0, 2.6)[0]
    else:
        scale = 50.0 if share > 0.05 else 12.0
        field = fractal_fields(rng, 1, scale, 3.2)[0]
    water = take_top(field, np.ones(field.shape, bool), int(share * N_PIXELS))
    if rng.random() < RIVER_PROB:
        water |= draw_path(rng, meander=rng.uniform(0.6, 1.2), width=rng.uniform(1.5, 4.5))
    return water


def artificial_layer(rng: np.random.Generator, share: float, free: np.ndarray) -> np.ndarray:
    """Hamlets and towns (clusters of varied size around random centres) and roads."""
    axis = np.arange(SIZE, dtype=np.float64)
    n_centres = 1 + rng.poisson(6)
    density = np.zeros((SIZE, SIZE))
    radius = np.sqrt(max(share, 0.002) * N_PIXELS / (np.pi * n_centres))
    for _ in range(n_centres):
        cy, cx = rng.uniform(0, SIZE, size=2)
        s = radius * rng.lognormal(0.0, 0.5)
        weight = rng.uniform(0.4, 1.0)
        # a round Gaussian is the outer product of two 1-D ones
        along_y, along_x = np.exp(-(axis - cy) ** 2 / (2 * s * s)), np.exp(-(axis - cx) ** 2 / (2 * s * s))
        density += np.outer(weight * along_y, along_x)
    field = density * np.exp(0.5 * fractal_fields(rng, 1, 8.0, 3.5)[0])
    built = take_top(field, free, int(share * N_PIXELS))
    for _ in range(rng.poisson(ROAD_RATE)):
        built |= draw_path(rng, meander=0.08, width=rng.choice([1.0, 1.0, 2.0])) & free
    return built


def high_ground_layer(rng: np.random.Generator, natural: float, snow_area: int,
                      free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Natural surfaces on the highest ground of an elevation field, snow on its peaks."""
    elevation = fractal_fields(rng, 1, 60.0, 3.0)[0]
    bare = take_top(elevation, free, int(natural * N_PIXELS))
    snow = take_top(elevation, bare, snow_area)
    return bare & ~snow, snow


def forest_layer(rng: np.random.Generator, broadleaf: float, coniferous: float,
                 free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forest blobs, split into coniferous stands and broadleaf."""
    cover = fractal_fields(rng, 1, rng.uniform(30, 80), 2.8)[0]
    stands = fractal_fields(rng, 1, rng.uniform(8, 30), 2.8)[0]
    forest = take_top(cover, free, int((broadleaf + coniferous) * N_PIXELS))
    conif = take_top(stands, forest, int(coniferous * N_PIXELS))
    return forest & ~conif, conif


def parcel_map(rng: np.random.Generator) -> np.ndarray:
    """Rectilinear field parcels (ids 0..n-1): two field systems with their own orientation."""
    yy, xx = _grid()
    half = SIZE * 0.75
    systems = []
    for _ in range(2):
        angle = rng.uniform(0, np.pi)
        u = np.cos(angle) * (xx - SIZE / 2) + np.sin(angle) * (yy - SIZE / 2) + half
        v = -np.sin(angle) * (xx - SIZE / 2) + np.cos(angle) * (yy - SIZE / 2) + half
        widths = rng.uniform(12, 45, size=int(2 * half / 12) + 2)
        edges = np.cumsum(widths) - rng.uniform(0, widths[0])
        strip = np.searchsorted(edges, u)
        length = rng.uniform(20, 90, size=len(edges) + 1)
        shift = rng.uniform(0, length)
        segment = np.floor((v + shift[strip]) / length[strip]).astype(np.int64)
        systems.append(strip * PARCEL_SEGMENTS + segment)
    selector = fractal_fields(rng, 1, 80.0, 3.0)[0] > rng.uniform(-0.8, 0.8)
    ids = np.where(selector, systems[0], systems[1] + PARCEL_IDS)
    # renumbered 0..n-1 in id order (np.unique's inverse, without its sort)
    present = np.bincount(ids.ravel(), minlength=2 * PARCEL_IDS) > 0
    return (np.cumsum(present) - 1)[ids]


def field_layer(rng: np.random.Generator, parcels: np.ndarray, cultivated_fraction: float,
                free: np.ndarray) -> np.ndarray:
    """Cultivated pixels: whole parcels (on the free area) chosen by a smooth suitability + chance."""
    n = parcels.max() + 1
    suitability = fractal_fields(rng, 1, 60.0, 3.0)[0]
    area = np.bincount(parcels[free], minlength=n)
    mean_suit = np.bincount(parcels.ravel(), suitability.ravel(), minlength=n) / np.maximum(
        np.bincount(parcels.ravel(), minlength=n), 1)
    score = mean_suit + 0.7 * rng.standard_normal(n)
    order = np.argsort(-score)
    goal = cultivated_fraction * area.sum()
    taken = np.cumsum(area[order]) - area[order] / 2 < goal
    cultivated_parcels = np.zeros(n, bool)
    cultivated_parcels[order[taken]] = True
    return cultivated_parcels[parcels] & free


def cloud_layer(rng: np.random.Generator, area: int) -> np.ndarray:
    """A ragged cloud of ``area`` pixels."""
    yy, xx = _grid()
    cy, cx = rng.uniform(0, SIZE, size=2)
    bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (3 * np.sqrt(area)) ** 2))
    field = bump + 0.3 * fractal_fields(rng, 1, 10.0, 2.5)[0]
    return take_top(field, np.ones(field.shape, bool), area)


def roughen(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Ragged class boundaries like the S2GLC labels: a smooth shift plus pixel jitter."""
    yy, xx = _grid()
    shift = DISPLACEMENT * gaussian_fields(rng, 2, 3.0)
    jitter = rng.integers(-1, 2, size=(2, SIZE, SIZE), dtype=np.int8) * (
        rng.random((2, SIZE, SIZE), dtype=np.float32) < JITTER_PROB)
    sy = np.clip(np.rint(yy + shift[0] + jitter[0]), 0, SIZE - 1).astype(np.intp)
    sx = np.clip(np.rint(xx + shift[1] + jitter[1]), 0, SIZE - 1).astype(np.intp)
    return mask[sy, sx]


def make_mask(rng: np.random.Generator, landscape: str, target: np.ndarray,
              rare: RarePatches) -> tuple[np.ndarray, np.ndarray]:
    """A land-cover mask (uint8) with about the ``target`` proportions, and its parcel map."""
    mask = np.zeros((SIZE, SIZE), MASK_DTYPE)
    free = np.ones((SIZE, SIZE), bool)

    def place(layer: np.ndarray, cls: int) -> None:
        mask[layer & free] = cls
        free[layer] = False

    place(water_layer(rng, landscape, target[WATER]), WATER)
    place(artificial_layer(rng, target[ARTIFICIAL], free), ARTIFICIAL)
    snow_area = rare.snow_area if landscape == "mountain" and rng.random() < SNOW_TILE_PROB else 0
    bare, snow = high_ground_layer(rng, target[NATURAL], snow_area, free)
    place(snow, SNOW)
    place(bare, NATURAL)
    broad, conif = forest_layer(rng, target[BROADLEAF], target[CONIFEROUS], free)
    place(conif, CONIFEROUS)
    place(broad, BROADLEAF)
    parcels = parcel_map(rng)
    fields = target[CULTIVATED] + target[HERBACEOUS]
    place(field_layer(rng, parcels, target[CULTIVATED] / fields if fields > 0 else 0.5, free), CULTIVATED)
    place(free.copy(), HERBACEOUS)
    mask = roughen(rng, mask)
    if rng.random() < CLOUD_TILE_PROB:
        mask[cloud_layer(rng, rare.cloud_area)] = CLOUDS
    return mask, parcels


# ------------------------------------------------------------------------------------------ pixels

def boundary_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class."""
    edge = np.zeros(mask.shape, bool)
    h = mask[:, 1:] != mask[:, :-1]
    v = mask[1:] != mask[:-1]
    edge[:, 1:] |= h
    edge[:, :-1] |= h
    edge[1:] |= v
    edge[:-1] |= v
    return edge


def mix_boundaries(dn: np.ndarray, mask: np.ndarray) -> None:
    """Pixels on a class boundary (a 4-neighbour of another class) become the mean of themselves and
    the mean of their 3×3 neighbourhood (edges replicated), in place on the bands×SIZE×SIZE image."""
    padded = np.pad(dn, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = padded[:, :, :-2] + padded[:, :, 1:-1] + padded[:, :, 2:]   # the 3×3 sum, separably
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    edge = boundary_pixels(mask)
    dn[:, edge] = 0.5 * (dn[:, edge] + box[:, edge] / 9.0)


def render_image(rng: np.random.Generator, mask: np.ndarray, parcels: np.ndarray,
                 spectra: Spectra) -> np.ndarray:
    """The uint16 SIZE×SIZE×4 image of a mask.

    Per pixel of class c: y = mean_c + tile shift_c + L_patch,c·p + L_texture,c·t + L_white,c·w, where
    p is the patch noise (the parcel's draw for field classes, a smooth field otherwise), t the smooth
    texture and w white noise (4 unit-variance bands each). Computed band-major (bands × pixels),
    one class at a time on its pixels, which are grouped by a stable sort of the mask.
    """
    flat_mask = mask.ravel()
    patch = fractal_fields(rng, 4, PATCH_SCALE, 3.0).reshape(4, -1)
    per_parcel = standard_normal(rng, (4, int(parcels.max()) + 1))
    texture = gaussian_fields(rng, 4, spectra.texture_sigma).reshape(4, -1)
    tile_shift = np.einsum("cij,cj->ci", spectra.chol_tile, rng.standard_normal((NUM_CLASSES, 4)))
    centre = (spectra.mean + tile_shift).astype(np.float32)
    white = standard_normal(rng, (4, N_PIXELS))   # iid, so it needs no reordering
    order = np.argsort(flat_mask, kind="stable")
    ends = np.cumsum(np.bincount(flat_mask, minlength=NUM_CLASSES))
    y = np.empty((4, N_PIXELS), np.float32)   # class-grouped pixel order
    for c, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
        if end == start:
            continue
        pixels = order[start:end]
        own_patch = per_parcel[:, parcels.ravel()[pixels]] if c in PARCEL_CLASSES else patch[:, pixels]
        y[:, start:end] = (spectra.chol_patch[c] @ own_patch + spectra.chol_texture[c] @ texture[:, pixels]
                           + spectra.chol_white[c] @ white[:, start:end] + centre[c][:, None])
    dn = np.empty_like(y)
    dn[:, order] = np.exp(y) - np.float32(spectra.offset)
    dn = dn.reshape(4, SIZE, SIZE)
    mix_boundaries(dn, mask)
    return np.clip(np.rint(dn), 1, MAX_PIXEL_VALUE).astype(IMAGE_DTYPE).transpose(1, 2, 0).copy()


@lru_cache(maxsize=1)
def _default_model() -> tuple[Spectra, RarePatches]:
    constants = load_constants()
    return spectra_from(constants), rare_patches(constants)


def make_tile(seed: int, sid: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` of tile ``sid`` for ``seed`` (deterministic)."""
    spectra, rare = _default_model()
    rng = np.random.default_rng([seed, sid])
    landscape = landscape_for(seed, sid)
    mask, parcels = make_mask(rng, landscape, sample_composition(rng, landscape), rare)
    image = render_image(rng, mask, parcels, spectra)
    return image, mask


# ---------------------------------------------------------------------------------------- writing

def write_image(path: Path, image: np.ndarray) -> None:
    """Uncompressed, contiguous, 4 rows per strip, minisblack + 3 extra samples: as the real tiles."""
    tifffile.imwrite(path, image, photometric="minisblack", planarconfig="contig", rowsperstrip=4,
                     extrasamples=[0, 0, 0], metadata=None, software=False)


def write_mask(path: Path, mask: np.ndarray) -> None:
    tifffile.imwrite(path, mask, photometric="minisblack", rowsperstrip=32, metadata=None, software=False)


def _write_atomic(path: Path, write, array: np.ndarray) -> None:
    """Write to a temporary name, then rename: a tile on disk under its name is complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp, array)
    os.replace(tmp, path)


def _write_one(job: tuple[Path, int, int, bool]) -> tuple[int, np.ndarray | None]:
    """Write one tile; return its id and, for a train tile, its class proportions."""
    root, seed, sid, train = job
    image, mask = make_tile(seed, sid)
    split = "train" if train else "test"
    if train:
        _write_atomic(root / split / "masks" / f"{sid}.tif", write_mask, mask)
    _write_atomic(root / split / "images" / f"{sid}.tif", write_image, image)   # last: the tile's done mark
    return sid, class_proportions(mask) if train else None


def write_labels(path: Path, ids: list[int], props: list[np.ndarray]) -> None:
    """train_labels.csv with Python's shortest float repr (exact: proportions are k/65536)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sample_id", *CLASS_NAMES])
        for sid, p in zip(ids, props):
            writer.writerow([sid, *(repr(float(v)) for v in p)])


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output folder exists and is not empty; nothing written (choose a new folder)")


def _progress(iterable, total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, initial=initial, desc="synth tiles", unit="tile", file=sys.stderr)


PLAN = "synth.json"   # what a half-written folder was asked for
# Raised whenever the same seed would draw other tiles, so that a half-written folder is never
# finished by another generator than the one that began it.
GENERATOR_VERSION = 3


def _staging(out: Path, plan: dict) -> Path:
    """The hidden folder the tiles are written to: a new one, or the half-written one of an earlier
    run with the same request (resumed); one with another request is refused."""
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        try:
            saved = json.loads((staging / PLAN).read_text())
        except (OSError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, dict) and saved.get("generator") != plan["generator"]:
            raise InputError(f"{staging}: a half-written synth begun by another version of the generator "
                             f"(it would mix two kinds of tiles); remove it")
        if saved != plan:
            raise InputError(f"{staging}: a half-written synth of another request ({saved}); run again with the "
                             f"same --train/--test/--seed to resume it, or remove it")
        for tmp in staging.rglob(".*.tmp"):
            tmp.unlink()
        return staging
    for sub in ("train/images", "train/masks", "test/images"):
        (staging / sub).mkdir(parents=True)
    (staging / PLAN).write_text(json.dumps(plan))
    return staging


def generate(out, n_train: int = 150, n_test: int = 24, seed: int = 0, progress: bool = True,
             workers: int | None = None) -> Path:
    """Write ``n_train`` train tiles (ids 1..n_train) with masks, ``n_test`` test tiles (ids after
    them) and ``train_labels.csv`` under ``out`` in the challenge layout; return ``out``.

    Refuses an existing non-empty ``out``. The tiles are written to a hidden sibling folder
    (``.<out>.partial``) that is renamed to ``out`` at the end, so ``out`` never holds a half-written
    set; a run that was cut short is resumed by the same command (the tiles already written are
    kept). ``workers`` processes (default: the cores this process may use).
    """
    if n_train < 0 or n_test < 0:
        raise InputError(f"tile counts must be >= 0 (train {n_train}, test {n_test})")
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out, {"train": n_train, "test": n_test, "seed": seed, "generator": GENERATOR_VERSION})
    _write_all(staging, n_train, n_test, seed, progress, workers or usable_cores())
    (staging / PLAN).unlink()
    _check_out(out)
    staging.replace(out)  # onto a missing or empty folder
    return out


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def _one_thread_each():
    """Spawned workers get single-threaded BLAS (unless the caller set the variables): the workers
    already fill the cores, and a BLAS pool in each would only oversubscribe them. The libraries
    read these when they load, so they are set in the environment the children inherit, and
    restored afterwards."""
    unset = [name for name in THREAD_VARIABLES if name not in os.environ]
    os.environ.update({name: "1" for name in unset})
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def _keep_freed_memory() -> None:
    """Pool initializer: the memory a tile frees stays in this worker's heap for the next tile.

    By default glibc hands freed memory back to the kernel (it unmaps large blocks and trims the top
    of the heap), so every tile faults its pages in again, zeroed, and the kernel time rivals the
    drawing. Both limits are raised: fixing either one alone switches off glibc's adjustment of the
    other and makes the faults worse. A worker then holds its peak working set. Does nothing where
    the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)   # its documented maximum
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError, TypeError):   # TypeError: CDLL(None) on Windows
        pass


def _write_all(root: Path, n_train: int, n_test: int, seed: int, progress: bool, workers: int) -> None:
    train_ids = list(range(1, n_train + 1))
    every = [(root, seed, sid, True) for sid in train_ids]
    every += [(root, seed, sid, False) for sid in range(n_train + 1, n_train + n_test + 1)]
    jobs = [j for j in every if not (root / ("train" if j[3] else "test") / "images" / f"{j[2]}.tif").exists()]
    done = len(every) - len(jobs)
    props = {}
    if len(jobs) > 8:   # in worker processes, even one: the caller's malloc settings stay untouched
        # spawn, not fork: forked children of a threaded caller (torch, OpenMP) can deadlock
        context = multiprocessing.get_context("spawn")
        with _one_thread_each(), ProcessPoolExecutor(workers, context, _keep_freed_memory) as pool:
            for sid, p in _progress(pool.map(_write_one, jobs, chunksize=4), len(every), progress, done):
                props[sid] = p
    else:
        for job in _progress(jobs, len(every), progress, done):
            sid, p = _write_one(job)
            props[sid] = p
    for sid in train_ids:   # the tiles of an earlier, resumed run
        if props.get(sid) is None:
            props[sid] = class_proportions(tifffile.imread(root / "train" / "masks" / f"{sid}.tif"))
    write_labels(root / "train_labels.csv", train_ids, [props[sid] for sid in train_ids])


def class_frequencies(root: Path) -> np.ndarray:
    """Pixel frequency of each class over the train tiles under ``root``: the mean of the labels
    (every tile has the same number of pixels)."""
    with open(Path(root) / "train_labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    if not rows:
        return np.zeros(NUM_CLASSES)
    return np.array([[float(v) for v in row[1:]] for row in rows]).mean(0)


def run(args) -> int:
    """CLI: ``dist-lc synth --out DIR --train N --test N --seed S [--workers W]``."""
    start = time.perf_counter()
    out = generate(args.out, n_train=args.train, n_test=args.test, seed=args.seed,
                   progress=sys.stderr.isatty(), workers=getattr(args, "workers", None))
    elapsed = time.perf_counter() - start
    print(f"wrote {args.train} train + {args.test} test tiles to {out} in {elapsed:.1f} s")
    target = load_constants()["target_frequencies"]
    print(f"{'class':<12}{'frequency':>11}{'target':>11}")
    for name, freq, goal in zip(CLASS_NAMES, class_frequencies(out), target):
        print(f"{name:<12}{freq:>11.6f}{goal:>11.6f}")
    return 0
