"""The GPU benchmark: the trainer's step on one CUDA GPU, its numerics, its profile, the trainer end to
end, and several CV folds sharing the GPU.

On a machine with one CUDA GPU, from a clone of the repository with the project installed (or on
``PYTHONPATH``) and torch with CUDA:

    python benchmarks/gpu.py --out gpu.md        # about 10 minutes on an H100/H200-class GPU

On a machine without the project's packages and without network (this workplace's lent GPU
machines), ``make gpu-wheels`` here fetches the few packages that such an image lacks into
``.whl/``, and ``bash benchmarks/gpu_device.sh`` there installs them and runs this script with its
output under ``$OUT``. Parts (``--parts``, all by default, in this order: what the others need
first, then by what the GPU figures need most), each written to ``--out`` as it ends, so that a run
cut short keeps what it measured. A part that fails is recorded and the next one runs; a part not
started within ``--budget-s`` is skipped and named, and its subprocesses are stopped at the budget
(a lent GPU's time is short). A later call with the remaining ``--parts`` on the same machine reuses
the shards and the step rates saved under ``--work``. Every variant compiles afresh
(``torch.compiler.reset()`` first):

0. **pinning** (CUDA): the loader's batch ring page-locked in place, and a refused page-lock (the
   same memory registered twice) leaving no CUDA error behind for the next kernel.
1. **kernels**: timed optimizer steps of the trainer itself, ``dist_lc.train.train_step`` on the
   Setup that ``dist_lc.train.build_setup`` makes of ``configs/benchmark.yaml`` (the benchmark
   U-Net, its loss, Adam, bf16 autocast, channels_last), on one fixed batch of 256² tiles shaped as
   the loader yields it (uint16 NHWC images and uint8 masks in pinned host memory, the views to
   apply: each step copies them to the GPU and turns them there, as in training). A ladder at
   micro-batch 128, each rung one change on the one before: the eager step with torch's foreach
   Adam (the trainer's CUDA path before ``train.compile: auto`` and ``optim.implementation:
   auto``), + the fused Adam kernel, + ``torch.compile`` (inductor fuses BatchNorm, ReLU and the
   other elementwise passes), + CUDA graphs (``train.compile_mode: reduce-overhead``). images/s,
   peak GPU memory, and MFU =
   images/s × training FLOPs per image (3 × forward, ``dist_lc.flops``) ÷ the GPU's dense bf16 peak
   (the vendor's figure for the device named in the table). Where inductor skipped the CUDA graphs
   (a mutated input, a CPU tensor), the table says how often (``TORCH_LOGS=perf_hints`` says why).
2. **check**: every rung's numerics: 50 optimizer steps (30 in ``--quick``; lr 1e-4, five fixed
   batches in turn) from the same weights, each step's loss against the eager foreach run's. A rung
   passes when its mean relative difference is within that of the eager run in bf16 against fp32
   (the precision's own tolerance). A failed check makes the script exit 1, after writing its table.
3. **resume**: a run trained one epoch on the CPU (torch's foreach Adam) and resumed on this
   device for a second with the trainer's defaults (on CUDA the fused Adam, whose step counters
   must move to the GPU with the rest of its state); a run that does not resume fails the script.
4. **profile**: torch.profiler over 5 steps of the fastest rung; the GPU kernels' time grouped
   into convolution, normalisation, elementwise, optimizer and other, with their shares, the share
   of wall time the GPU was busy, and the MFU.
5. **e2e**: ``dist_lc.train.train`` of ``configs/benchmark.yaml`` (micro-batch = batch = 128,
   workers = the cores less one) on fold 0 of 18,491 synthetic tiles (14,793 trained, 3,698
   validated, every epoch), two epochs with the recipe's defaults, in its own process: the second
   epoch's images/s against the step's own rate from part 1, its data-wait share, and the
   validation, checkpoint and compilation seconds apart.
6. **cv**: ``dist-lc cv --executor local`` of ``configs/recommended.yaml`` (5 folds of 2,000
   synthetic tiles, 1 epoch, one rank each, eager: ten compilations would take most of the time)
   on the one GPU with ``launcher.jobs_per_gpu`` 1, then 5: wall time, against the slowest fold job
   and the sum of the jobs.
7. **sweep**: the fastest compiled rung of part 1 at micro-batch 32, 64 and 256 (a compilation
   each), as part 1's table.
8. **e2e-before**: part 5 as the trainer ran before its CUDA defaults (eager, foreach Adam).

``--device cpu --quick`` runs a miniature of all of it (micro-batch 2, 64² tiles, a one-level U-Net
of 8 filters, no e2e-before: on a CPU it is the same eager step; the test suite does, so that it cannot rot, and so
that the numerics check of inductor's compiled step runs in every CI run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lc_common.errors import said  # noqa: E402
from lc_common.resources import usable_cores  # noqa: E402
from common import (BENCHMARK_RECIPE, REPO, log, loss_trace, machine_line, step_batches, step_overrides,  # noqa: E402
                    synthetic_shards, table, trace_deviation, trainer_setup)

QUICK_TILES = 100   # the miniature's synthetic tiles (also what the resume part trains on)

DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
                     "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "A6000": 155.0}   # vendors' dense figures

# the order they run in; e2e-before (the trainer end to end as before its CUDA defaults) last, for its time
PARTS = ("pinning", "kernels", "check", "resume", "profile", "e2e", "cv", "sweep", "e2e-before")
BEFORE = ["optim.implementation=foreach", "train.compile=false"]
# Each rung (its --set overrides) one change on the one before; the first is the trainer's CUDA step
# before the defaults changed (eager, torch's foreach Adam), all in bf16 autocast with channels_last.
LADDER = (
    ("eager, foreach Adam (before)", BEFORE),
    ("+ fused Adam", ["optim.implementation=fused", "train.compile=false"]),
    ("+ torch.compile", ["optim.implementation=fused", "train.compile=true"]),
    ("+ CUDA graphs (reduce-overhead)", ["optim.implementation=fused", "train.compile=true",
                                         "train.compile_mode=reduce-overhead"]),
)
SHARE_GROUPS = (   # kernel (CUDA) or op (CPU) name → group, the first match wins
    ("optimizer", ("adam", "multi_tensor", "_foreach", "optimizer")),
    ("normalisation", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution", ("conv", "xmma", "cudnn", "implicit_gemm", "wgrad", "dgrad", "fprop", "cutlass", "gemm", "sm90_",
                     "sm80_", "mkldnn")),
    ("elementwise", ("elementwise", "vectorized", "triton_poi", "triton_per", "triton_red", "relu", "threshold",
                     "copy", "fill", "add", "mul", "div", "cat", "index", "reduce", "softmax", "where", "clamp",
                     "flip", "rot90")),   # host-to-device copies (Memcpy HtoD) go to "other"
)


class Bench:
    """What every part needs: the device, sizes, shards, the report so far and where it goes."""

    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        quick = args.quick
        self.micro, self.size = (2, 64) if quick else (128, 256)
        # the miniature's U-Net has one level of 8 filters: bf16 convolutions crawl on a CPU, inductor's
        # compile time grows with the graph, and the miniature is there for the plumbing (the GPU run
        # checks the benchmark's own U-Net)
        self.model = ["model.filters=8", "model.upconv_filters=8", "model.num_layers=0"] if quick else []
        self.sweep = () if quick else (32, 64, 256)   # (on a CPU a compilation costs half a minute)
        self.steps = 2 if quick else 10
        self.check_steps = 30 if quick else 50   # the miniature checks the plumbing; the GPU run, the numerics
        self.ladder = LADDER if self.cuda else LADDER[:3]   # off CUDA, CUDA graphs are the compile above
        self.sections: list[str] = []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        self.failed: list[str] = []
        self.step_rates: dict[str, float] = {}   # rung label → images/s at self.micro
        self.best: tuple[str, list[str], int, float] | None = None   # (rung, overrides, micro-batch, images/s)
        self.saved = args.work / "steps.json"   # both, for a later call's parts on this machine
        self.deadline = time.perf_counter() + args.budget_s if args.budget_s else None

    def left(self) -> float | None:
        """Seconds left of ``--budget-s`` (None: no budget)."""
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def over(self) -> bool:
        left = self.left()
        return left is not None and left <= 0

    def timeout(self) -> float | None:
        """A subprocess's limit: what is left of the budget, and a minute's grace to end its work."""
        left = self.left()
        return None if left is None else max(left, 0) + 60

    def save_steps(self) -> None:
        self.args.work.mkdir(parents=True, exist_ok=True)
        self.saved.write_text(json.dumps({"measured": self.measured(), "step_rates": self.step_rates,
                                          "best": self.best}))

    def load_steps(self) -> None:
        """An earlier call's step rates, when it measured this device the same way."""
        try:
            saved = json.loads(self.saved.read_text())
        except (OSError, ValueError):
            return
        if saved.get("measured") == self.measured():
            self.step_rates, self.best = saved["step_rates"], saved["best"] and tuple(saved["best"])
            log(f"step rates of an earlier call: {self.saved}")

    def measured(self) -> list:
        """What step rates depend on: the device, torch, the ladder, the size (an earlier call's
        rates are used only when all are the same)."""
        return [self.name(), self.torch.__version__, [label for label, _ in self.ladder], self.micro, self.size,
                self.steps]

    def name(self) -> str:
        return self.torch.cuda.get_device_name(self.device) if self.cuda else "CPU"

    def write(self, section: str) -> None:
        self.sections.append(section)
        print(section + "\n", flush=True)
        self.args.out.write_text("\n\n".join(self.sections) + "\n")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def sets(self, overrides: list[str], micro: int, precision: str = "bf16") -> list[str]:
        """A rung's overrides after the step's own (the later of two settings of a key wins)."""
        return step_overrides(device=self.device.type, precision=precision, channels_last=True, compile=False,
                              micro=micro, size=self.size) + self.model + overrides


