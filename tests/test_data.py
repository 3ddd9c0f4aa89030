"""The shard stream: equal full micro-batches on every rank whatever the shard sizes, each
validation tile exactly once, augmentations applied to image and mask alike."""
from __future__ import annotations

import csv
import itertools
import re

import numpy as np
import pytest
import torch
import webdataset as wds

from lc_common.errors import InputError
from lc_common.tiles import class_proportions
from shard_tools.format import encode_sample
from dist_lc.loading import Loader
from dist_lc.data import (ShardStream, apply_views, balanced_range, random_crop, random_flip_rotate, random_view,
                          segments, train_steps)

from torchrun_util import torchrun

UNEVEN = [7, 3, 1, 5, 2, 9]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Six shards of 7, 3, 1, 5, 2, 9 tiny tiles (8×8); image band 0 encodes the tile number."""
    root, shards, n = tmp_path_factory.mktemp("uneven"), [], 0
    for i, count in enumerate(UNEVEN):
        path = root / f"train-f0-{i:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for _ in range(count):
                mask = (np.arange(64).reshape(8, 8) + n) % 10
                image = np.zeros((8, 8, 4), np.uint16)
                image[..., 0], image[..., 1] = n, mask * 100
                sink.write(encode_sample(str(n), image, mask.astype(np.uint8)))
                n += 1
        shards.append((str(path), count))
    return shards


def keys_of(loader):
    batches = [b["key"] for b in loader]
    return batches, [k for b in batches for k in b]


def test_balanced_range_partitions_exactly():
    for total, parts in itertools.product(range(0, 30), range(1, 7)):
        ranges = [balanced_range(total, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_segments_cover_a_range_across_shards():
    shards = [("a", 3), ("b", 0), ("c", 4), ("d", 2)]
    assert [(s.path, s.skip, s.take) for s in segments(shards, 2, 8)] == [("a", 2, 1), ("c", 0, 4), ("d", 0, 1)]


@pytest.mark.parametrize("world,micro,accum,workers", [(1, 2, 1, 0), (2, 2, 1, 2), (3, 2, 2, 0), (2, 3, 1, 2),
                                                       (4, 1, 3, 0)])
def test_every_rank_gets_the_same_full_batches(uneven_shards, world, micro, accum, workers):
    total = sum(UNEVEN)
    steps = train_steps(total, world, micro, accum)
    n = steps * accum * micro
    seen = []
    for rank in range(world):
        ds = ShardStream(uneven_shards, rank * n, (rank + 1) * n, micro, train=True, augment=True,
                         shuffle_buffer=4, seed=1, epoch=2, rank=rank)
        batches, keys = keys_of(Loader(ds, workers))
        assert len(batches) == steps * accum, f"rank {rank} ran {len(batches)} micro-batches"
        assert all(len(b) == micro for b in batches)
        seen += keys
    assert len(seen) == len(set(seen)) == world * n  # no tile twice in an epoch
    assert total - len(seen) < world * micro * accum  # only the tail that cannot fill a step waits


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (5, 0)])
def test_evaluation_sees_every_tile_exactly_once(uneven_shards, world, workers):
    total, seen = sum(UNEVEN), []
    for rank in range(world):
        a, b = balanced_range(total, world, rank)
        _, keys = keys_of(Loader(ShardStream(uneven_shards, a, b, 4), workers))
        seen += keys
    assert sorted(seen, key=int) == [str(i) for i in range(total)]


def test_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 10, (16, 16)).astype(np.uint8)
    image = np.stack([mask.astype(np.uint16) * 7 + c for c in range(4)], axis=-1)
    outcomes = set()
    for _ in range(40):
        img, msk = random_flip_rotate(image, mask, rng)
        assert np.array_equal(img[..., 0], msk.astype(np.uint16) * 7)
        outcomes.add(msk.tobytes())
    assert len(outcomes) == 8  # all flips and rotations occur


def test_the_device_applies_each_sample_the_view_its_worker_drew():
    """apply_views on a batch = random_flip_rotate sample by sample, with the same draws, bit for bit."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 24356, (24, 10, 10, 4)).astype(np.uint16)
    masks = rng.integers(0, 10, (24, 10, 10)).astype(np.uint8)
    expected, views = [], []
    for i in range(len(images)):
        img, msk = random_flip_rotate(images[i], masks[i], np.random.default_rng(i))
        expected.append((np.ascontiguousarray(img), np.ascontiguousarray(msk)))
        views.append(random_view(np.random.default_rng(i)))
    assert len(set(views)) == 8
    out_img, out_mask = apply_views(torch.from_numpy(images), torch.from_numpy(masks),
                                    torch.tensor(views, dtype=torch.int8))
    assert out_img.dtype == torch.uint16
    assert np.array_equal(out_img.numpy(), np.stack([e[0] for e in expected]))
    assert np.array_equal(out_mask.numpy(), np.stack([e[1] for e in expected]))


