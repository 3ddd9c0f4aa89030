"""``dist-lc map`` on georeferenced scenes built from the real sample's tiles: georeferencing kept,
per-tile proportions as ``predict`` gives them, the same map from 2 ranks as from 1, bounded memory,
and bad scenes refused; ``predict --images`` from a raw TIFF folder; pixel metrics against numpy."""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import rasterio
import tifffile

from dist_lc.synth.scenes import mosaic
from lc_common.errors import InputError
from lc_common.locks import held
from lc_common.tiles import CLASS_NAMES
from torchrun_util import REPO, dist_lc, env, fault, torchrun

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


def test_the_map_keeps_the_scene_georeferencing_and_a_gis_reads_it(mapped, scenes, smoke_run):
    assert not (mapped / ".map.lock").exists()   # held while mapping only
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
        made_with = json.loads((mapped / f"{scene.stem}_proportions.json").read_text())["made_with"]
        assert made_with == {"checkpoints": [str(smoke_run.resolve() / "checkpoints" / "best.pt")], "tta": False,
                             "overlap": 0}


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
    # The same rows, each in its place: a row lost, doubled or misplaced would differ by far more than
    # the float16 rounding of probabilities that fp32 kernels compute a little apart on 1 and 2 threads.
    with rasterio.open(mapped / "cut_probabilities.tif") as a, rasterio.open(out / "cut_probabilities.tif") as b:
        np.testing.assert_allclose(a.read(), b.read(), rtol=0, atol=1e-3)
    with rasterio.open(mapped / "cut_classes.tif") as a, rasterio.open(out / "cut_classes.tif") as b:
        assert (a.read() != b.read()).mean() < 1e-4   # a near-tie may tip
    one, two = (json.loads((d / "cut_proportions.json").read_text())["scene_region"] for d in (mapped, out))
    assert one["valid_pixels"] == two["valid_pixels"]
    assert one["proportions"] == pytest.approx(two["proportions"], abs=1e-5)


@pytest.mark.parametrize("spec", ["map-raise nth=2 rank=1", "map-kill nth=2 rank=1"], ids=["raises", "killed"])
def test_a_rank_that_fails_mid_scene_ends_the_map_and_leaves_no_partial_file(smoke_run, scenes, tmp_path, spec):
    """Rank 1 fails at its second window row, once rank 0 has written rows of the scene: no rank waits
    in the next gather, the launch fails, and rank 0 removes the scene's partial files, having heard
    of the failure in the turn's verdict or from torchrun's SIGTERM once rank 1 is gone."""
    out = tmp_path / "out"
    proc = torchrun(["-m", "dist_lc", *map_cmd(smoke_run / "checkpoints" / "best.pt", out, scenes["mosaic"],
                                               extra=["--probabilities", "uint8"])],
                    extra_env=fault(spec), check=False, timeout=300)
    assert proc.returncode != 0
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left in ([], [".map.lock"]), (left, proc.stderr[-3000:])
    if spec.startswith("map-raise"):
        said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert said and ("rank 1 failed first: RuntimeError: injected fault in a window row" in said[0]
                         or "stopped by SIGTERM" in said[0]), proc.stderr[-3000:]