def peak_tflops(name: str) -> tuple[float | None, str]:
    for key, value in DENSE_BF16_TFLOPS.items():
        if key in name:
            return value, f"{value:g} TFLOP/s dense bf16 ({key}, vendor figure)"
    return None, "no bf16 peak known for this device"


# ----------------------------------------------------------------------------- 0. pinning

def pinning(b: Bench) -> None:
    """The loader's batch ring page-locked in place; then a refused page-lock (the same memory
    registered again) must leave no CUDA error behind: the trainer's next kernel would raise it."""
    title = "### Page-locked batches: the loader's batch ring registered with CUDA in place"
    if not b.cuda:
        b.write(f"{title}: no CUDA device here")
        return
    from dist_lc.loading import BatchRing, take_cuda_error

    torch = b.torch
    ring = BatchRing(2, 8, 256, True)
    pinned = ring.pin()
    rows = [["page-lock the ring (cudaHostRegister)", "yes" if pinned else "refused: pageable copies"]]
    if pinned:
        t = ring.image
        cudart = torch.cuda.cudart()
        code = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
        if code == 0:   # not refused after all: nothing is pending, and the ring is registered twice
            cudart.cudaHostUnregister(t.data_ptr())
        taken = take_cuda_error()
        try:
            (torch.ones(4, device=b.device) * 2).sum().item()
            after = "none"
        except RuntimeError as exc:
            after = f"FAIL: {said(exc, limit=120)}"
            b.failed.append(f"pinning: a refused page-lock left a CUDA error for the next kernel: {after}")
        rows.append([f"register it again ({'refused, code ' if code else 'accepted?! code '}{code})",
                     f"the error taken by take_cuda_error: {taken[:120] if taken else 'none'}"])
        rows.append(["then a kernel", f"error raised: {after}"])
        ring.unpin()
    free = shutil.disk_usage("/dev/shm").free / 2**30
    b.write("\n".join([title, "", table(["what", "outcome"], rows), "", f"/dev/shm: {free:.1f} GiB free."]))


