"""Pictures: validation tiles (RGB, true mask, predicted mask) in the challenge's palette."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lc_common.atomic import write_atomic
from lc_common.tiles import CLASS_NAMES

# The challenge's colour palette (LandCoverData.CLASSES_COLORPALETTE in the benchmark).
PALETTE = np.array([[0, 0, 0], [255, 25, 236], [215, 25, 28], [211, 154, 92], [33, 115, 55],
                    [21, 75, 35], [118, 209, 93], [130, 130, 130], [255, 255, 255], [43, 61, 255]]) / 255.0
CMAP = ListedColormap(PALETTE)


def rgb(image_chw: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Bands R, G, B stretched between their 2nd and 98th percentiles for display, taken over the
    ``valid`` pixels where given (a scene's empty corners would otherwise darken the whole picture)."""
    img = np.asarray(image_chw[:3], dtype=np.float32).transpose(1, 2, 0)
    shown = img[valid] if valid is not None and valid.any() else img
    lo, hi = np.percentile(shown, 2), np.percentile(shown, 98)
    return np.clip((img - lo) / max(hi - lo, 1.0), 0, 1)


def prediction_figure(keys, images, masks, preds, title: str = "", dpi: int = 80) -> Figure:
    """One row per tile: RGB image, true mask, predicted mask (argmax).

    The margins are fixed in inches (titles above, the legend below) rather than found by
    ``tight_layout``, which draws the whole figure once more only to measure its text."""
    n = len(keys)
    height = 3 * n
    fig = Figure(figsize=(9, height), dpi=dpi)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.55 / height, top=1 - 0.75 / height, wspace=0.05,
                        hspace=0.12)
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        for ax, pic, name in zip(axes[i], (rgb(images[i]), masks[i], preds[i]), ("image", "mask", "predicted")):
            if pic.ndim == 2:
                ax.imshow(pic, cmap=CMAP, vmin=0, vmax=len(CLASS_NAMES) - 1, interpolation="nearest")
            else:
                ax.imshow(pic)
            ax.set_title(f"{keys[i]} {name}", fontsize=9)
            ax.axis("off")
    fig.legend(legend_handles(), CLASS_NAMES, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(title)
    return fig


def drawn(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8: ``fig`` drawn once, for a PNG file and TensorBoard alike (its add_figure
    would draw it again)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def save_pixels(pixels: np.ndarray, path) -> None:
    """A PNG of (H, W, 3) uint8 pixels, written whole or not at all."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: matplotlib.image.imsave(f, pixels, format="png"))


def legend_handles() -> list:
    return [Rectangle((0, 0), 1, 1, facecolor=PALETTE[c], edgecolor="0.5", linewidth=0.5)
            for c in range(len(CLASS_NAMES))]


def save_figure(fig: Figure, path, dpi: int = 80) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, format=Path(path).suffix[1:] or "png"))