RANK_1_CANNOT_LOAD = """
import os, sys
sys.path.insert(0, os.getcwd())   # the checkout under test (torchrun runs this with the repository as its cwd)
import dist_lc.predict
from lc_common.errors import InputError
if os.environ["RANK"] == "1":   # as on a node whose copy of the checkpoint is damaged
    def damaged(path, device):
        raise InputError(f"{path}: not a checkpoint (truncated)")
    dist_lc.predict.load_network = damaged
from dist_lc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_checkpoint_that_one_rank_cannot_load_ends_every_rank_with_its_cause(smoke_run, scenes, tmp_path):
    """Rank 0 would otherwise go on to its first collective and wait there for rank 1, gone (until the
    group's timeout, or torchrun's SIGTERM, which names no cause)."""
    script = tmp_path / "rank_1_cannot_load.py"
    script.write_text(RANK_1_CANNOT_LOAD)
    ckpt, out = smoke_run / "checkpoints" / "best.pt", tmp_path / "out"
    proc = torchrun([str(script), *map_cmd(ckpt, out, scenes["cut"])], check=False, timeout=300)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"error: rank 1 failed first: InputError: {ckpt}: not a checkpoint (truncated)" in said, \
        proc.stderr[-3000:]
    assert not out.exists()


def test_probabilities_that_are_not_finite_are_one_line_and_no_map(smoke_run, scenes, tmp_path):
    """A model whose output overflows (fp16) or diverged gives NaN, whose argmax is a class: refused,
    naming the scene, the row and the precision, rather than a map of one class."""
    out = tmp_path / "out"
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", out, scenes["cut"]), extra_env=fault("map-nan"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {scenes['cut']}: the window row at pixel row 0 was predicted with "
                           "probabilities that are not finite (NaN/inf); run in"), line
    assert not out.exists() or [p.name for p in out.iterdir()] == [".map.lock"]


def test_an_aoi_that_misses_some_scenes_of_a_folder_is_said_and_maps_them_all(smoke_run, tiles, tmp_path):
    """Two neighbouring tiles, an AOI inside the western one: both are mapped, the eastern one said to
    lie outside the AOI and without AOI proportions (an AOI that misses every scene is refused)."""
    from affine import Affine

    folder = tmp_path / "scenes"
    folder.mkdir()
    for name, tile, east in (("west", tiles[0], 0), ("east", tiles[1], 2560)):
        with rasterio.open(mosaic([[tile]], folder / f"{name}.tif"), "r+") as dst:
            dst.transform = Affine.translation(east, 0) * dst.transform
    out = tmp_path / "out"
    proc = dist_lc(map_cmd(smoke_run / "checkpoints" / "best.pt", out, folder,
                           extra=["--aoi", "500500,4998000,501500,4999000"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {folder / 'east.tif'}: --aoi lies outside the scene" in proc.stderr
    table = pd.read_csv(out / "proportions.csv")
    assert sorted(zip(table["scene"], table["region"])) == [("east", "scene"), ("west", "aoi"), ("west", "scene")]
    assert json.loads((out / "east_proportions.json").read_text())["aoi_region"] is None


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


def test_what_no_data_pixels_hold_does_not_change_their_neighbours(smoke_run, tiles, tmp_path):
    """The right tile is no_data three ways: every band 0, the scene's nodata value, or real pixels its
    mask band masks. The network sees each as the band means, so the left tile's probabilities (a
    window straddles both tiles at --overlap 64) are the same in all three."""
    import torch

    from dist_lc.mapping import row_probabilities
    from dist_lc.predict import Ensemble
    from dist_lc.scene import WINDOW, open_scene, taper, window_grid

    left = tiles[0]
    scenes = [mosaic([[left, np.zeros_like(left)]], tmp_path / "zeros.tif"),
              mosaic([[left, np.full_like(left, 65535)]], tmp_path / "nodata.tif", nodata=65535),
              mosaic([[left, tiles[1]]], tmp_path / "masked.tif")]
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(scenes[2], "r+") as dst:
        mask = np.full((256, 512), 255, np.uint8)
        mask[:, 256:] = 0
        dst.write_mask(mask)
    ensemble = Ensemble([smoke_run / "checkpoints" / "best.pt"], torch.device("cpu"))
    weight = torch.from_numpy(taper(WINDOW))
    seen = []
    for path in scenes:
        with open_scene(path) as scene:
            xs = window_grid(scene.height, scene.width, 64)[1]
            assert any(0 < x < 256 for x in xs)   # a window across the boundary
            seen.append(row_probabilities(scene, ensemble, 0, xs, weight, 4)[0][:, :, :256].astype(np.float32))
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[0], seen[2])


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
    ("out in use", "out: another dist-lc map (pid "),
    ("out under a file", "--out cannot be created (Not a directory)"),
    ("truncated", "cannot read rows"),
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
    elif case == "truncated":   # its header whole: refused when its pixels are first read, at the checks
        mosaic([[tiles[0]]] * 3, scene)
        with open(scene, "r+b") as f:
            f.truncate(scene.stat().st_size // 2)
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
    out, in_use = tmp_path / "out", contextlib.nullcontext()
    if case == "out in use":
        out.mkdir()
        in_use = held(out / ".map.lock", "")   # another mapping's, as far as this one can tell
    elif case == "out under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    with in_use:
        proc = dist_lc(map_cmd(ckpt, out, scene, extra=extra), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and message in line, line
    if case == "aoi outside":   # coordinates a user can copy back
        assert "e+0" not in line and "scene 500000.0,4997440.0,502560.0,5000000.0 in its CRS" in line, line
    # nothing left behind, not even an empty --out
    assert [p.name for p in out.glob("*")] == [".map.lock"] if case == "out in use" else not out.exists()


def test_an_overlap_past_half_a_window_is_warned_about_with_its_cost(tiles, tmp_path):
    """Legal, but a typo (250 for 25) would predict each pixel 1,820 times: said before any work."""
    scene = mosaic([[tiles[0]]], tmp_path / "s.tif")
    proc = dist_lc(map_cmd(scene, tmp_path / "out", scene, extra=["--overlap", "192"]), timeout=120)
    assert "warning: --overlap 192: windows 64 px apart, each pixel predicted about 16 times (128 px: 4 times)" \
        in proc.stderr.splitlines(), proc.stderr[-2000:]
    proc = dist_lc(map_cmd(scene, tmp_path / "out", scene, extra=["--overlap", "128"]), timeout=120)
    assert "--overlap" not in proc.stderr


@pytest.mark.slow
def test_peak_memory_is_bounded_on_a_large_scene(packed_sample, tiles, tmp_path):
    """A 3072 × 4096 scene (12 × 16 tiles, overlap 0) is mapped one row of windows at a time: its
    peak is that of its first 4 rows, where the other 8 rows' 10-class float32 probabilities alone
    would add 335 MB. That growth is the scene's, not the network's: a width-8 network (a one-epoch
    checkpoint made here) maps faster than the smoke run's width 16. The two mappings run side by
    side, each process measuring its own peak. glibc's malloc raises its mmap threshold as large
    blocks are freed, so each row's batches then come from a heap that is returned late and in
    pieces: the peak of that heap wanders by ±100 MB from run to run whatever the scene. A fixed
    threshold (MALLOC_MMAP_THRESHOLD_) hands every large block back when it is freed, and the peak
    is then what the process holds (the same to a few MB from run to run)."""
    from dist_lc.config import load_config
    from dist_lc.train import train

    run = tmp_path / "narrow"
    train(load_config("configs/smoke.yaml", [f"data.shards={packed_sample}", "data.fold=null", "data.crop=16",
                                             "data.workers=0", "model.filters=8", "model.upconv_filters=8",
                                             "train.epochs=1", "train.plot_every=0", "train.loggers=[]"]), run)
    procs, peaks = {}, {}
    with contextlib.ExitStack() as stack:
        for rows in (12, 4):   # the longer first
            scene = mosaic([[tiles[0]] * 16] * rows, tmp_path / f"rows{rows}.tif")
            log = stack.enter_context(open(tmp_path / f"map{rows}.log", "w+"))
            cmd = map_cmd(run / "checkpoints" / "last.pt", tmp_path / f"out{rows}", scene,
                          extra=["--overlap", "0", "--batch-size", "16"])
            procs[rows] = (subprocess.Popen([sys.executable, "-m", "dist_lc", *cmd], cwd=REPO,
                                            env=env(MALLOC_MMAP_THRESHOLD_=str(2**20)), stdout=log,
                                            stderr=subprocess.STDOUT), log)
            stack.callback(procs[rows][0].kill)   # (a no-op once it has ended)
        for rows, (proc, log) in procs.items():
            proc.wait(timeout=600)
            log.seek(0)
            output = log.read()
            assert proc.returncode == 0, output[-2000:]
            peaks[rows] = float(output.split("peak memory of rank 0: ")[1].split()[0])   # its own VmHWM
    assert peaks[12] - peaks[4] < 40, peaks
    with rasterio.open(tmp_path / "out12" / "rows12_classes.tif") as src:
        assert src.shape == (3072, 4096)


# ----------------------------------------------------------------------------- predict from raw TIFFs

def test_predict_from_the_raw_test_folder_equals_predict_from_shards(smoke_run, packed_sample, sample_root, tmp_path):
    ckpt = str(smoke_run / "checkpoints" / "best.pt")
    for args, name in (([f"--shards={packed_sample}"], "shards.csv"),
                       ([f"--images={sample_root / 'test' / 'images'}"], "images.csv")):
        proc = dist_lc(["predict", "--checkpoint", ckpt, *args, "--out", str(tmp_path / name)])
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


# ----------------------------------------------------------------------------- writing and reading, without a model

def synthetic_mosaic(out, rows: int = 2, cols: int = 2, **kwargs):
    """A mosaic of synthetic tiles (dist_lc.synth), as the real ones but without the sample."""
    from dist_lc.synth.generate import make_tile

    return mosaic([[make_tile(0, r * cols + c + 1)[0] for c in range(cols)] for r in range(rows)], out, **kwargs)


def write_map(scene_path, out, probabilities=None, overlap=0):
    """A scene's outputs from MapWriter fed random probabilities, window row by window row, as
    map_scene feeds it: its record."""
    from dist_lc.mapping import MapWriter
    from dist_lc.scene import open_scene, window_grid

    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    with open_scene(scene_path) as scene:
        writer = MapWriter(scene, out, probabilities, None)
        try:
            ys, _ = window_grid(scene.height, scene.width, overlap)
            for i, y in enumerate(ys):
                rows = min(256, scene.height - y)
                probs = rng.dirichlet(np.ones(8), (rows, scene.width)).transpose(2, 0, 1).astype(np.float16)
                writer.add(y, probs, np.ones((rows, scene.width), np.float32),
                           ys[i + 1] if i + 1 < len(ys) else scene.height)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise


LIMITED_WRITE = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, "tests")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from lc_common.errors import WriteError
from test_map import write_map
try:
    write_map(Path(sys.argv[1]), Path(sys.argv[2]), "float32", overlap=int(sys.argv[3]))
except WriteError as exc:
    print(f"WriteError: {exc}")
"""


