"""Estimate the synthetic generator's constants from real challenge tiles; write constants.json.

    python -m dist_lc.synth.derive_constants [--src DIR] [--out FILE]

``--src`` is a folder in the challenge layout (``train/images``, ``train/masks``); it is only read.
For every class present in the source the file holds:

- ``dn_mean`` (4) and ``dn_cov`` (4×4): pixel statistics in DN over all pixels of the class
  (what the generated pixels are checked against);
- ``log_mean`` and four covariances in the space ``y = log(DN + log_offset)`` of the *interior*
  pixels (whole 3×3 neighbourhood of one class; the generator mixes boundary pixels itself):
  ``cov_tile``: a tile's class mean around the class mean (date, atmosphere);
  ``cov_white``: uncorrelated pixel noise (sensor noise, sub-pixel detail);
  ``cov_texture``: a smooth texture (Gaussian correlation of ``texture_sigma`` pixels);
  ``cov_patch``: the rest of the within-tile spread (parcels, stands: larger scales).
  White and texture come from the structure function ``D(d) = E[(y_i - y_j)(y_i - y_j)ᵀ] / 2`` of
  same-class pixel pairs ``d`` = 1 and 2 apart (``D(d) = W + T (1 - exp(-d²/4σ²))`` solved for W, T);
  the patch part is the within-tile covariance minus both.

Classes absent from the source (no_data, clouds, natural, snow in the shared sample; water too if
the source has little) get explicit assumed signatures (``"estimated": false`` and the basis in
words); a source too small for the other classes is refused. Also written: the target class
frequencies of the full challenge training set, mask statistics of the source (neighbour agreement,
classes per tile, dominant share) for the generator's tests, and the source and date.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np
import tifffile

from lc_common.errors import InputError, print_error
from lc_common.tiles import BAND_NAMES, CLASS_NAMES, MAX_PIXEL_VALUE, NUM_CLASSES, class_proportions

# Pixel counts per class of the full challenge training set (18,491 tiles), from the challenge data.
FULL_TRAIN_COUNTS = [0, 20643, 60971025, 404760981, 277012377, 96473046, 333407133, 9775295, 1071, 29404605]
LOG_OFFSET = 100.0  # DN added before the log: tames the censored near-zero values (water NIR is often 1)
TEXTURE_SIGMA = 1.0  # pixels: correlation length of the texture part (exp(-d²/4σ²))
LAGS = (1, 2)        # pair distances of the structure function
MIN_TILE_PIXELS = 200
MIN_CLASS_PIXELS = 2000  # fewer interior pixels than this: the class gets an assumed signature

# Signatures assumed for classes the source lacks: DN mean (R, G, B, NIR), coefficient of variation,
# and the basis. Used only where the source has too few pixels of the class.
ASSUMED = {
    0: ([1.0, 1.0, 1.0, 1.0], 0.0, "no_data: never generated (0 pixels in the full training set)"),
    1: ([4600.0, 4500.0, 4800.0, 5200.0], 0.25,
        "clouds: bright and spectrally flat (reflectance ~0.45-0.5 in all four bands)"),
    7: ([1250.0, 1350.0, 1250.0, 2300.0], 0.35,
        "natural material surfaces (rock, sand, screes): bright bare-soil-like spectrum, weak NIR rise"),
    8: ([8200.0, 8400.0, 8700.0, 6600.0], 0.20,
        "snow: very bright in the visible, NIR lower than the visible (fresh-snow reflectance curve)"),
    9: ([350.0, 500.0, 350.0, 200.0], 0.5,
        "water (only if the source has too little): dark, NIR lowest (open-water reflectance curve)"),
}
# How an assumed class splits its variance over the tile / patch / pixel levels, and band correlations.
ASSUMED_SPLIT = {"cov_tile": 0.2, "cov_patch": 0.5, "cov_texture": 0.2, "cov_white": 0.1}
ASSUMED_CORR_VIS, ASSUMED_CORR_NIR = 0.9, 0.5


def default_src() -> Path:
    """The shared real sample next to the repository (``$DIST_LC_SHARED/data/s2glc-sample``)."""
    repo = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get("DIST_LC_SHARED", repo.parent / "shared"))
    return shared / "data" / "s2glc-sample"


def default_out() -> Path:
    return Path(__file__).with_name("constants.json")


def list_train_ids(src: Path) -> list[str]:
    images, masks = src / "train" / "images", src / "train" / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise InputError(f"{src}: no train/images and train/masks folders (challenge layout expected)")
    ids = sorted((p.stem for p in masks.glob("*.tif") if (images / p.name).is_file()),
                 key=lambda s: (len(s), s))
    if not ids:
        raise InputError(f"{src}: no train tile has both an image and a mask")
    return ids


def interior_mask(mask: np.ndarray) -> np.ndarray:
    """Pixels whose whole 3×3 neighbourhood has their class."""
    padded = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    inner = np.ones(mask.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            inner &= padded[dy:dy + h, dx:dx + w] == mask
    return inner


def neighbour_agreement(mask: np.ndarray) -> float:
    """Fraction of 4-neighbour pixel pairs with the same class."""
    same = np.count_nonzero(mask[:, 1:] == mask[:, :-1]) + np.count_nonzero(mask[1:] == mask[:-1])
    pairs = mask[:, 1:].size + mask[1:].size
    return same / pairs


def psd(cov: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (negative eigenvalues set to zero)."""
    cov = (cov + cov.T) / 2
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.clip(values, 0, None)) @ vectors.T