# ----------------------------------------------------------------------------- 1. kernels

def fresh_compilation(b: Bench) -> None:
    """Forget earlier variants' compilation: dynamo's cache belongs to the forward's code, shared by
    every Setup, so the next micro-batch size would otherwise get a dynamic-shape graph; CUDA
    graphs' memory pools go with it. The peak memory counts from here (a CUDA graph's memory is
    taken while it is recorded, in the warm-up)."""
    b.torch.compiler.reset()
    if b.cuda:
        b.torch.cuda.empty_cache()
        b.torch.cuda.reset_peak_memory_stats(b.device)


def time_steps(b: Bench, shards: Path, sets: list[str], steps: int, profile=None) -> dict:
    """``steps`` timed optimizer steps of the trainer's ``train_step`` (after 3 warm-up steps, which
    compile when the variant does); under ``profile`` (a torch.profiler context) when given."""
    from torch._dynamo.utils import counters

    from dist_lc.train import train_step

    torch = b.torch
    fresh_compilation(b)
    skips = counters["inductor"]["cudagraph_skips"]
    s = trainer_setup(shards, sets)
    batches = step_batches(s)   # on the host, pinned, as the loader's ring: the step copies them over
    s.model.train()
    try:
        started = time.perf_counter()
        for _ in range(3):
            train_step(s, batches)
        b.sync()
        warm_s = time.perf_counter() - started
        with profile or contextlib.nullcontext():
            started = time.perf_counter()
            for _ in range(steps):
                train_step(s, batches)
            b.sync()
            seconds = time.perf_counter() - started
    except torch.cuda.OutOfMemoryError:
        s.optimizer.zero_grad(set_to_none=True)   # what a failed step left; the next case needs the room
        return {"images_per_s": None, "note": "out of memory"}
    finally:
        s.close()
        if b.cuda:
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated(b.device) / 2**20 if b.cuda else None
    return {"images_per_s": s.layout.micro * steps / seconds, "peak_mb": peak, "warm_s": warm_s,
            "seconds": seconds, "compiled": s.compiled,
            "graph_skips": counters["inductor"]["cudagraph_skips"] - skips}


