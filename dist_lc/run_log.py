"""What a run writes besides checkpoints, on rank 0 only: log lines, metrics.csv (always), a tqdm
bar, prediction plots, and the trackers of ``train.loggers``: TensorBoard (scalars, the prediction
plots, the resolved config) and MLflow (the resolved config as parameters, the metrics per epoch).
On other ranks every method does nothing."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

import yaml
from tqdm import tqdm

from lc_common.atomic import write_bytes_atomic
from lc_common.errors import InputError, first_sentence

from . import pixel_metrics
from .config import Config, TrainConfig, dispatch_table, pick, to_dict

COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_kl", "val_tiles", *pixel_metrics.COLUMNS, "lr",
           "epoch_time_s", "val_time_s", "images_per_s", "data_wait_frac", "peak_mem_mb")
MLFLOW_RUN = "mlflow_run_id"   # the run folder's MLflow run, continued on resume


def read_metrics(run_dir) -> list[dict]:
    """A run's metrics.csv rows as written (strings; "" where an epoch skipped validation), [] if none
    yet. Every value is checked to be a number, so that a damaged file (a resume, a report, a tune
    reads it) is one line naming it and its line, not a traceback where a value is used."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for line, row in enumerate(rows, 2):
            _check_row(row, line)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable metrics ({type(exc).__name__}: {exc})") from None
    return rows


def _check_row(row: dict, line: int) -> None:
    if None in row or None in row.values():
        raise ValueError(f"line {line} has {'more' if None in row else 'fewer'} fields than the header")
    int(row["epoch"])
    for key, value in row.items():
        if value != "":
            try:
                float(value)
            except ValueError:
                raise ValueError(f"line {line}, {key}: {value!r} is not a number") from None


def check_columns(rows) -> None:
    """Every key of every row is a metrics.csv column: a metric without one is an error, not a value
    quietly left out of the file."""
    for row in rows:
        unknown = [key for key in row if key not in COLUMNS]
        if unknown:
            raise ValueError(f"metrics.csv has no column {unknown[0]!r} (columns: {', '.join(COLUMNS)})")


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as ``section.key: value`` strings (MLflow parameters)."""
    return {f"{section}.{key}": str(value) for section, keys in to_dict(cfg).items() for key, value in keys.items()}


# MLflow's own HTTP defaults retry a server that does not answer for about four minutes per call:
# at the start that is a run that seems to hang, at each epoch a training that stalls. Bounded here
# (3 retries about 7 s apart in all, 10 s per request: seconds for a refused connection, under a
# minute for a server that drops packets) unless the environment sets them.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MLFLOW_GIVE_UP = 3   # epochs in a row that could not be logged before the run stops trying


def _mlflow_reason(exc: Exception) -> str:
    """Why MLflow failed, short: the socket's own error where its long retry message carries one."""
    found = re.findall(r"\[Errno -?\d+\] [^'\")]+", str(exc))
    return found[-1].strip() if found else first_sentence(exc)


