"""The GPU benchmark: training speed of the benchmark U-Net on one CUDA GPU, and the trainer end to end.

On a machine with one CUDA GPU, from a clone of the repository:

    make setup TORCH=torch          # or: python -m venv .venv && .venv/bin/pip install torch -e .
    .venv/bin/python benchmarks/gpu.py --out gpu.md      # under 8 minutes on an H100/H200-class GPU

(the CPU venv that ``make setup`` builds by default has a CPU torch: install a CUDA build of torch
in it, e.g. ``.venv/bin/pip install --force-reinstall torch --index-url
https://download.pytorch.org/whl/cu126``). It prints, and writes to ``--out``, a markdown table:

1. **kernels**: optimizer steps of the trainer itself, ``dist_lc.train.train_step`` on the Setup
   that ``dist_lc.train.build_setup`` makes of ``configs/benchmark.yaml`` (984,234 parameters; its
   optimizer, loss, precision, layout and compilation), on one fixed batch of 256² tiles shaped as
   the loader yields it (uint16 NHWC images and uint8 masks in pinned host memory, the views to
   apply: each step copies them to the GPU and turns them there, as in training), at micro-batch
   32, 64 and 128, with the config overrides fp32, bf16 autocast, bf16 + channels_last, and bf16 +
   channels_last + ``train.compile``: images/s, peak GPU memory (``max_memory_allocated``), and
   MFU = images/s × training FLOPs per image ÷ the GPU's dense bf16 peak (the vendor's figure
   for the device named in the table, e.g. 989 TFLOP/s for an H100/H200 SXM; training FLOPs = 3 ×
   forward FLOPs, ``dist_lc.flops``);
2. **end to end**: ``dist-lc train`` of ``configs/benchmark.yaml`` (micro-batch 64) on 2,000 synthetic
   tiles that the script generates and packs itself, loader workers = the machine's cores, two
   epochs: images/s and the data-wait share of the second epoch, from metrics.csv.

``--device cpu --quick`` runs a miniature of all of it (the test suite does, so that it cannot rot).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lc_common.resources import usable_cores  # noqa: E402
from common import (BENCHMARK_RECIPE, REPO, log, machine_line, step_batches, step_overrides,  # noqa: E402
                    synthetic_shards, table, trainer_setup)

DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
                     "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "A6000": 155.0}   # vendors' dense figures


def peak_tflops(name: str) -> tuple[float | None, str]:
    for key, value in DENSE_BF16_TFLOPS.items():
        if key in name:
            return value, f"{value:g} TFLOP/s dense bf16 ({key}, vendor figure)"
    return None, "no bf16 peak known for this device"


def kernel_case(shards: Path, device, micro: int, size: int, precision: str, channels_last: bool, compile: bool,
                steps: int) -> dict:
    """``steps`` timed optimizer steps of the trainer's own ``train_step`` on a Setup of
    configs/benchmark.yaml with this case's overrides, after 3 warm-up steps (and compilation)."""
    import torch

    from dist_lc.train import train_step

    s = trainer_setup(shards, step_overrides(device=device.type, precision=precision, channels_last=channels_last,
                                             compile=compile, micro=micro, size=size))
    batches = step_batches(s)   # on the host, pinned, as the loader's ring: the step copies them over
    s.model.train()
    compile_s = 0.0

    def step():
        train_step(s, batches)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        started = time.perf_counter()
        for _ in range(3):   # warm-up (and compilation)
            step()
        sync()
        compile_s = time.perf_counter() - started if compile else 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = time.perf_counter() - started
    except torch.cuda.OutOfMemoryError:
        s.optimizer.zero_grad(set_to_none=True)   # what a failed step left; the next case needs the room
        return {"images_per_s": None, "peak_mb": None, "note": "out of memory"}
    finally:
        s.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_s": micro * steps / seconds, "peak_mb": peak, "compile_s": compile_s}


