"""The synthetic dataset: layout, TIFF format, labels, realism (masks and spectra), determinism."""
from __future__ import annotations

import argparse
import csv
import json
import shutil

import numpy as np
import pytest
import tifffile

from dist_lc.synth import derive_constants as dc
from dist_lc.synth import generate as gen
from lc_common.errors import InputError
from lc_common.tiles import CLASS_NAMES, IMAGE_SHAPE, MAX_PIXEL_VALUE, NUM_CLASSES, class_proportions

N_TRAIN, N_TEST, SEED = 40, 4, 0


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return gen.generate(out, n_train=N_TRAIN, n_test=N_TEST, seed=SEED, progress=False, workers=2)


@pytest.fixture(scope="module")
def train_tiles(synth_root):
    """{id: (image, mask)} of the generated train tiles."""
    return {
        sid: (tifffile.imread(synth_root / "train" / "images" / f"{sid}.tif"),
              tifffile.imread(synth_root / "train" / "masks" / f"{sid}.tif"))
        for sid in range(1, N_TRAIN + 1)
    }


@pytest.fixture(scope="module")
def constants():
    return gen.load_constants()


def read_labels(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], {int(r[0]): np.array([float(v) for v in r[1:]]) for r in rows[1:]}


# ------------------------------------------------------------------------------------------ layout

def test_layout_ids_dtypes_and_shapes(synth_root, train_tiles):
    train_ids = sorted(int(p.stem) for p in (synth_root / "train" / "images").glob("*.tif"))
    mask_ids = sorted(int(p.stem) for p in (synth_root / "train" / "masks").glob("*.tif"))
    test_ids = sorted(int(p.stem) for p in (synth_root / "test" / "images").glob("*.tif"))
    assert train_ids == mask_ids == list(range(1, N_TRAIN + 1))
    assert test_ids == list(range(N_TRAIN + 1, N_TRAIN + N_TEST + 1))
    for image, mask in train_tiles.values():
        assert image.shape == IMAGE_SHAPE and image.dtype == np.uint16
        assert mask.shape == IMAGE_SHAPE[:2] and mask.dtype == np.uint8
        assert 1 <= image.min() and image.max() <= MAX_PIXEL_VALUE
        assert mask.max() < NUM_CLASSES
    test_image = tifffile.imread(synth_root / "test" / "images" / f"{N_TRAIN + 1}.tif")
    assert test_image.shape == IMAGE_SHAPE and test_image.dtype == np.uint16


def test_tiff_files_look_like_the_real_ones(synth_root, sample_root):
    def tags(path):
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return {code: page.tags[code].value for code in (258, 259, 262, 277, 278, 284) if code in page.tags}

    real_image = tags(next((sample_root / "train" / "images").glob("*.tif")))
    real_mask = tags(next((sample_root / "train" / "masks").glob("*.tif")))
    assert tags(synth_root / "train" / "images" / "1.tif") == real_image
    synth_mask = tags(synth_root / "train" / "masks" / "1.tif")
    assert synth_mask == {k: v for k, v in real_mask.items() if k != 284}  # tifffile omits it for 1 sample
    assert real_image[259] == 1  # uncompressed


def test_labels_are_the_mask_proportions(synth_root, train_tiles):
    header, rows = read_labels(synth_root / "train_labels.csv")
    assert header == ["sample_id", *CLASS_NAMES]
    assert sorted(rows) == list(range(1, N_TRAIN + 1))
    for sid, (_, mask) in train_tiles.items():
        assert np.array_equal(rows[sid], class_proportions(mask))


# ------------------------------------------------------------------------------------------ realism

def test_masks_are_spatially_coherent_like_real_ones(train_tiles, sample_root):
    real = [dc.neighbour_agreement(tifffile.imread(p)) for p in (sample_root / "train" / "masks").glob("*.tif")]
    synth = [dc.neighbour_agreement(mask) for _, mask in train_tiles.values()]
    assert np.mean(synth) > 0.9
    assert abs(np.mean(synth) - np.mean(real)) < 0.03
    assert min(synth) > 0.75  # no tile of per-pixel noise


def test_tiles_mix_several_classes_and_many_are_dominated(train_tiles):
    props = np.array([class_proportions(mask) for _, mask in train_tiles.values()])
    assert np.median((props > 0.01).sum(1)) >= 3
    dominated = props.max(1) > 0.5
    assert 0.3 < dominated.mean() < 0.9
    leaders = props.argmax(1)[dominated]
    assert np.isin(leaders, [gen.CULTIVATED, gen.BROADLEAF, gen.CONIFEROUS, gen.HERBACEOUS]).mean() > 0.8


