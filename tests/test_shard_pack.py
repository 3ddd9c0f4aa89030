"""pack: layout, fold purity and stratification, exact props and statistics, reproducibility, overwrite."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from lc_common import atomic
from lc_common.errors import InputError, WriteError
from lc_common.tiles import CLASS_NAMES
from shard_tools import pack as pack_module
from shard_tools.cli import main
from shard_tools.describe import describe, fold_kl
from shard_tools.folds import assign_folds
from shard_tools.format import decode_sample
from shard_tools.manifest import load_manifest
from shard_tools.pack import pack
from shard_tools.verify import verify

from torchrun_util import REPO


def _ids(folder):
    return sorted((p.stem for p in folder.glob("*.tif")), key=int)


@pytest.fixture(scope="module")
def small_src(sample_root, tmp_path_factory):
    """12 real train tiles and 2 real test tiles copied into the challenge layout."""
    src = tmp_path_factory.mktemp("small") / "src"
    for sub, ids in (("train/images", _ids(sample_root / "train/images")[:12]),
                     ("train/masks", _ids(sample_root / "train/images")[:12]),
                     ("test/images", _ids(sample_root / "test/images")[:2])):
        (src / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(sample_root / sub / f"{i}.tif", src / sub / f"{i}.tif")
    return src


def _read_shards(paths):
    """Every sample of the shards as (key, image, mask, props), read the way the trainer reads them."""
    import webdataset as wds

    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    return [decode_sample(sample) for sample in dataset]


# ---------------------------------------------------------------- the real sample


def test_layout_counts_and_fold_purity(packed_sample, sample_root):
    m = load_manifest(packed_sample)
    assert m.data["counts"] == {"train": 300, "test": 24}
    assert m.num_folds == 5 and m.data["seed"] == 0 and m.data["class_names"] == list(CLASS_NAMES)
    names = sorted(p.name for p in packed_sample.glob("*.tar"))
    assert names == sorted(s["name"] for s in m.data["shards"])
    for entry in m.data["shards"]:
        assert (packed_sample / entry["name"]).stat().st_size == entry["bytes"]
        assert entry["count"] == len(entry["keys"]) <= 16
        if entry["split"] == "train":
            assert re.fullmatch(rf"train-f{entry['fold']}-\d{{6}}\.tar", entry["name"])
            assert {m.data["folds"][k] for k in entry["keys"]} == {entry["fold"]}
        else:
            assert re.fullmatch(r"test-\d{6}\.tar", entry["name"]) and entry["fold"] is None
    train_keys = [k for s in m.shards("train") for k in s["keys"]]
    assert sorted(train_keys, key=int) == _ids(sample_root / "train/images")
    assert sorted(m.data["folds"], key=int) == _ids(sample_root / "train/images")
    assert sorted(k for s in m.shards("test") for k in s["keys"]) == sorted(_ids(sample_root / "test/images"))
    assert np.bincount(list(m.data["folds"].values())).tolist() == [60] * 5


def test_each_folds_tiles_are_spread_over_its_shards_not_in_id_order(packed_sample):
    """Neighbouring ids are neighbouring places: in id order the shuffle buffer would feed batches of
    one region. Test tiles stay in id order."""
    m = load_manifest(packed_sample)
    for k in range(m.num_folds):
        keys = [int(key) for s in m.shards("train", [k]) for key in s["keys"]]
        by_id = sorted(keys)
        assert keys != by_id and set(keys) == {int(t) for t, f in m.data["folds"].items() if f == k}
        gap = np.abs(np.diff(keys)).mean()
        assert gap > 5 * np.diff(by_id).mean(), gap
    test_keys = [int(key) for s in m.shards("test") for key in s["keys"]]
    assert test_keys == sorted(test_keys)


def test_props_read_back_equal_train_labels(packed_sample, sample_root):
    labels = pd.read_csv(sample_root / "train_labels.csv").set_index("sample_id")
    m = load_manifest(packed_sample)
    samples = _read_shards(m.shard_path(s) for s in m.shards("train"))
    assert len(samples) == 300
    compared = 0
    for key, image, mask, props in samples:
        assert image.shape == (256, 256, 4) and image.dtype == np.uint16 and mask.dtype == np.uint8
        if int(key) in labels.index:
            assert np.array_equal(props, labels.loc[int(key), list(CLASS_NAMES)].to_numpy(np.float64)), key
            compared += 1
    assert compared == len(set(map(int, m.data["folds"])) & set(labels.index)) == 300


def test_channel_stats_and_class_pixels_exact(packed_sample, sample_root):
    m = load_manifest(packed_sample)
    images = [tifffile.imread(p).reshape(-1, 4) for p in (sample_root / "train/images").glob("*.tif")]
    n = sum(len(im) for im in images)
    mean = sum(im.sum(axis=0, dtype=np.float64) for im in images) / n  # float64 sums of integers: exact
    std = np.sqrt(sum(((im - mean) ** 2).sum(axis=0) for im in images) / n)  # two-pass, independent of pack's
    stats = m.data["channel_stats"]
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-15)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-12)
    assert stats["min"] == np.min([im.min(axis=0) for im in images], axis=0).tolist()
    assert stats["max"] == np.max([im.max(axis=0) for im in images], axis=0).tolist()
    for k in range(m.num_folds):
        ids = [i for i, f in m.data["folds"].items() if f == k]
        counts = sum(np.bincount(tifffile.imread(sample_root / "train/masks" / f"{i}.tif").ravel(), minlength=10)
                     for i in ids)
        assert m.class_pixels([k]).tolist() == counts.tolist()


def test_folds_are_whole_blocks_of_consecutive_ids(packed_sample):
    """The default (auto) for 300 tiles and 5 folds: blocks of 15, at least 4 blocks to a fold."""
    m = load_manifest(packed_sample)
    assert m.data["block_size"] == 15
    ids = sorted(m.data["folds"], key=int)
    blocks = [{m.data["folds"][i] for i in ids[b: b + 15]} for b in range(0, len(ids), 15)]
    assert all(len(b) == 1 for b in blocks)
    assert len({f for b in blocks for f in b}) == 5
    assert "blocks of 15 train tiles in id order" in describe(packed_sample)


def _max_fold_kl(props, fold):
    from shard_tools.describe import kl_divergence

    return max(kl_divergence(props.mean(0), props[fold == k].mean(0)) for k in np.unique(fold))


def test_folds_are_stratified(packed_sample, sample_root):
    """Tile by tile: < 1e-3 on the sample; in blocks, better than a random deal of the same blocks."""
    kl = fold_kl(load_manifest(packed_sample))
    assert len(kl) == 5
    labels = pd.read_csv(sample_root / "train_labels.csv").set_index("sample_id")
    props = labels.loc[sorted(map(int, _ids(sample_root / "train/images")))].to_numpy(np.float64)
    assert _max_fold_kl(props, assign_folds(props, 5, 0)) < 1e-3
    blocks = np.arange(len(props)) // 15
    assert np.array_equal(assign_folds(props, 5, 0, blocks)[blocks == 0], [assign_folds(props, 5, 0, blocks)[0]] * 15)
    dealt = [_max_fold_kl(props, np.random.default_rng(s).permutation(20)[blocks] % 5) for s in range(20)]
    assert max(kl.values()) < np.median(dealt), (kl, np.median(dealt))


def test_describe_reports_folds_kl_and_channels(packed_sample):
    text = describe(packed_sample)
    for needle in ("train     0       4       60", "test      -", "KL vs global", "NIR", "cultivated"):
        assert needle in text
    kl_lines = [line for line in text.splitlines() if re.match(r"^\s+\d  ", line) and "e-" in line]
    assert len(kl_lines) == 5


def test_describe_kl_is_the_challenge_formula():
    from dist_lc.metrics import kl_score  # the project's score; shard_tools itself must not import dist_lc

    from shard_tools.describe import kl_divergence

    rng = np.random.default_rng(5)
    for y, yhat in rng.dirichlet(np.ones(10), size=(20, 2)):
        yhat[4] = 0.0
        assert kl_divergence(y, yhat) == pytest.approx(kl_score(y[None], yhat[None]), rel=1e-12)


# ---------------------------------------------------------------- folds


def test_assign_folds_balanced_deterministic_and_seeded():
    props = np.random.default_rng(1).dirichlet(np.full(10, 0.3), size=23)
    a = assign_folds(props, 5, seed=3)
    assert np.array_equal(a, assign_folds(props, 5, seed=3))
    assert not np.array_equal(a, assign_folds(props, 5, seed=4))
    assert sorted(np.bincount(a, minlength=5).tolist()) == [4, 4, 5, 5, 5]
    assert assign_folds(props, 1).tolist() == [0] * 23
    with pytest.raises(ValueError):
        assign_folds(props[:3], 5)
    # blocks of one tile are the tiles; blocks of 3 stay whole and fill the folds within half a block
    assert np.array_equal(assign_folds(props, 5, 3, np.arange(23)), a)
    b = assign_folds(props, 5, seed=3, groups=np.arange(23) // 3)
    assert all(len(set(b[g: g + 3])) == 1 for g in range(0, 23, 3))
    assert max(np.bincount(b, minlength=5)) - min(np.bincount(b, minlength=5)) <= 3
    for seed in range(10):   # a short last block must not crowd a fold out: every fold gets a block
        g = np.arange(9) // 4
        assert sorted(set(assign_folds(np.eye(10)[g], 3, seed, g))) == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot split 4 blocks into 5 folds"):
        assign_folds(props[:12], 5, groups=np.arange(12) // 3)


# ---------------------------------------------------------------- small real copies


def test_shards_are_byte_reproducible(small_src, tmp_path):
    a = pack(small_src, tmp_path / "a", folds=3, samples_per_shard=3, workers=0, progress=False)
    b = pack(small_src, tmp_path / "b", folds=3, samples_per_shard=3, workers=2, progress=False)
    assert a.data["shards"] == b.data["shards"]
    for entry in a.data["shards"]:
        assert (tmp_path / "a" / entry["name"]).read_bytes() == (tmp_path / "b" / entry["name"]).read_bytes()


def test_refuses_non_empty_folder_and_overwrite_replaces(small_src, tmp_path):
    out = tmp_path / "out"
    pack(small_src, out, folds=2, samples_per_shard=2, workers=0, progress=False)
    before = {p.name for p in out.glob("*.tar")}
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        pack(small_src, out, folds=2, workers=0, progress=False)
    (out / "notes.txt").write_text("kept")
    m = pack(small_src, out, folds=2, samples_per_shard=5, workers=0, overwrite=True, progress=False)
    after = {p.name for p in out.glob("*.tar")}
    assert after == {s["name"] for s in m.data["shards"]} and len(after) < len(before)
    assert (out / "notes.txt").read_text() == "kept"
    verify(out)


def _contents(folder):
    """Every entry of a folder (hidden ones too) with its bytes (None: a folder), to compare after."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