def kernels(shards: Path, device, micros, size: int, steps: int, with_compile: bool) -> tuple[list[list], dict]:
    import torch

    from dist_lc.config import load_config
    from dist_lc.flops import training_flops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak, peak_text = peak_tflops(name)
    flops = training_flops(load_config(BENCHMARK_RECIPE).model, size)
    # (label, train.precision, train.channels_last, train.compile)
    variants = [("fp32", "fp32", False, False), ("bf16", "bf16", False, False),
                ("bf16 + channels_last", "bf16", True, False)]
    if with_compile:
        variants.append(("bf16 + channels_last + compile", "bf16", True, True))
    rows = []
    for micro in micros:
        for label, precision, cl, comp in variants:
            log(f"kernels: micro-batch {micro}, {label}")
            r = kernel_case(shards, device, micro, size, precision, cl, comp, steps)
            ips = r["images_per_s"]
            mfu = f"{ips * flops / (peak * 1e12):.1%}" if ips and peak else "–"
            rows.append([micro, label, f"{ips:.1f}" if ips else r.get("note", "–"),
                         f"{r['peak_mb']:.0f}" if r.get("peak_mb") else "–", mfu,
                         f"{r['compile_s']:.0f} s" if r.get("compile_s") else ""])
    return rows, {"device": name, "peak": peak_text, "train_gflop_per_image": flops / 1e9}


def end_to_end(shards: Path, work: Path, device: str, tiles: int, epochs: int, quick: bool) -> dict:
    """dist-lc train of the benchmark recipe on the synthetic shards; metrics of the last epoch."""
    import pandas as pd

    workers = usable_cores()
    run = work / "run"
    sets = [f"data.shards={shards}", f"data.workers={min(workers, 16)}", f"train.epochs={epochs}",
            f"train.device={device}", "train.plot_every=0"]
    sets += ["train.micro_batch_size=8", "train.batch_size=8", "data.crop=64"] if quick else \
        ["train.micro_batch_size=64", "train.batch_size=64"]
    subprocess.run([sys.executable, "-m", "dist_lc", "train", "--config", "configs/benchmark.yaml",
                    *[a for s in sets for a in ("--set", s)], "--run-dir", str(run)], check=True, cwd=REPO)
    last = pd.read_csv(run / "metrics.csv").iloc[-1]
    return {"images_per_s": float(last["images_per_s"]), "data_wait_frac": float(last["data_wait_frac"]),
            "epoch_time_s": float(last["epoch_time_s"]), "peak_mem_mb": float(last["peak_mem_mb"]),
            "workers": workers, "tiles": tiles}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, default=Path("gpu_benchmark.md"), help="where the table is written")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_gpu_bench"), help="synthetic tiles and shards")
    ap.add_argument("--quick", action="store_true", help="a miniature: micro-batch 2, 64² tiles, 200 tiles")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible (install a CUDA build of torch, see this script's docstring; "
              "--device cpu --quick runs the miniature)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    started = time.perf_counter()
    micros, size, steps = ((2,), 64, 2) if args.quick else ((32, 64, 128), 256, 10)
    tiles = 200 if args.quick else 2000
    # one set of synthetic shards for both parts: the end-to-end run trains on it, the kernels'
    # set-up needs a manifest and a full micro-batch of tiles (their batches are built in memory)
    shards = synthetic_shards(args.work, tiles, usable_cores())
    rows, info = kernels(shards, device, micros, size, steps, with_compile=not args.quick)
    e2e = end_to_end(shards, args.work, args.device, tiles, 1 if args.quick else 2, args.quick)
    text = "\n".join([
        f"Machine: {machine_line()}; device {info['device']}; torch {torch.__version__}", "",
        f"Kernels: dist_lc.train.train_step of configs/benchmark.yaml, one fixed batch of {size}² tiles as the "
        f"loader yields it, {steps} timed optimizer steps after 3 warm-up steps; "
        f"{info['train_gflop_per_image']:.0f} GFLOP per training image; MFU against {info['peak']}.", "",
        table(["micro-batch", "variant", "images/s", "peak GPU MB", "MFU", "compile"], rows), "",
        f"End to end: dist-lc train, configs/benchmark.yaml, {e2e['tiles']} synthetic tiles, {e2e['workers']} loader "
        f"workers: {e2e['images_per_s']:.1f} images/s, data wait {e2e['data_wait_frac']:.1%} of the epoch, "
        f"epoch {e2e['epoch_time_s']:.1f} s, peak {e2e['peak_mem_mb']:.0f} MB.", "",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s."])
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