def step_table(b: Bench, rows: list, flops: float, title: str) -> str:
    return "\n".join([
        f"### {title}: `train_step` of configs/benchmark.yaml, bf16 + channels_last, {b.size}² tiles "
        f"({flops / 1e9:.0f} GFLOP per training image), {b.steps} timed steps after 3 warm-up steps", "",
        table(["micro-batch", "variant", "images/s", "peak GPU MB", "MFU", "compile (warm-up)"], rows)])


def step_row(micro: int, label: str, r: dict, flops: float, peak: float | None) -> list:
    ips = r["images_per_s"]
    mfu = f"{ips * flops / (peak * 1e12):.1%}" if ips and peak else "–"
    return [micro, label, f"{ips:,.1f}" if ips else r["note"], f"{r['peak_mb']:,.0f}" if r.get("peak_mb") else "–",
            mfu, f"{r['warm_s']:.0f} s" if r.get("compiled") else ""]


NOT_RUN = "not run: --budget-s spent"


def kernels(b: Bench, shards: Path, flops: float, peak: float | None) -> None:
    rows, compiled, notes = [], [], []
    for label, overrides in b.ladder:
        if b.over():
            rows.append([b.micro, label, NOT_RUN, "–", "–", ""])
            continue
        log(f"kernels: micro-batch {b.micro}, {label}")
        r = time_steps(b, shards, b.sets(overrides, b.micro), b.steps)
        rows.append(step_row(b.micro, label, r, flops, peak))
        if r.get("graph_skips"):
            notes.append(f"{label}: inductor skipped CUDA graphs {r['graph_skips']} time(s) "
                         "(TORCH_LOGS=perf_hints says why)")
        if r["images_per_s"]:
            b.step_rates[label] = r["images_per_s"]
            if "train.compile=true" in overrides:
                compiled.append((r["images_per_s"], label, overrides))
    if compiled:
        _, label, overrides = max(compiled)
        b.best = (label, overrides, b.micro, b.step_rates[label])
    b.save_steps()
    b.write(step_table(b, rows, flops, "Step") + "".join(f"\n\n{note}" for note in notes))