def test_crash_during_overwrite_keeps_the_earlier_pack(small_src, tmp_path, monkeypatch):
    """A failure while the shards are written (here the sixth tile's read) leaves the earlier pack as
    it was, and nothing of this run: the new shards are moved in only once all are written."""
    out = tmp_path / "out"
    pack(small_src, out, folds=2, samples_per_shard=2, workers=0, progress=False)
    before = _contents(out)
    calls = []

    def failing_load(tile):
        calls.append(tile.id)
        if len(calls) > 5:
            raise RuntimeError("simulated crash")
        return real_load(tile)

    real_load = pack_module.load_tile
    monkeypatch.setattr(pack_module, "load_tile", failing_load)
    with pytest.raises(RuntimeError):
        pack(small_src, out, folds=2, samples_per_shard=3, workers=0, overwrite=True, progress=False)
    assert _contents(out) == before
    verify(out)


def test_a_second_pack_into_a_folder_being_packed_is_refused_and_the_first_left_whole(small_src, tmp_path):
    """Two packs at once into one folder (two terminals): the second would empty the first's staging
    folder or publish over it; it is refused in one line, even with --overwrite, and changes nothing."""
    from lc_common.locks import held

    out = tmp_path / "out"
    pack(small_src, out, folds=2, samples_per_shard=5, workers=0, progress=False)
    before = _contents(out)
    with held(out / pack_module.LOCK_NAME, "", transient=True):   # the first pack, still writing, to the second
        with pytest.raises(InputError, match=r"another pack \(pid \d+ on .+ since .+\) is writing into this folder"):
            pack(small_src, out, folds=2, samples_per_shard=3, workers=0, overwrite=True, progress=False)
        during = _contents(out)
        assert during.pop(pack_module.LOCK_NAME).startswith(f"pid {os.getpid()} on ".encode()) and during == before
    assert _contents(out) == before
    verify(out)


