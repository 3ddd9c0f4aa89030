"""Helpers shared by the training benchmarks (``train_throughput.py``, ``train_memory.py``, ``gpu.py``).

Standard library only at import time: ``train_throughput.py --tf-worker`` imports this module from
a separate TensorFlow virtual environment that has no torch.
"""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SRC = Path(os.environ.get("DIST_LC_SHARED") or REPO.parent / "shared") / "data" / "s2glc-sample"


def loadavg() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line() -> str:
    """One line: cores, arch, CPU model, ISA extensions that matter for the kernels, date, load."""
    from lc_common.resources import usable_cores

    cores = usable_cores()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{cores}-core {platform.machine()} ({cpu_model()}; {', '.join(isa) or 'no AVX2'}), "
            f"Python {platform.python_version()}, {date}, load average {loadavg()}")


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values) -> str:
    """``min–max`` of a list of numbers, for the tables' range columns."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{min(values):.2f}–{max(values):.2f}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_interleaved(setting: str, what: str, seconds: dict, before: str = "before", after: str = "shipped") -> None:
    """The machine and ``setting``; each variant's median and range of ``seconds`` (variant → list);
    then the ratio of ``after``'s median to ``before``'s: the report of an interleaved before/after."""
    print(f"Machine: {machine_line()}; {setting}\n")
    print(table([what, "median s", "range s"], [[v, f"{median(s):.2f}", spread(s)] for v, s in seconds.items()]))
    print(f"\n{after} / {before}: {median(seconds[after]) / median(seconds[before]):.2f}")


def ensure_shards(out: Path, src: Path = SAMPLE_SRC, block_size: str = "auto") -> Path:
    """A shard folder of the real sample: ``out`` if it already has a manifest, else packed there
    (``block_size``: ``lc-shard pack --block-size``)."""
    if (out / "manifest.json").is_file():
        from shard_tools.manifest import load_manifest
        from shard_tools.pack import block_size_for

        m = load_manifest(out)
        made, asked = m.data.get("block_size", 1), block_size_for(block_size, m.num_folds, m.data["counts"]["train"])
        if made != asked:
            raise SystemExit(f"{out}: packed with --block-size {made}, not {asked}; use another --work")
        return out
    subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(src), "--out", str(out),
                    "--block-size", str(block_size)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


# ----------------------------------------------------------------------------- the trainer's own step

BENCHMARK_RECIPE = REPO / "configs" / "benchmark.yaml"


def synthetic_shards(work: Path, tiles: int, workers: int = 1, *, keep_tiles: bool = True,
                     timeout: float | None = None) -> Path:
    """A shard folder of ``tiles`` synthetic tiles (``dist-lc synth``, then ``lc-shard pack``), made
    under ``work/synth-<tiles>`` unless already there. The folder is named by its tile count so that a
    run never reuses a smaller set left by another (the trainer needs a full batch of tiles).
    ``keep_tiles=False`` removes the TIFFs once packed (a full-size set's take half of 22 GB)."""
    base = work / f"synth-{tiles}"
    data, shards = base / "data", base / "shards"
    if not (shards / "manifest.json").exists():
        if not (data / "train_labels.csv").exists():
            subprocess.run([sys.executable, "-m", "dist_lc", "synth", "--out", str(data), "--train", str(tiles),
                            "--test", "0", "--workers", str(workers)], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL, timeout=timeout)
        subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(data), "--out", str(shards),
                        "--workers", str(workers)], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       timeout=timeout)
    if not keep_tiles:
        shutil.rmtree(data, ignore_errors=True)
    return shards


def step_overrides(*, device: str, precision: str, channels_last: bool, compile: bool, micro: int,
                   size: int, implementation: str = "auto", compile_mode: str = "default") -> list[str]:
    """The ``--set`` overrides of one timed variant: one micro-batch of ``micro`` tiles per optimizer
    step (no accumulation), ``size``² tiles (a crop below the full tile, as ``data.crop`` trains),
    the optimizer's kernels (``optim.implementation``) and torch.compile's mode."""
    from lc_common.tiles import IMAGE_SHAPE

    return [f"train.device={device}", f"train.precision={precision}",
            f"train.channels_last={str(channels_last).lower()}", f"train.compile={str(compile).lower()}",
            f"train.compile_mode={compile_mode}", f"optim.implementation={implementation}",
            f"train.batch_size={micro}", f"train.micro_batch_size={micro}",
            f"data.crop={size if size < IMAGE_SHAPE[0] else 'null'}"]


def trainer_setup(shards: Path, sets: list[str]):
    """``dist_lc.train.build_setup`` of configs/benchmark.yaml with ``sets``: the model, loss,
    optimizer, precision, memory layout and compilation that ``dist-lc train`` would run.

    On ``shards`` with no loader workers and no validation fold: the timed batches are built in
    memory (:func:`step_batches`); the shards only serve the set-up itself (the manifest's class
    weights, a training loader that needs one full batch of tiles and goes unused).
    ``train.micro_batch_size`` must be a number in ``sets``: "auto" would run trial steps to choose one."""
    from dist_lc.config import load_config
    from dist_lc.train import build_setup

    cfg = load_config(BENCHMARK_RECIPE, [f"data.shards={shards}", "data.fold=null", "data.workers=0", *sets])
    if cfg.train.micro_batch_size == "auto":
        raise ValueError("trainer_setup: give train.micro_batch_size a number (auto runs trial steps)")
    return build_setup(cfg)


