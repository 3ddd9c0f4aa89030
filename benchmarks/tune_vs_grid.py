"""A hyper-parameter search (``dist-lc tune``) against a grid of as many points (``dist-lc cv --grid``),
on the real sample, at the same per-fold budget: which finds the lower cross-validated KL, at what cost.

    python benchmarks/tune_vs_grid.py --work /tmp/tvg [--fold-minutes 1] [--folds 0 1] \\
        [--lr 1e-3,3e-3,1e-2] [--weight-decay 0,1e-4] [--nproc 2] [--shards DIR | --src DIR]
    python benchmarks/tune_vs_grid.py --quick --work /tmp/tvg-quick    # the test suite's smoke run

One search space over ``--recipe`` (default ``configs/recommended.yaml``), for both arms:

- grid: every combination of the ``--lr`` and ``--weight-decay`` values (3 × 2 = 6 points), each on
  every fold of ``--folds``, all run to the end;
- tune: the box those values span, continuous (learning rate log-uniform, weight decay uniform),
  written to ``WORK/space.yaml``; as many trials as the grid has points; TPE (``--seed``) and the
  median pruner, a trial's folds one after another so that a hopeless one stops early.

Both arms get the same shards (the sample packed once in 5 folds, seed 0), the same folds, the same
``train.time_limit`` per fold job (``--fold-minutes``; ``train.epochs`` set high so that the limit
decides), the same ranks per job and one job at a time on the local executor, so neither gets more
of the machine. They run one after the other, never at once. Only the folds' validation KL is used to
choose (the objective of both is the mean over folds of each fold's best validation KL); test tiles
are predicted by every fold job, as ``dist-lc cv`` always does, and never scored.

Reported, per arm: points or trials, fold jobs finished and cut by pruning, wall seconds, CPU seconds
of the whole process tree (this script makes itself the subreaper of the tree, so that jobs orphaned by
their launcher are still reaped here and counted by ``RUSAGE_CHILDREN``; a /proc sampler's figure is
kept beside it in the JSON as a cross-check), the best mean validation KL ± its fold noise (std over
folds / √folds: 60 tiles per fold leave that much chance in a mean), and the best point's parameters.
A markdown table on stdout and in ``WORK/tune_vs_grid.md``, everything in ``WORK/tune_vs_grid.json``.

Both bests are the minimum of as many noisy means, so they share the same optimism: a difference
below about twice the noise says nothing about which search is better.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SAMPLE_SRC, log, machine_line, measured, table  # noqa: E402

RECIPE = REPO / "configs" / "recommended.yaml"
SMOKE = REPO / "configs" / "smoke.yaml"
PR_SET_CHILD_SUBREAPER = 36     # linux/prctl.h
# The smoke run's model and data: the narrow U-Net of tests/test_cv.py on 32-pixel crops, one rank.
QUICK_SETS = ["data.crop=32", "data.workers=0", "data.shuffle_buffer=8", "model.filters=8",
              "model.upconv_filters=8", "train.batch_size=8", "train.micro_batch_size=4", "train.precision=fp32",
              "train.plot_every=0", "train.loggers=[]"]
QUICK_TILES = {"train": 60, "test": 8}   # 5 folds of 12 tiles


# ----------------------------------------------------------------------------- the search space

def yaml_number(value: float) -> str:
    """A float as YAML reads it back as a float: ``1e-3`` without a dot is a string to YAML 1.1."""
    return yaml.safe_dump(float(value)).splitlines()[0]


def number_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


@dataclass(frozen=True)
class Axis:
    """One key of the search: the grid's values, and for tune the interval they span."""
    key: str
    values: tuple[float, ...]
    log: bool

    @property
    def varies(self) -> bool:
        return len(set(self.values)) > 1

    def grid_arg(self) -> str:
        return f"{self.key}={','.join(yaml_number(v) for v in self.values)}"

    def fixed_set(self) -> str:
        """A key with one value is not searched: both arms get it as a plain override."""
        return f"{self.key}={yaml_number(self.values[0])}"

    def space_line(self) -> str:
        low, high = yaml_number(min(self.values)), yaml_number(max(self.values))
        return f"{self.key}: {{float: [{low}, {high}]{', log: true' if self.log else ''}}}"


