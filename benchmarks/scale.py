"""The challenge at its real size on this machine: 18,491 train and 5,043 test tiles through synth,
pack, verify, describe, a full-size cross-validation (training, validation, out-of-fold and test
prediction, report, submission) and predict with and without TTA. Every step's wall time and the
peak RSS of each of its processes (sampled from /proc) are recorded.

    python benchmarks/scale.py --work /work/big [--train 18491 --test 5043] [--steps synth,pack,...]
    python benchmarks/scale.py --quick --work /tmp/scale-quick      # 100 + 20 tiles: the suite's smoke run

Steps (``--steps``, in this order; each one reuses what earlier ones left in ``--work``):
``synth`` (``dist-lc synth``), ``pack`` (``lc-shard pack``), ``verify``, ``describe``, ``plan``
(the epoch planner and the loaders' set-up at this size, in-process), ``cv`` (``dist-lc cv`` of
``configs/recommended.yaml``, ``train.epochs=1``, 5 folds, 2 DDP ranks per fold on the local
executor: training on folds 1–4 validates on fold 0, and so on), ``report`` (``dist-lc report`` again,
alone), ``predict`` (the 5,043 test tiles with fold 0's best.pt or ``--checkpoint``, then with
``--tta``). Results go to ``--json`` (default ``WORK/scale.json``) as they come, so an interrupted
run keeps its figures.

Disk: the tiles and the shards take about 27 GB; remove ``--work`` afterwards.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lc_common.resources import usable_cores  # noqa: E402
from common import log, machine_line, measured, table  # noqa: E402

STEPS = ("synth", "pack", "verify", "describe", "plan", "cv", "report", "predict")
PY = sys.executable


def absolute(text: str) -> Path:
    """A path argument resolved where the command runs (the steps run in the repository root)."""
    return Path(text).resolve()


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def step_synth(work: Path, args) -> dict:
    return measured([PY, "-m", "dist_lc", "synth", "--out", str(work / "data"), "--train", str(args.train),
                     "--test", str(args.test), "--workers", str(args.workers)], work / "synth.log")


def step_pack(work: Path, args) -> dict:
    res = measured([PY, "-m", "shard_tools", "pack", "--src", str(work / "data"), "--out", str(work / "shards"),
                    "--folds", "5", "--workers", str(args.workers)], work / "pack.log")
    manifest = work / "shards" / "manifest.json"
    tiles = args.train + args.test
    res.update(tiles=tiles, tiles_per_s=tiles / res["wall_s"], shards=len(list((work / "shards").glob("*.tar"))),
               shard_bytes=du_bytes(work / "shards"), manifest_bytes=manifest.stat().st_size,
               source_bytes=du_bytes(work / "data"))
    return res


def step_verify(work: Path, args) -> dict:
    return measured([PY, "-m", "shard_tools", "verify", str(work / "shards")], work / "verify.log")


def step_describe(work: Path, args) -> dict:
    return measured([PY, "-m", "shard_tools", "describe", str(work / "shards")], work / "describe.log")


def step_plan(work: Path, args) -> dict:
    """The epoch planner and loader set-up at full size, in this process (no data read)."""
    from dist_lc.data import eval_loader, train_loader
    from shard_tools.manifest import load_manifest

    started = time.perf_counter()
    manifest = load_manifest(work / "shards")
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    for rank in (0, 1):
        train_loader(manifest, [1, 2, 3, 4], epoch=0, seed=0, world=2, rank=rank, micro=8, accum=1, workers=0)
    planned = (time.perf_counter() - started) / 2
    started = time.perf_counter()
    eval_loader(manifest, "train", [0], world=2, rank=0, batch_size=8, workers=0)
    return {"manifest_load_s": loaded, "train_plan_s": planned, "eval_plan_s": time.perf_counter() - started}


def step_cv(work: Path, args) -> dict:
    cv_dir = work / "cv"
    cmd = [PY, "-m", "dist_lc", "cv", "--config", "configs/recommended.yaml", "--out", str(cv_dir),
           "--executor", "local", "--set", f"data.shards={work / 'shards'}", "--set", "train.epochs=1",
           "--set", "launcher.tasks_per_node=2", "--set", "launcher.max_parallel=1",
           "--set", "launcher.time_min=600", *[a for s in args.cv_set for a in ("--set", s)]]
    if (cv_dir / "cv.json").exists():
        cmd = [PY, "-m", "dist_lc", "cv", "--out", str(cv_dir), "--resume"]
    res = measured(cmd, work / "cv.log")
    folds = []
    for fold_dir in sorted(cv_dir.glob("fold*")):
        import pandas as pd

        metrics = pd.read_csv(fold_dir / "metrics.csv").iloc[-1].to_dict()
        done = json.loads((fold_dir / "done.json").read_text()) if (fold_dir / "done.json").exists() else {}
        folds.append({"fold": fold_dir.name, **{k: metrics.get(k) for k in ("epoch_time_s", "val_time_s", "images_per_s",
                                                                           "data_wait_frac", "peak_mem_mb",
                                                                           "val_kl", "val_tiles")},
                      "predict_s": done.get("predict_s"), "oof_tiles": done.get("oof_tiles"),
                      "test_tiles": done.get("test_tiles")})
    res["folds"] = folds
    return res


def step_report(work: Path, args) -> dict:
    import pandas as pd

    res = measured([PY, "-m", "dist_lc", "report", str(work / "cv")], work / "report.log")
    sub = pd.read_csv(work / "cv" / "submission.csv", index_col=0)    # read as the challenge's eval.py reads it
    oof = pd.read_csv(work / "cv" / "oof.csv", index_col=0)
    report = json.loads((work / "cv" / "report.json").read_text())
    res.update(submission_rows=len(sub), submission_columns=list(sub.columns), oof_rows=len(oof),
               submission_row_sums=[float(sub.sum(axis=1).min()), float(sub.sum(axis=1).max())],
               oof_kl=report.get("oof_kl"), calibrated_kl=report.get("calibration", {}).get("oof_kl"))
    return res


def step_predict(work: Path, args) -> dict:
    ckpt = args.checkpoint or work / "cv" / "fold0" / "checkpoints" / "best.pt"
    out = {}
    for name, extra in (m for m in (("plain", []), ("tta", ["--tta"])) if m[0] in args.predict_modes.split(",")):
        res = measured([PY, "-m", "dist_lc", "predict", "--checkpoint", str(ckpt), "--shards", str(work / "shards"),
                        "--split", "test", "--out", str(work / f"test_{name}.csv"), "--workers", "1", *extra],
                       work / f"predict_{name}.log")
        res["tiles_per_s"] = args.test / res["wall_s"]
        out[name] = res
    return out


def render(results: dict) -> str:
    rows = []
    for name in STEPS:
        r = results.get(name)
        if not r:
            continue
        if name == "plan":
            rows.append([name, f"{r['train_plan_s'] * 1e3:.0f} ms plan, manifest {r['manifest_load_s']:.2f} s", "", ""])
        elif name == "predict":
            for k, v in ((k, v) for k, v in r.items() if isinstance(v, dict)):
                rows.append([f"predict {k}", f"{v['wall_s']:.0f} s", f"{v['tiles_per_s']:.1f} tiles/s",
                             f"{v['root_peak_mb']:.0f} MB (workers {v['child_peak_mb']:.0f})"])
        else:
            rows.append([name, f"{r['wall_s']:.0f} s", f"{r.get('tiles_per_s', 0):.0f} tiles/s" if "tiles_per_s" in r
                         else "", f"{r['root_peak_mb']:.0f} MB (children {r['child_peak_mb']:.0f})"
                         if "root_peak_mb" in r else f"{r.get('max_rss_kb_gnu_time', 0) / 1024:.0f} MB"])
    return table(["step", "wall", "rate", "peak RSS"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=absolute, required=True)
    ap.add_argument("--train", type=int, default=18491)
    ap.add_argument("--test", type=int, default=5043)
    ap.add_argument("--workers", type=int, default=usable_cores())
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--cv-set", action="append", default=[], metavar="KEY=VALUE", help="more --set for the cv step")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--predict-modes", default="plain,tta", help="plain, tta or both (tta costs 8 forward passes)")
    ap.add_argument("--checkpoint", type=absolute, help="the model predict runs (default: fold 0's best.pt "
                    "of the cv step; the speed depends on the recipe's network, not on its weights)")
    ap.add_argument("--quick", action="store_true", help="100 train + 20 test tiles, tiny model (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test = 100, 20
        args.cv_set += ["data.crop=32", "model.filters=8", "model.upconv_filters=8", "data.workers=0",
                        "cv.folds=[0,1]", "train.plot_every=0"]
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.json or args.work / "scale.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = machine_line()
    for name in args.steps.split(","):
        log(f"step {name}")
        results[name] = globals()[f"step_{name}"](args.work, args)
        results[name]["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        out.write_text(json.dumps(results, indent=1, default=str))
    print(f"Machine: {results['machine']}; {args.train} train + {args.test} test tiles\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
