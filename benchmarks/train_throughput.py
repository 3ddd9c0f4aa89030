"""Training throughput of the benchmark U-Net (results: docs/BENCHMARKS.md).

    python benchmarks/train_throughput.py                      # full run (~10 min on 2 cores)
    python benchmarks/train_throughput.py --quick              # smoke run (~2 min)
    python benchmarks/train_throughput.py --tf-python /tmp/tf215/bin/python   # + the TensorFlow peer

Sections (``--sections``, default ``kernels,e2e``), one run, so that every ratio is taken under the
same machine load (``profile`` adds a torch.profiler breakdown of one bf16 step):

``kernels``: optimizer steps of the trainer itself, ``dist_lc.train.train_step`` on the ``Setup``
that ``dist_lc.train.build_setup`` makes of ``configs/benchmark.yaml`` (the benchmark U-Net:
984,234 parameters; its optimizer, loss and normalisation; one micro-batch of ``--batch`` tiles per
step, ``data.crop`` = ``--size`` below 256), on one fixed batch held in memory and shaped as the
loader yields it (uint16 NHWC images, uint8 masks, the views to apply), so a step includes the
trainer's own ``to_device`` (views, layout) and its loss bookkeeping; no data loading. Variants are
config overrides (``train.precision``, ``train.channels_last``, ``train.compile``), on CPU: fp32
NCHW, fp32 channels_last, bf16 autocast, bf16 + channels_last, and ``train.compile`` of the
fastest eager variant (compile time reported apart, throughput measured after warm-up); on CUDA:
fp32, bf16, compile, with peak GPU memory. The variants are interleaved: each round runs
``--steps`` steps of every variant, in a rotated order, and the tables give the median over
rounds. The ceiling is the CPU's own matrix multiply rate (square ``torch.matmul``, fp32 and bf16)
measured inside every round; model FLOP utilisation (MFU) = images/s × training FLOPs per image /
that rate, with training FLOPs = 3 × forward FLOPs (``dist_lc.flops``; the table also gives
forward + backward as ``FlopCounterMode`` counts it, to show that the 3× rule holds). The set-up
needs shards: a few synthetic tiles are packed under ``--work``.

Optional peer: the same U-Net in Keras (TensorFlow 2.15, oneDNN, fp32, NHWC, batch 8, ``model.
train_on_batch`` = the compiled train function that ``fit`` runs), in a second process started
with ``--tf-python`` (a separate virtual environment holding ``tensorflow-cpu==2.15.*``; never the
project's). It is driven step by step from here, so its steps are interleaved with the PyTorch
ones; only one of the two processes computes at a time.

``e2e``: the real trainer, ``python -m dist_lc train --config configs/benchmark.yaml`` on the packed
real sample (shard pipeline, DataLoader workers, loss, Adam, validation excluded from the rate),
default CPU path (``precision: auto``: bf16 autocast on a CPU with native bf16, else fp32), 1 process and 2 DDP ranks under
torchrun (gloo); images/s, data-wait share and peak RSS are read from ``metrics.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (REPO, ensure_shards, loadavg, log, machine_line, median, spread, step_batches, step_overrides,
                    synthetic_shards, table, trainer_setup)

# The Preligens benchmark (TF 2.15 + oneDNN, fp32, tf.data) on a 2-core CPU of this kind, measured
# on another machine (orientation only: machines of this kind differ up to 2x).
TF_QUOTED_IMAGES_PER_S = 1.2


# ============================================================================ TensorFlow peer
# Runs in the TensorFlow virtual environment (no torch there): only stdlib + tensorflow below.

def keras_unet(input_shape=(256, 256, 4), num_classes=10, num_layers=2, filters=64, upconv_filters=96):
    """The Preligens benchmark U-Net (framework/model.py), the layer list of dist_lc/model.py.

    Block(n) = BatchNorm → Conv3x3(n, same, he_normal) → ReLU; UpBlock(n) = BatchNorm →
    Conv2DTranspose3x3(n, stride 2, same, output_padding 1) → ReLU; softmax output (as the benchmark).
    """
    from tensorflow.keras import layers, Model, Input

    def block(x, n):
        x = layers.BatchNormalization()(x)
        return layers.Conv2D(n, 3, padding="same", activation="relu", kernel_initializer="he_normal")(x)

    def up_block(x, n):
        x = layers.BatchNormalization()(x)
        return layers.Conv2DTranspose(n, 3, strides=2, padding="same", output_padding=1, activation="relu")(x)

    inputs = Input(input_shape)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", kernel_initializer="he_normal")(inputs)
    c1 = block(x, filters)
    x = layers.MaxPooling2D(2)(block(c1, filters))
    skips = []
    for _ in range(num_layers):
        x = block(block(x, filters), filters)
        skips.append(x)
        x = layers.MaxPooling2D(2)(block(x, filters))
    x = up_block(block(block(x, filters), filters), filters)
    for skip in reversed(skips):
        x = layers.concatenate([x, skip])
        x = up_block(block(block(x, upconv_filters), filters), filters)
    x = layers.concatenate([x, c1])
    x = block(block(x, upconv_filters), filters)
    outputs = layers.Conv2D(num_classes, 1, activation="softmax")(x)
    return Model(inputs, outputs)


def tf_worker(batch: int, size: int) -> int:
    """Line protocol on stdin/stdout: ``steps K`` → JSON {"wall": [K step times, s], "cpu": [K process
    CPU times, s]}; ``peak`` → peak RSS (MB); ``quit``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    started = time.perf_counter()
    model = keras_unet((size, size, 4))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy())
    rng = np.random.default_rng(0)
    x = (rng.integers(1, 24357, (batch, size, size, 4)) / 24356.0).astype(np.float32)  # benchmark: / max
    y = rng.integers(0, 10, (batch, size, size)).astype(np.int32)
    class_w = np.array([0, 0] + [1.0] * 8, np.float32)
    w = class_w[y]  # per-pixel class weights, as a sample weight
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    print(json.dumps({"ready": True, "tf": tf.__version__, "params": trainable,
                      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default(on)"),
                      "intra_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                      "build_s": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "peak":  # RSS high-water mark of this process, MB
            import resource

            print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True)
            continue
        wall, cpu = [], []
        for _ in range(int(cmd[1])):
            t, c = time.perf_counter(), time.process_time()
            model.train_on_batch(x, y, sample_weight=w)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    return 0


class TFPeer:
    """Drives :func:`tf_worker` in the TensorFlow venv."""

    def __init__(self, python: str, batch: int, size: int):
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--tf-worker",
                                      "--batch", str(batch), "--size", str(size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"TensorFlow peer did not start ({python})")
        self.info = json.loads(line)

    def steps(self, k: int) -> list[float]:
        """Runs k steps; returns their wall times (s) and keeps their process CPU times in ``last_cpu``."""
        self.proc.stdin.write(f"steps {k}\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        self.last_cpu = reply["cpu"]
        return reply["wall"]

    def peak_mb(self) -> float:
        self.proc.stdin.write("peak\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


# ============================================================================ PyTorch kernels

def matmul_gflops(dtype, n: int, reps: int, device) -> float:
    """Best of ``reps`` square n×n matmuls, GFLOP/s (2n³ per product)."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variant(name, shards, args, device, precision, channels_last=False, compile=False, threads=0):
    """One timed variant: the trainer's own Setup (``dist_lc.train.build_setup`` of
    configs/benchmark.yaml) with the variant's precision, layout and compilation as config overrides,
    and a fixed batch shaped as its loader yields it."""
    import torch

    sets = step_overrides(device=device.type, precision=precision, channels_last=channels_last, compile=compile,
                          micro=args.batch, size=args.size)
    s = trainer_setup(shards, sets)
    if device.type == "cpu" and args.threads:   # the set-up gives a CPU rank its share of the cores
        torch.set_num_threads(args.threads)
    s.model.train()
    return {"name": name, "setup": s, "batches": step_batches(s), "sets": sets, "precision": precision,
            "channels_last": channels_last, "compile": compile, "device": device, "threads": threads,
            "times": [], "cpu": [], "warmup": [], "peak_gpu_mb": None}


def train_step(v) -> float:
    """One optimizer step of ``dist_lc.train.train_step`` on the variant's fixed batch.

    Returns the wall time (s); the process CPU time of the step (all threads) is left in ``v["last_cpu"]``.
    """
    import torch

    from dist_lc.train import train_step as trainer_step

    device = v["device"]
    default_threads = torch.get_num_threads()
    if v["threads"]:
        torch.set_num_threads(v["threads"])
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    trainer_step(v["setup"], v["batches"])
    _sync(device)
    elapsed = time.perf_counter() - t
    v["last_cpu"] = time.process_time() - c
    torch.set_num_threads(default_threads)
    return elapsed


def close_variants(variants) -> None:
    for v in variants:
        if "setup" in v:
            v["setup"].close()


def start_peer(args):
    """The TensorFlow peer process, or None (with the reason logged)."""
    if not args.tf_python:
        return None
    log(f"starting the TensorFlow peer ({args.tf_python})")
    try:
        return TFPeer(args.tf_python, args.batch, args.size)
    except (OSError, RuntimeError, ValueError) as exc:
        log(f"TensorFlow peer unavailable: {exc}")
        return None


def kernels(args, peer, shards: Path) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    out = {"device": str(device), "torch": torch.__version__, "batch": args.batch, "size": args.size}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)

    if device.type == "cuda":
        specs = [("fp32", "fp32", False), ("bf16 autocast", "bf16", False)]
    else:
        specs = [("fp32 NCHW", "fp32", False), ("fp32 channels_last", "fp32", True),
                 ("bf16 autocast", "bf16", False), ("bf16 + channels_last", "bf16", True)]
    variants = []   # filled by _kernels; their Setups are closed however it ends
    try:
        return _kernels(args, peer, shards, device, specs, variants, out)
    finally:
        close_variants(variants)


def _kernels(args, peer, shards, device, specs, variants, out) -> dict:
    import torch

    from dist_lc.flops import forward_flops, training_flops

    for n, precision, cl in specs:
        variants.append(make_variant(n, shards, args, device, precision, cl))
    # what build_setup left (a CPU rank's share of the cores, or --threads)
    out["threads"] = torch.get_num_threads()
    if device.type == "cpu" and args.one_thread and torch.get_num_threads() > 1:
        variants.append(make_variant("bf16 autocast, 1 thread", shards, args, device, "bf16", False, threads=1))
    model = variants[0]["setup"].cfg.model
    log(f"kernels on {device}, {out['threads']} threads, batch {args.batch}, {args.size}px: "
        f"dist_lc.train.train_step of configs/benchmark.yaml")

    fwd = forward_flops(model, args.size)
    out["forward_gflop_per_image"] = fwd / 1e9
    out["train_gflop_per_image"] = training_flops(model, args.size) / 1e9
    out["train_gflop_per_image_counted"] = training_flops(model, args.size, counted=True) / 1e9
    log(f"forward {fwd / 1e9:.1f} GFLOP/image")

    if peer is not None and device.type == "cpu":
        out["tf"] = peer.info
        peer_v = {"name": "TensorFlow 2.15 Keras fp32 (peer)", "times": [], "cpu": [], "peer": True,
                  "warmup": peer.steps(args.warmup)}
    else:
        peer = None

    for v in variants:
        for _ in range(args.warmup):
            v["warmup"].append(train_step(v))
        log(f"warm-up {v['name']}: {[round(t, 2) for t in v['warmup']]} s")

    if args.compile:
        best = min(variants[: len(specs)], key=lambda v: v["warmup"][-1])
        cache = tempfile.mkdtemp(prefix="inductor-cold-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, not one from an earlier run's cache
        c = make_variant(f"torch.compile ({best['name']})", shards, args, device, best["precision"],
                         best["channels_last"], compile=True)
        variants.append(c)
        log(f"compiling {c['name']} (cold cache {cache})")
        first = train_step(c)
        for _ in range(max(args.warmup, 1)):
            c["warmup"].append(train_step(c))
        c["first_step_s"] = first
        log(f"compiled: first step {first:.1f} s, then {[round(t, 2) for t in c['warmup']]} s")

    ceilings = {"fp32": [], "bf16": []}
    loads = []
    everyone = variants + ([peer_v] if peer else [])
    for r in range(args.rounds):
        loads.append(loadavg())
        ceilings["fp32"].append(matmul_gflops(torch.float32, args.matmul_n, 3, device))
        ceilings["bf16"].append(matmul_gflops(torch.bfloat16, args.matmul_n, 3, device))
        order = everyone[r % len(everyone):] + everyone[: r % len(everyone)]
        for v in order:
            if not v.get("peer"):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times, cpu = [], []
                for _ in range(args.steps):
                    times.append(train_step(v))
                    cpu.append(v["last_cpu"])
                if device.type == "cuda":
                    v["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                times = peer.steps(args.steps)
                cpu = peer.last_cpu
            v["times"].append(median(times))
            v["cpu"].append(median(cpu))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v['name']} {args.batch / v['times'][-1]:.2f}" for v in everyone) + " images/s; matmul "
            f"fp32 {ceilings['fp32'][-1]:.0f} bf16 {ceilings['bf16'][-1]:.0f} GFLOP/s")
    out["loadavg_rounds"] = loads
    out["matmul_gflops"] = {k: {"median": median(vals), "all": vals} for k, vals in ceilings.items()}
    out["variants"] = []
    for v in everyone:
        rates = [args.batch / t for t in v["times"]]
        row = {"name": v["name"], "images_per_s": median(rates), "rates": rates,
               "cpu_s_per_image": [c / args.batch for c in v["cpu"]],
               "warmup_s": v["warmup"], "peak_gpu_mb": v.get("peak_gpu_mb")}
        if "sets" in v:
            row["trainer_sets"] = v["sets"]
        if "first_step_s" in v:
            row["first_step_s"] = v["first_step_s"]
            row["compile_s"] = v["first_step_s"] - median(v["times"])
        out["variants"].append(row)
    return out


def profile(args, shards: Path) -> dict:
    """Where a bf16 + channels_last step spends its time: torch.profiler, self CPU time per op."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device("cpu")
    out = {}
    for name, precision, cl in (("bf16 + channels_last", "bf16", True), ("bf16 autocast", "bf16", False)):
        v = make_variant(name, shards, args, device, precision, cl)
        try:
            train_step(v)
            load = loadavg()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                wall = train_step(v)
        finally:
            close_variants([v])
        ops = {}
        for e in prof.key_averages():
            ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
        total = sum(ops.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[: args.profile_top]
        out[name] = {"wall_s": wall, "self_total_s": total, "load": load,
                     "top": [(k, t, t / total) for k, t in top]}
        log(f"profiled {name}: {wall:.1f} s")
    return out


# ============================================================================ end to end

def e2e_run(name: str, nproc: int, shards: Path, work: Path, args) -> dict:
    run_dir = work / name.replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"data.shards={shards}", f"train.epochs={args.e2e_epochs}", "train.plot_every=0",
            f"data.workers={args.e2e_workers}"] + [f"{s}" for s in args.e2e_set]
    if args.e2e_crop:
        sets.append(f"data.crop={args.e2e_crop}")
    train_args = ["train", "--config", str(REPO / "configs" / "benchmark.yaml"), "--run-dir", str(run_dir)]
    for s in sets:
        train_args += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if nproc == 1:
        cmd = [sys.executable, "-m", "dist_lc", *train_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "dist_lc", *train_args]
    import resource

    load_before = loadavg()
    t = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru2.ru_utime + ru2.ru_stime) - (ru.ru_utime + ru.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first_line = next((line for line in proc.stderr.splitlines() if "rank(s) on" in line), "")
    return {"name": name, "nproc": nproc, "command": " ".join(cmd[1:]), "wall_s": wall, "cpu_s": cpu, "rows": rows,
            "log": first_line.strip(), "load_before": load_before, "load_after": loadavg()}


def e2e(args, peer) -> dict:
    shards = ensure_shards(args.shards)
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=args.work))
    runs, tf_rates = [], []

    def tf_steps():
        if peer is not None and args.e2e_tf_steps:
            tf_rates.extend(args.batch / t for t in peer.steps(args.e2e_tf_steps))
            log(f"  TensorFlow peer: {[round(x, 2) for x in tf_rates[-args.e2e_tf_steps:]]} images/s")

    for r in range(args.e2e_rounds):
        for name, nproc in ([("1 process", 1), ("2 DDP ranks (gloo)", 2)] if r % 2 == 0 else
                            [("2 DDP ranks (gloo)", 2), ("1 process", 1)]):
            tf_steps()
            log(f"e2e {name}, round {r + 1}")
            res = e2e_run(f"{name} r{r}", nproc, shards, work, args)
            res["name"] = name
            last = res["rows"][-1]
            log(f"  {float(last['images_per_s']):.2f} images/s, data wait {float(last['data_wait_frac']):.3f}, "
                f"{res['log']}")
            runs.append(res)
    tf_steps()
    return {"shards": str(shards), "runs": runs, "tf_rates": tf_rates}


# ============================================================================ report

def report(res: dict, args) -> str:
    lines = [f"Machine: {machine_line()}", ""]
    k = res.get("kernels")
    tf_rate = None
    if k:
        fp32, bf16 = k["matmul_gflops"]["fp32"]["median"], k["matmul_gflops"]["bf16"]["median"]
        gf = k["train_gflop_per_image"]
        lines += [f"### Training step throughput (dist_lc.train.train_step), synthetic tiles in memory "
                  f"({k['device']}, {k['threads']} threads, torch {k['torch']}, batch {k['batch']}, "
                  f"{k['size']}×{k['size']})", "",
                  f"Forward {k['forward_gflop_per_image']:.1f} GFLOP/image; training step counted as 3 × forward = "
                  f"{gf:.1f} GFLOP/image (FlopCounterMode on forward+backward: "
                  f"{k['train_gflop_per_image_counted']:.1f}). Ceiling, median over rounds of the best of 3 "
                  f"{args.matmul_n}² matmuls: fp32 {fp32:.0f} GFLOP/s (rounds {spread(k['matmul_gflops']['fp32']['all'])}), "
                  f"bf16 {bf16:.0f} GFLOP/s (rounds {spread(k['matmul_gflops']['bf16']['all'])}). "
                  f"Load average per round: {'; '.join(k['loadavg_rounds'])}.", ""]
        base_rates = k["variants"][0]["rates"]
        rows = []
        for v in k["variants"]:
            rate = v["images_per_s"]
            if v["name"].startswith("TensorFlow"):
                tf_rate = rate
            achieved = rate * gf
            notes = []
            if "compile_s" in v:
                notes.append(f"compile ≈ {v['compile_s']:.0f} s (first step {v['first_step_s']:.0f} s)")
            if v.get("peak_gpu_mb"):
                notes.append(f"peak GPU {v['peak_gpu_mb']:.0f} MiB")
            ratio = median([a / b for a, b in zip(v["rates"], base_rates)])
            cpu = median(v["cpu_s_per_image"])
            rows.append([v["name"], f"{rate:.2f}", f"{max(v['rates']):.2f}", spread(v["rates"]), f"{ratio:.2f}×",
                         f"{achieved:.0f}", f"{100 * achieved / fp32:.0f}%", f"{100 * achieved / bf16:.0f}%",
                         f"{cpu:.2f}", "; ".join(notes)])
        lines.append(table(["variant", "images/s (median)", "best round", "range over rounds",
                            "vs fp32 NCHW (median of per-round ratios)", "model GFLOP/s", "MFU vs fp32 matmul",
                            "MFU vs bf16 matmul", "CPU-s per image (all threads)", "notes"], rows, "lrrrrrrrrl"))
        if tf_rate:
            tf_rates = k["variants"][-1]["rates"]
            tf_cpu = k["variants"][-1]["cpu_s_per_image"]
            lines += ["", "Same run, ratio to the TensorFlow peer (median of per-round ratios), images/s and, in "
                      "brackets, images per CPU-second: " + ", ".join(
                          f"{v['name']} {median([a / b for a, b in zip(v['rates'], tf_rates)]):.2f}× "
                          f"({median([b / a for a, b in zip(v['cpu_s_per_image'], tf_cpu)]):.2f}×)"
                          for v in k["variants"] if not v["name"].startswith("TensorFlow"))]
            info = k.get("tf", {})
            lines.append(f"TensorFlow peer: TF {info.get('tf')}, {info.get('params')} trainable parameters, "
                         f"oneDNN {info.get('onednn')}, intra-op threads {info.get('intra_threads') or 'default'}.")
        lines.append("")
    prof = res.get("profile")
    if prof:
        for name, pr in prof.items():
            lines += [f"### Profile of one {name} step (torch.profiler, self CPU time by op; step {pr['wall_s']:.1f} s "
                      f"wall, load average {pr['load']})", ""]
            lines.append(table(["op", "self CPU s", "share"],
                               [[f"`{k}`", f"{t:.2f}", f"{100 * f:.0f}%"] for k, t, f in pr["top"]]))
            lines.append("")
    e = res.get("e2e")
    if e:
        lines += ["### End to end through the trainer (configs/benchmark.yaml, precision auto = bf16 on CPU)", ""]
        rows = []
        for r in e["runs"]:
            for row in r["rows"]:
                rows.append([r["name"], row["epoch"], row["step"], f"{float(row['images_per_s']):.2f}",
                             f"{float(row['data_wait_frac']):.3f}", f"{float(row['epoch_time_s']):.0f}",
                             f"{float(row['peak_mem_mb']):.0f}", f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}",
                             f"{r['load_before']} → {r['load_after']}"])
        lines.append(table(["run", "epoch", "optimizer steps", "images/s", "data_wait_frac", "epoch s",
                            "peak RSS rank 0 (MB)", "whole run wall s", "whole run CPU s (all processes)",
                            "load average before → after"], rows))
        by = {}
        for r in e["runs"]:
            by.setdefault(r["name"], []).append(float(r["rows"][-1]["images_per_s"]))
        if e.get("tf_rates"):
            tf_rate = median(e["tf_rates"])
            lines += ["", f"TensorFlow peer steps taken between the e2e runs (batch {args.batch}, synthetic, in memory): "
                      f"median {tf_rate:.2f} images/s, range {spread(e['tf_rates'])}."]
        peer = tf_rate or TF_QUOTED_IMAGES_PER_S
        src = "the TensorFlow peer measured in this run" if tf_rate else \
            f"the quoted {TF_QUOTED_IMAGES_PER_S} images/s (not measured here)"
        lines += ["", "Median images/s (last epoch of each run) and ratio to " + src + ": " + ", ".join(
            f"{n} {median(v):.2f} ({median(v) / peer:.2f}×)" for n, v in by.items()), ""]
        lines.append("Commands: " + "; ".join(sorted({r["command"] for r in e["runs"]})))
    if res.get("tf_peak_rss_mb"):
        lines += ["", f"TensorFlow peer process peak RSS (batch {args.batch}): {res['tf_peak_rss_mb']:.0f} MB."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 128 px (unless --size), no compile, e2e on 128-px crops")
    p.add_argument("--sections", default="kernels,e2e", help="comma list of kernels, profile, e2e")
    p.add_argument("--profile-top", type=int, default=12, help="profile: ops listed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, help="tile side of the kernels' batch (default 256; --quick: 128)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the rounds")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="measure the CPU even if CUDA is there")
    p.add_argument("--tf-python", help="python of a venv holding tensorflow-cpu==2.15.* (the peer)")
    p.add_argument("--shards", type=Path, default=Path("/tmp/bench_train_shards"),
                   help="packed real sample (packed there from ../shared/data/s2glc-sample if missing)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the synthetic shards of the kernels and the e2e run folders go")
    p.add_argument("--e2e-epochs", type=int, default=1)
    p.add_argument("--e2e-rounds", type=int, default=1)
    p.add_argument("--e2e-workers", type=int, default=2, help="data.workers (the recipe's value: 2)")
    p.add_argument("--e2e-crop", type=int, default=0)
    p.add_argument("--e2e-tf-steps", type=int, default=2, help="TensorFlow peer steps before/between/after e2e runs")
    p.add_argument("--no-one-thread", dest="one_thread", action="store_false",
                   help="skip the bf16 1-thread variant (intra-op scaling)")
    p.add_argument("--e2e-set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer --set")
    p.add_argument("--json", type=Path)
    p.add_argument("--tf-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tf_worker:
        return tf_worker(args.batch, args.size)
    if args.quick:
        args.rounds, args.size, args.compile, args.e2e_crop = 1, args.size or 128, False, args.e2e_crop or 128
        args.matmul_n = min(args.matmul_n, 1024)
    args.size = args.size or 256
    sections = set(args.sections.split(","))
    res = {"machine": machine_line(), "argv": sys.argv}
    log(res["machine"])
    peer = start_peer(args)
    try:
        if sections & {"kernels", "profile"}:
            # a few synthetic tiles: the timed batches are built in memory, the set-up only needs a
            # manifest and a full batch of training tiles
            shards = synthetic_shards(args.work / "bench_train_synth", max(args.batch, 8))
        if "kernels" in sections:
            res["kernels"] = kernels(args, peer, shards)
        if "profile" in sections:
            res["profile"] = profile(args, shards)
        if "e2e" in sections:
            res["e2e"] = e2e(args, peer)
        if peer is not None:
            res["tf_peak_rss_mb"] = peer.peak_mb()
    finally:
        if peer is not None:
            peer.close()
    text = report(res, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
