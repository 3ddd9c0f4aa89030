"""What a validation's prediction plot costs the rank that draws it (rank 0, while the others wait):
``RunLog.plot`` as shipped (margins fixed, the figure drawn once for the PNG and TensorBoard) against
the code before (``tight_layout``, ``savefig``, TensorBoard's ``add_figure``: three draws),
interleaved, on ``train.plot_tiles`` synthetic validation tiles of 256²::

    python benchmarks/plot_time.py [--rounds 5] [--tiles 4] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_interleaved  # noqa: E402

from dist_lc.plots import drawn, prediction_figure, save_figure, save_pixels  # noqa: E402


def before(shown: dict, out: Path, writer, epoch: int) -> None:
    fig = prediction_figure(**shown, title=f"epoch {epoch}", dpi=100)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    save_figure(fig, out / f"before_{epoch:03d}.png")
    writer.add_figure("before", fig, epoch)


def shipped(shown: dict, out: Path, writer, epoch: int) -> None:
    pixels = drawn(prediction_figure(**shown, title=f"epoch {epoch}"))
    save_pixels(pixels, out / f"shipped_{epoch:03d}.png")
    writer.add_image("shipped", pixels, epoch, dataformats="HWC")


def main(argv=None) -> int:
    from torch.utils.tensorboard import SummaryWriter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiles", type=int, default=4, help="train.plot_tiles (its default: 4)")
    ap.add_argument("--quick", action="store_true", help="one round of one tile (a smoke run)")
    args = ap.parse_args(argv)
    rounds, tiles = (1, 1) if args.quick else (args.rounds, args.tiles)
    rng = np.random.default_rng(0)
    shown = {"keys": [str(i) for i in range(tiles)],
             "images": [rng.integers(0, 3000, (4, 256, 256)).astype(np.uint16) for _ in range(tiles)],
             "masks": [rng.integers(0, 10, (256, 256)) for _ in range(tiles)],
             "preds": [rng.integers(0, 10, (256, 256)) for _ in range(tiles)]}
    seconds = {"before": [], "shipped": []}
    with tempfile.TemporaryDirectory(prefix="plot_time-") as work:
        writer = SummaryWriter(work)
        for variant in (before, shipped):   # matplotlib's and TensorBoard's first-use costs out of the rounds
            variant(shown, Path(work), writer, 0)
        for epoch in range(1, rounds + 1):
            for name, variant in (("before", before), ("shipped", shipped)):
                started = time.perf_counter()
                variant(shown, Path(work), writer, epoch)
                seconds[name].append(time.perf_counter() - started)
        writer.close()
    print_interleaved(f"{tiles} tile(s) of 256², {rounds} round(s), interleaved", "plot", seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
