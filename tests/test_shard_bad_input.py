"""pack on bad input: one clear error line naming the file and the problem, exit 2, no manifest left."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lc_common.errors import InputError
from shard_tools.cli import main
from shard_tools.pack import pack
from shard_tools.verify import verify

RNG = np.random.default_rng(0)


def _image(shape=(256, 256, 4), dtype=np.uint16):
    return RNG.integers(1, 5000, size=shape).astype(dtype)


def _mask():
    return RNG.integers(0, 10, size=(256, 256)).astype(np.uint8)


def _write(path: Path, array: np.ndarray) -> None:
    """As the challenge's tiles are stored: one page, samples contiguous, min-is-black."""
    tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig" if array.ndim == 3 else None)


@pytest.fixture
def src(tmp_path) -> Path:
    """A valid synthetic source: train tiles 1..3 with masks, test tile 10."""
    root = tmp_path / "src"
    for sub in ("train/images", "train/masks", "test/images"):
        (root / sub).mkdir(parents=True)
    for i in (1, 2, 3):
        _write(root / "train/images" / f"{i}.tif", _image())
        _write(root / "train/masks" / f"{i}.tif", _mask())
    _write(root / "test/images" / "10.tif", _image())
    return root


def _truncate(path: Path, size: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _mask_with_12(path: Path) -> None:
    mask = _mask()
    mask[100, 7] = 12
    _write(path, mask)


def _dangling_pair(src: Path, tile_id: int) -> None:
    """A train tile whose image and mask links both point at purged files (a tree of links)."""
    for sub in ("images", "masks"):
        os.symlink(src / "purged" / f"{tile_id}.tif", src / "train" / sub / f"{tile_id}.tif")


# (case id, how to break the source, the file the message must name, the problem it must state)
CASES = [
    ("truncated image", lambda s: _truncate(s / "train/images/2.tif"), "2.tif", "truncated TIFF"),
    ("truncated test image", lambda s: _truncate(s / "test/images/10.tif", 20000), "10.tif", "truncated TIFF"),
    ("non-TIFF image", lambda s: (s / "train/images/3.tif").write_bytes(b"PK\x03\x04 a zip, not a TIFF"),
     "3.tif", "not a TIFF"),
    ("image with 3 bands", lambda s: _write(s / "train/images/1.tif", _image((256, 256, 3))),
     "1.tif", "image shape (256, 256, 3)"),
    ("image 128x128", lambda s: _write(s / "test/images/10.tif", _image((128, 128, 4))),
     "10.tif", "image shape (128, 128, 4)"),
    ("image float32", lambda s: _write(s / "train/images/2.tif", _image(dtype=np.float32)),
     "2.tif", "image dtype float32"),
    ("mask value 12", lambda s: _mask_with_12(s / "train/masks/3.tif"), "3.tif", "mask value 12 above 9"),
    ("mask uint16", lambda s: _write(s / "train/masks/1.tif", _mask().astype(np.uint16)),
     "1.tif", "mask dtype uint16"),
    ("truncated mask", lambda s: _truncate(s / "train/masks/2.tif"), "2.tif", "truncated TIFF"),
    ("mask missing", lambda s: (s / "train/masks/2.tif").unlink(), "images/2.tif", "train image without a mask"),
    ("image missing", lambda s: (s / "train/images/3.tif").unlink(), "masks/3.tif", "mask without a train image"),
    ("duplicate id .tif/.tiff", lambda s: _write(s / "train/images/1.tiff", _image()),
     "1.tif", "duplicate id '1'"),
    ("duplicate numeric id", lambda s: _write(s / "test/images/010.tif", _image()),
     "10.tif", "duplicate id"),
    ("id in train and test", lambda s: _write(s / "test/images/2.tif", _image()),
     "test/images/2.tif", "both a train and a test tile"),
    ("id in train and test as 1 and 01", lambda s: _write(s / "test/images/01.tif", _image()),
     "test/images/01.tif", "both a train and a test tile (also"),
    ("dangling link as a test image", lambda s: os.symlink(s / "purged/11.tif", s / "test/images/11.tif"),
     "test/images/11.tif", "not a readable file (a dangling link to"),
    ("dangling train image and mask", lambda s: _dangling_pair(s, 4), "train/images/4.tif", "a dangling link"),
    ("folder named like a tile", lambda s: (s / "test/images/12.tif").mkdir(),
     "test/images/12.tif", "not a readable file (a folder)"),
    ("id with a dot", lambda s: _write(s / "test/images/11.5.tif", _image()),
     "11.5.tif", "contains a dot"),
    ("id not an integer", lambda s: _write(s / "test/images/tile_a.tif", _image()),
     "tile_a.tif", "is not an integer"),
    ("multi-page image", lambda s: tifffile.imwrite(s / "train/images/2.tif", np.stack([_image(), _image()]),
                                                    photometric="minisblack", planarconfig="contig"),
     "2.tif", "multi-page TIFF (2 pages)"),
    ("multi-page test image", lambda s: tifffile.imwrite(s / "test/images/10.tif", np.stack([_image()] * 3),
                                                         photometric="minisblack", planarconfig="contig"),
     "10.tif", "multi-page TIFF (3 pages)"),
    ("test/images is a file", lambda s: (__import__("shutil").rmtree(s / "test/images"),
                                         (s / "test/images").write_text("x")),
     "test/images", "not a folder"),
]


def _assert_clean_failure(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tar")) if out.exists() else True


@pytest.mark.parametrize("break_source, filename, problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_names_file_and_problem(src, tmp_path, capsys, break_source, filename, problem):
    break_source(src)
    out = tmp_path / "out"
    rc = main(["pack", "--src", str(src), "--out", str(out), "--folds", "2", "--workers", "2",
               "--samples-per-shard", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert filename in err and problem in err, err
    _assert_clean_failure(out)


def test_api_raises_input_error_in_process(src, tmp_path):
    _mask_with_12(src / "train/masks/2.tif")
    with pytest.raises(InputError, match=r"masks/2\.tif: mask value 12 above 9"):
        pack(src, tmp_path / "out", folds=2, workers=0, progress=False)
    _assert_clean_failure(tmp_path / "out")


def test_late_failure_removes_written_shards(src, tmp_path):
    """A truncated image found only in the second pass (header intact): shards already written go too."""
    _write(src / "train/images/4.tif", _image())
    _write(src / "train/masks/4.tif", _mask())
    _truncate(src / "train/images/3.tif", 300_000)
    with pytest.raises(InputError, match=r"3\.tif: truncated TIFF"):
        pack(src, tmp_path / "out", folds=2, samples_per_shard=1, workers=0, progress=False)
    assert not (tmp_path / "out").exists()   # the folder it made goes too


@pytest.mark.parametrize("case", ["missing", "empty", "no tiles", "a file"])
def test_source_folder_missing_or_empty(tmp_path, capsys, case):
    src = tmp_path / "src"
    if case == "empty":
        src.mkdir()
    elif case == "no tiles":
        (src / "train/images").mkdir(parents=True)
        (src / "train/images/readme.txt").write_text("no tiles here")
    elif case == "a file":
        src.write_text("not a folder")
    rc = main(["pack", "--src", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(src) in err
    assert ("does not exist" if case == "missing" else "not a folder" if case == "a file" else "no tiles found") in err
    _assert_clean_failure(tmp_path / "out")


@pytest.mark.parametrize("args, problem", [
    (["--folds", "0"], "--folds must be at least 1"),
    (["--folds", "4"], "cannot split 3 train tiles into 4 folds"),
    (["--samples-per-shard", "0"], "samples per shard must be at least 1"),
    (["--shard-size", "0"], "shard size must be a positive number of MB, got 0.0"),
    (["--shard-size", "inf"], "shard size must be a positive number of MB, got inf"),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--folds", "2", "--block-size", "0"], "--block-size must be a whole number of tiles (1: tile by tile) or auto, got '0'"),
    (["--folds", "2", "--block-size", "2.5"], "--block-size must be a whole number of tiles (1: tile by tile) or auto, got '2.5'"),
    (["--folds", "2", "--block-size", "3"], "--block-size 3: 3 train tiles make 1 block(s), fewer than the 2 folds"),
])
def test_bad_options(src, tmp_path, capsys, args, problem):
    assert main(["pack", "--src", str(src), "--out", str(tmp_path / "out"), *args]) == 2
    assert problem in capsys.readouterr().err
    _assert_clean_failure(tmp_path / "out")


def test_output_is_a_file(src, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(["pack", "--src", str(src), "--out", str(tmp_path / "out"), "--folds", "2"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["pack", "--src", str(src), "--out", str(tmp_path / "out" / "shards"), "--folds", "2"]) == 2
    assert "--out cannot be created" in capsys.readouterr().err


def test_a_failed_overwrite_keeps_the_earlier_shards(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pack", "--src", str(src), "--out", str(out), "--folds", "2", "--workers", "0"]) == 0
    before = sorted(p.name for p in out.iterdir())
    _mask_with_12(src / "train/masks/2.tif")
    assert main(["pack", "--src", str(src), "--out", str(out), "--folds", "2", "--overwrite"]) == 2
    assert "mask value 12 above 9" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def _contents(folder: Path) -> dict[str, bytes | None]:
    """Every entry of a folder (hidden ones too) with its bytes (None: a folder), to compare after."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


def test_a_late_failure_on_overwrite_keeps_the_earlier_pack(src, tmp_path, capsys):
    """Pixel data cut with the header intact passes the survey (headers only) and is refused only while
    the shards are written: the earlier pack must come through that too, with no leftover of this run."""
    out = tmp_path / "out"
    args = ["pack", "--src", str(src), "--out", str(out), "--folds", "2", "--workers", "0"]
    assert main(args) == 0
    before = _contents(out)
    _truncate(src / "train/images/3.tif", 300_000)
    assert main([*args, "--overwrite", "--samples-per-shard", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3.tif: truncated TIFF" in err, err
    assert _contents(out) == before
    verify(out)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new folder", "overwrite"])
def test_a_shard_that_cannot_be_written_is_one_line_and_leaves_nothing(src, tmp_path, overwrite):
    """A file-size limit stands in for a full disk or a quota: the shard's write fails in a reader
    process. An earlier pack in the folder is kept as it was."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))   # python ignores SIGXFSZ: EFBIG

    out = tmp_path / "out"
    if overwrite:
        pack(src, out, folds=2, workers=0, progress=False)
    before = _contents(out) if overwrite else {}
    proc = subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(src), "--out", str(out),
                           "--folds", "2", "--workers", "2", *(["--overwrite"] if overwrite else [])],
                          capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot write: File too large" in proc.stderr, proc.stderr
    assert "-000000.tar" in proc.stderr
    assert (_contents(out) if out.exists() else {}) == before   # a folder it made goes too


def test_ctrl_c_ends_a_pack_in_one_line_and_leaves_nothing(sample_root, tmp_path):
    """SIGINT to the process group, as a terminal sends it: the readers ignore it, the packing process
    removes what it wrote and ends by it (not 130 alone: a shell loop around it must stop too)."""
    import signal
    import subprocess
    import sys
    import time

    from torchrun_util import REPO

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools", "pack", "--src", str(sample_root), "--out", str(out),
                             "--workers", "2", "--samples-per-shard", "8"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.rglob("*.tar"))):   # writing shards
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "lc-shard pack: stopped by SIGINT (Ctrl-C)", err[-3000:]
    _assert_clean_failure(out)
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))   # no staging folder either


def test_a_tiff_whose_tags_are_damaged_is_one_line_naming_it_and_nothing_else(tmp_path, capsys):
    """tifffile logs damaged tag entries and reads past them: their lines, without the file's name,
    came before an error about a mask shape that was the damage's doing."""
    import struct

    from lc_common.tiles import read_mask

    path = tmp_path / "7.tif"
    _write(path, _mask())
    data = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        struct.pack_into("<H", data, ifd + 2 + 12 * entry + 2, 0)   # each entry's data type: 0, which none is
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        read_mask(path)
    assert str(err.value).startswith(f"{path}: damaged TIFF (") and "\n" not in str(err.value), err.value
    assert capsys.readouterr().err == ""


def test_an_image_cut_short_is_found_from_its_header(src, tmp_path):
    """The survey reads headers only: a tile cut in half (an archive copied partly) was found when its
    shard was written, test tiles last, near the end of a 14 GB pack."""
    from lc_common.tiles import check_image_header

    image = next((src / "test" / "images").glob("*.tif"))
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=rf"^{image}: truncated TIFF \(its pixel data end at byte \d+, the file at "
                                         rf"{len(data) // 2}\)$"):
        check_image_header(image)