def test_class_frequencies_close_to_the_full_training_set(train_tiles, constants):
    counts = sum(np.bincount(mask.ravel(), minlength=NUM_CLASSES) for _, mask in train_tiles.values())
    freq = counts / counts.sum()
    target = np.array(constants["target_frequencies"])
    assert np.all(np.abs(freq - target) < 0.08), (freq.round(4), target.round(4))
    for c in (gen.ARTIFICIAL, gen.WATER, gen.NATURAL):  # the rare classes are there
        assert counts[c] > 0, CLASS_NAMES[c]


def test_class_frequencies_over_many_masks(constants):
    """Masks only (no pixels), 150 tiles: main classes within 0.035, minor ones within a factor 1.6."""
    rare = gen.rare_patches(constants)
    counts = np.zeros(NUM_CLASSES)
    for sid in range(1, 151):
        rng = np.random.default_rng([SEED, sid])
        landscape = gen.landscape_for(SEED, sid)
        mask, _ = gen.make_mask(rng, landscape, gen.sample_composition(rng, landscape), rare)
        counts += np.bincount(mask.ravel(), minlength=NUM_CLASSES)
    freq = counts / counts.sum()
    target = np.array(constants["target_frequencies"])
    assert np.all(np.abs(freq - target) < 0.035), (freq.round(4), target.round(4))
    minor = (target > 0.005) & (target < 0.1)
    assert np.all(np.abs(np.log(freq[minor] / target[minor])) < np.log(1.6)), (freq.round(4), target.round(4))


def expected_interior_dn_mean(signature: dict, offset: float) -> np.ndarray:
    """Mean DN of the log-normal model: exp(mean + variance / 2) - offset, all levels summed."""
    variance = sum(np.diag(signature[k]) for k in ("cov_tile", "cov_patch", "cov_texture", "cov_white"))
    return np.exp(np.array(signature["log_mean"]) + variance / 2) - offset


def mean_of_tile_means(images, selections) -> np.ndarray:
    """Band means per tile (tiles with 500+ selected pixels), averaged over tiles: one tile's shift
    (its date, its atmosphere) then weighs as much as any other's, whatever its area."""
    means = [image[sel].astype(np.float64).mean(0) for image, sel in zip(images, selections) if sel.sum() >= 500]
    assert len(means) >= 10
    return np.mean(means, axis=0)


def test_band_means_follow_the_constants(train_tiles, constants):
    """Compared in the generator's space log(DN + offset), where the spreads are even across bands."""
    images = [image for image, _ in train_tiles.values()]
    masks = [mask for _, mask in train_tiles.values()]
    interior = [dc.interior_mask(mask) for mask in masks]
    offset = constants["log_offset"]

    def log_gap(observed, expected):
        return np.abs(np.log(observed + offset) - np.log(np.asarray(expected) + offset))

    for c in (gen.ARTIFICIAL, gen.CULTIVATED, gen.BROADLEAF, gen.CONIFEROUS, gen.HERBACEOUS):
        signature = constants["classes"][CLASS_NAMES[c]]
        observed = mean_of_tile_means(images, [mask == c for mask in masks])  # boundaries included
        assert np.all(log_gap(observed, signature["dn_mean"]) < 0.2), (CLASS_NAMES[c], observed)
        if c != gen.ARTIFICIAL:  # interior artificial pixels: too few tiles for a tight check
            inner = mean_of_tile_means(images, [(mask == c) & i for mask, i in zip(masks, interior)])
            expected = expected_interior_dn_mean(signature, offset)
            assert np.all(log_gap(inner, expected) < 0.08), (CLASS_NAMES[c], inner, expected)
    # forests are dark in red and bright in NIR, and coniferous darker in NIR than broadleaf
    pixels = np.concatenate([image[mask == gen.BROADLEAF] for image, mask in zip(images, masks)])
    broad = pixels.mean(0)
    conif = np.concatenate([image[mask == gen.CONIFEROUS] for image, mask in zip(images, masks)]).mean(0)
    assert broad[3] > 5 * broad[0] and conif[3] < broad[3]


def test_pixels_are_not_constant_within_a_class(train_tiles):
    image, mask = train_tiles[1]
    c = np.bincount(mask.ravel()).argmax()
    assert image[mask == c].std(0).min() > 10