@pytest.mark.parametrize("overlap", [0, 64], ids=["in write", "at close"])
def test_a_map_that_cannot_be_written_whole_is_a_write_error_and_leaves_no_file(tmp_path, overlap):
    """Under a 1 MB file size limit (as on a full disk or at a quota) the 8 MB of float32
    probabilities fail: with windows on the block grid, GDAL writes whole blocks at once and
    rasterio's write() raises; with overlapping windows, every block is written when the file is
    closed, where GDAL only logs its failure."""
    import subprocess
    import sys

    from torchrun_util import REPO, env

    scene, out = synthetic_mosaic(tmp_path / "s.tif"), tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", LIMITED_WRITE, str(scene), str(out), str(overlap)], cwd=REPO,
                          env=env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == f"WriteError: {out / 's_probabilities.tif'}: cannot write: File too large", \
        proc.stdout + proc.stderr[-3000:]
    assert list(out.iterdir()) == []   # no final name, no partial file


def test_outputs_that_cannot_be_opened_leave_no_partial_file(tmp_path):
    """The classes map opens, the probabilities cannot be created (a folder is in the way)."""
    from lc_common.errors import WriteError

    scene, out = synthetic_mosaic(tmp_path / "s.tif", 1, 1), tmp_path / "out"
    (out / ".s_probabilities.tif.partial.tif").mkdir(parents=True)
    with pytest.raises(WriteError, match=r"s_probabilities\.tif: cannot write: Is a directory"):
        write_map(scene, out, "uint8")
    assert [p.name for p in out.iterdir()] == [".s_probabilities.tif.partial.tif"]


def test_a_final_name_that_cannot_be_taken_leaves_no_output(tmp_path):
    """The classes map renamed, the quicklook not (a folder has its name): the classes map loses its name too."""
    from lc_common.errors import WriteError

    scene, out = synthetic_mosaic(tmp_path / "s.tif", 1, 1), tmp_path / "out"
    (out / "s_quicklook.png" / "x").mkdir(parents=True)
    (out / "s_proportions.json").write_text("{}")   # an earlier map's: it would pass for this one's
    with pytest.raises(WriteError, match=r"s_quicklook\.png: cannot write: Is a directory"):
        write_map(scene, out)
    assert [p.name for p in out.iterdir()] == ["s_quicklook.png"]


