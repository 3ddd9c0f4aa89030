"""``dist-lc map`` on georeferenced scenes built from the real sample's tiles: georeferencing kept,
per-tile proportions as ``predict`` gives them, the same map from 2 ranks as from 1, bounded memory,
and bad scenes refused; ``predict --images`` from a raw TIFF folder; pixel metrics against numpy."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import rasterio
import tifffile

from dist_lc.synth.scenes import mosaic
from lc_common.tiles import CLASS_NAMES
from torchrun_util import dist_lc, torchrun

SCORED = list(CLASS_NAMES[2:])


@pytest.fixture(scope="module")
def tiles(sample_root) -> list[np.ndarray]:
    """The first 12 real train tiles, in id order."""
    paths = sorted((sample_root / "train" / "images").iterdir(), key=lambda p: int(p.stem))[:12]
    return [tifffile.imread(p) for p in paths]


@pytest.fixture(scope="module")
def scenes(tiles, tmp_path_factory):
    """A 3 × 4 mosaic of whole tiles (768 × 1024) and a 700 × 1000 cut of it, UTM 31N, 10 m pixels."""
    root = tmp_path_factory.mktemp("scenes")
    grid = [tiles[r * 4:(r + 1) * 4] for r in range(3)]
    return {"mosaic": mosaic(grid, root / "mosaic.tif"), "cut": mosaic(grid, root / "cut.tif", crop=(700, 1000))}


def map_cmd(ckpt, out, *scenes, extra=()):
    return ["map", "--checkpoint", str(ckpt), "--out", str(out), *map(str, scenes), *extra]


@pytest.fixture(scope="module")
def mapped(smoke_run, scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("mapped")
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", out, scenes["mosaic"], scenes["cut"],
                           extra=["--probabilities", "float32", "--overlap", "0"]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_map_keeps_the_scene_georeferencing_and_a_gis_reads_it(mapped, scenes):
    for name, scene in scenes.items():
        with rasterio.open(scene) as src, rasterio.open(mapped / f"{scene.stem}_classes.tif") as out:
            assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
            assert out.nodata == src.nodata == 0 and out.dtypes == ("uint8",)
            assert out.colormap(1)[5][:3] == (21, 75, 35)          # coniferous in the challenge palette
            classes = out.read(1)
            assert set(np.unique(classes)) <= set(range(2, 10))     # no no_data pixels in the real tiles
        assert (mapped / f"{scene.stem}_quicklook.png").stat().st_size > 10_000
        with rasterio.open(mapped / f"{scene.stem}_probabilities.tif") as probs:
            assert probs.count == 8 and probs.descriptions[0] == "P(artificial)"


def test_per_tile_proportions_of_the_map_are_those_of_predict(mapped, smoke_run, tiles, tmp_path):
    """Windows on the tile grid (overlap 0): each tile's mean probabilities are predict's proportions."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, tile in enumerate(tiles):
        tifffile.imwrite(folder / f"{i}.tif", tile, photometric="minisblack", planarconfig="contig")
    proc = dist_lc(["predict", "--checkpoint", str(smoke_run / "checkpoints" / "best.pt"), "--images", str(folder),
                    "--out", str(tmp_path / "p.csv"), "--workers", "0", "--batch-size", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = pd.read_csv(tmp_path / "p.csv").set_index("sample_id")[SCORED].to_numpy()
    with rasterio.open(mapped / "mosaic_probabilities.tif") as src:
        probs = src.read()
    got = np.stack([probs[:, r * 256:(r + 1) * 256, c * 256:(c + 1) * 256].mean(axis=(1, 2))
                    for r in range(3) for c in range(4)])
    np.testing.assert_allclose(got / got.sum(axis=1, keepdims=True), expected, atol=2e-4)   # bf16 batches of 4 vs 4


def test_blended_windows_stay_close_to_predict_on_whole_tiles(smoke_run, scenes, tiles, tmp_path):
    """With the default 64-px overlap a pixel near a tile border is also seen in windows centred
    elsewhere, with other context: the tile's proportions move, but little (mean |Δ| < 0.02)."""
    out = tmp_path / "out"
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", out, scenes["mosaic"],
                           extra=["--probabilities", "float32"]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with rasterio.open(out / "mosaic_probabilities.tif") as blended:
        probs = blended.read()
    got = np.stack([probs[:, r * 256:(r + 1) * 256, c * 256:(c + 1) * 256].mean(axis=(1, 2))
                    for r in range(3) for c in range(4)])
    got /= got.sum(axis=1, keepdims=True)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, tile in enumerate(tiles):
        tifffile.imwrite(folder / f"{i}.tif", tile, photometric="minisblack", planarconfig="contig")
    dist_lc(["predict", "--checkpoint", str(smoke_run / "checkpoints" / "best.pt"), "--images", str(folder),
             "--out", str(tmp_path / "p.csv"), "--workers", "0"])
    expected = pd.read_csv(tmp_path / "p.csv").set_index("sample_id")[SCORED].to_numpy()
    assert np.abs(got - expected).mean() < 0.02


def test_two_ranks_write_the_same_map_as_one_process(mapped, smoke_run, scenes, tmp_path):
    out = tmp_path / "two"
    torchrun(["-m", "dist_lc", *map_cmd(smoke_run / "checkpoints" / "best.pt", out, scenes["cut"],
                                        extra=["--probabilities", "float32", "--overlap", "0"])], timeout=600)
    for name in ("cut_classes.tif", "cut_probabilities.tif"):
        with rasterio.open(mapped / name) as a, rasterio.open(out / name) as b:
            assert np.array_equal(a.read(), b.read()), name
    assert json.loads((out / "cut_proportions.json").read_text())["scene_region"] == \
        json.loads((mapped / "cut_proportions.json").read_text())["scene_region"]


def test_no_data_pixels_and_an_aoi(smoke_run, tiles, tmp_path):
    grid = [[t.copy() for t in tiles[:2]]]
    grid[0][1][:] = 0                                      # the right tile: every band 0
    scene = mosaic(grid, tmp_path / "half.tif")
    out = tmp_path / "out"
    # the left tile in the scene's CRS (UTM, 10 m pixels from x = 500000, y = 5000000 downwards)
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", out, scene,
                           extra=["--aoi", "500000,4997440,502560,5000000"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with rasterio.open(out / "half_classes.tif") as src:
        classes = src.read(1)
    assert (classes[:, 256:] == 0).all() and (classes[:, :256] >= 2).all()
    record = json.loads((out / "half_proportions.json").read_text())
    assert record["scene_region"]["valid_pixels"] == 256 * 256 == record["aoi_region"]["valid_pixels"]
    table = pd.read_csv(out / "proportions.csv")
    assert list(table["region"]) == ["scene", "aoi"] and abs(table[SCORED].sum(axis=1) - 1).max() < 1e-9


def test_a_scene_without_georeferencing_is_mapped_without_a_crs(smoke_run, tiles, tmp_path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.concatenate(tiles[:2], axis=1), photometric="minisblack", planarconfig="contig")
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", tmp_path / "out", plain), timeout=300)
    assert proc.returncode == 0 and "no georeferencing" in proc.stderr
    with rasterio.open(tmp_path / "out" / "plain_classes.tif") as src:
        assert src.crs is None and src.shape == (256, 512)


@pytest.mark.parametrize("case, message", [
    ("3 bands", "3 band(s); a scene needs the 4 bands"),
    ("float32", "bands of type float32, expected uint16"),
    ("missing", "scene does not exist"),
    ("aoi outside", "--aoi lies outside the scene"),
    ("bad aoi", "expected x0,y0,x1,y1"),
    ("not a checkpoint", "not a dist_lc checkpoint"),
    ("overlap", "--overlap 300: must be 0 to 255 pixels"),
])
def test_bad_scenes_and_options_are_one_clear_line(smoke_run, tiles, tmp_path, case, message):
    import rasterio.transform

    scene, ckpt, extra = tmp_path / "s.tif", smoke_run / "checkpoints" / "best.pt", []
    image = tiles[0].transpose(2, 0, 1)
    profile = {"driver": "GTiff", "width": 256, "height": 256, "crs": "EPSG:32631",
               "transform": rasterio.transform.from_origin(500000, 5000000, 10, 10)}
    if case == "3 bands":
        with rasterio.open(scene, "w", count=3, dtype="uint16", **profile) as dst:
            dst.write(image[:3])
    elif case == "float32":
        with rasterio.open(scene, "w", count=4, dtype="float32", **profile) as dst:
            dst.write(image.astype(np.float32))
    elif case != "missing":
        mosaic([[tiles[0]]], scene)
    if case == "aoi outside":
        extra = ["--aoi", "lonlat:100,10,101,11"]
    elif case == "bad aoi":
        extra = ["--aoi", "near the river"]
    elif case == "not a checkpoint":
        ckpt = scene
    elif case == "overlap":
        extra = ["--overlap", "300"]
    proc = dist_lc(map_cmd(ckpt, tmp_path / "out", scene, extra=extra), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line, line
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.slow
def test_peak_memory_is_bounded_on_a_large_scene(smoke_run, tiles, tmp_path):
    """A 4096 × 4096 scene (256 windows of overlap 0 along each side... 16 × 16 tiles): one row of
    windows at a time, so the peak stays far below the scene's 10-class float32 probabilities (640 MB)."""
    tile = tiles[0]
    scene = mosaic([[tile] * 16] * 16, tmp_path / "large.tif")
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", tmp_path / "out", scene,
                           extra=["--overlap", "0", "--batch-size", "16"]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = float(proc.stdout.split("peak memory of rank 0: ")[1].split()[0])   # its own VmHWM
    assert peak_mb < 1500, peak_mb
    with rasterio.open(tmp_path / "out" / "large_classes.tif") as src:
        assert src.shape == (4096, 4096)


# ----------------------------------------------------------------------------- predict from raw TIFFs

def test_predict_from_the_raw_test_folder_equals_predict_from_shards(smoke_run, packed_sample, sample_root, tmp_path):
    ckpt = str(smoke_run / "checkpoints" / "best.pt")
    for args, name in (([f"--shards={packed_sample}"], "shards.csv"),
                       ([f"--images={sample_root / 'test' / 'images'}"], "images.csv")):
        proc = dist_lc(["predict", "--checkpoint", ckpt, *args, "--out", str(tmp_path / name), "--tta"])
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (pd.read_csv(tmp_path / n, dtype={"sample_id": str}).set_index("sample_id") for n in ("shards.csv",
                                                                                                  "images.csv"))
    assert len(a) == 24 and sorted(a.index) == sorted(b.index)
    np.testing.assert_array_equal(a.loc[b.index].to_numpy(), b.to_numpy())


def test_predict_images_refuses_a_folder_without_tiles(smoke_run, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = dist_lc(["predict", "--checkpoint", str(smoke_run / "checkpoints" / "best.pt"),
                    "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    assert proc.returncode == 2 and "no <id>.tif tiles" in proc.stderr


# ----------------------------------------------------------------------------- pixel metrics

def test_validation_pixel_metrics_equal_a_numpy_reference(smoke_run, packed_sample):
    """The last epoch's IoUs in metrics.csv, recomputed in numpy from the same checkpoint's pixels."""
    import torch

    from dist_lc.data import eval_loader, to_nchw
    from dist_lc.predict import Ensemble
    from shard_tools.manifest import load_manifest

    row = pd.read_csv(smoke_run / "metrics.csv").iloc[-1]
    ensemble = Ensemble([smoke_run / "checkpoints" / "last.pt"], torch.device("cpu"))
    truth, pred = [], []
    for batch in eval_loader(load_manifest(packed_sample), "train", [0], world=1, rank=0, batch_size=8, workers=0):
        _, probs = ensemble(to_nchw(batch["image"]), pixels=True)
        truth.append(batch["mask"].numpy().ravel())
        pred.append((probs[:, 2:].argmax(dim=1) + 2).numpy().ravel())
    t, p = np.concatenate(truth), np.concatenate(pred)
    keep = t >= 2
    t, p = t[keep], p[keep]
    ious = {}
    for c, name in enumerate(CLASS_NAMES[2:], 2):
        union = np.sum((t == c) | (p == c))
        if union:
            ious[name] = np.sum((t == c) & (p == c)) / union
    assert row["pixel_acc"] == pytest.approx(np.mean(t == p), abs=2e-3)
    assert row["miou"] == pytest.approx(np.mean(list(ious.values())), abs=2e-3)
    for name, value in ious.items():
        assert row[f"iou_{name}"] == pytest.approx(value, abs=5e-3), name