def axes_of(args) -> list[Axis]:
    # the rate spans a decade: log-uniform; the decay includes 0, which a log scale cannot hold
    return [Axis("optim.lr", tuple(args.lr), log=True),
            Axis("optim.weight_decay", tuple(args.weight_decay), log=False)]


def grid_points(axes: list[Axis]) -> int:
    return math.prod(len(a.values) for a in axes if a.varies)


def write_space(axes: list[Axis], path: Path) -> Path:
    lines = ["# the box spanned by the grid's values (benchmarks/tune_vs_grid.py)",
             *[a.space_line() for a in axes if a.varies]]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- the shards

def tiny_source(src: Path, out: Path) -> Path:
    """The first tiles of the sample in the challenge layout, as symlinks (nothing copied)."""
    for split, count in QUICK_TILES.items():
        names = sorted(os.listdir(src / split / "images"), key=lambda n: int(n.split(".")[0]))[:count]
        for kind in ("images", "masks") if split == "train" else ("images",):
            (out / split / kind).mkdir(parents=True, exist_ok=True)
            for name in names:
                link = out / split / kind / name
                if not link.is_symlink():
                    link.symlink_to((src / split / kind / name).resolve())
    return out


def packed(src: Path, out: Path) -> Path:
    """``src`` packed in 5 folds (seed 0) at ``out``, unless a manifest is already there."""
    if not (out / "manifest.json").is_file():
        from shard_tools.pack import pack

        log(f"packing {src} → {out}")
        pack(src, out, folds=5, seed=0, samples_per_shard=16, workers=2, progress=False)
    return out


def shards_of(args) -> Path:
    if args.shards:
        return args.shards
    if args.quick:
        return packed(tiny_source(args.src, args.work / "tiny-src"), args.work / "tiny-shards")
    return packed(args.src, args.work / "shards")


# ----------------------------------------------------------------------------- the two commands

def shared_sets(args, shards: Path, axes: list[Axis]) -> list[str]:
    """What both arms run with: the budget, the launcher, the folds, the unsearched keys."""
    folds = ",".join(map(str, args.folds))
    sets = [f"data.shards={shards}", f"train.time_limit={args.fold_minutes}", f"train.epochs={args.epochs}",
            f"launcher.tasks_per_node={args.nproc}", "launcher.max_parallel=1",
            f"launcher.time_min={int(args.fold_minutes * 3) + 10}", f"cv.folds=[{folds}]",
            *(QUICK_SETS if args.quick else []), *[a.fixed_set() for a in axes if not a.varies], *args.set]
    return [x for s in sets for x in ("--set", s)]


def grid_command(args, shards: Path, axes: list[Axis], out: Path) -> list[str]:
    grid = [x for a in axes if a.varies for x in ("--grid", a.grid_arg())]
    return [sys.executable, "-m", "dist_lc", "cv", "--config", str(args.recipe), "--out", str(out),
            "--executor", "local", *shared_sets(args, shards, axes), *grid]


def tune_command(args, shards: Path, axes: list[Axis], space: Path, out: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "dist_lc", "tune", "--config", str(args.recipe), "--out", str(out),
            "--executor", "local", *shared_sets(args, shards, axes), "--space", str(space),
            "--trials", str(trials), "--parallel", "1", "--folds", ",".join(map(str, args.folds)),
            "--sampler", "tpe", "--pruner", "median", "--fold-order", "sequential", "--seed", str(args.seed)]


# ----------------------------------------------------------------------------- running an arm