def sweep(b: Bench, shards: Path, flops: float, peak: float | None) -> None:
    """The fastest compiled rung at other micro-batch sizes (a later call's profile takes the best)."""
    if b.best is None or not b.sweep:
        b.write("### Micro-batch sweep: " + ("no compiled rung measured (run the kernels part first)" if b.sweep
                                             else "none in --quick"))
        return
    label, overrides, _, best_ips = b.best
    rows = []
    for micro in b.sweep:
        if b.over():
            rows.append([micro, label, NOT_RUN, "–", "–", ""])
            continue
        log(f"sweep: micro-batch {micro}, {label}")
        r = time_steps(b, shards, b.sets(overrides, micro), b.steps)
        rows.append(step_row(micro, label, r, flops, peak))
        if r["images_per_s"] and r["images_per_s"] > best_ips:
            b.best, best_ips = (label, overrides, micro, r["images_per_s"]), r["images_per_s"]
    b.save_steps()
    b.write(step_table(b, rows, flops, "Micro-batch sweep"))


# ----------------------------------------------------------------------------- 2. numerics

def check(b: Bench, shards: Path) -> None:
    """Each rung's loss trace (50 steps, 30 in --quick) against the eager foreach run's, within bf16's
    own difference."""
    import numpy as np

    micro = b.micro   # the kernels' shapes: their compiled graphs are in inductor's cache
    traces = {}
    for label, overrides, precision in [("eager fp32", BEFORE, "fp32"), *[(lab, o, "bf16") for lab, o in b.ladder]]:
        if b.over():
            break
        log(f"check: {b.check_steps} steps, {label}")
        fresh_compilation(b)
        traces[label] = loss_trace(shards, b.sets(["optim.lr=1e-4", *overrides], micro, precision), b.check_steps)
    title = (f"### Numerics: {b.check_steps} steps from the same weights (micro-batch {micro}, lr 1e-4, 5 batches "
             "in turn), each step's loss against the eager foreach bf16 run")
    if b.ladder[0][0] not in traces:
        b.write(f"{title}: {NOT_RUN}")
        return
    reference = traces[b.ladder[0][0]]
    tolerance = trace_deviation(reference, traces["eager fp32"])
    rows = []
    for label, _ in b.ladder[1:]:
        if label not in traces:
            rows.append([label, "–", f"{tolerance:.3%}", NOT_RUN])
            continue
        deviation = trace_deviation(traces[label], reference)
        ok = deviation <= tolerance and bool(np.isfinite(traces[label]).all())
        if not ok:
            b.failed.append(f"check: {label} differs from the eager step by {deviation:.2%} (bf16: {tolerance:.2%})")
        rows.append([label, f"{deviation:.3%}", f"{tolerance:.3%}", "pass" if ok else "FAIL"])
    b.write("\n".join([
        title, "",
        table(["variant", "mean relative difference", "bf16 against fp32, eager", "check"], rows)]))


# ----------------------------------------------------------------------------- 3. profile

def share_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in SHARE_GROUPS if any(k in low for k in keys)), "other")


def profile(b: Bench, shards: Path, flops: float, peak: float | None) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    label, overrides, micro, _ = b.best or (b.ladder[-1][0], b.ladder[-1][1], b.micro, None)
    steps = 5
    log(f"profile: {steps} steps, micro-batch {micro}, {label}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    prof = torch_profile(activities=activities)
    r = time_steps(b, shards, b.sets(overrides, micro), steps, profile=prof)
    groups: dict[str, float] = {}
    if b.cuda:   # the GPU's kernels (and copies), each its own time
        timed = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                 if e.device_type == b.torch.autograd.DeviceType.CUDA]
    else:        # a CPU's time: each aten op's own (self) time
        timed = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")]
    for name, us in timed:
        group = share_group(name)
        groups[group] = groups.get(group, 0.0) + us
    total = sum(groups.values()) or 1.0
    rows = [[group, f"{groups.get(group, 0.0) / 1e3 / steps:.2f}", f"{groups.get(group, 0.0) / total:.1%}"]
            for group in [g for g, _ in SHARE_GROUPS] + ["other"]]
    busy = total / 1e6 / r["seconds"] if r.get("seconds") else float("nan")
    ips = r.get("images_per_s")
    mfu = f"{ips * flops / (peak * 1e12):.1%}" if ips and peak else "–"
    where = "GPU kernels" if b.cuda else "aten ops' own CPU time"
    b.write("\n".join([
        f"### Profile: {steps} steps of `{label}` at micro-batch {micro} (torch.profiler, {where})", "",
        table(["group", "ms per step", "share"], rows), "",
        f"Busy {busy:.0%} of the profiled steps' wall time; {ips or 0:,.1f} images/s under the profiler, "
        f"MFU {mfu}."]))