def step_batches(s, seed: int = 0) -> list[dict]:
    """The micro-batches of one optimizer step of Setup ``s``, as its loader yields them to
    ``dist_lc.train.train_step``: built by the loader's own ``BatchBuilder`` from random tiles
    (uint16 N×H×W×4 images, uint8 masks, float32 proportions, int8 views when ``data.augment``),
    numpy fields made tensors as ``dist_lc.loading`` does, images and masks in pinned memory on
    CUDA as the loader's batch ring is. Still on the host: the step's ``to_device`` moves them, turns
    each sample by its view and lays the images out as the model takes them, as in training."""
    import numpy as np
    import torch

    from dist_lc.data import BatchBuilder, as_pixels, random_view
    from lc_common.tiles import IMAGE_SHAPE, MAX_PIXEL_VALUE, NUM_CLASSES, class_proportions

    size, micro = s.cfg.data.crop or IMAGE_SHAPE[0], s.layout.micro
    rng = np.random.default_rng(seed)
    builder, batch = BatchBuilder(micro), None
    for i in range(micro):
        image = rng.integers(1, MAX_PIXEL_VALUE + 1, (size, size, IMAGE_SHAPE[2]), dtype=np.uint16)
        mask = rng.integers(0, NUM_CLASSES, (size, size), dtype=np.uint8)
        view = random_view(rng) if s.cfg.data.augment else None
        batch = builder.add(f"synthetic-{i}", as_pixels(image), mask, class_proportions(mask), view)
    batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if s.device.type == "cuda":
        batch["image"], batch["mask"] = batch["image"].pin_memory(), batch["mask"].pin_memory()
    return [batch] * s.layout.accum


def loss_trace(shards: Path, sets: list[str], steps: int = 50, batches: int = 5):
    """The mean tile loss of each of ``steps`` optimizer steps of the trainer's own ``train_step`` on
    the Setup of configs/benchmark.yaml with ``sets``, cycling through ``batches`` fixed random
    batches: the same weights and batches for every variant, so that their traces compare."""
    import numpy as np

    from dist_lc.train import train_step

    s = trainer_setup(shards, sets)
    try:
        data = [step_batches(s, seed=i) for i in range(batches)]
        return np.array([train_step(s, data[i % batches])[0] for i in range(steps)])
    finally:
        s.close()


def trace_deviation(trace, reference) -> float:
    """Mean relative difference of two loss traces, step by step."""
    import numpy as np

    return float(np.mean(np.abs(trace - reference) / np.abs(reference)))


def cv_command(recipe, out: Path, shards: Path, minutes: float, folds, nproc: int = 2, sets=(),
               executor: str = "local") -> list[str]:
    """``dist-lc cv`` of a recipe on a time budget per fold, as the quality and overhead benchmarks run
    it: ``nproc`` DDP ranks per fold job, one job at a time, ``train.time_limit`` minutes of training
    each (the epoch count left to the fitted schedule)."""
    sets = [f"data.shards={shards}", f"train.time_limit={minutes}", "train.epochs=1000",
            f"launcher.tasks_per_node={nproc}", "launcher.max_parallel=1",
            f"launcher.time_min={int(minutes * 3) + 10}", f"cv.folds={list(folds)}", *sets]
    return [sys.executable, "-m", "dist_lc", "cv", "--config", str(recipe), "--out", str(out),
            "--executor", executor, *[a for s in sets for a in ("--set", s)]]


def log(msg: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes and their memory

def _proc_table() -> dict[int, tuple[int, float, float]]:
    """{pid: (parent pid, RSS MB, CPU seconds)} of every live process."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[21]) * page_mb, (int(fields[11]) + int(fields[12])) / tick)
    return out


class TreeSampler:
    """Samples a command's process tree every ``interval`` seconds: the peak RSS of the root process
    and of each descendant, and their CPU seconds (what ``time`` cannot split by process)."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        import threading

        self.root, self.interval = root_pid, interval
        self.peak: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self.parent: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = _proc_table()
            tree, frontier = {self.root}, [self.root]
            while frontier:
                pid = frontier.pop()
                for child, (ppid, _, _) in table.items():
                    if ppid == pid and child not in tree:
                        tree.add(child)
                        frontier.append(child)
                        self.parent[child] = pid
            for pid in tree & table.keys():
                _, rss, cpu = table[pid]
                self.peak[pid] = max(self.peak.get(pid, 0.0), rss)
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        """{"root_peak_mb", "child_peak_mb" (the largest descendant), "root_cpu_s", "children_cpu_s"}."""
        self._stop.set()
        self._thread.join()
        children = [p for p in self.peak if p != self.root]
        direct = [p for p in children if self.parent.get(p) == self.root]
        return {"root_peak_mb": self.peak.get(self.root, float("nan")),
                "child_peak_mb": max((self.peak[p] for p in children), default=0.0),
                "direct_child_peaks_mb": sorted((self.peak[p] for p in direct), reverse=True),
                "deeper_peak_mb": max((self.peak[p] for p in children if p not in direct), default=0.0),
                "root_cpu_s": self.cpu.get(self.root, 0.0),
                "children_cpu_s": sum(self.cpu[p] for p in children)}


def measured(cmd: list[str], log_path: Path | None = None, cwd=REPO, env=None, timeout: float | None = None) -> dict:
    """Run a command, its process tree sampled: wall seconds, exit status, peaks and CPU seconds."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    started = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        rc = proc.wait(timeout=timeout)
        stats = sampler.stop()
    finally:
        if log_path:
            out.close()
    return {"cmd": " ".join(map(str, cmd)), "rc": rc, "wall_s": time.perf_counter() - started, **stats}
