"""Per-pixel gradient-boosting reference for the quality benchmark (``benchmarks/quality.py``).

The strongest classical pipeline measured on the real sample, rebuilt here as a
benchmark-only model (lightgbm and scipy, both in the main dependencies):

1. **Features per pixel** (30): the 4 bands (R, G, B, NIR, sensor units), NDVI = (NIR-R)/(NIR+R),
   NDWI = (G-NIR)/(G+NIR), and the box-filtered local mean and standard deviation of each band over
   5×5, 15×15 and 45×45 windows (``scipy.ndimage.uniform_filter``, reflected borders).
2. **Class-balanced pixel sample** from the training folds: every class gets the same quota
   (water-filled: a class with fewer pixels than its quota gives all of them and the others share
   the rest), about ``pixels`` in total. Pixel ``i`` of class ``c`` is drawn with probability
   ``rate_c = quota_c / count_c``; the realised rates (drawn / available) are kept.
3. **LightGBM** multiclass on that sample (every class present in it, no_data/clouds included when
   present so that cloud pixels are not forced into a land class).
4. **Prior correction**: a model fitted on a sample drawn at rate ``rate_c`` learns
   ``p(c|x)·rate_c`` up to normalisation, so ``log rate_c`` is subtracted from its raw scores
   before the softmax. ``correct=False`` gives the uncorrected (balanced-prior) prediction.
5. **Tile prediction**: the mean of the pixel probabilities over the tile (every ``stride``-th pixel
   in each direction; 1 = all), classes 0 and 1 removed and the rest renormalised
   (``dist_lc.metrics.scored_proportions``).

Scores are computed by the caller with ``dist_lc.metrics`` only.

Standalone check on one fold (prints the fold's KL with and without the correction)::

    python benchmarks/pixel_gbm.py --shards /tmp/qb/shards --fold 0 --pixels 1500000
"""
from __future__ import annotations

import argparse
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np

from lc_common.tiles import BAND_NAMES, NUM_CLASSES
from shard_tools.format import decode_sample
from shard_tools.manifest import load_manifest

WINDOWS = (5, 15, 45)
BANDS = BAND_NAMES
FEATURE_NAMES = (list(BANDS) + ["NDVI", "NDWI"]
                 + [f"{stat}{w}_{b}" for w in WINDOWS for stat in ("mean", "std") for b in BANDS])

DEFAULT_PARAMS = {
    "objective": "multiclass",
    "learning_rate": 0.1,
    "num_leaves": 63,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.5,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "force_col_wise": True,
    "verbose": -1,
}
DEFAULT_ROUNDS = 300
DEFAULT_STRIDE = 2      # predict on every 2nd pixel each way (a quarter of them); see quality.md


# ----------------------------------------------------------------------------- data


@dataclass
class Tiles:
    """The train split of a shard folder in memory (the real sample: 300 tiles, ~200 MB)."""
    keys: list
    folds: np.ndarray        # (N,) int
    images: np.ndarray       # (N, 256, 256, 4) uint16
    masks: np.ndarray        # (N, 256, 256) uint8
    props: np.ndarray        # (N, 10) float64, from the masks

    def select(self, folds) -> np.ndarray:
        return np.flatnonzero(np.isin(self.folds, list(folds)))


def load_tiles(shards) -> Tiles:
    """Every train tile of a shard folder, in manifest order, with its fold."""
    manifest = load_manifest(shards)
    keys, folds, images, masks, props = [], [], [], [], []
    for entry in manifest.shards("train"):
        groups: dict[str, dict] = {}
        with tarfile.open(manifest.shard_path(entry)) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                groups.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        for raw in groups.values():
            key, image, mask, prop = decode_sample(raw)
            keys.append(key)
            folds.append(int(entry["fold"]))
            images.append(image)
            masks.append(mask)
            props.append(prop)
    return Tiles(keys, np.asarray(folds), np.stack(images), np.stack(masks), np.stack(props))


# ----------------------------------------------------------------------------- features