def test_a_truncated_scene_is_one_line_naming_the_file_and_rows(tmp_path):
    from dist_lc.scene import open_scene

    scene = synthetic_mosaic(tmp_path / "s.tif", 3, 1)
    with open(scene, "r+b") as f:
        f.truncate(scene.stat().st_size // 2)
    with open_scene(scene) as opened, pytest.raises(InputError) as err:   # the header is whole
        for y in (0, 256, 512):
            opened.read_rows(y, 256)
    assert str(err.value).startswith(f"{scene}: cannot read rows ") and "\n" not in str(err.value)


def test_the_map_has_the_georeferencing_of_its_scene_and_no_other(tmp_path):
    """None for a scene without any (no identity transform claimed); the ground control points of a
    scene georeferenced by them alone."""
    from rasterio.control import GroundControlPoint

    plain = synthetic_mosaic(tmp_path / "plain.tif", 1, 2, crs=None)
    gcps = [GroundControlPoint(0, 0, 500000, 5000000), GroundControlPoint(0, 512, 505120, 5000000),
            GroundControlPoint(256, 0, 500000, 4997440)]
    with rasterio.open(plain) as src:
        profile, pixels = {k: v for k, v in src.profile.items() if k != "transform"}, src.read()
    with rasterio.open(tmp_path / "gcp.tif", "w", **{**profile, "gcps": gcps, "crs": "EPSG:32631"}) as dst:
        dst.write(pixels)
    out = tmp_path / "out"
    assert write_map(plain, out)["crs"] is None
    assert write_map(tmp_path / "gcp.tif", out)["crs"] == "EPSG:32631"
    tags = {t.name for t in tifffile.TiffFile(out / "plain_classes.tif").pages[0].tags}
    assert not tags & {"ModelTransformationTag", "ModelPixelScaleTag", "ModelTiepointTag", "GeoKeyDirectoryTag"}
    with rasterio.open(out / "gcp_classes.tif") as src:
        assert src.gcps[1] == "EPSG:32631" and [(p.row, p.col, p.x, p.y) for p in src.gcps[0]] == \
            [(p.row, p.col, p.x, p.y) for p in gcps]


def test_the_quicklook_of_a_long_narrow_scene_has_a_bounded_size(tmp_path):
    """The quicklook of a strip 512 times as long as it is wide (its rows subsampled to 1024): a figure
    as tall as the strip would pass matplotlib's limit of 2^16 pixels."""
    from PIL import Image

    from dist_lc.mapping import MapWriter
    from dist_lc.scene import open_scene

    with open_scene(synthetic_mosaic(tmp_path / "s.tif", 1, 1)) as scene:
        writer = MapWriter(scene, tmp_path, None, None)
        try:
            writer.look_rgb = [np.full((4, 1024, 2), 1000, np.uint16)]
            writer.look_classes = [np.full((1024, 2), 3, np.uint8)]
            writer._quicklook()
            with Image.open(writer.partial["quicklook"]) as image:
                assert max(image.size) < 4000, image.size
        finally:
            writer.abort()


def test_scenes_are_checked_up_front_then_opened_one_at_a_time(tmp_path, monkeypatch):
    """A folder may hold more scenes than a process may open files: each is checked and closed before
    any work, and open only during its own work."""
    import argparse
    import os
    import shutil

    from dist_lc import mapping

    folder = tmp_path / "scenes"
    folder.mkdir()
    synthetic_mosaic(folder / "a.tif", 1, 1)
    for name in "bcd":
        shutil.copy(folder / "a.tif", folder / f"{name}.tif")

    def open_scenes() -> int:
        links = (os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                 if os.path.exists(f"/proc/self/fd/{fd}"))
        return sum(link.startswith(str(folder)) for link in links)

    during = []

    def fake_map_scene(scene, *args):
        during.append(open_scenes())
        return {"scene": str(scene.path), "width": 256, "height": 256, "aoi_region": None,
                "scene_region": {"valid_pixels": 1, "proportions": {}}}

    monkeypatch.setattr(mapping, "Ensemble", lambda *args, **kwargs: None)
    monkeypatch.setattr(mapping, "map_scene", fake_map_scene)
    args = argparse.Namespace(scenes=[str(folder)], out=str(tmp_path / "out"), overlap=64, aoi=None, checkpoint=[],
                              tta=False, batch_size=8, probabilities=None, device="cpu")
    assert mapping.run(args) == 0
    assert during == [1, 1, 1, 1] and open_scenes() == 0


MALFORMED_AOI = [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "--aoi is not GeoJSON"),
    (b'[{"type": "Polygon", "coordinates": []}]', "must be an object"),
    (b'{"type": "Polygon"}', "Polygon has no valid coordinates"),
    (b'{"type": "Polygon", "coordinates": []}', "Polygon has no valid coordinates"),
    (b'{"type": "MultiPolygon", "coordinates": [[[]]]}', "MultiPolygon has no valid coordinates"),
    (b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[3, 45], [3.1, 45]]]}}',
     "no valid coordinates"),
    (b'{"type": "FeatureCollection", "features": [7]}', "must be a Polygon or MultiPolygon"),
]


@pytest.mark.parametrize("content, problem", MALFORMED_AOI)
def test_a_malformed_geojson_aoi_is_one_line_naming_the_file(tmp_path, content, problem):
    from dist_lc.scene import aoi_mask_for, open_scene, parse_aoi
    from lc_common.errors import InputError

    path = tmp_path / "area.geojson"
    path.write_bytes(content)
    with open_scene(synthetic_mosaic(tmp_path / "s.tif", 1, 1)) as scene, pytest.raises(InputError) as err:
        aoi_mask_for(scene, parse_aoi(str(path)))
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_a_geojson_aoi_is_placed_on_the_scene(tmp_path):
    """The upper-left quarter of a 512² scene, given as a lon/lat Feature."""
    from rasterio.warp import transform_geom

    from dist_lc.scene import aoi_mask_for, open_scene, parse_aoi

    quarter = {"type": "Polygon", "coordinates": [[[500000, 5000000], [502560, 5000000], [502560, 4997440],
                                                   [500000, 4997440], [500000, 5000000]]]}
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": transform_geom("EPSG:32631", "EPSG:4326", quarter)}))
    with open_scene(synthetic_mosaic(tmp_path / "s.tif")) as scene:
        inside = aoi_mask_for(scene, parse_aoi(str(path))).rows(0, 512)
    assert inside[:255, :255].all() and not inside[257:].any() and not inside[:, 257:].any()


LOCAL_CRS = 'LOCAL_CS["arbitrary",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'


@pytest.mark.parametrize("case", ["local CRS", "metres as lon/lat"])
def test_an_aoi_that_cannot_be_placed_in_the_scene_crs_is_one_line_naming_the_scene(tmp_path, case):
    """PROJ finds no way from lon/lat to a local (engineering) CRS, and refuses latitudes beyond the
    poles on the way to UTM: a line naming the scene and the reason, not GDAL's error."""
    from rasterio.crs import CRS

    from dist_lc.scene import aoi_mask_for, open_scene, parse_aoi
    from lc_common.errors import InputError

    if case == "local CRS":
        scene, aoi = synthetic_mosaic(tmp_path / "s.tif", 1, 1, crs=CRS.from_wkt(LOCAL_CRS)), "lonlat:3,45,3.1,45.1"
    else:   # past the parser's own check, as a GeoJSON in UTM metres would be without it
        scene, aoi = synthetic_mosaic(tmp_path / "s.tif", 1, 1), "lonlat:3,45,3.1,45.1"
    with open_scene(scene) as opened, pytest.raises(InputError) as err:
        geometry, crs = parse_aoi(aoi)
        if case == "metres as lon/lat":
            geometry = {"type": "Polygon", "coordinates": [[[500000, 4999000], [501000, 4999000], [501000, 5000000],
                                                            [500000, 5000000], [500000, 4999000]]]}
        aoi_mask_for(opened, (geometry, crs))
    text = str(err.value)
    assert text.startswith(f"{scene}: the --aoi cannot be placed in the scene's CRS (") and "\n" not in text, text
    assert len(text) < 300 and "$schema" not in text, text   # the local CRS named, not spelled out in PROJJSON


