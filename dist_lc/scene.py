"""Sentinel-2 scenes of any size as GeoTIFFs (rasterio): what a scene must be, the grid of
overlapping windows a model sees it through, the weight that blends them, and areas of interest.

A scene has the bands of the challenge tiles (R, G, B, NIR; uint16). Windows of ``size`` pixels
(the tiles' 256) step by ``size - overlap``; the last window of a row or column is flush with the
scene's edge, so no window reads outside a scene at least one window large (a smaller scene is
padded by reflection and the padding is cut off). Each window's probabilities are weighted by a
2-D Hann taper (plus a small floor, so that a scene's edge pixels, seen by one window only, keep a
weight): window borders, where a window's context is poorest, count least, and no seam shows.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from lc_common.errors import InputError, one_line
from lc_common.tiles import BAND_NAMES, IMAGE_DTYPE, IMAGE_SHAPE, S2_BAND_IDS

WINDOW = IMAGE_SHAPE[0]
TAPER_FLOOR = 1e-3
SUFFIXES = (".tif", ".tiff")
DENSIFY_DEG = 0.01   # a lon/lat AOI's points along its edges, reprojected: 1 km apart, a 0.001-pixel bow
TILE_PIXEL_M = 10.0   # the challenge tiles' pixels on the ground: Sentinel-2's 10 m bands
PIXEL_RATIO = 1.25    # pixels this many times larger or smaller than the tiles' are warned about
EARTH_RADIUS_M = 6_371_008.8   # the mean radius: a pixel's size to 0.5 %, enough to tell 10 m from 20 m
L2A_OFFSET = 1000   # what processing baseline 04.00 adds to the L2A digital numbers
OFFSET_SAMPLES = 4  # windows down and across read to judge a scene's darkest pixels
OFFSET_ADVICE = ("subtract 1000 from the pixels above 0 (0 is no_data), keeping them at 1 or more: gdal_calc.py "
                 "-A SCENE --allBands A --calc \"where(A > 1001, A - 1000, where(A > 0, 1, 0))\" --type UInt16 "
                 "--NoDataValue 0 --outfile OUT")


def positions(length: int, size: int, step: int) -> list[int]:
    """Window starts along an axis: every ``step``, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, step))
    return starts + [length - size]


def window_grid(height: int, width: int, overlap: int) -> tuple[list[int], list[int]]:
    """Window starts down and across a ``height`` × ``width`` scene, neighbours ``overlap`` pixels apart."""
    step = WINDOW - overlap
    return positions(height, WINDOW, step), positions(width, WINDOW, step)


def taper(size: int) -> np.ndarray:
    """(size, size) float32 blending weight: a 2-D Hann window plus a floor."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2 + TAPER_FLOOR
    return np.outer(w, w).astype(np.float32)


def gdal_text(exc: BaseException) -> str:
    """GDAL's own message of a rasterio error (rasterio chains it as the cause), on one line, cut short."""
    return one_line(exc.__cause__ or exc)[:200]