def test_a_killed_runs_staging_folder_is_taken_over(small_src, tmp_path):
    """A run killed while writing leaves its staging folder: the next run (no --overwrite needed when
    the folder holds nothing else) empties it and leaves none behind."""
    out = tmp_path / "out"
    (out / pack_module.STAGING_NAME).mkdir(parents=True)
    (out / pack_module.STAGING_NAME / "train-f0-000000.tar").write_bytes(b"half a shard")
    m = pack(small_src, out, folds=2, samples_per_shard=5, workers=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["name"] for s in m.data["shards"])])
    verify(out)


def _fail_at_replace(monkeypatch, name: str) -> None:
    """os.replace onto ``name`` fails (pack moves the shards into place in plan order, test shards
    last, then renames the manifest's temporary file), as on a file system that goes away."""
    real = os.replace

    def replace(a, b):
        if os.path.basename(b) == name:
            raise OSError(errno.EIO, "simulated I/O error")
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)


def _fail_at_manifest_fsync(monkeypatch) -> None:
    """The folder's fsync after the manifest's rename fails: the manifest is in place, the write failed."""
    def fsync_dir(folder):
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(atomic, "fsync_dir", fsync_dir)


@pytest.mark.parametrize("fail", ["first shard's move", "last shard's move", "manifest's rename",
                                  "manifest folder's fsync"])