@pytest.mark.parametrize("aoi, problem", [
    ("lonlat:200,45,201,46", "longitudes in -180..180 and latitudes in -90..90"),
    ("lonlat:3,95,3.1,96", "longitudes in -180..180 and latitudes in -90..90"),
    ("utm.geojson", "not longitudes and latitudes"),
])
def test_an_aoi_outside_longitudes_and_latitudes_is_refused_before_any_scene(tmp_path, aoi, problem):
    from dist_lc.scene import parse_aoi
    from lc_common.errors import InputError

    if aoi.endswith(".geojson"):   # UTM metres where GeoJSON holds degrees
        aoi = str(tmp_path / aoi)
        (tmp_path / "utm.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [[
            [500000, 4999000], [501000, 4999000], [501000, 5000000], [500000, 5000000], [500000, 4999000]]]}))
    with pytest.raises(InputError) as err:
        parse_aoi(aoi)
    assert problem in str(err.value) and "\n" not in str(err.value), str(err.value)


def half_empty_scene(out):
    """A 256 × 512 synthetic scene whose right tile is every band 0 (no_data)."""
    from dist_lc.synth.generate import make_tile

    tile = make_tile(0, 1)[0]
    return mosaic([[tile, np.zeros_like(tile)]], out)


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_the_probabilities_mask_their_no_data_pixels(tmp_path, kind):
    """0 is a probability, so no nodata value can say no_data: the file's own mask band does, kept inside
    the GeoTIFF (no .msk beside it), as a GIS reads it."""
    out = tmp_path / "out"
    write_map(half_empty_scene(tmp_path / "s.tif"), out, kind)
    assert not list(out.glob("*.msk"))
    with rasterio.open(out / "s_probabilities.tif") as src:
        mask, probs = src.dataset_mask(), src.read(masked=True)
    assert (mask[:, 256:] == 0).all() and (mask[:, :256] == 255).all()
    assert np.ma.getmaskarray(probs)[:, :, 256:].all() and not np.ma.getmaskarray(probs)[:, :, :256].any()


def test_pixels_masked_by_the_scene_mask_band_are_no_data(tmp_path):
    """A scene whose internal mask band masks its right tile (every pixel of it has data): no class
    there, and only the left tile's pixels in the proportions."""
    from dist_lc.scene import open_scene

    scene = synthetic_mosaic(tmp_path / "s.tif", 1, 2)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(scene, "r+") as dst:
        mask = np.full((256, 512), 255, np.uint8)
        mask[:, 256:] = 0
        dst.write_mask(mask)
    assert not (tmp_path / "s.tif.msk").exists()
    record = write_map(scene, tmp_path / "out")
    with rasterio.open(tmp_path / "out" / "s_classes.tif") as src:
        classes = src.read(1)
    assert (classes[:, 256:] == 0).all() and (classes[:, :256] >= 2).all()
    assert record["scene_region"]["valid_pixels"] == 256 * 256
    with open_scene(scene) as opened:   # a window of rows, not the whole scene's mask
        assert opened.valid(opened.read_rows(100, 20), 100).sum() == 20 * 256


def test_a_fourth_band_tagged_alpha_is_the_nir_not_a_mask(tmp_path):
    """tifffile tags the 4th sample of an RGB image alpha by default: in a scene it is the NIR, not a
    mask band, so a dark NIR stays valid; a NIR at 0 is no_data as any band at 0 is."""
    from dist_lc.scene import open_scene

    image = np.full((256, 256, 4), 1000, np.uint16)
    image[:, :128, 3] = 5
    image[:, 255, 3] = 0
    tifffile.imwrite(tmp_path / "rgb.tif", image, photometric="rgb")
    with open_scene(tmp_path / "rgb.tif") as scene:
        assert scene.dataset.colorinterp[3].name == "alpha" and not scene.has_mask_band
        valid = scene.valid(scene.read_rows(0, 256), 0)
        assert valid[:, :255].all() and not valid[:, 255].any()


def test_a_map_without_probabilities_removes_those_of_an_earlier_map(tmp_path):
    """Mapped again into the same folder without --probabilities, a scene keeps no probabilities of the
    earlier map beside classes they no longer match."""
    scene, out = synthetic_mosaic(tmp_path / "s.tif", 1, 1), tmp_path / "out"
    write_map(scene, out, "uint8")
    assert (out / "s_probabilities.tif").exists()
    write_map(scene, out)
    assert sorted(p.name for p in out.iterdir()) == ["s_classes.tif", "s_proportions.json", "s_quicklook.png"]


def test_large_outputs_are_bigtiff_and_small_ones_classic(tmp_path):
    """A compressed GeoTIFF is classic unless asked: one past 4 GiB could not be written. A scene whose
    float32 probabilities hold 2.1 GB uncompressed gets a BigTIFF, its 67 MB class map a classic TIFF
    (no pixel written: closing files GDAL left empty costs a fraction of a second)."""
    import types
    from pathlib import Path

    from dist_lc.mapping import MapWriter

    scene = types.SimpleNamespace(width=8192, height=8192, path=Path("big.tif"), georeferencing={})
    writer = MapWriter(scene, tmp_path, "float32", None)
    try:
        writer.classes.close()
        writer.probs_file.close()
        magic = {key: writer.partial[key].read_bytes()[:4] for key in ("classes", "probabilities")}
    finally:
        writer.abort()
    assert magic == {"classes": b"II*\x00", "probabilities": b"II+\x00"}   # classic, BigTIFF


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_overlapping_window_rows_leave_no_dead_bytes_in_the_geotiffs(tmp_path, kind):
    """Window rows 192 rows apart (the default overlap) finish rows that end inside a block: were
    they written as they came, GDAL would write each such block twice and leave its first copy in the
    file (a third of a float32 map). Every tile's bytes, the mask's included, are all the file holds
    beside its header. GDAL's block cache is made too small to hold a block until the file closes, as
    the map's is on a wide scene. The dead bytes left are less than any tile: the headers GDAL writes
    again when it adds the overviews."""
    import tifffile

    out = tmp_path / "out"
    with rasterio.Env(GDAL_CACHEMAX=1):   # bytes, as rasterio takes it: no block stays cached
        write_map(synthetic_mosaic(tmp_path / "s.tif", rows=3, cols=3, crop=(700, 700)), out, kind, overlap=64)
    for name in ("s_classes.tif", "s_probabilities.tif"):
        with tifffile.TiffFile(out / name) as tif:
            live = sum(sum(page.databytecounts) for page in tif.pages)
            smallest = min(tif.pages[0].databytecounts)
        assert (out / name).stat().st_size - live < smallest, name