def run_bounded(b: Bench, cmd: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` stopped at the budget as a user would stop it: SIGTERM first (a training
    saves and ends, ``dist-lc cv`` ends its local fold jobs), SIGKILL 20 s later."""
    with subprocess.Popen(cmd, cwd=REPO, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=b.timeout())
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise TimeoutError(f"{' '.join(map(str, cmd[1:4]))} ...: stopped at --budget-s") from None
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ----------------------------------------------------------------------------- 5. end to end

def e2e_worker(run_dir: Path, sets: list[str]) -> int:
    """One ``dist_lc.train.train`` of configs/benchmark.yaml in this process; its Timing and metrics
    rows as JSON on the last line of stdout."""
    import dataclasses

    import pandas as pd

    from dist_lc.config import load_config
    from dist_lc.train import train

    result = train(load_config(BENCHMARK_RECIPE, sets), run_dir)
    rows = pd.read_csv(run_dir / "metrics.csv").to_dict("records")
    print(json.dumps({"timing": dataclasses.asdict(result.timing), "rows": rows}))
    return 0


def e2e_run(b: Bench, shards: Path, name: str, overrides: list[str], workers: int) -> dict:
    batch = 8 if b.args.quick else 128
    sets = [f"data.shards={shards}", "data.fold=0", f"data.workers={workers}", "train.epochs=2",
            f"train.device={b.device.type}", "train.plot_every=0", "train.loggers=[]",
            f"train.micro_batch_size={batch}", f"train.batch_size={batch}", *overrides]
    sets += ["data.crop=64", *b.model] if b.args.quick else []   # the plumbing
    run_dir = b.args.work / f"e2e-{name}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    log(f"e2e: {name}: {' '.join(sets[1:])}")
    out = run_bounded(b, [sys.executable, __file__, "--e2e-worker", str(run_dir), *sets],
                      stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def e2e(b: Bench, shards: Path, tiles: int, name: str) -> None:
    """One run: ``after`` (the recipe's defaults: compile + fused Adam on CUDA) or ``before`` (eager,
    foreach Adam: its own part, run last, for its time)."""
    runs = {"before": (BEFORE, b.ladder[0][0]),
            "after": ([], b.ladder[2][0] if b.cuda else None)}
    runs = {name: runs[name]}
    rows = []
    workers = max(1, min(usable_cores() - 1, 16))
    for name, (overrides, rung) in runs.items():
        if b.over():
            rows.append([name, NOT_RUN, *["–"] * 8])
            continue
        r = e2e_run(b, shards, name, overrides, workers)
        t, last = r["timing"], r["rows"][-1]
        step = b.step_rates.get(rung)
        ips = last["images_per_s"]
        rows.append([name, f"{ips:,.1f}", f"{ips / step:.0%} of {step:,.0f}" if step and not b.args.quick else "–",
                     f"{last['data_wait_frac']:.1%}", f"{last['epoch_time_s']:.1f}", f"{last['val_time_s']:.1f}",
                     f"{t['bookkeeping_s'] / max(len(r['rows']), 1):.2f}", f"{t['compile_s']:.0f}",
                     f"{t['setup_s']:.0f}", f"{last['peak_mem_mb']:,.0f}"])
    b.write("\n".join([
        f"### End to end{', before' if name == 'before' else ''}: `dist_lc.train.train` of configs/benchmark.yaml, "
        f"fold 0 of {tiles:,} synthetic tiles, 2 epochs, {workers} loader workers; the second epoch", "",
        table(["run", "images/s", "of the step's rate", "data wait", "epoch s", "validation s",
               "checkpoints + log s per epoch", "compile s", "set-up s", "peak MB"], rows),
        "", "before: train.compile false, optim.implementation foreach; after: the recipe's defaults."]))


# ----------------------------------------------------------------------------- 6. several folds on one GPU

def cv_part(b: Bench) -> None:
    """Folds one after another, then sharing the device (on a CPU, the miniature: jobs side by side)."""
    quick = b.args.quick
    recipe, tiles, folds, epochs = (("smoke", QUICK_TILES, [0, 1], 1) if quick
                                    else ("recommended", 2000, [0, 1, 2, 3, 4], 1))
    shards = synthetic_shards(b.args.work, tiles, usable_cores(), timeout=b.timeout())
    rows = []
    for sharing in (len(folds),) if quick else (1, len(folds)):   # the miniature: the plumbing, once
        if b.over():
            rows.append([sharing, NOT_RUN, "–", "–", "–"])
            continue
        out = b.args.work / f"cv-{sharing}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        sets = [f"data.shards={shards}", f"cv.folds={folds}", f"train.epochs={epochs}", "train.plot_every=0",
                "train.compile=false", "launcher.tasks_per_node=1",
                f"data.workers={max(1, usable_cores() // len(folds) - 1)}", *b.model]
        sets += (["launcher.gpus_per_node=1", f"launcher.jobs_per_gpu={sharing}", "launcher.max_parallel=0"]
                 if b.cuda else ["launcher.gpus_per_node=0", f"launcher.max_parallel={sharing}"])
        log(f"cv: {len(folds)} folds, {sharing} at a time")
        started = time.perf_counter()
        run_bounded(b, [sys.executable, "-m", "dist_lc", "cv", "--config", f"configs/{recipe}.yaml", "--out",
                        str(out), "--executor", "local", *[a for s in sets for a in ("--set", s)]],
                    stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        jobs = [json.loads(p.read_text()) for p in sorted(out.glob("**/fold*/done.json"))]
        job_s = [j.get("timeline", {}).get("job_s", float("nan")) for j in jobs]
        rows.append([sharing, f"{wall:.0f}", f"{max(job_s):.0f}", f"{sum(job_s):.0f}", len(jobs)])
    sharing = "launcher.jobs_per_gpu on the one GPU" if b.cuda else "launcher.max_parallel on the CPU"
    b.write("\n".join([
        f"### Several folds at once: `dist-lc cv --executor local`, configs/{recipe}.yaml, {len(folds)} folds of "
        f"{tiles:,} synthetic tiles, {epochs} epoch(s), one rank each, eager; jobs at once = {sharing}", "",
        table(["jobs at once", "wall s", "slowest fold job s", "sum of fold jobs s", "folds done"], rows)]))


# ----------------------------------------------------------------------------- 3. resume across devices

def resume_part(b: Bench) -> None:
    """One epoch on the CPU in channels_last, then the run resumed on this device for a second without
    it (a one-level U-Net of 8 filters: what is checked is the optimizer state's move to the device
    and to the other memory layout, which the fused CUDA kernels require, not a speed)."""
    shards = synthetic_shards(b.args.work, QUICK_TILES, usable_cores(), timeout=b.timeout())
    run_dir = b.args.work / "resume"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    sets = [f"data.shards={shards}", "data.fold=0", "data.crop=64", "data.workers=1", "model.filters=8",
            "model.upconv_filters=8", "model.num_layers=0", "train.plot_every=0", "train.loggers=[]",
            "train.batch_size=8", "train.micro_batch_size=8", "train.compile=false"]
    rows = []
    for device, epochs, kernels, layout in (("cpu", 1, "foreach", True), (b.device.type, 2, "auto", False)):
        log(f"resume: epoch {epochs} on {device}, optim.implementation={kernels}, train.channels_last={layout}")
        more = [*sets, f"train.device={device}", f"train.epochs={epochs}", f"optim.implementation={kernels}",
                f"train.channels_last={str(layout).lower()}"]
        proc = run_bounded(b, [sys.executable, "-m", "dist_lc", "train", "--config", str(BENCHMARK_RECIPE),
                               "--run-dir", str(run_dir), *[a for x in more for a in ("--set", x)]],
                           check=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = proc.stderr.strip().splitlines() or ["(nothing)"]   # the trainer logs there
        said = next((x for x in reversed(lines) if f"epoch {epochs}:" in x), lines[-1]) if not proc.returncode \
            else lines[-1]
        if proc.returncode != 0 or (epochs == 2 and "resuming after epoch 1" not in proc.stdout + proc.stderr):
            b.failed.append(f"resume: epoch {epochs} on {device} did not resume the run: {said}")
        rows.append([epochs, device, kernels, layout, proc.returncode, said[:100]])
        if proc.returncode != 0:
            break
    b.write("\n".join([
        "### Resume across devices: `dist-lc train` of configs/benchmark.yaml (one level of 8 filters, 64² crops), "
        "1 epoch on the CPU in channels_last, then resumed here without it", "",
        table(["epoch", "device", "optim.implementation", "channels_last", "exit", "its log line"], rows)]))


# ----------------------------------------------------------------------------- main

def shards(b: Bench, tiles: int, keep_tiles: bool = True) -> Path:
    """Synthetic shards of ``tiles`` tiles under ``--work``, made on the first call."""
    tick = time.perf_counter()
    made = synthetic_shards(b.args.work, tiles, usable_cores(), keep_tiles=keep_tiles, timeout=b.timeout())
    if time.perf_counter() - tick > 1:
        log(f"synthetic shards, {tiles} tiles: {time.perf_counter() - tick:.0f} s")
    return made


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--e2e-worker"]:
        return e2e_worker(Path(argv[1]), argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, default=Path("gpu_benchmark.md"), help="where the tables are written")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_gpu_bench"), help="synthetic tiles and runs")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="a miniature: micro-batch 2, 64² tiles, 100 tiles, "
                    "a one-level U-Net of 8 filters")
    ap.add_argument("--budget-s", type=float, default=500, help="parts not started within this many seconds "
                    "are skipped; a subprocess still running a minute past it gets SIGTERM (0: no budget)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(f"--parts: no part {sorted(unknown)[0]!r}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible (install a CUDA build of torch; --device cpu --quick runs the "
              "miniature)", file=sys.stderr)
        return 2
    b = Bench(args)
    from dist_lc.config import load_config
    from dist_lc.flops import training_flops

    started = time.perf_counter()
    name = b.name()
    if "kernels" not in parts:
        b.load_steps()
    peak, peak_text = peak_tflops(name)
    flops = training_flops(load_config(BENCHMARK_RECIPE, b.model).model, b.size)
    b.write(f"Machine: {machine_line()}; device {name}; torch {torch.__version__}; MFU against {peak_text}.")
    # the step's set-up needs a manifest and a full micro-batch of tiles (its batches are built in
    # memory); the end-to-end run trains on a full-size fold, made only when that part runs
    small = QUICK_TILES if args.quick else 512
    full = QUICK_TILES if args.quick else 18491
    runs = {"pinning": lambda: pinning(b), "kernels": lambda: kernels(b, shards(b, small), flops, peak),
            "check": lambda: check(b, shards(b, small)), "resume": lambda: resume_part(b),
            "profile": lambda: profile(b, shards(b, small), flops, peak),
            "e2e": lambda: e2e(b, shards(b, full, keep_tiles=args.quick), full, "after"), "cv": lambda: cv_part(b),
            "sweep": lambda: sweep(b, shards(b, small), flops, peak),
            "e2e-before": lambda: (b.write("### End to end, before: none in --quick") if args.quick
                                   else e2e(b, shards(b, full, keep_tiles=False), full, "before"))}
    skipped = []
    for part in [p for p in PARTS if p in parts]:
        if b.over():
            skipped.append(part)
            continue
        tick = time.perf_counter()
        try:
            runs[part]()
        except Exception as exc:   # the next parts still run: a lent GPU's time is short
            traceback.print_exc()
            b.failed.append(f"{part}: {type(exc).__name__}: {str(exc).strip()[:300]}")
        finally:   # the next part (or its subprocesses) gets the GPU without this one's graphs and cache
            fresh_compilation(b)
        log(f"{part}: {time.perf_counter() - tick:.0f} s")
    b.write(f"Whole benchmark: {time.perf_counter() - started:.0f} s." +
            (f" Not started within --budget-s {args.budget_s:g}: {', '.join(skipped)} (`--parts "
             f"{','.join(skipped)}` on the same machine reuses --work)." if skipped else "") +
            "".join(f"\n- {line}" for line in b.failed))
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())