def become_subreaper() -> bool:
    """Make processes orphaned inside an arm (a job whose launcher did not wait for it) our children,
    so that reaping them adds their CPU time to RUSAGE_CHILDREN instead of losing it to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def own_children() -> set[int]:
    """The pids whose parent is this process: the orphans handed to us, and the helpers of our own
    (multiprocessing's resource tracker after the packing) that live as long as we do."""
    from dist_lc.cv.executors import children_of   # the local executor's one reading of /proc

    return set(children_of().get(os.getpid(), []))


def reap_orphans(ours: set[int], within_s: float = 30.0) -> int:
    """Wait for the orphans handed to us (a job still exiting after its launcher returned), not for the
    children in ``ours`` that were there before; their count."""
    reaped, deadline = 0, time.monotonic() + within_s
    while time.monotonic() < deadline:
        waiting = own_children() - ours
        if not waiting:
            break
        for pid in waiting:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    reaped += 1
            except ChildProcessError:
                continue
        time.sleep(0.2)
    return reaped


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_arm(name: str, cmd: list[str], log_path: Path) -> dict:
    """One arm's command to its end: wall seconds, CPU seconds of its process tree, exit status."""
    log(f"{name}: {' '.join(cmd)} (log: {log_path})")
    before, ours = children_cpu_s(), own_children()
    run = measured(cmd, log_path)
    orphans = reap_orphans(ours)
    cpu = children_cpu_s() - before
    if run["rc"]:
        raise SystemExit(f"{name} failed ({run['rc']}); see {log_path}:\n{log_tail(log_path)}")
    log(f"{name}: {run['wall_s']:.0f} s wall, {cpu:.0f} CPU s")
    return {"cmd": run["cmd"], "wall_s": run["wall_s"], "cpu_s": cpu, "orphans_reaped": orphans,
            "cpu_s_sampled": run["root_cpu_s"] + run["children_cpu_s"]}


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------- reading the reports

def noise(std: float | None, folds: int) -> float | None:
    """The fold noise of a mean over folds: std / √folds (none with a single fold)."""
    return std / math.sqrt(folds) if std is not None and folds > 1 else None


def grid_result(out: Path) -> dict:
    """The grid's report.json: every point ran to the end, the best is the report's own choice."""
    report = json.loads((out / "report.json").read_text())
    blocks = report.get("grid") or [report]
    done = sum(1 for b in blocks for f in b["folds"] if f.get("status") == "done")
    best_folds = len(report["folds"])
    return {"finished": done, "cut": 0, "pruned": 0, "kl_mean": report["mean_kl"], "kl_std": report["std_kl"],
            "noise": noise(report["std_kl"], best_folds), "folds": best_folds, "params": report["params"],
            "points": [{"params": b["params"], "kl_mean": b["mean_kl"], "kl_std": b["std_kl"]} for b in blocks]}


def cut_jobs(out: Path, trial: dict) -> int:
    """Fold jobs of a pruned trial that started and never wrote done.json: the ones pruning stopped."""
    if trial["state"] != "PRUNED" or not trial["folder"]:
        return 0
    return sum(1 for run in (out / trial["folder"]).glob("fold*")
               if run.is_dir() and not (run / "done.json").exists())


def tune_result(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    trials, best = report["trials"], report["best"]
    if best is None:
        raise SystemExit(f"tune: no trial completed; see {out / 'report.md'}")
    return {"finished": sum(t["folds_done"] for t in trials), "cut": sum(cut_jobs(out, t) for t in trials),
            "pruned": report["states"].get("PRUNED", 0), "kl_mean": best["kl_mean"], "kl_std": best["kl_std"],
            "noise": noise(best["kl_std"], best["folds_done"]), "folds": best["folds_done"], "params": best["params"],
            "points": [{"params": t["params"], "state": t["state"], "kl_mean": t["kl_mean"], "kl_std": t["kl_std"]}
                       for t in trials]}


# ----------------------------------------------------------------------------- the report

def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def kl_text(result: dict) -> str:
    spread = f" ± {result['noise']:.4f}" if result["noise"] is not None else " (1 fold: no noise estimate)"
    return f"{result['kl_mean']:.4f}{spread}"


def render(rows: list[dict], args, command: str, started: str) -> str:
    body = [[r["arm"], r["size"], r["finished"], f"{r['pruned']} trials, {r['cut']} jobs" if r["arm"] == "tune"
             else "–", f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}", kl_text(r), params_text(r["params"])]
            for r in rows]
    lines = [f"Command: `{command}`  ", f"Machine: {machine_line()}; started {started}  ",
             f"Recipe `{Path(args.recipe).name}`, folds {', '.join(map(str, args.folds))}, "
             f"`train.time_limit={args.fold_minutes}` min per fold job, {args.nproc} rank(s) per job, one job at a "
             "time (local executor). KL: the best point's mean validation KL over folds ± std/√folds.", "",
             table(["arm", "points / trials", "fold jobs finished", "pruned", "wall s", "CPU s",
                    "best KL mean ± noise", "best parameters"], body, align="lrrlrrrl")]
    if len(rows) == 2 and rows[0]["noise"] is not None and rows[1]["noise"] is not None:
        diff = rows[1]["kl_mean"] - rows[0]["kl_mean"]
        z = diff / math.hypot(rows[0]["noise"], rows[1]["noise"]) if rows[0]["noise"] or rows[1]["noise"] else None
        lines += ["", f"tune − grid: {diff:+.4f}" + (f" ({z:+.1f} × the noise of the difference)" if z is not None
                                                    else "")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder: shards, both arms, the results")
    ap.add_argument("--src", type=Path, default=SAMPLE_SRC, help="the sample in the challenge layout")
    ap.add_argument("--shards", type=Path, help="packed shards to use instead of packing --src")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--fold-minutes", type=float, default=1.0, help="train.time_limit of every fold job")
    ap.add_argument("--epochs", type=int, default=1000, help="train.epochs: high, so that the time limit decides")
    ap.add_argument("--lr", type=number_list, default=[1e-3, 3e-3, 1e-2], help="the grid's learning rates")
    ap.add_argument("--weight-decay", type=number_list, default=[0.0, 1e-4], help="the grid's weight decays")
    ap.add_argument("--nproc", type=int, default=2, help="DDP ranks per fold job")
    ap.add_argument("--seed", type=int, default=0, help="tune's sampler seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both arms")
    ap.add_argument("--quick", action="store_true", help="60 tiles, 2 points, 1 fold, 1 epoch (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.recipe, args.folds, args.fold_minutes, args.epochs, args.nproc = SMOKE, [0], 0.5, 1, 1
        args.lr, args.weight_decay = [1e-3, 1e-2], [0.0]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    command = " ".join(["python", "benchmarks/tune_vs_grid.py", *(sys.argv[1:] if argv is None else argv)])
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    subreaper = become_subreaper()
    axes = axes_of(args)
    points = grid_points(axes)
    if points < 2:
        raise SystemExit("--lr/--weight-decay: give at least one key two values (a search needs a space)")
    shards = shards_of(args)
    space = write_space(axes, args.work / "space.yaml")
    arms = [("grid", grid_command(args, shards, axes, args.work / "grid"), grid_result, args.work / "grid"),
            ("tune", tune_command(args, shards, axes, space, args.work / "tune", points), tune_result,
             args.work / "tune")]
    for _, _, _, out in arms:   # checked before either runs: a clash must not cost a whole grid first
        if out.exists():
            raise SystemExit(f"{out} exists: give a fresh --work (or remove it) so that both arms start clean")
    rows = []
    for name, cmd, read, out in arms:   # one after the other: the arms never share the machine
        timing = run_arm(name, cmd, args.work / f"{name}.log")
        rows.append({"arm": name, "size": points, **timing, **read(out)})
    text = render(rows, args, command, started)
    print(text)
    (args.work / "tune_vs_grid.md").write_text(text)
    record = {"command": command, "machine": machine_line(), "started": started, "subreaper": subreaper,
              "shards": str(shards), "space": space.read_text(), "rows": rows}
    (args.work / "tune_vs_grid.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