@pytest.mark.parametrize("kind, draw, amplitude", [
    ("texture", lambda rng: gen.gaussian_fields(rng, 48, 1.0), lambda f: np.exp(-2 * (np.pi * f) ** 2)),
    ("roughening", lambda rng: gen.gaussian_fields(rng, 48, 3.0), lambda f: np.exp(-2 * (3 * np.pi * f) ** 2)),
    ("town blobs", lambda rng: gen.fractal_fields(rng, 48, 8.0, 3.5), lambda f: (1 + (8 * f) ** 2) ** -1.75),
    ("patches", lambda rng: gen.fractal_fields(rng, 48, 24.0, 3.0), lambda f: (1 + (24 * f) ** 2) ** -1.5),
])
def test_noise_fields_keep_the_correlation_of_their_whole_spectrum(kind, draw, amplitude):
    """Fields drawn from the low-frequency block only correlate as the full spectrum says they should."""
    n = 512
    radius = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    covariance = np.fft.ifft2(amplitude(radius) ** 2).real
    expected = covariance[0, :13] / covariance[0, 0]
    fields = draw(np.random.default_rng(7))
    measured = [1.0] + [float((fields[:, :, :-lag] * fields[:, :, lag:]).mean()) for lag in range(1, 13)]
    assert np.allclose(measured, expected, atol=0.03), (kind, np.round(measured, 3), np.round(expected, 3))


def test_normal_draws_are_standard_normal_and_independent():
    from scipy import stats

    draws = gen.standard_normal(np.random.default_rng(11), (1000, 1001)).astype(np.float64).ravel()
    assert draws.size == 1001000
    assert abs(draws.mean()) < 0.005 and abs(draws.var() - 1) < 0.005
    assert stats.kstest(draws, "norm").pvalue > 0.01
    assert np.abs(draws).max() > 4.5                       # tails not cut short
    half = draws.size // 2                                  # the two halves share their radii
    assert abs(np.corrcoef(draws[:half] ** 2, draws[half:2 * half] ** 2)[0, 1]) < 0.005


def test_boundary_pixels_take_the_mean_of_their_3x3_neighbourhood():
    rng = np.random.default_rng(3)
    mask = (gen.fractal_fields(rng, 1, 12.0)[0] > 0).astype(np.uint8) + 2
    dn = rng.uniform(1, 5000, size=(4, gen.SIZE, gen.SIZE)).astype(np.float32)
    padded = np.pad(dn, ((0, 0), (1, 1), (1, 1)), mode="edge")
    box = sum(padded[:, dy:dy + gen.SIZE, dx:dx + gen.SIZE] for dy in range(3) for dx in range(3)) / 9
    edge = gen.boundary_pixels(mask)
    expected = np.where(edge, 0.5 * (dn + box), dn)
    gen.mix_boundaries(dn, mask)
    assert 0.02 < edge.mean() < 0.5
    assert np.allclose(dn, expected, rtol=1e-5)


# --------------------------------------------------------------------------------- determinism, I/O

def test_deterministic_for_a_seed_and_independent_of_workers(synth_root, train_tiles):
    image, mask = gen.make_tile(SEED, 7)
    assert np.array_equal(image, train_tiles[7][0]) and np.array_equal(mask, train_tiles[7][1])
    again = gen.make_tile(SEED, 7)
    assert np.array_equal(image, again[0]) and np.array_equal(mask, again[1])
    other = gen.make_tile(SEED + 1, 7)
    assert not np.array_equal(mask, other[1])
    test_image, _ = gen.make_tile(SEED, N_TRAIN + 2)
    assert np.array_equal(test_image, tifffile.imread(synth_root / "test" / "images" / f"{N_TRAIN + 2}.tif"))


