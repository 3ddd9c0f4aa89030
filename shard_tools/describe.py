"""A readable summary of a shard folder, from its manifest alone (no shard is read).

Per fold, the mean class-proportion vector is the fold's pixel counts divided by its pixels: every
tile has the same number of pixels, so this equals the mean of the tiles' proportion vectors.
``KL`` is the challenge's formula (the same as ``dist_lc.metrics.kl_score``, which shard_tools must
not import): drop no_data and clouds, renormalise, add 1e-7 to both sides, sum y·log(y/ŷ), with
y the global mean and ŷ the fold's mean. A well stratified fold has a KL near 0.
"""
from __future__ import annotations

import numpy as np

from lc_common.tiles import BAND_NAMES, CLASS_NAMES, IGNORED_CLASSES, NUM_CLASSES
from .manifest import Manifest, load_manifest

EPSILON = 1e-7
BANDS = BAND_NAMES


def kl_divergence(y_true, y_pred) -> float:
    """The challenge's KL of one proportion vector (10,) against another."""
    scored = [c for c in range(NUM_CLASSES) if c not in IGNORED_CLASSES]
    t = np.asarray(y_true, dtype=np.float64)[scored]
    p = np.asarray(y_pred, dtype=np.float64)[scored]
    t = t / t.sum() + EPSILON
    p = p / p.sum() + EPSILON
    return float(np.sum(t * np.log(t / p)))


def fold_means(manifest: Manifest) -> dict[int, np.ndarray]:
    """Mean class-proportion vector of each fold (from its pixel counts)."""
    out = {}
    for k in range(manifest.num_folds):
        pixels = manifest.class_pixels([k]).astype(np.float64)
        out[k] = pixels / pixels.sum() if pixels.sum() else pixels
    return out


def fold_kl(manifest: Manifest) -> dict[int, float]:
    """KL (challenge formula) of each fold's mean proportions against the global mean."""
    total = manifest.class_pixels().astype(np.float64)
    if not total.sum():
        return {}
    overall = total / total.sum()
    return {k: kl_divergence(overall, mean) for k, mean in fold_means(manifest).items() if mean.sum()}


def _counts_table(manifest: Manifest) -> list[str]:
    lines = ["split  fold  shards  samples        MB"]
    groups = [("train", k) for k in range(manifest.num_folds)] + [("test", None)]
    for split, fold in groups:
        shards = manifest.shards(split, None if fold is None else [fold])
        if split == "test" and not shards:
            continue
        samples = sum(s["count"] for s in shards)
        size = sum(s["bytes"] for s in shards) / 1e6
        lines.append(f"{split:<5}  {'-' if fold is None else fold:>4}  {len(shards):>6}  {samples:>7}  {size:>8.1f}")
    return lines


def _class_table(manifest: Manifest) -> list[str]:
    short = [name[:10] for name in CLASS_NAMES]
    lines = ["fold  " + " ".join(f"{n:>10}" for n in short) + "  KL vs global"]
    kl = fold_kl(manifest)
    for k, mean in fold_means(manifest).items():
        row = " ".join(f"{100 * v:>10.3f}" for v in mean)
        lines.append(f"{k:>4}  {row}  {kl[k]:.3e}" if k in kl else f"{k:>4}  {row}  -")
    total = manifest.class_pixels().astype(np.float64)
    if total.sum():
        lines.append(" all  " + " ".join(f"{100 * v:>10.3f}" for v in total / total.sum()))
    return lines


def _channel_table(manifest: Manifest) -> list[str]:
    stats = manifest.data["channel_stats"]
    if not stats["mean"]:
        return ["(no train pixels)"]
    lines = ["band        mean         std    min    max"]
    for i, band in enumerate(BANDS[: len(stats["mean"])]):
        lines.append(f"{band:<4}  {stats['mean'][i]:>10.3f}  {stats['std'][i]:>10.3f}  "
                     f"{stats['min'][i]:>5}  {stats['max'][i]:>5}")
    return lines


def drawn_tile_by_tile(block_size) -> bool:
    """Whether a pack's folds were drawn tile by tile (``block_size`` from its manifest; None: a pack
    made before blocks)."""
    return block_size is None or block_size == 1


def fold_scheme(block_size) -> str:
    """How a pack drew its folds."""
    if drawn_tile_by_tile(block_size):
        return "tile by tile: a tile's neighbours were in the other folds"
    return f"blocks of {block_size} train tiles in id order"


def describe(root) -> str:
    """Folds, counts per split and fold, class distribution and KL per fold, channel statistics."""
    m = load_manifest(root)
    d = m.data
    head = [f"shards   {m.root}",
            f"source   {d.get('source', '?')}",
            f"format   {d['format_version']} (tool {d.get('tool_version', '?')}, encoding "
            + ", ".join(f"{k}={v}" for k, v in d.get("encoding", {}).items()) + ")",
            f"folds    {m.num_folds} (seed {d.get('seed', '?')}, {fold_scheme(d.get('block_size'))}); "
            f"train {d['counts'].get('train', 0)}, "
            f"test {d['counts'].get('test', 0)} tiles"]
    sections = [head,
                ["", "samples per split and fold"] + _counts_table(m),
                ["", "class distribution per fold (mean tile proportions, %), KL of fold mean vs global mean"]
                + _class_table(m),
                ["", "channel statistics over train pixels"] + _channel_table(m)]
    return "\n".join(line for section in sections for line in section)