def test_the_geotiffs_have_overviews_that_keep_classes_and_no_data(tmp_path):
    """Halvings down to one block, as gdaladdo makes them: a GIS draws the whole scene from them.
    The class map's overviews hold classes (the most frequent, not an average of class numbers),
    its no_data stays 0; the probabilities' are averages of valid pixels, masked where none is."""
    from dist_lc.mapping import overview_factors

    assert [overview_factors(h, w) for h, w in ((256, 256), (257, 100), (700, 700), (10980, 10980))] == [
        [], [2], [2, 4], [2, 4, 8, 16, 32, 64]]
    path = synthetic_mosaic(tmp_path / "s.tif", rows=3, cols=3, crop=(700, 700))
    with rasterio.open(path, "r+") as dst:   # an empty left edge: no_data, in the outputs and their overviews
        dst.write(np.zeros((4, 700, 100), np.uint16), window=rasterio.windows.Window(0, 0, 100, 700))
    write_map(path, tmp_path / "out", "uint8", overlap=64)
    with rasterio.open(tmp_path / "out" / "s_classes.tif") as classes:
        assert classes.overviews(1) == [2, 4]
        base, coarse = classes.read(1), classes.read(1, out_shape=(175, 175))   # GDAL reads the overview
    assert set(np.unique(coarse)) <= set(np.unique(base)) and (coarse[:, :25] == 0).all() and coarse[:, 25:].all()
    with rasterio.open(tmp_path / "out" / "s_probabilities.tif") as probs:
        assert probs.overviews(1) == [2, 4]
        mask = probs.read_masks(1, out_shape=(350, 350))
        half = probs.read(out_shape=(8, 350, 350)).astype(np.float64)
        full = probs.read().astype(np.float64)
    assert (mask[:, :50] == 0).all() and mask[:, 50:].all()
    pooled = full[:, :, 100:].reshape(8, 350, 2, 300, 2).mean(axis=(2, 4))
    assert np.abs(half[:, :, 50:] - pooled).max() <= 1   # averages, rounded to uint8


def test_a_lonlat_aoi_follows_its_parallels_across_the_scene(tmp_path):
    """A lon/lat box's northern edge is a parallel, which is curved in UTM: joined by its corners alone,
    a 2°-long edge would cut the scene tens of pixels off the parallel in its middle. Each column's
    AOI pixels are those whose centre lies south of the parallel, to the pixel."""
    from rasterio.warp import transform

    from dist_lc.scene import aoi_mask_for, open_scene, parse_aoi

    with open_scene(synthetic_mosaic(tmp_path / "s.tif", rows=3, cols=4)) as scene:   # 45° N, 3° E (its meridian)
        t = scene.dataset.transform
        _, (lat,) = transform(scene.crs, "EPSG:4326", *map(list, zip(t * (512, 384))))
        inside = aoi_mask_for(scene, parse_aoi(f"lonlat:2,40,4,{lat}")).rows(0, scene.height)
        cols, rows = np.meshgrid(np.arange(scene.width) + 0.5, np.arange(scene.height) + 0.5)
        _, lats = transform(scene.crs, "EPSG:4326", *(t * (cols.ravel(), rows.ravel())))
    expected = (np.asarray(lats) <= lat).reshape(inside.shape)
    assert 0 < expected.mean() < 1
    assert (inside != expected).sum(axis=0).max() <= 1   # the edge's own pixel, at most, in each column


@pytest.mark.parametrize("tag, problem", [
    ({"descriptions": ("B02", "B03", "B04", "B08")},
     "bands described as B02, B03, B04, B08; a scene needs the challenge tiles' order R, G, B, NIR "
     "(Sentinel-2 B04, B03, B02, B08): reorder them (gdal_translate -b 3 -b 2 -b 1 -b 4)"),
    ({"colorinterp": ("blue", "green", "red", "undefined")}, "bands colour-interpreted as blue, green, red, undefined"),
    ({"offsets": (-1000,) * 4}, "its bands carry an offset (-1000; scale 1): the model reads digital numbers"),
    ({"offsets": (-0.1,) * 4, "scales": (1e-4,) * 4}, "its bands carry an offset (-0.1; scale 0.0001)"),
    ({"descriptions": ("B04", "B03", "B02", "B08")}, None),
    ({"descriptions": ("Red", "green", "blue", "NIR"), "scales": (1e-4,) * 4}, None),   # reflectance × 10⁴, no offset
    ({"colorinterp": ("red", "green", "blue", "alpha")}, None),
    ({"descriptions": ("B04", "B03", "B02", "B08"), "colorinterp": ("blue", "green", "red", "undefined")}, None),
    ({"descriptions": ("B1", "B2", "B3", "B4")}, None),   # generic numbers: not Sentinel-2's, not judged
], ids=["S2 order", "BGR colours", "baseline 04.00 offset", "offset in reflectance", "R G B NIR", "names and scale",
        "RGB + alpha", "names over colours", "generic names"])