def test_training_batches_carry_their_views_and_the_pixels_as_stored(uneven_shards):
    """The workers copy pixels as the shard holds them (no transposing copy); the view travels beside."""
    batch = next(iter(ShardStream(uneven_shards, 0, 4, 4, train=True, augment=True, seed=0)))
    plain = next(iter(ShardStream(uneven_shards, 0, 4, 4, train=True, augment=False, seed=0)))
    assert batch["views"].shape == (4, 2) and "views" not in plain
    assert torch.equal(batch["image"], plain["image"]) and torch.equal(batch["mask"], plain["mask"])


def test_crop_cuts_image_and_mask_alike():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 10, (32, 32)).astype(np.uint8)
    image = np.repeat(mask[..., None].astype(np.uint16), 4, axis=-1)
    img, msk = random_crop(image, mask, 8, rng)
    assert img.shape == (8, 8, 4) and msk.shape == (8, 8)
    assert np.array_equal(img[..., 2], msk)


def test_cropped_tiles_carry_the_crop_proportions(uneven_shards):
    ds = ShardStream(uneven_shards, 0, 8, 4, train=True, crop=4, seed=0)
    for batch in Loader(ds, 0):
        for mask, props in zip(batch["mask"], batch["props"]):
            np.testing.assert_allclose(props.numpy(), class_proportions(mask.numpy()), atol=1e-7)


def test_a_shard_shorter_than_its_manifest_is_one_clear_error(uneven_shards):
    """A shard of 9 samples that its manifest lists as 11 is named, not left as a silently short rank."""
    path, count = uneven_shards[-1]
    with pytest.raises(InputError, match=rf"{re.escape(path)}: the shard ends after {count} samples, .* at least {count + 2}"):
        list(ShardStream([(path, count + 2)], 0, count + 2, 1, train=True))


def test_a_bad_shard_read_by_a_loader_worker_is_still_one_line(uneven_shards):
    """torch re-raises a worker's error with the worker's traceback as its message; the user reads one line."""
    path, count = uneven_shards[-1]
    loader = Loader(ShardStream([(path, count + 2)], 0, count + 2, 1, train=True), 1)
    with pytest.raises(InputError) as caught:
        list(loader)
    assert str(caught.value) == (f"{path}: the shard ends after {count} samples, its manifest lists at least "
                                 f"{count + 2}; run `lc-shard verify` on its folder")


def test_uneven_real_shards_two_ranks_finish_with_equal_steps(sample_root, tmp_path):
    """13 real tiles in shards of 3, 3, 1 / 3, 3 (2 folds), 2 ranks × 2 loader workers: no hang."""
    src = tmp_path / "src"
    ids = sorted((p.stem for p in (sample_root / "train" / "masks").glob("*.tif")), key=int)[:13]
    for sub in ("images", "masks"):
        (src / "train" / sub).mkdir(parents=True)
        for i in ids:
            (src / "train" / sub / f"{i}.tif").symlink_to(sample_root / "train" / sub / f"{i}.tif")
    from shard_tools.pack import pack

    manifest = pack(src, tmp_path / "shards", folds=2, seed=0, samples_per_shard=3, workers=1, progress=False)
    assert sorted(s["count"] for s in manifest.data["shards"]) == [1, 3, 3, 3, 3]
    run = tmp_path / "run"
    torchrun(["-m", "dist_lc", "train", "--config", "configs/smoke.yaml", "--set", f"data.shards={tmp_path / 'shards'}",
              "--set", "data.fold=null", "--set", "data.workers=2", "--set", "data.crop=32",
              "--set", "train.batch_size=4", "--set", "train.micro_batch_size=2", "--set", "train.epochs=2",
              "--run-dir", str(run)], timeout=180)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6]  # 13 // (2 ranks × 2) = 3 steps per epoch
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