def texture_correlation(d: float) -> float:
    return float(np.exp(-d * d / (4 * TEXTURE_SIGMA ** 2)))


class ClassAccumulator:
    """Sufficient statistics of one class, fed tile by tile."""

    def __init__(self) -> None:
        self.n_all, self.sum_dn, self.sum_dn2 = 0, np.zeros(4), np.zeros((4, 4))
        self.n, self.sum_y = 0, np.zeros(4)
        self.tile_means, self.tile_counts = [], []
        self.within_scatter = np.zeros((4, 4))
        self.lag_scatter = {d: np.zeros((4, 4)) for d in LAGS}
        self.lag_pairs = {d: 0 for d in LAGS}

    def add_all(self, dn: np.ndarray) -> None:
        self.n_all += len(dn)
        self.sum_dn += dn.sum(0)
        self.sum_dn2 += dn.T @ dn

    def add_interior(self, y: np.ndarray) -> None:
        """y: (n, 4) transformed interior pixels of the class in one tile."""
        self.n += len(y)
        self.sum_y += y.sum(0)
        tile_mean = y.mean(0)
        resid = y - tile_mean
        self.within_scatter += resid.T @ resid
        if len(y) >= MIN_TILE_PIXELS:
            self.tile_means.append(tile_mean)
            self.tile_counts.append(len(y))

    def add_pairs(self, d: int, diff: np.ndarray) -> None:
        """Differences (n, 4) of same-class interior pixel pairs ``d`` apart."""
        self.lag_scatter[d] += diff.T @ diff / 2
        self.lag_pairs[d] += len(diff)

    def texture_split(self) -> tuple[np.ndarray, np.ndarray]:
        """(white, texture) covariances from the structure function at the two lags."""
        (d1, d2) = LAGS
        s1 = self.lag_scatter[d1] / max(self.lag_pairs[d1], 1)
        s2 = self.lag_scatter[d2] / max(self.lag_pairs[d2], 1)
        g1, g2 = 1 - texture_correlation(d1), 1 - texture_correlation(d2)
        texture = psd((s2 - s1) / (g2 - g1))
        white = psd(s1 - g1 * texture)
        return white, texture

    def summary(self) -> dict:
        dn_mean = self.sum_dn / self.n_all
        dn_cov = self.sum_dn2 / self.n_all - np.outer(dn_mean, dn_mean)
        log_mean = self.sum_y / self.n
        white, texture = self.texture_split()
        within = self.within_scatter / self.n
        return {
            "estimated": True,
            "pixels": int(self.n_all),
            "interior_pixels": int(self.n),
            "dn_mean": dn_mean.tolist(),
            "dn_cov": dn_cov.tolist(),
            "log_mean": log_mean.tolist(),
            "cov_tile": weighted_cov(np.array(self.tile_means) - log_mean, np.array(self.tile_counts)).tolist(),
            "cov_patch": psd(within - white - texture).tolist(),
            "cov_texture": texture.tolist(),
            "cov_white": white.tolist(),
        }


