"""``dist-lc map``: land-cover maps of Sentinel-2 scenes of any size, with their georeferencing.

    dist-lc map --checkpoint CKPT [CKPT ...] --out DIR SCENE.tif|FOLDER [...] [--overlap 64] [--tta]
                [--probabilities uint8|float32] [--aoi x0,y0,x1,y1 | lonlat:x0,y0,x1,y1 | area.geojson]

Per scene, in ``--out``: ``<scene>_classes.tif`` (uint8 class ids, the challenge palette as its
colour table, the scene's CRS and transform, 0 = no_data), optionally ``<scene>_probabilities.tif``
(the 8 scored classes, one band each; uint8 = probability × 255, or float32; GDAL 3.10 has no
float16; no_data masked by the file's internal mask band), ``<scene>_quicklook.png``,
``<scene>_proportions.json``; and ``proportions.csv`` for all scenes (and their AOI). A scene without
georeferencing gives a map without any; one georeferenced by ground control points gives a map with
them. Every file appears under its final name only once it is complete, checked and on disk; after a
failure (a full disk, a quota) none of a scene's files keeps its name.

Precision: the window rows travel to rank 0 as float16 (half the volume of the gather), so
``--probabilities float32`` holds float16 values (about 3 significant digits) widened to float32;
the classes and the proportions are computed from the same float16 rows.

How a scene is read and predicted (bounded memory: one row of windows at a time): the scene's
window rows (:mod:`dist_lc.scene`) are dealt to the ranks in turns; a rank reads the 256 rows of
its window row, predicts its windows in batches (ensemble, TTA, each checkpoint's precision) and
blends them along the row; rank 0 gathers each turn's rows, blends them into a running
accumulator of 256 rows, finishes every row no later window will touch and writes them in whole
rows of 256 × 256 blocks (a block written twice would leave its first copy in the file). The class of a pixel is
its most probable scored class; pixels with any band at 0 (or at the scene's nodata value), or
that the scene's own mask band masks, are no_data, and the network sees them as the band means
(what it sees beyond a tile's edge), not as their raw values. A scene's class proportions are the mean
probabilities over its valid pixels, classes 0 and 1 removed (as ``predict`` computes them for a
tile), next to the share of each class in the map.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lc_common import locks
from lc_common.atomic import fsync_dir, fsync_path, write_csv_atomic, write_json_atomic
from lc_common.errors import InputError, WriteError, one_line, print_error
from lc_common.tiles import CLASS_NAMES, IMAGE_DTYPE, IMAGE_SHAPE

from . import distributed
from .confusion import SCORED
from .memory import peak_memory_mb
from .metrics import SCORED_CLASSES, SCORED_NAMES, expand_scored
from .plots import PALETTE, legend_handles, rgb, save_figure
from .predict import (Ensemble, PredictionError, agreed, failure_note, first_failure, out_of_memory, raise_agreed,
                      raise_verdict)
from .precision import agreed_precision
from .scene import (WINDOW, AoiMask, AoiOutside, aoi_mask_for, band_order_warning, gdal_text, offset_warning,
                    open_scene, parse_aoi, scale_warning, scene_paths, taper, window_grid)
from .stopping import SignalHandlers

LOCK = ".map.lock"   # in --out while a mapping writes there
BLOCK = 256          # the outputs' tiles, in pixels
QUICKLOOK_PX = 1024   # the longer side of a quicklook, at most
QUICKLOOK_MAX_IN = 24   # the tallest quicklook figure (inches): an elongated scene stays far below 2^16 pixels
CLASS_OF = np.asarray(SCORED_CLASSES, np.uint8)   # index among the scored classes → class id
PROBE_BYTES = 1 << 20
CACHE_MARGIN = 16 << 20   # bytes of GDAL's block cache beyond what a map's rows need


@dataclass
class Planned:
    """A scene checked before any work, then closed (a folder may hold more scenes than a process may
    have open files): what its work needs besides the scene, reopened then."""
    path: Path
    aoi: AoiMask | None
    ys: list[int]
    xs: list[int]


def plan_scene(path: Path, aoi, overlap: int) -> tuple[Planned, AoiOutside | None, list[str], object]:
    """The scene's plan, whether the AOI misses it (its map then has no AOI proportions), what to
    warn of, and its CRS."""
    with open_scene(path) as scene:
        warned = [f"{path}: no georeferencing; its map is written without a CRS"] if scene.crs is None else []
        warned += filter(None, [scale_warning(scene), band_order_warning(scene), offset_warning(scene)])
        try:
            mask, outside = aoi_mask_for(scene, aoi), None
        except AoiOutside as exc:
            mask, outside = None, exc
        return Planned(path, mask, *window_grid(scene.height, scene.width, overlap)), outside, warned, scene.crs


def plan_scenes(paths: list[Path], aoi, overlap: int) -> list[Planned]:
    """Every scene checked before any work, its warnings said once (by rank 0 under a launcher). An
    AOI may miss some scenes of a folder of neighbouring ones (said, and their maps have no AOI
    proportions), not all of them."""
    plans, missed, warned, crss = zip(*(plan_scene(p, aoi, overlap) for p in paths))
    first = []   # (CRS, the first scene in it): compared as rasterio does, not as text (WKT spelt two ways)
    for path, crs in zip(paths, crss):
        if not any(crs == seen for seen, _ in first):
            first.append((crs, path))
    if aoi is not None and aoi[1] is None and len(first) > 1:   # a box in "the scene's CRS": which one?
        raise InputError("--aoi x0,y0,x1,y1 is a box in the scenes' CRS, but their CRSs differ ("
                         + "; ".join(f"{path.name}: {crs.to_string() if crs else 'none'}" for crs, path in first)
                         + "); give it as lonlat:x0,y0,x1,y1 or a GeoJSON file, or map each CRS's scenes apart")
    if all(missed):
        raise missed[0]
    if distributed.read_env().is_main:
        for line in [w for ws in warned for w in ws] + [f"{e}; its map has no AOI proportions" for e in missed if e]:
            print(f"warning: {line}", file=sys.stderr)
    return list(plans)


def row_probabilities(scene, ensemble: Ensemble, y: int, xs: list[int], weight: torch.Tensor,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One window row, its windows blended: (scored probabilities (8, h, width) float16, weights (h, width)).

    float16 halves what the ranks gather; even float32 outputs hold float16 values (module docstring)."""
    strip = scene.read_rows(y, WINDOW)
    valid = scene.valid(strip, y)
    h, w = strip.shape[1:]
    if h < WINDOW or w < WINDOW:   # a scene smaller than one window: reflected, the reflection cut off later
        pad = ((0, WINDOW - h if h < WINDOW else 0), (0, WINDOW - w if w < WINDOW else 0))
        strip, valid = np.pad(strip, ((0, 0), *pad), mode="reflect"), np.pad(valid, pad, mode="reflect")
    width = strip.shape[2]
    total = torch.zeros(len(SCORED_CLASSES), WINDOW, width, device=ensemble.device)
    weights = torch.zeros(WINDOW, width, device=ensemble.device)
    scored = SCORED.to(ensemble.device)
    for i in range(0, len(xs), batch_size):
        starts = xs[i:i + batch_size]
        image = torch.from_numpy(np.stack([strip[:, :, x:x + WINDOW] for x in starts]).astype(np.float32))
        inside = torch.from_numpy(np.stack([valid[:, x:x + WINDOW] for x in starts]))
        _, probs = ensemble(image.to(ensemble.device), pixels=True, valid=inside.to(ensemble.device))
        for x, p in zip(starts, probs[:, scored]):
            total[:, :, x:x + WINDOW] += p * weight
            weights[:, x:x + WINDOW] += weight
    probs = (total / weights)[:, :h, :w]
    if not torch.isfinite(probs).all():   # an overflow (fp16) or diverged weights: argmax of NaN is a class
        raise InputError(f"{scene.path}: the window row at pixel row {y} was predicted with probabilities that "
                         f"are not finite (NaN/inf); {ensemble.precision_hint()}")
    return probs.cpu().numpy().astype(np.float16), weights.cpu().numpy()[:h, :w]


