"""Every benchmark script runs in its --quick mode, so that a refactor that breaks one fails the suite
(the figures themselves are measured by running the scripts in full: docs/BENCHMARKS.md)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from torchrun_util import REPO, env

pytestmark = pytest.mark.slow


def bench(script: str, *args, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_loader(packed_sample):
    assert "rank CPU ms/tile" in bench("loader.py", "--quick", "--shards", packed_sample)


def test_batch_mix(sample_root):
    out = bench("batch_mix.py", "--quick", "--labels", sample_root / "train_labels.csv")
    assert "now: blocks of ids, each fold in a seeded order" in out and "random batches" in out


def test_spatial_folds(sample_root):
    out = bench("spatial_folds.py", "--quick", "--labels", sample_root / "train_labels.csv")
    assert "held-out ranges (the truth)" in out and "blocks of 100 tiles" in out


def test_shard_io(sample_root, tmp_path):
    assert "max fold KL" in bench("shard_io.py", "--quick", "--src", sample_root, "--work", tmp_path / "w")


def test_train_throughput(tmp_path):
    out = bench("train_throughput.py", "--quick", "--sections", "kernels", "--size", "32", "--batch", "2",
                "--work", tmp_path)
    assert "images/s" in out


def test_train_memory(packed_sample):
    assert "peak" in bench("train_memory.py", "--quick", "--shards", packed_sample, "--set", "data.crop=64",
                           "--set", "model.filters=8", "--set", "model.upconv_filters=8").lower()


def test_exit_time():
    assert "after / before:" in bench("exit_time.py", "--quick")


def test_launcher_start():
    out = bench("launcher_start.py", "--before", REPO, "--quick")
    assert "after / before:" in out
    assert [line.split(" | ")[-1] for line in out.splitlines() if line.startswith("| after |")] == ["no |"]


def test_confusion():
    assert "confusion: shipped / before:" in bench("confusion.py", "--quick")


def test_plot_time():
    assert "shipped / before:" in bench("plot_time.py", "--quick")


def test_calibration_fit():
    assert "shipped / before:" in bench("calibration_fit.py", "--quick")


def test_upconv():
    assert "speed-up" in bench("upconv.py", "--quick")


def test_pixel_gbm(packed_sample):
    assert "KL" in bench("pixel_gbm.py", "--quick", "--shards", packed_sample)


def test_bn_statistics(packed_sample, smoke_run):
    assert "batch statistics" in bench("bn_statistics.py", smoke_run / "checkpoints" / "last.pt", "--shards",
                                       packed_sample)


def test_cv_parallel(sample_root, tmp_path):  # the script packs benchmarks/common.py's SAMPLE_SRC
    assert "speed-up" in bench("cv_parallel.py", "--quick", "--work", tmp_path)


def test_quality(sample_root, tmp_path):
    out = bench("quality.py", "--quick", "--src", sample_root, "--work", tmp_path)
    assert "pixel GBM" in out and "dist-lc cv" in out and "second stage" in out
    assert "with the pixel GBM's tile means" in out
    again = bench("quality.py", "--quick", "--src", sample_root, "--work", tmp_path, "--methods", "joint",
                  "--json", tmp_path / "again.json",
                  "--cv-from", tmp_path / "quality.json", "--gbm-from", tmp_path / "quality.json")
    assert "(quality.json) + second stage with the pixel GBM's tile means" in again
    key = "dist-lc cv recommended.yaml (0.1 min/fold)"
    paired = bench("paired_quality.py", "--work", tmp_path, "--a", tmp_path / "quality.json", f"{key} / plain",
                   "--b", tmp_path / "quality.json", f"{key} / second stage")
    assert "(paired bootstrap)" in paired and "B per fold: fold 0:" in paired


def test_scale(tmp_path):
    assert "predict tta" in bench("scale.py", "--quick", "--work", tmp_path)


def test_gpu_benchmark_on_cpu(tmp_path):
    """Its miniature runs every part, and the compiled and fused steps pass the numerics check (the
    script exits 1 when one does not)."""
    out = bench("gpu.py", "--device", "cpu", "--quick", "--work", tmp_path, "--out", tmp_path / "gpu.md",
                "--budget-s", "0")   # every part, however slow the machine
    for section in ("### Page-locked batches", "### Step", "### Numerics", "### Profile", "### End to end",
                    "### Several folds", "### Micro-batch sweep", "### Resume across devices",
                    "### End to end, before: none", "Whole benchmark"):
        assert section in out
    assert "| 2 | cpu | auto | False | 0 |" in out   # the run trained on, resumed out of channels_last
    checked = [line for line in out.splitlines() if line.startswith("| + ") and line.endswith(("pass |", "FAIL |"))]
    assert [line.split(" | ")[0] for line in checked] == ["| + fused Adam", "| + torch.compile"]
    assert all(line.endswith("pass |") for line in checked)
    assert (tmp_path / "gpu.md").read_text().strip() == out.strip()


def test_the_gpu_benchmark_goes_on_after_a_failed_part_and_names_the_parts_past_its_budget(tmp_path, monkeypatch):
    """A lent GPU's minutes are few: a part that raises is recorded (exit 1) and the next part runs;
    a part not started within --budget-s is skipped and named."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    def broken(*args):
        raise RuntimeError("a broken part")

    def spends_the_budget(b, shards):
        ran.append("check")
        b.deadline = time.perf_counter()

    ran = []
    monkeypatch.setattr(gpu, "shards", lambda b, tiles, keep_tiles=True: tmp_path)
    monkeypatch.setattr(gpu, "kernels", broken)
    monkeypatch.setattr(gpu, "check", spends_the_budget)
    monkeypatch.setattr(gpu, "resume_part", lambda b: ran.append("resume"))
    out = tmp_path / "gpu.md"
    code = gpu.main(["--device", "cpu", "--quick", "--work", str(tmp_path), "--out", str(out),
                     "--parts", "kernels,check,resume", "--budget-s", "600"])
    text = out.read_text()
    assert code == 1 and ran == ["check"], text
    assert "Not started within --budget-s 600: resume (`--parts resume`" in text
    assert "\n- kernels: RuntimeError: a broken part" in text


