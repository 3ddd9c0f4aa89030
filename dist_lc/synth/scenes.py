"""Georeferenced scenes for ``dist-lc map``: mosaics of real or synthetic 256² tiles as GeoTIFFs.

A mosaic is placed in a UTM zone (EPSG:32631 by default) with 10 m pixels, north up, as Sentinel-2
scenes are; :func:`synthetic_scene` writes a scene of any size from synthetic tiles one row of
tiles at a time (bounded memory), for benchmarks of large scenes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lc_common.tiles import IMAGE_SHAPE, S2_BAND_IDS

TILE = IMAGE_SHAPE[0]
UTM31N = "EPSG:32631"
ORIGIN = (500_000.0, 5_000_000.0)   # upper-left corner, metres (45°N, 3°E)
PIXEL_M = 10.0


def _profile(height: int, width: int, crs, nodata) -> dict:
    from rasterio.transform import from_origin

    return {"driver": "GTiff", "width": width, "height": height, "count": IMAGE_SHAPE[2], "dtype": "uint16",
            "crs": crs, "transform": from_origin(ORIGIN[0], ORIGIN[1], PIXEL_M, PIXEL_M) if crs else None,
            "nodata": nodata, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}


def mosaic(images: list[list[np.ndarray]], out, *, crs=UTM31N, nodata=0, crop: tuple[int, int] | None = None) -> Path:
    """Write a grid of (256, 256, 4) uint16 tiles (rows of columns) as one GeoTIFF, optionally cropped
    to (height, width) from the upper-left corner."""
    import rasterio

    grid = np.concatenate([np.concatenate(row, axis=1) for row in images], axis=0)
    if crop is not None:
        grid = grid[:crop[0], :crop[1]]
    out = Path(out)
    with rasterio.open(out, "w", **_profile(grid.shape[0], grid.shape[1], crs, nodata)) as dst:
        _name_bands(dst)
        dst.write(grid.transpose(2, 0, 1))
    return out


def _name_bands(dst) -> None:
    """The tiles' bands by their Sentinel-2 names, so that a reader need not assume their order."""
    for index, name in enumerate(S2_BAND_IDS, 1):
        dst.set_band_description(index, name)


def synthetic_scene(out, height: int, width: int, seed: int = 0, crs=UTM31N) -> Path:
    """A ``height`` × ``width`` scene of synthetic tiles (dist_lc.synth), written a row of tiles at a time."""
    import rasterio
    from rasterio.windows import Window

    from .generate import make_tile

    out = Path(out)
    cols = -(-width // TILE)
    with rasterio.open(out, "w", **_profile(height, width, crs, 0)) as dst:
        _name_bands(dst)
        for r in range(-(-height // TILE)):
            row = np.concatenate([make_tile(seed, r * cols + c + 1)[0] for c in range(cols)], axis=1)
            rows = min(TILE, height - r * TILE)
            dst.write(row[:rows, :width].transpose(2, 0, 1), window=Window(0, r * TILE, width, rows))
    return out