def test_a_failure_while_moving_the_shards_in_leaves_no_manifest_and_no_shard(small_src, tmp_path, monkeypatch,
                                                                              fail):
    """Once the old manifest is deleted the old pack is gone: a failure from there on must leave neither
    a manifest (which could list shards that are not there) nor shards nor temporary files."""
    out = tmp_path / "out"
    pack(small_src, out, folds=2, samples_per_shard=4, workers=0, progress=False)
    (out / "notes.txt").write_text("kept")
    if fail == "manifest folder's fsync":
        _fail_at_manifest_fsync(monkeypatch)
    else:
        _fail_at_replace(monkeypatch, {"first shard's move": "train-f0-000000.tar", "last shard's move":
                                       "test-000000.tar", "manifest's rename": "manifest.json"}[fail])
    with pytest.raises(WriteError, match="simulated I/O error"):
        pack(small_src, out, folds=2, samples_per_shard=5, workers=0, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_shard_size_limit(small_src, tmp_path):
    m = pack(small_src, tmp_path / "out", folds=2, shard_size_mb=2, workers=0, progress=False)
    train = m.shards("train")
    assert len(train) >= 4
    assert all(s["bytes"] <= 2_000_000 or s["count"] == 1 for s in train)


def test_test_only_source(small_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_src / "test", src / "test")
    m = pack(src, tmp_path / "out", workers=0, progress=False)
    assert m.data["counts"] == {"train": 0, "test": 2} and m.data["folds"] == {}
    verify(tmp_path / "out")
    assert "test      -       1        2" in describe(tmp_path / "out")


def test_cli_pack_verify_describe(small_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pack", "--src", str(small_src), "--out", str(out), "--folds", "3", "--seed", "1",
                 "--samples-per-shard", "4", "--workers", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["num_folds"] == 3
    assert main(["verify", str(out)]) == 0
    assert main(["describe", str(out)]) == 0
    assert "KL vs global" in capsys.readouterr().out
    assert main(["pack", "--src", str(small_src), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_python_dash_m(small_src, tmp_path):
    run = subprocess.run([sys.executable, "-m", "shard_tools", "describe", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "does not exist" in run.stderr


@pytest.mark.parametrize("seed", range(5))
def test_ties_between_folds_do_not_depend_on_rounding(seed):
    """A few kinds of tile, repeated (as all-cultivated or all-water tiles are): the folds' needs tie
    often. Listing the classes in another order changes only the rounding of the sums, and must
    not change the folds (it did while BLAS summed them: one more CPU, other folds)."""
    rng = np.random.default_rng(seed)
    kinds = rng.multinomial(65536, rng.dirichlet(np.full(10, 0.3)), size=4) / 65536
    props = kinds[rng.integers(0, 4, 300)]
    order = rng.permutation(10)
    assert np.array_equal(assign_folds(props, 5, seed), assign_folds(props[:, order], 5, seed))


@pytest.mark.parametrize("fn, items, error", [
    ("local", "range(40)", "Can't pickle local object"),
    ("str", "[threading.Lock() for _ in range(40)]", "cannot pickle '_thread.lock' object"),
], ids=["function", "items"])
def test_a_pool_task_that_cannot_be_pickled_fails_at_once(fn, items, error):
    """A function or items the readers cannot receive raise the pickling error (on Python 3.11 the
    pool's shutdown with cancel_futures waited for ever once its feeder thread had failed to pickle
    tasks)."""
    script = ("import threading\n"
              "from shard_tools.pack import _mapper\n"
              "def main():\n"
              "    def local(x): return x\n"
              "    with _mapper(2) as mapper:\n"
              f"        list(mapper({fn}, {items}))\n"
              "if __name__ == '__main__':\n"
              "    main()\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and error in run.stderr, run.stderr[-2000:]
