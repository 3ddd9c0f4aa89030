"""The challenge's tiles: the class list, the image and mask layout, and reading the TIFF files.

A tile is ``<id>.tif`` (an integer id): a 256×256×4 uint16 image (bands R, G, B, NIR) in
``images/``, and for train tiles a 256×256 uint8 mask of classes 0..9 in ``masks/``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tifffile

from .errors import InputError, one_line

CLASS_NAMES = (
    "no_data", "clouds", "artificial", "cultivated", "broadleaf",
    "coniferous", "herbaceous", "natural", "snow", "water",
)
NUM_CLASSES = len(CLASS_NAMES)
IGNORED_CLASSES = (0, 1)  # no_data, clouds: weight 0 in the loss, dropped from the score
IMAGE_SHAPE = (256, 256, 4)
BAND_NAMES = ("R", "G", "B", "NIR")          # the tiles' bands, in their order
S2_BAND_IDS = ("B04", "B03", "B02", "B08")   # the same bands by Sentinel-2's numbering
IMAGE_DTYPE = np.dtype("uint16")
MASK_DTYPE = np.dtype("uint8")
MAX_PIXEL_VALUE = 24356  # the benchmark's normaliser (largest value in the training set)
TIFF_SUFFIXES = (".tif", ".tiff")


def class_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels of each of the 10 classes in a mask, int64 (10,) (a mask is checked for classes
    above 9 where it is read)."""
    return np.bincount(mask.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES].astype(np.int64)


def class_proportions(mask: np.ndarray) -> np.ndarray:
    """Proportion of each of the 10 classes in a mask, float64 (10,), as train_labels.csv has them."""
    return class_pixels(mask) / mask.size


def check_image(shape, dtype, where, expected=IMAGE_SHAPE) -> None:
    """:class:`InputError` naming ``where`` unless an image is ``expected`` (a tile: ``IMAGE_SHAPE``) uint16."""
    if tuple(shape) != tuple(expected):
        raise InputError(f"{where}: image shape {tuple(shape)}, expected {tuple(expected)}")
    if np.dtype(dtype) != IMAGE_DTYPE:
        raise InputError(f"{where}: image dtype {np.dtype(dtype)}, expected {IMAGE_DTYPE}")


def check_mask(mask: np.ndarray, where, expected=IMAGE_SHAPE[:2]) -> None:
    """:class:`InputError` naming ``where`` unless a mask is ``expected`` (a tile: H×W) uint8 with classes 0..9."""
    if mask.shape != tuple(expected):
        raise InputError(f"{where}: mask shape {mask.shape}, expected {tuple(expected)}")
    if mask.dtype != MASK_DTYPE:
        raise InputError(f"{where}: mask dtype {mask.dtype}, expected {MASK_DTYPE}")
    top = int(mask.max())
    if top >= NUM_CLASSES:
        raise InputError(f"{where}: mask value {top} above {NUM_CLASSES - 1} (classes are 0..{NUM_CLASSES - 1})")


def id_sort_key(tile_id: str):
    """Numeric ids in numeric order, then the others in string order."""
    return (0, int(tile_id), tile_id) if tile_id.isdigit() else (1, 0, tile_id)


def _listing(folder: Path) -> list[Path]:
    """The entries of a split's folder; [] when it does not exist, an error when it cannot be read."""
    if not folder.exists() and not folder.is_symlink():
        return []
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (expected the tiles of a split)")
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def _not_a_file(path: Path) -> str:
    """Why an entry named like a tile is not one, for the error that names it."""
    if path.is_symlink() and not path.exists():
        return f"a dangling link to {os.readlink(path)}"
    return "a folder" if path.is_dir() else "not a regular file"


def tiffs_by_id(folder: Path) -> dict[str, Path]:
    """``{id: path}`` of the TIFFs in a folder (hidden files ignored); ids must be integers, once each.
    An entry named like a tile that is not a file (a dangling link, a folder) is an error: skipping it
    would drop the tile from the shards and the submission without a word."""
    found: dict[str, Path] = {}
    numeric: dict[int, Path] = {}
    for path in _listing(folder):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or suffix not in TIFF_SUFFIXES:
            continue
        if not path.is_file():
            raise InputError(f"{path}: not a readable file ({_not_a_file(path)})")
        tile_id = path.name[: -len(suffix)]
        if "." in tile_id:
            raise InputError(f"{path}: id {tile_id!r} contains a dot (WebDataset keys end at the first dot)")
        if not (tile_id.isascii() and tile_id.isdigit()):
            raise InputError(f"{path}: id {tile_id!r} is not an integer (the challenge's tiles are <integer>.tif)")
        other = found.get(tile_id) or (numeric.get(int(tile_id)) if tile_id.isdigit() else None)
        if other is not None:
            raise InputError(f"{path}: duplicate id {tile_id!r} (also {other.name})")
        found[tile_id] = path
        if tile_id.isdigit():
            numeric[int(tile_id)] = path
    return found


def _one_page(tif: tifffile.TiffFile, path: Path) -> None:
    pages = len(tif.pages)
    if pages != 1:
        raise InputError(f"{path}: multi-page TIFF ({pages} pages); a tile is a single page")


def _from_tiff(path: Path, read):
    """``read(tif)`` of a single-page TIFF; whatever tifffile raises becomes one line naming the file,
    and so does what it only logs (damaged tags or page offsets, which it reads past): on stderr it
    would be lines without a file's name, before an error about a shape that was the damage's doing."""
    logged = _Logged()
    tifffile_log = logging.getLogger("tifffile")
    tifffile_log.addHandler(logged)
    propagate, tifffile_log.propagate = tifffile_log.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            _one_page(tif, path)
            value = read(tif)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever tifffile says, the file is unreadable
        text = one_line(exc)
        problem = "truncated TIFF" if text.startswith("failed to read") else "cannot read TIFF"
        raise InputError(f"{path}: {problem} ({text})") from None
    finally:
        tifffile_log.removeHandler(logged)
        tifffile_log.propagate = propagate
    if logged.first is not None:
        raise InputError(f"{path}: damaged TIFF ({logged.first})")
    return value


class _Logged(logging.Handler):
    """The first warning tifffile logs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.first = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = one_line(record.getMessage())[:200]


def read_tiff(path: Path) -> np.ndarray:
    return _from_tiff(path, lambda tif: tif.asarray())


def check_image_header(path: Path) -> None:
    """The image's shape and dtype, and that its pixel data lie within the file, from its header alone
    (a cut copy of a 14 GB archive is found in the survey, not when its tile is written)."""
    def header(tif):
        page = tif.pages[0]
        return tif.series[0], max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)

    series, end = _from_tiff(path, header)
    check_image(series.shape, series.dtype, path)
    size = os.path.getsize(path)
    if end > size:
        raise InputError(f"{path}: truncated TIFF (its pixel data end at byte {end}, the file at {size})")


def read_mask(path: Path) -> np.ndarray:
    mask = read_tiff(path)
    check_mask(mask, path)
    return mask


def read_image(path: Path) -> np.ndarray:
    """A tile's image (256×256×4 uint16), checked; InputError naming the file otherwise."""
    image = read_tiff(path)
    check_image(image.shape, image.dtype, path)
    return image