def test_a_scene_whose_metadata_says_other_bands_is_refused_in_one_line(tmp_path, tag, problem):
    """Band descriptions, colour interpretation and offsets that contradict R, G, B, NIR digital numbers
    without an offset (the tiles the model learned from) are refused before any work; metadata that
    agrees, or says nothing, is not."""
    from rasterio.enums import ColorInterp

    from dist_lc.scene import open_scene

    path = synthetic_mosaic(tmp_path / "s.tif")
    with rasterio.open(path, "r+") as dst:
        for i in range(1, 5):
            dst.set_band_description(i, "")   # the mosaic's own names, which would win over colours
        for i, text in enumerate(tag.get("descriptions", ()), 1):
            dst.set_band_description(i, text)
        if "colorinterp" in tag:
            dst.colorinterp = [ColorInterp[name] for name in tag["colorinterp"]]
        if "offsets" in tag:
            dst.offsets = tag["offsets"]
        if "scales" in tag:
            dst.scales = tag["scales"]
    if problem is None:
        with open_scene(path):
            return
    with pytest.raises(InputError, match=re.escape(f"{path}: {problem}")):
        open_scene(path)


@pytest.mark.parametrize("case", ["plain", "offset", "unnamed", "offset in a corner"])
def test_what_a_scene_leaves_unsaid_is_warned_about_before_any_work(tmp_path, monkeypatch, capsys, case):
    """Digital numbers offset by +1000 (L2A of processing baseline 04.00 in a file that does not declare
    it) and bands without names (a B02, B03, B04, B08 stack would be read with red and blue swapped)
    pass every check of the metadata: each is one warning, naming the file, before any work. A scene
    whose only bright part is a corner is not taken for an offset one."""
    from dist_lc.mapping import plan_scenes

    path = synthetic_mosaic(tmp_path / "s.tif", 2, 2)
    with rasterio.open(path, "r+") as dst:
        pixels = dst.read()
        if case == "offset":
            dst.write(pixels + 1000)
        elif case == "offset in a corner":
            pixels[:, :256, :256] += 1000
            dst.write(pixels)
        elif case == "unnamed":
            for band in range(1, 5):
                dst.set_band_description(band, "")
    monkeypatch.delenv("RANK", raising=False)
    plan_scenes([path], None, 64)
    said = capsys.readouterr().err.splitlines()
    if case == "offset":
        assert len(said) == 1 and said[0].startswith(f"warning: {path}: its darkest pixels are "), said
        assert "digital numbers offset by +1000" in said[0] and "gdal_calc.py" in said[0], said
    elif case == "unnamed":
        assert said == [f"warning: {path}: its bands are not named (band descriptions or colour interpretation): read "
                        "as R, G, B, NIR (Sentinel-2 B04, B03, B02, B08); a B02, B03, B04, B08 stack needs "
                        "gdal_translate -b 3 -b 2 -b 1 -b 4 (naming the bands, e.g. B04..B08 as descriptions, "
                        "silences this)"]
    else:
        assert said == []


def test_a_pixel_with_any_band_at_zero_is_no_data():
    """At a swath's edge the bands' footprints differ: a pixel whose NIR alone is 0 is no ground the
    model knows (the tiles hold no 0), and must not be mapped as black ground."""
    from dist_lc.scene import missing

    pixels = np.full((4, 1, 4), 500, np.uint16)
    pixels[3, 0, 1] = 0          # NIR missing
    pixels[:, 0, 2] = 0          # every band missing
    pixels[0, 0, 3] = 7          # the scene's nodata value in one band
    assert missing(pixels, 7).tolist() == [[False, True, True, True]]
    assert missing(pixels, None).tolist() == [[False, True, True, False]]


def test_the_quicklook_stretch_ignores_no_data():
    """A scene mostly empty (an orbit's edge) is stretched on its valid pixels, not drawn black."""
    from dist_lc.plots import rgb

    image = np.zeros((4, 10, 10), np.uint16)
    image[:, :2, :2] = np.arange(1000, 1004).reshape(2, 2)
    shown = rgb(image, image[0] > 0)
    assert shown[:2, :2].max() == 1.0 and shown[:2, :2].min() == 0.0
    assert rgb(image)[:2, :2].min() > 0.99   # stretched over every pixel, the valid ones all but saturate


def test_a_scene_in_a_crs_without_a_way_to_lonlat_has_no_ground_size(tmp_path):
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from dist_lc.scene import ground_pixel_m, open_scene

    path = synthetic_mosaic(tmp_path / "s.tif", 1, 1)
    with rasterio.open(path, "r+") as dst:
        dst.crs = CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]')
        dst.transform = from_origin(0, 2560, 10, 10)
    with open_scene(path) as scene:
        assert ground_pixel_m(scene) is None


def test_a_lonlat_aoi_across_the_antimeridian_stays_a_small_box():
    """Densified, an edge from 179.99° to -179.99° is 0.02° long, not a trip around the globe."""
    from dist_lc.scene import _densified

    box = {"type": "Polygon", "coordinates": [[[179.99, -10.0], [-179.99, -10.0], [-179.99, -9.98],
                                                [179.99, -9.98], [179.99, -10.0]]]}
    lons = np.asarray(_densified(box)["coordinates"][0])[:, 0]
    assert len(lons) < 20 and np.ptp(lons) == pytest.approx(0.02)


def test_gdal_cache_holds_two_rows_of_windows_of_the_scene_and_a_row_of_output_blocks(monkeypatch):
    """rasterio.Env takes GDAL_CACHEMAX in bytes (GDAL's own variable is in MB): a size in MB given
    there is a cache of a few dozen bytes, and every block is decoded again at each read."""
    from dist_lc.mapping import CACHE_MARGIN, Planned, gdal_cache

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    plan = Planned(None, None, [0], [0, 192, 768])   # a 1024-wide scene
    rows = 2 * 256 * 1024 * 4 * 2   # two window rows of the scene's 4 uint16 bands
    assert gdal_cache([plan], None)["GDAL_CACHEMAX"] == rows + 256 * 1024 + CACHE_MARGIN
    assert gdal_cache([plan], "float32")["GDAL_CACHEMAX"] == rows + 256 * 1024 * (1 + 8 * 4 + 1) + CACHE_MARGIN
    monkeypatch.setenv("GDAL_CACHEMAX", "300")
    assert gdal_cache([plan], None) == {}