def test_refuses_a_non_empty_output_folder(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError) as info:
        gen.generate(out, n_train=1, n_test=0, progress=False)
    message = str(info.value)
    assert str(out) in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_a_failed_run_leaves_no_output_and_the_same_command_resumes_it(tmp_path, monkeypatch):
    calls = []

    def failing(seed, sid):
        calls.append(sid)
        if len(calls) > 2:
            raise OSError("disk full")
        return real(seed, sid)

    real = gen.make_tile
    monkeypatch.setattr(gen, "make_tile", failing)
    with pytest.raises(OSError):
        gen.generate(tmp_path / "out", n_train=4, n_test=1, progress=False, workers=1)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    with pytest.raises(InputError, match="half-written synth of another request"):
        gen.generate(tmp_path / "out", n_train=5, n_test=1, progress=False, workers=1)
    calls.clear()
    monkeypatch.setattr(gen, "make_tile", lambda seed, sid: (calls.append(sid), real(seed, sid))[1])
    gen.generate(tmp_path / "out", n_train=4, n_test=1, progress=False, workers=1)
    assert calls == [3, 4, 5]                                   # tiles 1 and 2 were kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fresh = gen.generate(tmp_path / "fresh", n_train=4, n_test=1, progress=False, workers=1)
    for name in ("train/images/1.tif", "train/masks/4.tif", "test/images/5.tif", "train_labels.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (fresh / name).read_bytes(), name


def test_a_half_written_folder_of_another_generator_version_is_refused(tmp_path, monkeypatch):
    staging = tmp_path / ".out.partial"
    monkeypatch.setattr(gen, "GENERATOR_VERSION", gen.GENERATOR_VERSION - 1)
    monkeypatch.setattr(gen, "_write_all", lambda *args: (_ for _ in ()).throw(OSError("stopped")))
    with pytest.raises(OSError):
        gen.generate(tmp_path / "out", n_train=2, n_test=0, progress=False, workers=1)
    monkeypatch.undo()
    with pytest.raises(InputError, match="another version of the generator") as info:
        gen.generate(tmp_path / "out", n_train=2, n_test=0, progress=False, workers=1)
    assert str(staging) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_empty_existing_folder_is_accepted(tmp_path):
    gen.generate(tmp_path, n_train=1, n_test=1, seed=3, progress=False, workers=1)
    assert (tmp_path / "train" / "images" / "1.tif").is_file()
    assert (tmp_path / "test" / "images" / "2.tif").is_file()


def test_run_prints_where_and_the_class_frequencies(tmp_path, capsys):
    out = tmp_path / "cli"
    assert gen.run(argparse.Namespace(out=str(out), train=2, test=1, seed=0, workers=1)) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "cultivated" in text and "water" in text
    _, rows = read_labels(out / "train_labels.csv")
    assert sorted(rows) == [1, 2]


# ------------------------------------------------------------------------------------------ constants

def test_shipped_constants_are_complete(constants):
    assert constants["target_counts"] == dc.FULL_TRAIN_COUNTS
    assert abs(sum(constants["target_frequencies"]) - 1) < 1e-9
    assert constants["source"] and constants["date"]
    for name in CLASS_NAMES:
        sig = constants["classes"][name]
        assert len(sig["dn_mean"]) == 4 and len(sig["log_mean"]) == 4
        for key in ("dn_cov", "cov_tile", "cov_patch", "cov_texture", "cov_white"):
            cov = np.array(sig[key])
            assert cov.shape == (4, 4) and np.allclose(cov, cov.T)
            assert np.linalg.eigvalsh(cov).min() > -1e-9, (name, key)
    for name in ("artificial", "cultivated", "broadleaf", "coniferous", "herbaceous", "water"):
        assert constants["classes"][name]["estimated"] is True
    for name in ("clouds", "natural", "snow"):
        assert constants["classes"][name]["estimated"] is False and constants["classes"][name]["basis"]


def test_derive_constants_from_a_few_real_tiles(sample_root, tmp_path):
    src = tmp_path / "src"
    ids = sorted((p.stem for p in (sample_root / "train" / "masks").glob("*.tif")), key=int)[:16]
    for sub in ("images", "masks"):
        (src / "train" / sub).mkdir(parents=True)
        for sid in ids:
            shutil.copy(sample_root / "train" / sub / f"{sid}.tif", src / "train" / sub / f"{sid}.tif")
    out = tmp_path / "constants.json"
    assert dc.main(["--src", str(src), "--out", str(out)]) == 0
    derived = json.loads(out.read_text())
    assert derived["source_tiles"] == len(ids) and derived["source"] == str(src.resolve())
    cultivated = derived["classes"]["cultivated"]
    assert cultivated["estimated"] is True
    shipped = gen.load_constants()["classes"]["cultivated"]["dn_mean"]
    assert np.all(np.abs(np.array(cultivated["dn_mean"]) / shipped - 1) < 0.5)
    assert derived["classes"]["snow"]["estimated"] is False  # absent from the source: assumed


def test_derive_constants_refuses_a_source_too_small(sample_root, tmp_path, capsys):
    src = tmp_path / "src"
    for sub in ("images", "masks"):
        (src / "train" / sub).mkdir(parents=True)
        shutil.copy(sample_root / "train" / sub / "1.tif", src / "train" / sub / "1.tif")
    assert dc.main(["--src", str(src), "--out", str(tmp_path / "c.json")]) == 2
    assert "interior pixels" in capsys.readouterr().err


def test_derive_constants_refuses_a_folder_without_tiles(tmp_path, capsys):
    assert dc.main(["--src", str(tmp_path), "--out", str(tmp_path / "c.json")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