@dataclass
class Scene:
    """An open scene: its rasterio dataset and what the map needs to know about it."""
    path: Path
    dataset: object

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def georeferencing(self) -> dict:
        """What a map copies of the scene's georeferencing, only what the scene has: its transform and
        CRS, or its ground control points and their CRS (rasterio gives a missing transform as identity)."""
        gcps, gcp_crs = self.dataset.gcps
        if gcps:
            return {"gcps": gcps, "crs": gcp_crs}
        out = {} if self.dataset.transform.is_identity else {"transform": self.dataset.transform}
        return out | ({"crs": self.dataset.crs} if self.dataset.crs is not None else {})

    @property
    def crs(self):
        """The CRS of the scene's transform or of its ground control points; None without either."""
        return self.georeferencing.get("crs")

    @property
    def height(self) -> int:
        return self.dataset.height

    @property
    def width(self) -> int:
        return self.dataset.width

    @property
    def nodata(self):
        return self.dataset.nodata

    def read_rows(self, top: int, rows: int, left: int = 0, cols: int | None = None) -> np.ndarray:
        """(4, rows, cols) uint16 of the scene's rows [top, top + rows) and columns [left, left + cols)
        (clipped to the scene; all columns when ``cols`` is None)."""
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        rows = min(rows, self.height - top)
        cols = self.width - left if cols is None else min(cols, self.width - left)
        try:
            return self.dataset.read(window=Window(left, top, cols, rows))
        except RasterioIOError as exc:   # the header was fine at open; the pixels are read only now
            raise InputError(f"{self.path}: cannot read rows {top}-{top + rows - 1} of the scene, truncated or "
                             f"corrupt ({gdal_text(exc)})") from None

    @cached_property
    def has_mask_band(self) -> bool:
        """Whether the file has a mask band of its own (internal, or a .msk beside it). An alpha band is
        not taken as one: a scene has exactly the 4 bands, so a 4th band tagged alpha is the NIR
        mislabelled (tifffile tags it so by default for 4-sample RGB), not a mask."""
        from rasterio.enums import MaskFlags

        flags = self.dataset.mask_flag_enums[0]
        return MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags

    def valid(self, pixels: np.ndarray, top: int) -> np.ndarray:
        """(rows, width) bool for ``pixels``, the scene's rows from ``top``: False (no_data) where a band
        is missing (:func:`missing`), or where the file's mask band masks the pixel."""
        valid = ~missing(pixels, self.nodata)
        if self.has_mask_band:   # read only then: a file without one costs nothing more than before
            valid &= self._mask_rows(top, pixels.shape[1]) > 0
        return valid

    def _mask_rows(self, top: int, rows: int) -> np.ndarray:
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        try:
            return self.dataset.dataset_mask(window=Window(0, top, self.width, rows))
        except RasterioIOError as exc:
            raise InputError(f"{self.path}: cannot read the mask of rows {top}-{top + rows - 1} of the scene, "
                             f"truncated or corrupt ({gdal_text(exc)})") from None

    def close(self) -> None:
        self.dataset.close()


def missing(pixels: np.ndarray, nodata) -> np.ndarray:
    """Pixels (bands first) where any band is 0 or the scene's nodata value. Any band, not all: at a
    swath's edge the bands' footprints differ by a few pixels, and a band at 0 there would be read as
    black ground (the tiles hold no 0: their digital numbers start at 1)."""
    empty = pixels == 0
    if nodata is not None:
        empty |= pixels == nodata
    return empty.any(axis=0)