def pixel_features(image: np.ndarray) -> np.ndarray:
    """(H, W, 30) float32 features of one (H, W, 4) uint16 tile; see FEATURE_NAMES."""
    from scipy.ndimage import uniform_filter

    # band-first: each band's plane is contiguous, which makes the window filters ~3x faster than on
    # (H, W, 4); the same arithmetic in the same order, so the same features to the bit
    x = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float64)
    r, g, nir = x[0], x[1], x[3]
    feats = np.empty((len(FEATURE_NAMES), *x.shape[1:]), dtype=np.float32)
    feats[:4] = x
    feats[4] = (nir - r) / np.maximum(nir + r, 1.0)
    feats[5] = (g - nir) / np.maximum(g + nir, 1.0)
    sq = x * x
    for i, w in enumerate(WINDOWS):
        mean = uniform_filter(x, size=(1, w, w), mode="reflect")
        var = uniform_filter(sq, size=(1, w, w), mode="reflect") - mean * mean
        feats[6 + 8 * i:10 + 8 * i] = mean
        feats[10 + 8 * i:14 + 8 * i] = np.sqrt(np.maximum(var, 0.0))
    return feats.transpose(1, 2, 0)


# ----------------------------------------------------------------------------- sampling


def balanced_quota(counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class pixel quota: equal shares of ``total``, water-filled over classes with few pixels."""
    counts = np.asarray(counts, dtype=np.float64)
    quota = np.zeros_like(counts)
    open_ = counts > 0
    left = float(min(total, counts.sum()))
    while open_.any():
        share = left / open_.sum()
        small = open_ & (counts - quota <= share)
        if not small.any():
            quota[open_] += share
            break
        left -= (counts[small] - quota[small]).sum()
        quota[small] = counts[small]
        open_ &= ~small
    return quota


@dataclass
class Sample:
    X: np.ndarray            # (n, 30) float32
    y: np.ndarray            # (n,) int, class index 0..9
    rates: np.ndarray        # (10,) realised sampling rate per class (drawn / available); 0 if absent
    counts: np.ndarray       # (10,) available pixels per class in the training tiles
    seconds: float = 0.0


def balanced_sample(tiles: Tiles, index: np.ndarray, pixels: int, seed: int = 0) -> Sample:
    """A class-balanced pixel sample of about ``pixels`` pixels from ``tiles`` [index]."""
    t0 = time.perf_counter()
    counts = np.bincount(tiles.masks[index].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES].astype(np.int64)
    quota = balanced_quota(counts, pixels)
    target = np.divide(quota, counts, out=np.zeros(NUM_CLASSES), where=counts > 0)
    rng = np.random.default_rng(seed)
    Xs, ys = [], []
    for i in index:
        mask = tiles.masks[i].ravel()
        pick = np.flatnonzero(rng.random(mask.size) < target[mask])
        if pick.size == 0:
            continue
        feats = pixel_features(tiles.images[i]).reshape(-1, len(FEATURE_NAMES))
        Xs.append(feats[pick])
        ys.append(mask[pick])
    X, y = np.concatenate(Xs), np.concatenate(ys).astype(np.int64)
    drawn = np.bincount(y, minlength=NUM_CLASSES)[:NUM_CLASSES]
    rates = np.divide(drawn, counts, out=np.zeros(NUM_CLASSES), where=counts > 0)
    return Sample(X, y, rates, counts, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- model


@dataclass
class PixelGBM:
    booster: object
    classes: np.ndarray              # class index (0..9) of each model output
    log_rates: np.ndarray            # log sampling rate of each model output
    stats: dict = field(default_factory=dict)

    def raw_scores(self, feats: np.ndarray, threads: int = 1, rounds: int | None = None) -> np.ndarray:
        raw = self.booster.predict(feats, raw_score=True, num_threads=threads, num_iteration=rounds)
        return raw.reshape(len(feats), -1)

    def tile_probs(self, image: np.ndarray, *, stride: int = 1, threads: int = 1,
                   rounds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(prior-corrected, uncorrected) mean pixel probabilities (10,) of one tile, one pass of the trees.

        Classes 0/1 are still in; ``predict_tiles`` removes them."""
        feats = pixel_features(image)[::stride, ::stride].reshape(-1, len(FEATURE_NAMES))
        raw = self.raw_scores(feats, threads, rounds)
        out = []
        for shift in (self.log_rates, 0.0):
            z = raw - shift
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            full = np.zeros(NUM_CLASSES)
            full[self.classes] = p.mean(axis=0)
            out.append(full)
        return out[0], out[1]


def train(sample: Sample, *, rounds: int = DEFAULT_ROUNDS, params: dict | None = None, threads: int = 1,
          seed: int = 0) -> PixelGBM:
    """LightGBM multiclass on the balanced sample; outputs are the classes present in it."""
    import lightgbm as lgb

    classes = np.flatnonzero(np.bincount(sample.y, minlength=NUM_CLASSES))
    lookup = np.full(NUM_CLASSES, -1)
    lookup[classes] = np.arange(len(classes))
    p = dict(DEFAULT_PARAMS, **(params or {}))
    p.update(num_class=len(classes), num_threads=threads, seed=seed)
    t0 = time.perf_counter()
    data = lgb.Dataset(sample.X, label=lookup[sample.y], feature_name=list(FEATURE_NAMES), free_raw_data=True)
    booster = lgb.train(p, data, num_boost_round=rounds)
    seconds = time.perf_counter() - t0
    stats = {"train_s": seconds, "sample_s": sample.seconds, "pixels": int(len(sample.y)),
             "rounds": rounds, "threads": threads, "classes": classes.tolist(),
             "rates": [float(r) for r in sample.rates]}
    return PixelGBM(booster, classes, np.log(sample.rates[classes]), stats)


def predict_tiles(model: PixelGBM, tiles: Tiles, index: np.ndarray, *, stride: int = DEFAULT_STRIDE,
                  threads: int = 1, rounds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prior-corrected, uncorrected) tile proportions (n, 10): mean pixel probabilities, classes 0/1 dropped."""
    from dist_lc.metrics import expand_scored, scored_proportions

    def tile_proportions(mean_probs):
        return expand_scored(scored_proportions(mean_probs))

    t0 = time.perf_counter()
    corr, plain = zip(*(model.tile_probs(tiles.images[i], stride=stride, threads=threads, rounds=rounds)
                        for i in index))
    model.stats["predict_s"] = time.perf_counter() - t0
    return tile_proportions(np.stack(corr)), tile_proportions(np.stack(plain))


def fit_fold(tiles: Tiles, fold: int, *, pixels: int, rounds: int = DEFAULT_ROUNDS, stride: int = DEFAULT_STRIDE,
             threads: int = 1, seed: int = 0, params: dict | None = None):
    """Train on the other folds, predict fold ``fold``: (val index, corrected, uncorrected, stats)."""
    val = tiles.select([fold])
    trn = np.flatnonzero(tiles.folds != fold)
    sample = balanced_sample(tiles, trn, pixels, seed=seed + fold)
    model = train(sample, rounds=rounds, params=params, threads=threads, seed=seed + fold)
    corrected, plain = predict_tiles(model, tiles, val, stride=stride, threads=threads)
    return val, corrected, plain, model.stats


def main(argv=None) -> int:
    from dist_lc.metrics import kl_score

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="shard folder (lc-shard pack of the sample)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--pixels", type=int, default=1_500_000, help="balanced training sample size")
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--report-at", type=int, nargs="+", help="also score after these many rounds")
    ap.add_argument("--stride", type=int, nargs="+", default=[DEFAULT_STRIDE],
                    help="prediction pixel stride(s); several values compare the tile means")
    ap.add_argument("--threads", type=int, default=1, help="LightGBM threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--quick", action="store_true", help="20,000 pixels, 10 rounds, stride 8 (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.pixels, args.rounds, args.stride = 20_000, 10, [8]
    tiles = load_tiles(args.shards)
    val = tiles.select([args.fold])
    trn = np.flatnonzero(tiles.folds != args.fold)
    sample = balanced_sample(tiles, trn, args.pixels, seed=args.fold)
    print(f"sample: {len(sample.y)} pixels in {sample.seconds:.1f}s; per class drawn "
          f"{np.bincount(sample.y, minlength=NUM_CLASSES).tolist()}; rates {np.round(sample.rates, 4).tolist()}",
          flush=True)
    model = train(sample, rounds=args.rounds, threads=args.threads, seed=args.fold)
    print(f"trained {args.rounds} rounds in {model.stats['train_s']:.1f}s", flush=True)
    for rounds in sorted(set(args.report_at or []) | {args.rounds}):
        for stride in args.stride:
            corr, plain = predict_tiles(model, tiles, val, stride=stride, threads=args.threads, rounds=rounds)
            print(f"fold {args.fold} rounds {rounds} stride {stride}: KL {kl_score(tiles.props[val], corr):.5f} "
                  f"(prior-corrected), {kl_score(tiles.props[val], plain):.5f} (uncorrected); "
                  f"predict {model.stats['predict_s']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
