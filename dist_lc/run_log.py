"""What a run writes besides checkpoints, on rank 0 only: log lines, metrics.csv, TensorBoard,
a tqdm bar, prediction plots. On other ranks every method does nothing."""
from __future__ import annotations

import contextlib
import csv
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from .plots import prediction_figure, save_figure

COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_kl", "val_tiles", "lr", "epoch_time_s",
           "images_per_s", "data_wait_frac", "peak_mem_mb")


def read_metrics(run_dir) -> list[dict]:
    """A run's metrics.csv rows as written (strings; "" where an epoch skipped validation), [] if none yet."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass


class RunLog:
    def __init__(self, run_dir, enabled: bool, resume_epoch: int = 0):
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.log = logging.getLogger("dist_lc")
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._keep_rows_up_to(resume_epoch)
        if not self.log.handlers:
            self.log.setLevel(logging.INFO)
            fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
            for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(self.run_dir / "train.log")):
                handler.setFormatter(fmt)
                self.log.addHandler(handler)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_epoch + 1)

    def _keep_rows_up_to(self, epoch: int) -> None:
        """On resume, drop rows of epochs the checkpoint does not hold (they will be trained again)."""
        if (self.run_dir / "metrics.csv").exists():
            self._write_rows([r for r in read_metrics(self.run_dir) if int(r["epoch"]) <= epoch], mode="w")

    def _write_rows(self, rows, mode="a") -> None:
        path = self.run_dir / "metrics.csv"
        new = mode == "w" or not path.exists()
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def progress(self, total: int, desc: str):
        if not self.enabled:
            return contextlib.nullcontext(_NoBar())
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                    disable=None if sys.stderr.isatty() else True)

    def epoch(self, row: dict, best: bool) -> None:
        if not self.enabled:
            return
        self._write_rows([row])
        for name, value in row.items():
            if name not in ("epoch", "step") and value is not None:
                self.writer.add_scalar(name, value, row["epoch"])
        self.writer.flush()
        parts = [f"{k} {row[k]:.4g}" for k in ("train_loss", "val_loss", "val_kl", "lr", "images_per_s")
                 if row.get(k) is not None]
        self.info(f"epoch {row['epoch']}: " + ", ".join(parts) + ("  *best*" if best else ""))

    def plot(self, epoch: int, shown: dict) -> None:
        if self.enabled and shown["key"]:
            fig = prediction_figure(shown["key"], shown["image"], shown["mask"], shown["pred"], title=f"epoch {epoch}")
            save_figure(fig, self.run_dir / "plots" / f"epoch_{epoch:03d}.png")
            self.writer.add_figure("predictions", fig, epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