def open_scene(path) -> Scene:
    """A scene checked for the model's bands: 4 bands, uint16; one clear line naming the file otherwise.

    A scene without georeferencing is accepted (its map has none either). Use it as a context manager.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: scene does not exist" if not path.exists() else f"{path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path}: cannot read the scene ({gdal_text(exc)})") from None
    scene = Scene(path, dataset)
    try:
        if dataset.count != IMAGE_SHAPE[2]:
            raise InputError(f"{path}: {dataset.count} band(s); a scene needs the {IMAGE_SHAPE[2]} bands of the "
                             "challenge tiles (R, G, B, NIR; from a 12-band L2A or 13-band L1C stack in band "
                             "order: gdal_translate -b 4 -b 3 -b 2 -b 8)")
        if np.dtype(dataset.dtypes[0]) != IMAGE_DTYPE:
            raise InputError(f"{path}: bands of type {dataset.dtypes[0]}, expected {IMAGE_DTYPE} (Sentinel-2 digital "
                             "numbers, reflectance × 10000, as in the challenge tiles; from reflectance in 0..1: "
                             "gdal_translate -ot UInt16 -scale 0 1 0 10000)")
        _check_bands(path, dataset)
    except InputError:
        dataset.close()
        raise
    return scene


_S2_BAND = {band[1:].lstrip("0"): name for band, name in zip(S2_BAND_IDS, BAND_NAMES)}   # "4": "R", ...
_WORD = {"red": "R", "green": "G", "blue": "B", "nir": "NIR", "near-infrared": "NIR", "near infrared": "NIR"}


def ground_pixel_m(scene: Scene) -> tuple[float, float] | None:
    """The width and height on the ground, in metres, of the scene's central pixel, whatever its CRS
    (in lon/lat or Web Mercator the nominal pixel size says little); None without a transform and a CRS
    that reaches lon/lat."""
    from rasterio.warp import transform

    where = scene.georeferencing
    if "transform" not in where or "crs" not in where:
        return None
    c, r = scene.width / 2, scene.height / 2
    t = where["transform"]   # written out: affine 3 deprecates `*` for points, affine 2 (rasterio 1.3) lacks `@`
    xs, ys = zip(*((t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f) for x, y in ((c, r), (c + 1, r), (c, r + 1))))
    try:
        lons, lats = np.radians(transform(where["crs"], "EPSG:4326", list(xs), list(ys)))
    except Exception:   # noqa: BLE001 - a local or engineering CRS, with no way to lon/lat: no size to tell
        return None
    if not np.isfinite([lons, lats]).all():
        return None

    def metres(i: int) -> float:   # haversine from the pixel's corner to its neighbour ``i``
        h = (np.sin((lats[i] - lats[0]) / 2) ** 2
             + np.cos(lats[0]) * np.cos(lats[i]) * np.sin((lons[i] - lons[0]) / 2) ** 2)
        return float(2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(h)))

    return metres(1), metres(2)


def scale_warning(scene: Scene) -> str | None:
    """A line for a scene whose pixels are not the tiles' 10 m (a 20 or 60 m product, a resampled
    mosaic): the model would see every field and road at another scale, and its map says nothing of it."""
    size = ground_pixel_m(scene)
    if size is None or all(1 / PIXEL_RATIO <= s / TILE_PIXEL_M <= PIXEL_RATIO for s in size):
        return None
    return (f"{scene.path}: pixels of {size[0]:.2g} × {size[1]:.2g} m on the ground; the model learned from "
            f"{TILE_PIXEL_M:g} m pixels and may map this scale poorly (resample it: gdalwarp -tr "
            f"{TILE_PIXEL_M:g} {TILE_PIXEL_M:g}, in a CRS in metres)")


def _band_name(description: str | None) -> str | None:
    """R, G, B or NIR for a band description that names one (``B04``, ``B4``, ``red``...), else None."""
    text = (description or "").strip().lower()
    found = re.fullmatch(r"(?:sentinel-?2\s*)?b0?(\d{1,2})a?", text)
    if found:
        return _S2_BAND.get(found.group(1)) if not text.endswith("a") else None   # B8A is not the tiles' NIR
    return _WORD.get(text)


def _stated_order(dataset) -> tuple[list[str], str] | None:
    """(the band order a scene's metadata states, how it states it), or None where it states none."""
    from rasterio.enums import ColorInterp

    named = [_band_name(d) for d in dataset.descriptions]
    colours = {ColorInterp.red: "R", ColorInterp.green: "G", ColorInterp.blue: "B"}
    interp = [colours.get(c) for c in dataset.colorinterp[:3]] + ["NIR"]
    # judged only on what names every band (or the three colours) once: partial or generic names
    # ("B1".."B4", "Band 1") say nothing; descriptions, which say more, win over colours
    if all(named) and len(set(named)) == 4:
        return named, f"described as {', '.join(dataset.descriptions)}"
    if all(interp) and len(set(interp)) == 4:
        return interp, f"colour-interpreted as {', '.join(c.name for c in dataset.colorinterp)}"
    return None


def band_order_warning(scene: Scene) -> str | None:
    """A line for a scene whose metadata does not say which band is which: it is read as R, G, B, NIR,
    and a stack in Sentinel-2's own numbering (B02, B03, B04, B08: what ``gdal_merge -separate`` of
    the band files in name order gives) would be mapped with red and blue swapped, without a word."""
    if _stated_order(scene.dataset) is not None:
        return None
    return (f"{scene.path}: its bands are not named (band descriptions or colour interpretation): read as R, G, "
            "B, NIR (Sentinel-2 B04, B03, B02, B08); a B02, B03, B04, B08 stack needs gdal_translate -b 3 -b 2 "
            "-b 1 -b 4 (naming the bands, e.g. B04..B08 as descriptions, silences this)")


def offset_warning(scene: Scene) -> str | None:
    """A line for a scene whose darkest pixels are at 1000 or more in R, G and B alike: digital numbers
    offset by +1000, as Sentinel-2 L2A of processing baseline 04.00 (2022) and its reprocessed
    collection are, in a file that carries no offset to say so (COGs of cloud catalogues, band files
    stacked by hand). Water, shadow and vegetation keep the visible bands' darkest percent of a real
    scene well below 1000 without the offset; only a scene under snow or cloud is that bright."""
    dark = []
    for top in _spread(scene.height):
        for left in _spread(scene.width):
            pixels = scene.read_rows(top, WINDOW, left, WINDOW).reshape(IMAGE_SHAPE[2], -1)
            dark.append(pixels[:3, ~missing(pixels, scene.nodata)])
    visible = np.concatenate(dark, axis=1)
    if visible.shape[1] == 0:
        return None
    darkest = np.percentile(visible, 1, axis=1)
    if (darkest < L2A_OFFSET).any():
        return None
    return (f"{scene.path}: its darkest pixels are {', '.join(f'{v:.0f}' for v in darkest)} in R, G, B (1st "
            f"percentile over windows spread across it): digital numbers offset by +{L2A_OFFSET}, as Sentinel-2 "
            "L2A of processing baseline 04.00 or later is? The model would read brighter ground than there is: "
            f"{OFFSET_ADVICE}. A scene under snow or cloud is this bright without an offset.")


def _spread(length: int) -> list[int]:
    """Starts of OFFSET_SAMPLES windows spread evenly along an axis (fewer on a small scene)."""
    last = max(length - WINDOW, 0)
    return sorted({last * i // (OFFSET_SAMPLES - 1) for i in range(OFFSET_SAMPLES)})


def _check_bands(path: Path, dataset) -> None:
    """Refuse a scene whose own metadata says it is not what the model reads: bands in another order
    (B02, B03, B04, B08 as Sentinel-2 numbers them, or a blue/green/red colour interpretation), or an
    offset on its digital numbers (processing baseline 04.00, from 2022, adds 1000 to the L2A digital
    numbers, and says so by an offset of -1000, or -0.1 with the 1e-4 scale): the challenge tiles are
    R, G, B, NIR without an offset, and a scene read otherwise is mapped wrong without a word."""
    said, shown = _stated_order(dataset) or (list(BAND_NAMES), "")
    if said != list(BAND_NAMES):
        order = " ".join(f"-b {said.index(n) + 1}" for n in BAND_NAMES)
        raise InputError(f"{path}: bands {shown}; a scene needs the challenge tiles' order R, G, B, NIR "
                         f"(Sentinel-2 B04, B03, B02, B08): reorder them (gdal_translate {order})")
    offsets = sorted({o for o in dataset.offsets if o})
    if offsets:
        raise InputError(f"{path}: its bands carry an offset ({', '.join(f'{o:g}' for o in offsets)}; scale "
                         f"{', '.join(f'{c:g}' for c in sorted(set(dataset.scales)))}): the model reads digital numbers "
                         "without one, as the challenge tiles are; for Sentinel-2 L2A of processing baseline "
                         f"04.00 or later, {OFFSET_ADVICE} (a new file, without the offset)")


def scene_paths(items: list[str]) -> list[Path]:
    """The scenes named on the command line; a folder stands for the GeoTIFFs in it."""
    out = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
            if not found:
                raise InputError(f"{path}: no .tif scene in the folder")
            out += found
        elif not path.exists():
            raise InputError(f"{path}: scene does not exist")
        else:
            out.append(path)
    stems = [p.stem for p in out]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise InputError(f"two scenes are named {twice[0]!r}: their outputs would collide; rename one")
    return out


# ----------------------------------------------------------------------------- areas of interest

def parse_aoi(text: str | None):
    """``--aoi``: ``x0,y0,x1,y1`` in the scene's CRS, ``lonlat:x0,y0,x1,y1``, or a GeoJSON file
    (lon/lat, as GeoJSON is). Returns (geometry as a GeoJSON dict, its CRS or None for the scene's)."""
    if text is None:
        return None
    crs = None
    body = text
    if text.startswith("lonlat:"):
        crs, body = "EPSG:4326", text[len("lonlat:"):]
    path = Path(body)
    if path.suffix.lower() in (".geojson", ".json"):
        if not path.is_file():
            raise InputError(f"{path}: --aoi GeoJSON file does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:   # ValueError: not UTF-8 (a binary file), not JSON
            raise InputError(f"{path}: --aoi is not GeoJSON ({one_line(exc)})") from None
        geometry = _geometry(data, path)
        x0, y0, x1, y1 = _bounds(geometry)
        if not _is_lonlat(x0, y0, x1, y1):
            raise InputError(f"{path}: --aoi GeoJSON coordinates span {x0:.6g},{y0:.6g} to {x1:.6g},{y1:.6g}: not "
                             "longitudes and latitudes, as GeoJSON's are (a box in the scene's CRS is x0,y0,x1,y1)")
        return geometry, "EPSG:4326"
    try:
        x0, y0, x1, y1 = (float(v) for v in body.split(","))
    except ValueError:
        raise InputError(f"--aoi {text!r}: expected x0,y0,x1,y1 (scene CRS), lonlat:x0,y0,x1,y1 or a .geojson file"
                         ) from None
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"--aoi {text!r}: the box is empty (expected x0 < x1 and y0 < y1)")
    if crs is not None and not _is_lonlat(x0, y0, x1, y1):
        raise InputError(f"--aoi {text!r}: a lonlat: box needs longitudes in -180..180 and latitudes in -90..90 "
                         "(lonlat:lon0,lat0,lon1,lat1)")
    box = {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
    return box, crs


def _is_lonlat(x0: float, y0: float, x1: float, y1: float) -> bool:
    """Whether a box lies within the longitudes and latitudes that exist (PROJ refuses the others, or
    wraps them somewhere unexpected)."""
    return -180 <= x0 and x1 <= 180 and -90 <= y0 and y1 <= 90


def _geometry(data, path: Path) -> dict:
    if not isinstance(data, dict):
        raise InputError(f"{path}: --aoi GeoJSON must be an object (a geometry, a Feature or a FeatureCollection), "
                         f"not a JSON {type(data).__name__}")
    if data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list) or len(features) != 1:
            found = len(features) if isinstance(features, list) else "no list of"
            raise InputError(f"{path}: --aoi GeoJSON must hold one polygon, found {found} features")
        data = features[0]
    if isinstance(data, dict) and data.get("type") == "Feature":
        data = data.get("geometry")
    if not isinstance(data, dict) or data.get("type") not in ("Polygon", "MultiPolygon"):
        raise InputError(f"{path}: --aoi GeoJSON must be a Polygon or MultiPolygon")
    if not _rings_ok(data):
        raise InputError(f"{path}: --aoi GeoJSON {data['type']} has no valid coordinates (each ring a list of at "
                         "least 4 [x, y] positions)")
    # positions may carry a height, in some rings and not others (GeoJSON allows it): x and y are the AOI
    polygons = [data["coordinates"]] if data["type"] == "Polygon" else data["coordinates"]
    flat = [[[[float(v) for v in p[:2]] for p in ring] for ring in polygon] for polygon in polygons]
    return {"type": data["type"], "coordinates": flat[0] if data["type"] == "Polygon" else flat}


def _rings_ok(geometry: dict) -> bool:
    """Whether every ring has at least 4 finite positions (reprojecting and rasterising fail on less)."""
    coordinates = geometry.get("coordinates")
    polygons = [coordinates] if geometry["type"] == "Polygon" else coordinates
    try:
        rings = [np.asarray([p[:2] for p in ring], dtype=np.float64) for polygon in polygons for ring in polygon]
    except (TypeError, ValueError):   # not lists of numbers, or ragged
        return False
    return bool(rings) and all(polygons) and all(r.ndim == 2 and len(r) >= 4 and r.shape[1] >= 2
                                                 and np.isfinite(r).all() for r in rings)


class AoiOutside(InputError):
    """An AOI that misses a scene entirely: a refusal when it misses every scene of the command."""


def aoi_mask_for(scene: Scene, aoi) -> "AoiMask | None":
    """The AOI on the scene's grid; an error when the scene lacks a CRS it needs or misses it entirely."""
    if aoi is None:
        return None
    geometry, crs = aoi
    if "gcps" in scene.georeferencing:
        raise InputError(f"{scene.path}: the scene is georeferenced by ground control points only, so an --aoi "
                         "cannot be placed on its pixels")
    if crs is not None:
        if scene.crs is None:
            raise InputError(f"{scene.path}: the scene has no CRS, so a lon/lat --aoi cannot be placed on it")
        geometry = _reprojected(scene, geometry, crs)
    elif scene.dataset.transform.is_identity:   # rasterio's stand-in: the box would be read as columns and rows
        raise InputError(f"{scene.path}: the scene has no georeferencing, so an --aoi box cannot be placed on it")
    mask = AoiMask(geometry, scene.dataset.transform, scene.width)
    x0, y0, x1, y1 = _bounds(geometry)
    left, bottom, right, top = scene.dataset.bounds
    if x1 <= min(left, right) or x0 >= max(left, right) or y1 <= min(bottom, top) or y0 >= max(bottom, top):
        digits = 6 if scene.crs is not None and scene.crs.is_geographic else 1   # whole numbers a user can copy back, not 5.4054e+06

        def box(*values: float) -> str:
            return ",".join(f"{v:.{digits}f}" for v in values)

        raise AoiOutside(f"{scene.path}: --aoi lies outside the scene (AOI {box(x0, y0, x1, y1)}; "
                         f"scene {box(left, bottom, right, top)} in its CRS)")
    return mask


def _reprojected(scene: Scene, geometry: dict, crs) -> dict:
    """The AOI in the scene's CRS; an error naming the scene when PROJ has no way there (a local or
    engineering CRS) or the AOI lies outside the projection's domain."""
    from rasterio._err import CPLE_BaseError   # GDAL's errors; rasterio.errors exposes no base class of them
    from rasterio.errors import CRSError, TransformError
    from rasterio.warp import transform_geom

    try:
        out = transform_geom(crs, scene.dataset.crs, _densified(geometry))
        reason = None if np.isfinite(_bounds(out)).all() else "coordinates outside the projection's domain"
    except (CPLE_BaseError, CRSError, TransformError) as exc:
        # GDAL spells out a CRS without an EPSG code as PROJJSON, hundreds of characters: named instead
        reason = re.sub(r"'\{.*\}'", "the scene's CRS", one_line(exc.__cause__ or exc))[:200]
    if reason is not None:
        raise InputError(f"{scene.path}: the --aoi cannot be placed in the scene's CRS ({reason})")
    return out


def _densified(geometry: dict, step: float = DENSIFY_DEG) -> dict:
    """A lon/lat polygon with points every ``step`` degrees along its edges. Reprojected, a straight
    edge in lon/lat (a parallel of a box) is a curve: joined by its corners alone, a parallel across
    one degree in UTM at 45° N is off by 12 pixels in its middle, and the AOI takes the wrong pixels."""
    def ring(points) -> list:
        points = np.asarray(points, dtype=np.float64)[:, :2]
        # an edge from 179.99° to -179.99° is 0.02° long across the antimeridian, not 359.98° around
        points[:, 0] = np.degrees(np.unwrap(np.radians(points[:, 0])))
        out = [points[:1]]
        for a, b in zip(points[:-1], points[1:]):
            n = max(1, int(np.ceil(np.abs(b - a).max() / step)))
            out.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
        return np.concatenate(out).tolist()

    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    dense = [[ring(r) for r in polygon] for polygon in polygons]
    return {"type": geometry["type"], "coordinates": dense[0] if geometry["type"] == "Polygon" else dense}


def _bounds(geometry: dict) -> tuple[float, float, float, float]:
    coords = np.asarray([p[:2] for ring in _rings(geometry) for p in ring], dtype=np.float64)
    return coords[:, 0].min(), coords[:, 1].min(), coords[:, 0].max(), coords[:, 1].max()


def _rings(geometry: dict):
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for polygon in polygons:
        yield from polygon


class AoiMask:
    """Which pixels of a block of rows lie inside the AOI (rasterised block by block: bounded memory)."""

    def __init__(self, geometry: dict, transform, width: int):
        self.geometry, self.transform, self.width = geometry, transform, width

    def rows(self, top: int, count: int) -> np.ndarray:
        from rasterio.features import geometry_mask
        from rasterio.windows import Window, transform as window_transform

        return geometry_mask([self.geometry], out_shape=(count, self.width),
                             transform=window_transform(Window(0, top, self.width, count), self.transform),
                             invert=True)