class MLflowRun:
    """One run folder as one MLflow run (the same run after a resume), through MlflowClient. A tracking
    server that cannot be reached at the start is one line (the run has not begun); later, an epoch
    that cannot be logged is a warning (metrics.csv holds every epoch), and the run stops trying after
    ``MLFLOW_GIVE_UP`` in a row."""

    def __init__(self, run_dir: Path, cfg: Config, resumed: bool, warn):
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param
        except ImportError:
            raise InputError("train.loggers lists mlflow but MLflow is not installed: "
                             "pip install 'dist-lc[mlflow]' (or mlflow-skinny)") from None
        self._metric, self._warn, self._failed = Metric, warn, 0
        for key, value in MLFLOW_HTTP.items():
            os.environ.setdefault(key, value)
        uri = (cfg.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or (run_dir.parent.resolve() / "mlruns").as_uri())
        self.uri = uri
        if uri.startswith("file:"):
            # A file store is what many ranks and jobs can share on a cluster filesystem (SQLite is not
            # safe over NFS); MLflow 3 asks for this opt-in before it uses one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / MLFLOW_RUN
        if resumed and id_file.exists():
            self.run_id = id_file.read_text().strip()
            return
        key = "train.mlflow_uri"   # where the URI came from, for the refusal
        if not cfg.train.mlflow_uri:
            key = ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                   else f"{key} (null: a file store beside the run)")
        try:
            experiment = self._experiment(cfg.train.experiment or "dist_lc")
            run = self.client.create_run(experiment, run_name=run_dir.name,
                                         tags={"run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
            for i in range(0, len(params), 100):   # MLflow takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        except Exception as exc:  # noqa: BLE001 - MlflowException, or the store's own OSError
            raise InputError(f"{key} {uri}: MLflow does not take the run ({_mlflow_reason(exc)}); check the "
                             "server, or drop mlflow from train.loggers") from None
        id_file.write_text(self.run_id + "\n")

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another fold created it at the same moment, or the refusal stands
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _call(self, what: str, call) -> None:
        if self._failed >= MLFLOW_GIVE_UP:
            return
        try:
            call()
            self._failed = 0
        except Exception as exc:  # noqa: BLE001 - logging must not end a training
            self._failed += 1
            stop = " (no more tries: metrics.csv has every epoch)" if self._failed >= MLFLOW_GIVE_UP else ""
            self._warn(f"warning: MLflow at {self.uri} did not take {what} ({_mlflow_reason(exc)}){stop}")

    def epoch(self, row: dict) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self._metric(k, float(v), stamp, int(row["epoch"])) for k, v in row.items()
                   if k not in ("epoch", "step") and isinstance(v, (int, float)) and v == v]
        self._call(f"epoch {row['epoch']}", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def close(self, status: str) -> None:
        self._call(f"the run's end ({status})", lambda: self.client.set_terminated(self.run_id, status))


class RunLog:
    def __init__(self, run_dir, enabled: bool, resume_epoch: int = 0, cfg: Config | None = None):
        self.enabled, self.run_dir = enabled, Path(run_dir)
        self.log = logging.getLogger("dist_lc")
        self.writer = self.mlflow = self.file_handler = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._keep_rows_up_to(resume_epoch)
        self.log.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        if not any(getattr(h, "dist_lc_stderr", False) for h in self.log.handlers):
            console = logging.StreamHandler(sys.stderr)
            console.dist_lc_stderr = True
            console.setFormatter(fmt)
            self.log.addHandler(console)
        # this run's own file: a second run in the same process must not write into the first one's log
        self.file_handler = logging.FileHandler(self.run_dir / "train.log")
        self.file_handler.setFormatter(fmt)
        self.log.addHandler(self.file_handler)
        loggers = cfg.train.loggers if cfg is not None else ["tensorboard"]
        for name in dict.fromkeys(loggers):   # each once, in the order given
            pick(LOGGERS, name, "train.loggers")(self, cfg, resume_epoch)

    def _start_tensorboard(self, cfg: Config | None, resume_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_epoch + 1)
        if cfg is not None and not resume_epoch:
            text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)   # markdown code block

    def _start_mlflow(self, cfg: Config | None, resume_epoch: int) -> None:
        self.mlflow = MLflowRun(self.run_dir, cfg, resumed=resume_epoch > 0, warn=self.info)

    def _keep_rows_up_to(self, epoch: int) -> None:
        """On resume, drop rows of epochs the checkpoint does not hold (they will be trained again)."""
        path = self.run_dir / "metrics.csv"
        if path.exists():
            rows = read_metrics(self.run_dir)
            try:
                check_columns(rows)
            except ValueError as exc:   # another version's file: refused rather than cut down to these columns
                raise InputError(f"{path}: {exc}; move it aside to resume") from None
            self._write_rows([r for r in rows if int(r["epoch"]) <= epoch], mode="w")

    def _write_rows(self, rows, mode="a") -> None:
        """The file written whole each time (it is small): a failed write (a full disk) leaves the
        previous rows intact, never half a row. A key outside COLUMNS is an error, not dropped."""
        check_columns(rows)
        kept = read_metrics(self.run_dir) if mode == "a" else []
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept + list(rows))
        write_bytes_atomic(self.run_dir / "metrics.csv", text.getvalue().encode())

    def rows(self) -> list[dict]:
        """The run's metrics rows so far, resumed epochs included, as numbers (None where an epoch
        skipped validation)."""
        return [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in read_metrics(self.run_dir)]

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
        if self.writer is not None:
            for name, value in row.items():
                if name not in ("epoch", "step") and value is not None:
                    self.writer.add_scalar(name, value, row["epoch"])
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.epoch(row)
        parts = [f"{k} {row[k]:.4g}" for k in ("train_loss", "val_loss", "val_kl", "miou", "lr", "images_per_s")
                 if row.get(k) is not None]
        self.info(f"epoch {row['epoch']}: " + ", ".join(parts) + ("  *best*" if best else ""))

    def plot(self, epoch: int, shown: dict) -> None:
        if self.enabled and shown["key"]:
            from .plots import drawn, prediction_figure, save_pixels   # matplotlib: only when a run plots

            pixels = drawn(prediction_figure(shown["key"], shown["image"], shown["mask"], shown["pred"],
                                             title=f"epoch {epoch}"))
            save_pixels(pixels, self.run_dir / "plots" / f"epoch_{epoch:03d}.png")
            if self.writer is not None:
                self.writer.add_image("predictions", pixels, epoch, dataformats="HWC")

    def failure(self) -> None:
        """The traceback of the exception being handled, into train.log only: stderr gets the one
        line of the entry point. Best effort: the failure may be the disk that holds the log."""
        if self.file_handler is not None:
            try:
                self.file_handler.stream.write("".join(traceback.format_exc()))
                self.file_handler.flush()
            except (OSError, ValueError):
                pass

    def close(self, status: str = "FINISHED") -> None:
        if getattr(self, "file_handler", None) is not None:
            self.log.removeHandler(self.file_handler)
            self.file_handler.close()
            self.file_handler = None
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.close(status)


# how each of train.loggers starts with a run (metrics.csv is none of them: it is always written)
LOGGERS = dispatch_table(TrainConfig, "loggers", {"tensorboard": RunLog._start_tensorboard,
                                                  "mlflow": RunLog._start_mlflow})