def weighted_cov(devs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Covariance of deviations from a known centre (zero), weighted."""
    if len(devs) < 2:
        return np.zeros((4, 4))
    w = weights / weights.sum()
    return (devs * w[:, None]).T @ devs


def transform(dn: np.ndarray) -> np.ndarray:
    return np.log(dn.astype(np.float64) + LOG_OFFSET)


def accumulate_tile(image: np.ndarray, mask: np.ndarray, accs: dict[int, ClassAccumulator]) -> None:
    inner = interior_mask(mask)
    y = transform(image)
    for c in np.unique(mask):
        sel = mask == c
        acc = accs.setdefault(int(c), ClassAccumulator())
        acc.add_all(image[sel].astype(np.float64))
        isel = sel & inner
        if not isel.any():
            continue
        acc.add_interior(y[isel])
        for d in LAGS:
            h = isel[:, d:] & isel[:, :-d]
            v = isel[d:] & isel[:-d]
            acc.add_pairs(d, np.concatenate([(y[:, d:] - y[:, :-d])[h], (y[d:] - y[:-d])[v]]))


def assumed_signature(c: int) -> dict:
    mean, cv, basis = ASSUMED[c]
    mean = np.array(mean)
    sd_log = np.log1p(cv) * np.ones(4)
    corr = np.full((4, 4), ASSUMED_CORR_VIS)
    corr[3, :] = corr[:, 3] = ASSUMED_CORR_NIR
    np.fill_diagonal(corr, 1.0)
    total = corr * np.outer(sd_log, sd_log)
    dn_sd = mean * cv
    signature = {
        "estimated": False,
        "basis": basis,
        "pixels": 0,
        "interior_pixels": 0,
        "dn_mean": mean.tolist(),
        "dn_cov": (corr * np.outer(dn_sd, dn_sd)).tolist(),
        "log_mean": (np.log(mean + LOG_OFFSET) - 0.5 * sd_log ** 2).tolist(),
    }
    signature.update({key: (share * total).tolist() for key, share in ASSUMED_SPLIT.items()})
    return signature


def mask_statistics(masks_props: np.ndarray, agreements: list[float]) -> dict:
    props = masks_props
    top = props.max(1)
    return {
        "neighbour_agreement_mean": float(np.mean(agreements)),
        "neighbour_agreement_q05": float(np.quantile(agreements, 0.05)),
        "classes_per_tile_median": float(np.median((props > 0).sum(1))),
        "classes_over_1pct_per_tile_median": float(np.median((props > 0.01).sum(1))),
        "dominant_share_quartiles": np.quantile(top, [0.25, 0.5, 0.75]).tolist(),
        "tiles_with_class": (props > 0).mean(0).tolist(),
        "class_frequencies": props.mean(0).tolist(),
    }


def derive(src: Path) -> dict:
    """All constants from the real tiles under ``src`` (read only)."""
    ids = list_train_ids(src)
    accs: dict[int, ClassAccumulator] = {}
    props, agreements = [], []
    for sid in ids:
        image = tifffile.imread(src / "train" / "images" / f"{sid}.tif")
        mask = tifffile.imread(src / "train" / "masks" / f"{sid}.tif")
        accumulate_tile(image, mask, accs)
        props.append(class_proportions(mask))
        agreements.append(neighbour_agreement(mask))
    classes = {}
    for c in range(NUM_CLASSES):
        acc = accs.get(c)
        if acc is not None and acc.n >= MIN_CLASS_PIXELS and len(acc.tile_means) >= 2:
            classes[CLASS_NAMES[c]] = acc.summary()
        elif c in ASSUMED:
            classes[CLASS_NAMES[c]] = assumed_signature(c)
        else:
            found = 0 if acc is None else acc.n
            raise InputError(f"{src}: class {CLASS_NAMES[c]} has {found} interior pixels (need "
                             f"{MIN_CLASS_PIXELS} over 2+ tiles); use a source with more tiles")
    counts = np.array(FULL_TRAIN_COUNTS, dtype=np.float64)
    return {
        "source": str(src.resolve()),
        "source_tiles": len(ids),
        "date": _dt.date.today().isoformat(),
        "generated_by": "python -m dist_lc.synth.derive_constants",
        "bands": list(BAND_NAMES),
        "pixel_range": [1, MAX_PIXEL_VALUE],
        "log_offset": LOG_OFFSET,
        "texture_sigma": TEXTURE_SIGMA,
        "target_counts": FULL_TRAIN_COUNTS,
        "target_frequencies": (counts / counts.sum()).tolist(),
        "target_source": "pixel counts per class of the full challenge training set (18,491 tiles)",
        "mask_stats": mask_statistics(np.array(props), agreements),
        "classes": classes,
    }


def write_constants(constants: dict, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(constants, indent=1) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=default_src(), help="real tiles, challenge layout")
    parser.add_argument("--out", type=Path, default=default_out(), help="constants file to write")
    args = parser.parse_args(argv)
    try:
        constants = derive(args.src)
    except InputError as exc:
        print_error(exc)
        return 2
    write_constants(constants, args.out)
    print(f"wrote {args.out} from {constants['source_tiles']} tiles in {args.src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