def test_the_gpu_benchmark_numerics_check_fails_a_step_that_computes_another_loss(packed_sample, tmp_path,
                                                                                   monkeypatch):
    """The check is no formality: a rung whose loss differs (class weights off) fails it, while the
    same step built another way (NCHW instead of channels_last) passes."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    args = argparse.Namespace(device="cpu", quick=True, out=tmp_path / "gpu.md", work=tmp_path, budget_s=0)
    b = gpu.Bench(args)
    b.ladder = (gpu.LADDER[0], ("+ NCHW", [*gpu.BEFORE, "train.channels_last=false"]),
                ("+ other loss", [*gpu.BEFORE, "loss.class_weights=none"]))
    gpu.check(b, packed_sample)
    assert len(b.failed) == 1 and "+ other loss" in b.failed[0]


def test_before_after(sample_root, tmp_path):  # the script packs benchmarks/common.py's SAMPLE_SRC
    out = bench("before_after.py", "--before", REPO, "--quick", "--work", tmp_path)
    assert "after / before:" in out and out.count("| before |") == 1


def test_map_speed(sample_root, tmp_path):  # the script reads benchmarks/common.py's SAMPLE_SRC
    assert "Mpx/s" in bench("map_speed.py", "--quick", "--work", tmp_path)


def test_cv_overhead(sample_root, tmp_path):  # the script packs benchmarks/common.py's SAMPLE_SRC
    assert "outside the epochs" in bench("cv_overhead.py", "--quick", "--work", tmp_path)


def test_tune_vs_grid(sample_root, tmp_path):
    out = bench("tune_vs_grid.py", "--quick", "--src", sample_root, "--work", tmp_path)
    assert "| grid |" in out and "| tune |" in out
    assert (tmp_path / "tune_vs_grid.json").is_file()