@pytest.mark.parametrize("crs, origin, pixel, warned", [
    ("EPSG:32631", (500_000, 5_000_000), (10, 10), None),
    ("EPSG:32631", (500_000, 5_000_000), (20, 20), "pixels of 20 × 20 m on the ground"),
    ("EPSG:32631", (500_000, 5_000_000), (60, 60), "pixels of 60 × 60 m on the ground"),
    ("EPSG:4326", (3, 45), (1.2718e-4, 8.993e-5), None),   # 10 m at 45° N in degrees
    ("EPSG:4326", (3, 45), (8.993e-5, 8.993e-5), "pixels of 7.1 × 10 m on the ground"),
    ("EPSG:3857", (333_958, 5_621_521), (14.142, 14.142), None),   # Web Mercator's 14.1 m are 10 m at 45° N
], ids=["UTM 10 m", "UTM 20 m", "UTM 60 m", "lon/lat 10 m", "lon/lat square degrees", "Web Mercator 10 m"])
def test_a_scene_whose_pixels_are_not_10_m_on_the_ground_is_warned_about_once(tmp_path, monkeypatch, capsys,
                                                                              crs, origin, pixel, warned):
    """The model learned from 10 m pixels; a 20 or 60 m product would be mapped at the wrong scale
    without a word. The size is measured on the ground, whatever the CRS: Web Mercator's nominal
    14 m at 45° N are 10 m. Under a launcher, rank 0 alone says it."""
    from rasterio.transform import from_origin

    from dist_lc.mapping import plan_scenes

    path = synthetic_mosaic(tmp_path / "s.tif")
    with rasterio.open(path, "r+") as dst:
        dst.crs, dst.transform = crs, from_origin(*origin, *pixel)
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        plan_scenes([path], None, 64)
    said = capsys.readouterr().err.splitlines()
    expected = ([f"warning: {path}: {warned}; the model learned from 10 m pixels and may map this scale poorly "
                 "(resample it: gdalwarp -tr 10 10, in a CRS in metres)"] if warned else [])
    assert said == expected


def test_a_box_aoi_over_scenes_in_different_crss_is_refused_in_one_line(tmp_path):
    """The same eastings and northings are ground 6° apart in UTM 31N and 32N: which one the box means
    cannot be guessed."""
    from dist_lc.mapping import plan_scenes
    from dist_lc.scene import parse_aoi

    west = synthetic_mosaic(tmp_path / "west.tif", 1, 1)
    east = synthetic_mosaic(tmp_path / "east.tif", 1, 1, crs="EPSG:32632")
    with pytest.raises(InputError) as err:
        plan_scenes([west, east], parse_aoi("500000,4999000,501000,5000000"), 0)
    assert str(err.value) == ("--aoi x0,y0,x1,y1 is a box in the scenes' CRS, but their CRSs differ (west.tif: "
                              "EPSG:32631; east.tif: EPSG:32632); give it as lonlat:x0,y0,x1,y1 or a GeoJSON file, "
                              "or map each CRS's scenes apart"), err.value
    assert len(plan_scenes([west, east], parse_aoi("lonlat:3.01,45.14,3.02,45.15"), 0)) == 2   # placed in each CRS


def test_a_box_aoi_on_a_scene_without_a_crs_is_placed_by_its_transform_or_refused_without_one(tmp_path):
    from rasterio.transform import from_origin

    from dist_lc.scene import AoiOutside, aoi_mask_for, open_scene, parse_aoi

    plain = synthetic_mosaic(tmp_path / "plain.tif", 1, 1, crs=None)
    with rasterio.open(plain) as src:
        profile, pixels = src.profile, src.read()
    world = tmp_path / "world.tif"   # a transform (a world file's) and no CRS
    with rasterio.open(world, "w", **{**profile, "transform": from_origin(500000, 5000000, 10, 10)}) as dst:
        dst.write(pixels)
    with open_scene(world) as scene:
        assert aoi_mask_for(scene, parse_aoi("500000,4998720,501280,5000000")).rows(0, 256)[:127, :127].all()
        with pytest.raises(AoiOutside, match=r"world\.tif: --aoi lies outside the scene \(AOI 0\.0,0\.0,1\.0,1\.0; "
                                             r"scene 500000\.0,4997440\.0,502560\.0,5000000\.0 in its CRS\)"):
            aoi_mask_for(scene, parse_aoi("0,0,1,1"))
    with open_scene(plain) as scene, pytest.raises(InputError) as err:
        aoi_mask_for(scene, parse_aoi("0,0,100,100"))
    assert str(err.value) == f"{plain}: the scene has no georeferencing, so an --aoi box cannot be placed on it"


def test_a_geojson_aoi_may_give_heights_in_some_rings_and_not_others(tmp_path):
    from dist_lc.scene import aoi_mask_for, open_scene, parse_aoi

    outer = [[2.99, 45.09], [3.01, 45.09], [3.01, 45.11], [2.99, 45.11], [2.99, 45.09]]
    hole = [[3.0, 45.1, 0], [3.005, 45.1, 0], [3.005, 45.105, 0], [3.0, 45.105, 0], [3.0, 45.1, 0]]
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [outer, hole]}))
    geometry, crs = parse_aoi(str(path))
    assert crs == "EPSG:4326" and all(len(p) == 2 for ring in geometry["coordinates"] for p in ring)
    with open_scene(synthetic_mosaic(tmp_path / "s.tif", 1, 1, crs="EPSG:4326")) as scene:
        with pytest.raises(InputError, match="outside the scene"):   # placed, not a ValueError
            aoi_mask_for(scene, (geometry, crs))


def test_a_mapping_into_an_earlier_out_removes_its_proportions_list_first(tmp_path):
    """Its scenes are listed once they are all mapped: until then, an earlier mapping's list would
    stand for this one's."""
    from dist_lc.mapping import claim_out

    out = tmp_path / "out"
    out.mkdir()
    (out / "proportions.csv").write_text("scene,region\nold,scene\n")
    (out / "old_proportions.json").write_text("{}")
    with contextlib.ExitStack() as claimed:
        claim_out(out, claimed)
        assert not (out / "proportions.csv").exists() and (out / "old_proportions.json").exists()
