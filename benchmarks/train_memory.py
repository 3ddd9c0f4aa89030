"""Peak memory of a training step, per micro-batch and with accumulation (results: docs/BENCHMARKS.md).

    python benchmarks/train_memory.py            # full run (~8 min on 2 cores)
    python benchmarks/train_memory.py --quick    # smoke run

Each configuration runs in a fresh process (``--child``), so its RSS high-water mark
(``dist_lc.train.peak_memory_mb``, the figure the trainer logs as ``peak_mem_mb``) belongs to it
alone. The child builds everything with the trainer's own code, ``dist_lc.train.build_setup`` from
``configs/benchmark.yaml`` (+ ``--set`` overrides, 256×256 tiles, the real sample's shards), feeds
``dist_lc.train.train_step`` from ``dist_lc.data.train_loader`` exactly as ``train_epoch`` does
(collect ``accum`` micro-batches, then one optimizer step), and reports the RSS after set-up, the
peak after each optimizer step, and the largest DataLoader worker's peak. On CUDA it also reports
``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, ensure_shards, loadavg, log, machine_line, table

# (precision, effective batch, micro-batch, optimizer steps)
FULL = [("auto", 4, 4, 2), ("auto", 8, 8, 3), ("auto", 16, 16, 2), ("auto", 32, 8, 2), ("auto", 256, 8, 1),
        ("fp32", 4, 4, 1), ("fp32", 8, 8, 2), ("fp32", 32, 32, 1)]
QUICK = [("auto", 4, 4, 1), ("auto", 8, 8, 1), ("auto", 32, 8, 1)]

# The Preligens benchmark (TF 2.15, fp32) on a 2-core CPU of this kind, quoted (not measured here).
TF_QUOTED_PEAK_GB = {8: 4.8, 32: 14.3}


def _rss_mb() -> float:
    from dist_lc.memory import rss_bytes

    return rss_bytes() / 2**20


def _workers_peak_mb(loader) -> float:
    """The largest loader worker's RSS high-water mark (VmHWM), read while the workers live: they are
    the forkserver's children, not this process's, so RUSAGE_CHILDREN does not count them."""
    peak = 0.0
    for worker in getattr(loader._iterator, "_workers", ()):
        try:
            for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return peak


def child(args) -> int:
    import torch

    from dist_lc.config import load_config
    from dist_lc.memory import peak_memory_mb
    from dist_lc.train import build_setup, timed, train_step

    sets = [f"data.shards={args.shards}", "data.fold=null", f"train.precision={args.precision}",
            f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro}",
            f"data.workers={args.workers}", *args.set]
    cfg = load_config(REPO / "configs" / "benchmark.yaml", sets)
    s = build_setup(cfg)
    out = {"precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[s.dtype],
           "accum": s.layout.accum, "threads": torch.get_num_threads(),
           "rss_setup_mb": _rss_mb(), "peak_setup_mb": peak_memory_mb(torch.device("cpu")), "steps": []}
    steps = s.steps_per_epoch
    s.model.train()
    workers_peak = 0.0
    with s.train_data.batches(0) as it:
        batches = timed(it, waited := [0.0])
        for _ in range(min(args.steps, steps)):   # as train_epoch: each micro-batch computed as the loader yields it
            waited[0], started = 0.0, time.perf_counter()
            train_step(s, itertools.islice(batches, s.layout.accum))
            step = {"seconds": time.perf_counter() - started, "collect_s": waited[0],
                    "peak_mb": peak_memory_mb(torch.device("cpu")), "rss_mb": _rss_mb()}
            if s.device.type == "cuda":
                step["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(s.device) / 2**20
            out["steps"].append(step)
            workers_peak = max(workers_peak, _workers_peak_mb(s.train_data))
    s.close()
    out["worker_peak_mb"] = workers_peak
    print(json.dumps(out), flush=True)
    return 0


def run_config(precision, batch, micro, steps, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--precision", precision, "--batch", str(batch),
           "--micro", str(micro), "--steps", str(steps), "--shards", str(args.shards), "--workers", str(args.workers)]
    for s in args.set:
        cmd += ["--set", s]
    load = loadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update({"precision_set": precision, "batch": batch, "micro": micro, "load": load,
                "wall_s": time.perf_counter() - started})
    return res


def tf_peer_peaks(args) -> list[dict]:
    """Peak RSS of the Keras U-Net peer (train_throughput.py's TF worker), fresh process per batch size."""
    from train_throughput import TFPeer

    out = []
    for batch, steps in args.tf_batches:
        load = loadavg()
        peer = TFPeer(args.tf_python, batch, 256)
        try:
            times = peer.steps(steps)
            out.append({"batch": batch, "peak_mb": peer.peak_mb(), "step_s": times, "load": load,
                        "tf": peer.info.get("tf")})
        finally:
            peer.close()
        log(f"  TensorFlow peer batch {batch}: peak {out[-1]['peak_mb']:.0f} MB")
    return out


def report(results: list[dict], args, tf=None) -> str:
    lines = [f"Machine: {machine_line()}", "",
             "### Peak memory of a training step (fresh process per row, 256×256 tiles, configs/benchmark.yaml, "
             f"data.workers={args.workers})", ""]
    base = {r["precision"]: r for r in results if r["batch"] == 8 and r["micro"] == 8}
    rows = []
    for r in results:
        peak = max(st["peak_mb"] for st in r["steps"])
        ref = base.get(r["precision"])
        ref_peak = max(st["peak_mb"] for st in ref["steps"]) if ref else None
        vs = f"{peak / ref_peak:.2f}×" if ref_peak else "–"
        per_step = " / ".join(f"{st['peak_mb']:.0f}" for st in r["steps"])
        secs = " / ".join(f"{st['seconds']:.0f} ({st['collect_s']:.1f})" for st in r["steps"])
        rows.append([f"{r['precision']} ({r['precision_set']})", r["batch"], r["micro"], r["accum"],
                     f"{r['rss_setup_mb']:.0f}", per_step, f"{peak:.0f}", f"{peak - r['rss_setup_mb']:.0f}", vs,
                     f"{r['worker_peak_mb']:.0f}", secs, r["load"]])
    lines.append(table(["precision", "effective batch", "micro-batch", "accum", "RSS after set-up (MB)",
                        "peak after each step (MB)", "peak (MB)", "peak − set-up (MB)", "vs micro 8 same precision",
                        "largest loader worker peak (MB)", "step s (waiting for its micro-batches, s)", "load average"],
                       rows))
    if tf:
        lines += ["", f"Peer measured in this run: the same U-Net in Keras (TensorFlow {tf[0]['tf']}, oneDNN, fp32, "
                  "synthetic tiles in memory, `train_on_batch`), fresh process per row:", ""]
        lines.append(table(["peer batch", "peak RSS (MB)", "step s", "load average"],
                           [[t["batch"], f"{t['peak_mb']:.0f}", " / ".join(f"{x:.0f}" for x in t["step_s"]), t["load"]]
                            for t in tf]))
    lines += ["", "Peer as quoted (another machine of this kind, its own tf.data pipeline): the Preligens TF 2.15 "
              "benchmark, fp32, " + ", ".join(f"batch {b}: {gb} GB" for b, gb in TF_QUOTED_PEAK_GB.items()) + "."]
    if any("cuda_max_allocated_mb" in st for r in results for st in r["steps"]):
        lines.append("CUDA max_memory_allocated (MB): " + ", ".join(
            f"{r['precision']} b{r['batch']}/m{r['micro']}: {max(st.get('cuda_max_allocated_mb', 0) for st in r['steps']):.0f}"
            for r in results))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="bf16 micro 4 and 8 and batch 32 by accumulation, 1 step each")
    p.add_argument("--shards", type=Path, default=Path("/tmp/bench_train_shards"),
                   help="packed real sample (packed there from ../shared/data/s2glc-sample if missing)")
    p.add_argument("--workers", type=int, default=2, help="data.workers (the recipe's value: 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer --set")
    p.add_argument("--only", help="comma list of PRECISION:BATCH:MICRO:STEPS to run instead of the table")
    p.add_argument("--tf-python", help="python of a venv holding tensorflow-cpu==2.15.* (the Keras peer)")
    p.add_argument("--tf-batches", default="8:2,32:1", help="peer BATCH:STEPS list")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args.shards = ensure_shards(args.shards)
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = [(a, int(b), int(c), int(d)) for a, b, c, d in (x.split(":") for x in args.only.split(","))]
    log(machine_line())
    results = []
    for precision, batch, micro, steps in configs:
        log(f"{precision} batch {batch} micro {micro}, {steps} step(s)")
        r = run_config(precision, batch, micro, steps, args)
        log(f"  peak {max(st['peak_mb'] for st in r['steps']):.0f} MB (set-up {r['rss_setup_mb']:.0f} MB), "
            f"{r['wall_s']:.0f} s")
        results.append(r)
    tf = None
    if args.tf_python:
        args.tf_batches = [tuple(int(v) for v in x.split(":")) for x in args.tf_batches.split(",")]
        try:
            tf = tf_peer_peaks(args)
        except (OSError, RuntimeError, ValueError) as exc:
            log(f"TensorFlow peer unavailable: {exc}")
    print(report(results, args, tf))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "results": results, "tf": tf}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