class GdalFailures(logging.Handler):
    """GDAL's failures while a map is written. Inside a rasterio.Env, rasterio sends GDAL's errors to
    its log (a failure at INFO, "GDAL signalled an error"), those that raise nothing included: the
    blocks GDAL still caches are written when the file is closed (with overlapping windows, all of
    them), and a failure there (a full disk, a quota) reaches nothing but the log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or str(record.msg).startswith("GDAL signalled an error"):
            self.messages.append(one_line(record.getMessage()))

    @contextlib.contextmanager
    def installed(self):
        """A rasterio.Env with this handler on rasterio's log, lowered to INFO, while it lasts."""
        import rasterio

        logger = logging.getLogger("rasterio")
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        try:
            # the probabilities' mask band inside the GeoTIFF (GDAL's default, unless the environment says
            # otherwise): a .msk beside the partial file would never be renamed with it
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
                yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)

    @contextlib.contextmanager
    def watch(self):
        """An OSError with GDAL's first failure during the block, when the block itself raised nothing."""
        self.messages.clear()
        yield
        if self.messages:
            raise OSError(None, self.messages[0])


class MapWriter:
    """Rank 0's side of one scene: the blending accumulator, the output files, the proportions."""

    def __init__(self, scene, out_dir: Path, probabilities: str | None, aoi, made_with: dict | None = None):
        self.scene, self.aoi, self.probabilities, self.made_with = scene, aoi, probabilities, made_with
        width = scene.width
        self.acc = np.zeros((len(SCORED_CLASSES), WINDOW, width), np.float32)
        self.wacc = np.zeros((WINDOW, width), np.float32)
        self.base = 0
        stem = scene.path.stem
        self.finals = {"classes": out_dir / f"{stem}_classes.tif", "quicklook": out_dir / f"{stem}_quicklook.png",
                       "proportions": out_dir / f"{stem}_proportions.json"}
        stale = out_dir / f"{stem}_probabilities.tif"
        if probabilities:
            self.finals["probabilities"] = stale
        # an earlier map's probabilities would stand beside classes they no longer match
        self.stale = [] if probabilities else [stale]
        self.partial = {k: p.with_name(f".{p.name}.partial{p.suffix}") for k, p in self.finals.items()}
        self.classes = self.probs_file = None
        self.gdal, self.session = GdalFailures(), contextlib.ExitStack()
        try:
            self.session.enter_context(self.gdal.installed())
            self._open()
        except BaseException:   # the first file open, the second not: no partial file stays
            self.abort()
            raise
        self.sums = {"scene": np.zeros(len(SCORED_CLASSES)), "aoi": np.zeros(len(SCORED_CLASSES))}
        self.counts = {"scene": np.zeros(len(CLASS_NAMES), np.int64), "aoi": np.zeros(len(CLASS_NAMES), np.int64)}
        self.step = max(1, math.ceil(max(scene.height, scene.width) / QUICKLOOK_PX))
        self.look_rgb, self.look_classes = [], []
        self.queued: list[tuple] = []   # finished rows not yet written: (classes, probabilities, valid)
        self.written = 0                # the rows written to the files, a multiple of BLOCK until the last

    def _open(self) -> None:
        import rasterio

        # BigTIFF where the data could pass a classic TIFF's 4 GiB: for a compressed file GDAL's default
        # never chooses it; IF_SAFER does when the uncompressed data pass 2 GB (small maps stay classic).
        profile = {"driver": "GTiff", "width": self.scene.width, "height": self.scene.height,
                   **self.scene.georeferencing, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
                   "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        with warnings.catch_warnings(), self._writing("classes"):
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.classes = rasterio.open(self.partial["classes"], "w", count=1, dtype="uint8", nodata=0, **profile)
            self.classes.write_colormap(1, {c: tuple(int(round(v * 255)) for v in PALETTE[c]) + (255,)
                                            for c in range(len(CLASS_NAMES))})
            self.classes.set_band_description(1, "land-cover class (0 no_data, 2..9 as the challenge)")
        if not self.probabilities:
            return
        with warnings.catch_warnings(), self._writing("probabilities"):
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            uint8 = self.probabilities == "uint8"
            self.probs_file = rasterio.open(self.partial["probabilities"], "w", count=len(SCORED_CLASSES),
                                            dtype=self.probabilities, predictor=2 if uint8 else 3, **profile)
            for i, name in enumerate(SCORED_NAMES, 1):
                self.probs_file.set_band_description(i, f"P({name})" + (" × 255" if uint8 else ""))

    @contextlib.contextmanager
    def _writing(self, key: str):
        """A failure to write output ``key`` as a WriteError naming its final path, with the reason."""
        try:
            yield
        except WriteError as exc:   # lc_common.atomic's, naming the partial file
            raise WriteError(self.finals[key], exc.__cause__) from exc
        except OSError as exc:      # rasterio's RasterioIOError is one
            raise WriteError(self.finals[key], _with_errno(self.partial[key], exc)) from exc

    def add(self, y: int, probs: np.ndarray, weights: np.ndarray, until: int) -> None:
        """Blend one window row (at scene row ``y``) in, then write the rows before ``until``."""
        rows = probs.shape[1]
        offset = y - self.base
        self.acc[:, offset:offset + rows] += probs.astype(np.float32) * weights
        self.wacc[offset:offset + rows] += weights
        self._flush(until - self.base)

    def _flush(self, n: int) -> None:
        """Finish the accumulator's first ``n`` rows: their classes, probabilities and counts, queued
        for the files (:meth:`_write`)."""
        probs = self.acc[:, :n] / self.wacc[:n]
        valid = self.scene.valid(pixels := self.scene.read_rows(self.base, n), self.base)
        classes = CLASS_OF[probs.argmax(axis=0)]
        classes[~valid] = 0
        out = None
        if self.probs_file is not None:
            out = np.round(probs * 255).astype(np.uint8) if self.probabilities == "uint8" else probs
            out[:, ~valid] = 0
        self.queued.append((classes, out, valid))
        self._write()
        self._count("scene", probs, classes, valid)
        if self.aoi is not None:
            self._count("aoi", probs, classes, valid & self.aoi.rows(self.base, n))
        keep = [i for i in range(n) if (self.base + i) % self.step == 0]
        self.look_rgb.append(pixels[:, keep, ::self.step])
        self.look_classes.append(classes[keep, ::self.step])
        self.acc[:, :-n or None] = self.acc[:, n:] if n < WINDOW else 0
        self.acc[:, WINDOW - n:] = 0
        self.wacc[:-n or None] = self.wacc[n:] if n < WINDOW else 0
        self.wacc[WINDOW - n:] = 0
        self.base += n

    def _write(self, last: bool = False) -> None:
        """Write the queued rows in whole rows of blocks (all of them when ``last``). A block written
        part-filled is written again once the next rows fill it, and GDAL appends the recompressed
        block and leaves the first copy in the file as dead bytes: a third of the file when window
        rows (192 rows apart at the default overlap) were written as they came."""
        from rasterio.windows import Window

        rows = sum(c.shape[0] for c, _, _ in self.queued)
        n = rows if last else rows - rows % BLOCK
        if not n:
            return
        classes, valid = (np.concatenate([q[i] for q in self.queued]) for i in (0, 2))
        probs = np.concatenate([q[1] for q in self.queued], axis=1) if self.probs_file is not None else None
        window = Window(0, self.written, self.scene.width, n)
        with self._writing("classes"), self.gdal.watch():
            self.classes.write(classes[None, :n], window=window)
        if probs is not None:
            with self._writing("probabilities"), self.gdal.watch():
                self.probs_file.write(probs[:, :n], window=window)
                # no nodata value would do (0 is a probability): the file's mask band says no_data
                self.probs_file.write_mask(np.where(valid[:n], 255, 0).astype(np.uint8), window=window)
        rest = (classes[n:], probs[:, n:] if probs is not None else None, valid[n:])
        # copies: views would keep the whole concatenation alive until the next write
        self.queued = [tuple(a.copy() if a is not None else None for a in rest)] if n < rows else []
        self.written += n

    def _count(self, region: str, probs, classes, inside) -> None:
        self.sums[region] += probs[:, inside].astype(np.float64).sum(axis=1)
        self.counts[region] += np.bincount(classes[inside], minlength=len(CLASS_NAMES))

    def summary(self, region: str) -> dict:
        valid = int(self.counts[region].sum())
        props = expand_scored(self.sums[region][None])[0] if valid else np.zeros(len(CLASS_NAMES))
        return {"valid_pixels": valid, "proportions": dict(zip(CLASS_NAMES, props.tolist())),
                "map_fractions": dict(zip(CLASS_NAMES, (self.counts[region] / max(valid, 1)).tolist()))}

    def finish(self) -> dict:
        """Close and check the GeoTIFFs, write the rest, then give every file its final name."""
        self._write(last=True)
        self._close("classes")
        if self.probs_file is not None:
            self._close("probabilities")
        self.session.close()
        with self._writing("quicklook"):
            self._quicklook()
        record = {"scene": str(self.scene.path), "width": self.scene.width, "height": self.scene.height,
                  "crs": str(self.scene.crs) if self.scene.crs is not None else None,
                  "scene_region": self.summary("scene"),
                  "aoi_region": self.summary("aoi") if self.aoi is not None else None,
                  "made_with": self.made_with}   # a folder mapped again may hold scenes of several mappings
        with self._writing("proportions"):
            write_json_atomic(self.partial["proportions"], record)
        self._publish()
        return record

    def _close(self, key: str) -> None:
        """Close a GeoTIFF (GDAL writes its cached blocks then), give it overviews, and fsync it."""
        handle = self.classes if key == "classes" else self.probs_file
        with self._writing(key):
            with self.gdal.watch():
                handle.close()
                add_overviews(self.partial[key], "mode" if key == "classes" else "average")
            fsync_path(self.partial[key])

    def _publish(self) -> None:
        """Rename every partial file to its final name; after a failure, none keeps its final name."""
        try:
            for path in self.stale:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise WriteError(path, exc) from exc
            for key, final in self.finals.items():
                with self._writing(key):
                    os.replace(self.partial[key], final)
            with self._writing("classes"):
                fsync_dir(self.finals["classes"].parent)   # the new names durable, not only the data
        except WriteError:   # an earlier map's files too: left, they would pass for this scene's whole map
            for final in self.finals.values():
                with contextlib.suppress(OSError):
                    final.unlink()
            raise

    def abort(self) -> None:
        """Close what is open and remove every partial file (on any failure)."""
        for handle in (self.classes, self.probs_file):
            if handle is not None and not handle.closed:
                handle.close()
        self.session.close()
        for path in self.partial.values():
            with contextlib.suppress(OSError):   # the original error is the one to report
                path.unlink(missing_ok=True)

    def _quicklook(self) -> None:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure

        image, classes = np.concatenate(self.look_rgb, axis=1), np.concatenate(self.look_classes, axis=0)
        ratio = image.shape[1] / max(image.shape[2], 1)
        height = min(6 * ratio + 1.2, QUICKLOOK_MAX_IN)   # a tall, narrow image is drawn narrower instead
        fig = Figure(figsize=(12, height))
        ax_rgb, ax_map = fig.subplots(1, 2)
        ax_rgb.imshow(rgb(image, classes != 0))   # 0: no_data
        ax_map.imshow(classes, cmap=ListedColormap(PALETTE), vmin=0, vmax=len(CLASS_NAMES) - 1,
                      interpolation="nearest")
        for ax, title in ((ax_rgb, "RGB"), (ax_map, "land cover")):
            ax.set_title(f"{self.scene.path.name}: {title}", fontsize=9)
            ax.axis("off")
        names = [n for i, n in enumerate(CLASS_NAMES) if i != 1]
        fig.legend([h for i, h in enumerate(legend_handles()) if i != 1], names, loc="lower center", ncol=5,
                   fontsize=8)
        fig.tight_layout(rect=(0, 1.0 / height, 1, 1))
        save_figure(fig, self.partial["quicklook"], dpi=90)


def overview_factors(height: int, width: int) -> list[int]:
    """Halvings until the coarsest overview fits in one block, as ``gdaladdo`` chooses by default."""
    factors = []
    while max(height, width) / (factors[-1] if factors else 1) > BLOCK:
        factors.append(2 * (factors[-1] if factors else 1))
    return factors


def add_overviews(path: Path, resampling: str) -> None:
    """Internal overviews (compressed as the file is): without them a GIS reads every pixel of a
    scene to draw it whole. ``mode`` keeps a class map's classes (an average of class numbers is
    another class); ``average`` suits probabilities. Both leave out no_data pixels (nodata value or
    mask band)."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path, "r+") as dst:
        factors = overview_factors(dst.height, dst.width)
        if not factors:   # a scene a GIS draws whole from its own pixels
            return
        # a row of blocks in the cache: with less than a block, GDAL writes back each block it reads
        # (a second copy of the whole file, the first left dead)
        row = math.ceil(dst.width / BLOCK) * BLOCK * BLOCK * dst.count * np.dtype(dst.dtypes[0]).itemsize
        with rasterio.Env(GDAL_CACHEMAX=row + CACHE_MARGIN):
            dst.build_overviews(factors, Resampling[resampling])


def _with_errno(partial: Path, exc: OSError) -> OSError:
    """``exc``, or when it has no errno (GDAL's errors name a TIFF routine, not the cause), what the
    file system answers to a write at the end of the partial file: a full disk, a quota, a file size
    limit, a read-only folder; GDAL's message if that write succeeds."""
    if exc.errno is not None:
        return exc
    try:
        with open(partial, "ab") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as answer:
        return answer
    return OSError(None, exc.strerror or gdal_text(exc))


def map_scene(scene, plan: Planned, ensemble: Ensemble, env, out_dir: Path, args, progress,
              stop: "StopOnce") -> dict | None:
    """Predict and write one scene (window rows dealt to the ranks); its record on rank 0.

    Every rank learns each turn's outcome (:func:`~dist_lc.predict.raise_agreed`): a rank whose row
    failed, or was stopped by a signal, or rank 0 failing to write, ends them all with its cause, and
    rank 0 removes the scene's partial files. A rank that raised alone would leave the others waiting
    in the next gather. A signal is raised at once only while the rank predicts its row; one that
    comes while it gathers, writes or cleans up is taken at its next turn (``stop.held``)."""
    ys, xs, batch_size = plan.ys, plan.xs, args.batch_size
    weight = torch.from_numpy(taper(WINDOW)).to(ensemble.device)
    made_with = {"checkpoints": [str(Path(c).resolve()) for c in args.checkpoint], "tta": args.tta,
                 "overlap": args.overlap}
    writer = None
    try:
        writer = _on_main(env, stop, MapWriter, scene, out_dir, args.probabilities, plan.aoi, made_with)
        for turn in range(0, len(ys), env.world_size):
            mine, part, failure = turn + env.rank, None, None
            try:
                stop.check()   # a signal that came while this rank gathered or wrote
                if mine < len(ys):
                    part = (mine, *row_probabilities(scene, ensemble, ys[mine], xs, weight, batch_size))
            except Exception as exc:   # noqa: BLE001 - agreed below (Stopped included)
                failure = out_of_memory(exc, batch_size) or exc
            with stop.held():
                parts = distributed.gather_objects((part, failure_note(failure)))
                verdict = first_failure([note for _, note in parts]) if parts is not None else None
                if writer is not None and verdict is None:
                    try:
                        for r, probs, weights in sorted(p for p, _ in parts if p is not None):
                            writer.add(ys[r], probs, weights, ys[r + 1] if r + 1 < len(ys) else scene.height)
                    except Exception as exc:   # noqa: BLE001 - a full disk: the peers wait to hear
                        failure, verdict = exc, (0, *failure_note(exc))
                raise_agreed(verdict, failure)
            progress.update(len(xs) * min(env.world_size, len(ys) - turn))
        # rank 0 alone closes the files and builds their overviews, in a time that grows with the
        # scene: the others wait for its word without the collectives' timeout
        return _on_main(env, stop, lambda: writer.finish(), untimed=True)
    except BaseException:
        if writer is not None:
            with stop.held():
                writer.abort()
        raise


def _on_main(env, stop: "StopOnce", fn, *args, untimed: bool = False):
    """``fn(*args)`` on rank 0 (None elsewhere) with signals held, its failure raised on every rank. A
    collective (``untimed``: its word reaches the others through the store, however long it takes)."""
    value, failure, verdict = None, None, None
    with stop.held():
        if env.is_main:
            try:
                value = fn(*args)
            except Exception as exc:   # noqa: BLE001 - agreed below
                failure, verdict = exc, (0, *failure_note(exc))
        if untimed:
            raise_verdict(distributed.broadcast_untimed(verdict), failure)
        else:
            raise_agreed(verdict, failure)
    return value


def _rows_of(record: dict) -> list[dict]:
    out = []
    for region in ("scene", "aoi"):
        found = record[f"{region}_region"]
        if found is not None:
            out.append({"scene": Path(record["scene"]).stem, "region": region, "valid_pixels": found["valid_pixels"],
                        **found["proportions"]})
    return out


def run(args) -> int:
    import rasterio

    if not 0 <= args.overlap < WINDOW:
        raise InputError(f"--overlap {args.overlap}: must be 0 to {WINDOW - 1} pixels")
    if args.overlap > WINDOW // 2 and distributed.read_env().is_main:   # legal, but the cost grows fast
        print(f"warning: --overlap {args.overlap}: windows {WINDOW - args.overlap} px apart, each pixel predicted "
              f"about {(WINDOW / (WINDOW - args.overlap)) ** 2:.0f} times ({WINDOW // 2} px: 4 times)",
              file=sys.stderr, flush=True)
    paths = scene_paths(args.scenes)
    aoi = parse_aoi(args.aoi)
    plans = plan_scenes(paths, aoi, args.overlap)
    failure = None
    # Inside an Env, GDAL's error messages go to rasterio's log, not to stderr: an error ends in one line.
    with rasterio.Env(**gdal_cache(plans, args.probabilities)), distributed.process_group(args.device) as group:
        stop = StopOnce()
        try:
            with stop:
                map_scenes(args, plans, group, stop)
        except Exception as exc:   # noqa: BLE001 - raised below
            # every rank raised it together: they leave the group together
            failure = exc
    if failure is not None and stop.signum is not None:   # a peer's error too: the signal came first or
        failure = Stopped(stop.signum)                    # because of it (torchrun's, once a rank died)
    if isinstance(failure, (PredictionError, Stopped)):
        print_error(failure)
        return 128 + failure.signum if isinstance(failure, Stopped) else 1
    if failure is not None:   # bad input, a write: one line from the entry point; anything else: its traceback
        raise failure
    return 0


class Stopped(Exception):
    """A mapping ended by a signal (a user's, Slurm's, or torchrun's when a peer rank has died)."""

    def __init__(self, signum: int):
        super().__init__(f"dist-lc map: stopped by {signal.Signals(signum).name}; the scene being mapped was "
                         "not written (its partial files removed); the scenes before it are in --out")
        self.signum = signum


class StopOnce(SignalHandlers):
    """While open, the first SIGTERM or SIGHUP raises :class:`Stopped`, so that the scene being written
    removes its partial files on the way out; later ones are ignored, so that nothing cuts that short.
    Inside ``held()`` (a collective, a write, the clean-up) the signal is only noted, and ``check()``
    raises it where the ranks can agree on it."""
    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self._holding = 0

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if not self._holding:
                raise Stopped(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped(self.signum)


def gdal_cache(plans: list[Planned], probabilities: str | None) -> dict:
    """GDAL's block cache (``rasterio.Env`` options): two rows of windows of the widest scene (a
    window row's blocks, read again by the next row where they overlap, and by the writer for its
    no_data mask and quicklook), a row of blocks of each output (the map writes whole rows of
    blocks) and a margin. GDAL's default, 5 % of the memory, keeps blocks long done with: the map's
    memory would grow with the scene up to that (gigabytes on a large node). rasterio takes the size
    in bytes (GDAL's own GDAL_CACHEMAX variable, in MB, is read only when none is set: the user's
    wins)."""
    if "GDAL_CACHEMAX" in os.environ:
        return {}
    width = max(p.xs[-1] + WINDOW for p in plans)
    scene = 2 * WINDOW * width * IMAGE_SHAPE[2] * np.dtype(IMAGE_DTYPE).itemsize
    per_pixel = 1 + (len(SCORED_CLASSES) * np.dtype(probabilities).itemsize + 1 if probabilities else 0)
    return {"GDAL_CACHEMAX": scene + BLOCK * width * per_pixel + CACHE_MARGIN}


def map_scenes(args, plans: list[Planned], group: distributed.Group, stop: StopOnce) -> None:
    out_dir = Path(args.out)
    ensemble, failure = None, None
    with stop.held():   # collectives: a signal is taken at the next turn
        auto = agreed_precision("auto", group.device)
    try:
        ensemble = Ensemble(args.checkpoint, group.device, tta=args.tta, auto=auto)
    except Exception as exc:   # noqa: BLE001 - agreed: a rank that left here would leave its peers waiting
        failure = exc
    with stop.held():
        agreed(failure)
    with contextlib.ExitStack() as claimed:
        with stop.held():
            distributed.on_main(claim_out, out_dir, claimed)
        map_all(args, plans, ensemble, group.env, group.device, out_dir, stop)


def claim_out(out_dir: Path, claimed: contextlib.ExitStack) -> None:
    """--out made, and held by this mapping (rank 0's, the one that writes) until ``claimed`` closes:
    two mappings into one folder would publish each other's half-written scenes. A failed mapping
    leaves no empty --out that it made, and no proportions.csv of an earlier mapping: beside this
    one's scenes, it would pass for this mapping's list."""
    claimed.enter_context(locks.claimed(out_dir, f"{out_dir}: another dist-lc map ({{holder}}) is writing into "
                                                 "this folder; wait for it to end or choose another --out", LOCK))
    listed = out_dir / "proportions.csv"
    try:
        listed.unlink(missing_ok=True)
    except OSError as exc:
        raise WriteError(listed, exc) from exc


def map_all(args, plans: list[Planned], ensemble: Ensemble, env, device, out_dir: Path, stop: StopOnce) -> None:
    from tqdm import tqdm

    records = []
    with tqdm(total=sum(len(p.ys) * len(p.xs) for p in plans), desc="map windows", unit="window",
              file=sys.stderr, disable=not (env.is_main and sys.stderr.isatty())) as bar:
        for plan in plans:
            with open_scene(plan.path) as scene:
                records.append(map_scene(scene, plan, ensemble, env, out_dir, args, bar, stop))
    with stop.held():   # the scenes are written: a signal now ends a mapping that is complete
        distributed.on_main(write_csv_atomic, out_dir / "proportions.csv",
                            pd.DataFrame([row for r in records if r for row in _rows_of(r)]))
    if env.is_main:
        for r in records:
            print(f"mapped {r['scene']} ({r['width']} × {r['height']} px) → {out_dir}")
        print(f"peak memory of rank 0: {peak_memory_mb(device):.0f} MB")


def scene_record(out_dir: Path, stem: str) -> dict:
    """A mapped scene's proportions record (``<scene>_proportions.json``)."""
    return json.loads((Path(out_dir) / f"{stem}_proportions.json").read_text())
