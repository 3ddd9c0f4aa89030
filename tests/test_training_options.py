"""Options users expect from a training tool: the largest micro-batch that fits, a schedule that fits
the time limit, early stopping, gradient clipping, experiment tracking, help on every option."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from dist_lc import cli, memory
from dist_lc import train as train_mod
from dist_lc.config import load_config
from shard_tools import cli as shard_cli
from torchrun_util import REPO, dist_lc

SMALL = ["data.crop=32", "data.workers=0", "model.filters=8", "model.upconv_filters=8", "train.plot_every=0",
         "train.precision=fp32"]


def sets(shards, *extra) -> list[str]:
    return [a for s in [f"data.shards={shards}", *SMALL, *extra] for a in ("--set", s)]


def run_train(shards, run, *extra, timeout=300):
    proc = dist_lc(["train", "--config", "configs/smoke.yaml", *sets(shards, *extra), "--run-dir", str(run)],
                   timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------------------- micro-batch auto

def test_auto_micro_batch_under_a_small_memory_budget_accumulates_and_equals_the_fixed_run(tiny_shards, tmp_path,
                                                                                         monkeypatch):
    """A budget with room for 5 tiles' activations: auto picks 4 (the largest divisor of 16 that fits)
    and trains exactly as micro-batch 4 does; the run folder's config records the 4."""
    cfg = load_config("configs/smoke.yaml", [f"data.shards={tiny_shards}", *SMALL, "train.micro_batch_size=auto",
                                             "train.batch_size=16"])
    probe = train_mod.build_setup(load_config("configs/smoke.yaml", [f"data.shards={tiny_shards}", *SMALL]))
    per_tile = memory.saved_bytes_per_tile(probe.net, probe.loss_fn, 32, probe.device, None, True)
    states = sum(p.numel() * p.element_size() for p in probe.net.parameters()) * 4
    monkeypatch.setattr(memory, "rss_bytes", lambda: 1e9)   # the process's present footprint, fixed for the test
    budget_gb = (1e9 + states + 5 * per_tile * memory.BACKWARD_FACTOR) / 2**30
    auto = train_mod.build_setup(load_config("configs/smoke.yaml", [f"data.shards={tiny_shards}", *SMALL,
                                                                    "train.micro_batch_size=auto", "train.batch_size=16",
                                                                    f"train.memory_limit_gb={budget_gb}"]))
    assert (auto.layout.micro, auto.layout.accum) == (4, 4) and auto.cfg.train.micro_batch_size == 4
    assert "train.micro_batch_size auto: 4" in auto.notes[0]
    assert cfg.train.micro_batch_size == "auto"
    # The runs in this process, under the RSS fixed above: a run in a process of its own (its real RSS
    # far below 1e9) would find room for 16 and compare 16 with 16, then resume with 16 whatever it read.
    run_a, run_f = tmp_path / "auto", tmp_path / "fixed"
    common = [f"data.shards={tiny_shards}", *SMALL, "train.batch_size=16", "train.loggers=[]"]
    result = train_mod.train(load_config("configs/smoke.yaml", [*common, "train.epochs=1", "train.micro_batch_size=auto",
                                                                f"train.memory_limit_gb={budget_gb}"]), run_a)
    assert result.config.train.micro_batch_size == 4
    assert yaml.safe_load((run_a / "config.yaml").read_text())["train"]["micro_batch_size"] == 4
    train_mod.train(load_config("configs/smoke.yaml", [*common, "train.epochs=1", "train.micro_batch_size=4"]), run_f)
    a = torch.load(run_a / "checkpoints" / "last.pt", weights_only=True)["model"]
    f = torch.load(run_f / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], f[k]) for k in a), "auto trained differently from the fixed micro-batch it chose"
    # resumed without the memory limit (room for 16 now): with the micro-batch chosen when it started
    train_mod.train(load_config("configs/smoke.yaml", [*common, "train.epochs=2", "train.micro_batch_size=auto"]), run_a)
    resumed = [x for x in (run_a / "train.log").read_text().splitlines() if "resuming after epoch 1" in x]
    assert len(resumed) == 1 and "(4 × 4 accumulation × 1 ranks)" in resumed[0], resumed


def test_micro_batch_candidates_keep_the_batch_exact():
    assert memory.candidates(16) == [16, 8, 4, 2, 1] and memory.candidates(12) == [12, 6, 4, 3, 2, 1]


# ----------------------------------------------------------------------------- schedule, early stop, clipping

def test_a_time_limit_fits_the_cosine_schedule_and_a_resume_keeps_it(tiny_shards, tmp_path):
    # 9 s: an epoch of the 48 training tiles (3 steps) and its validation of 12 take about a second on
    # 2 cores, so several epochs fit (as 15 s fitted a few on the 300-tile sample)
    run = tmp_path / "run"
    proc = run_train(tiny_shards, run, "train.epochs=1000", "train.time_limit=0.15", "schedule.name=cosine",
                     "schedule.warmup_epochs=1", "optim.lr=0.002", "schedule.min_lr=0.00002")
    log = (run / "train.log").read_text()
    assert "the cosine schedule now ends after epoch" in log, proc.stderr[-2000:]
    planned = int(log.rsplit("the cosine schedule now ends after epoch ", 1)[1].split()[0])
    rows = pd.read_csv(run / "metrics.csv")
    assert 1 <= planned < 1000 and len(rows) <= planned   # (one epoch may be all that fits on a loaded machine)
    if len(rows) == planned > 1:   # it ended inside the limit at the end of its schedule, at min_lr (an
        # epoch of warmup is all a loaded machine may fit: then there is no annealing to end)
        assert rows["lr"].iloc[-1] == pytest.approx(2e-5, rel=1e-6)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["planned_epochs"] == planned


def test_a_late_refit_only_shortens_the_schedule_to_what_still_fits():
    from dist_lc.config import TrainConfig
    from dist_lc.train import SCHEDULE_MARGIN, refit_length

    t = TrainConfig(val_from=0.8, val_every=2)
    # epochs 51..60 at 5 s and validations after 52, 54, ..., 60 at 4 s: 70 s, more than 60 s allow;
    # ending after 58 leaves 8 epochs and 4 validations: 56 s
    assert refit_length(t, 50, 60, [5.0, 5.0, 5.0], [4.0], 60.0) == 58
    assert 56 <= 60 * SCHEDULE_MARGIN < 65
    assert refit_length(t, 50, 60, [1.0], [1.0], 1e6) == 60      # faster epochs never lengthen it
    assert refit_length(t, 50, 60, [5.0], [4.0], 0.0) == 51      # no time left: one epoch to come
    assert refit_length(t, 60, 60, [5.0], [4.0], 0.0) == 60      # the schedule's end


def test_no_fitted_schedule_without_a_time_limit(tiny_shards, tmp_path):
    run = tmp_path / "run"
    run_train(tiny_shards, run, "train.epochs=2", "schedule.name=cosine")
    assert "cosine schedule now ends" not in (run / "train.log").read_text()
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_early_stop_after_patience_validations_without_a_better_score(tiny_shards, tmp_path):
    run = tmp_path / "run"
    stopping = ["train.epochs=20", "train.early_stop=2", "train.early_stop_min_delta=0.01", "optim.lr=1e-9",
                "model.norm=group", "model.groups=4"]
    run_train(tiny_shards, run, *stopping)
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert "train.early_stop 2: no better score in 2 validations; stopping after epoch 3" in \
        (run / "train.log").read_text()
    run_train(tiny_shards, run, *stopping)   # run again: it has stopped, it does not train on
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    assert "train.early_stop 2: this run already stopped early after epoch 3" in (run / "train.log").read_text()


def test_gains_each_under_min_delta_count_once_they_add_up_to_more():
    """1.0, 0.95, 0.90 with min_delta 0.06: 0.90 beats 1.0 by 0.10, so early stopping's count starts
    again, although no single step gained 0.06. best.pt follows every better score."""
    from dist_lc.checkpoint import Progress

    p = Progress()
    assert [(p.judge(score, 0.06), p.stale) for score in (1.0, 0.95, 0.90, 0.89, 0.95)] == \
        [(True, 0), (True, 1), (True, 0), (True, 1), (False, 2)]
    assert (p.best, p.reference) == (0.89, 0.90)
    assert (p.judge(None, 0.06), p.stale) == (False, 2)   # an epoch without validation counts for nothing


def test_a_cosine_run_that_ends_inside_its_warmup_says_so():
    from dist_lc.train import warn_if_all_warmup

    lines = []
    log = type("Log", (), {"info": staticmethod(lines.append)})
    cfg = load_config(None, ["schedule.name=cosine", "schedule.warmup_epochs=2", "train.epochs=2"])
    warn_if_all_warmup(cfg, log, 3)
    assert lines == []
    warn_if_all_warmup(cfg, log, 2)    # the run's length, or a time limit's fit
    assert len(lines) == 1 and lines[0].startswith("warning: the run ends after epoch 2, inside the cosine's")
    warn_if_all_warmup(load_config(None, ["schedule.warmup_epochs=2", "train.epochs=1"]), log, 1)   # plateau
    assert len(lines) == 1


def test_a_min_lr_above_the_learning_rate_never_raises_it():
    """A search over optim.lr below a recipe's schedule.min_lr: the cosine holds optim.lr."""
    from dist_lc.optim import build_optimizer, build_scheduler

    cfg = load_config(None, ["schedule.name=cosine", "optim.lr=0.001", "schedule.min_lr=0.01", "train.epochs=3",
                             "schedule.warmup_epochs=1"])
    optimizer = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=2)
    rates = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert max(rates) == pytest.approx(0.001) and rates[-1] == pytest.approx(0.001)


def test_the_compiling_step_is_no_part_of_the_epoch_cost_that_fits_the_schedule(packed_sample, tmp_path,
                                                                                monkeypatch):
    """train.time_limit 10 min; the first epoch took 100 s, 90 of them compiling: the schedule is
    fitted to 10 s epochs (49 in all), not to 100 s ones (5)."""
    from types import SimpleNamespace

    from dist_lc.checkpoint import Checkpointer, Progress
    from dist_lc.run_log import RunLog

    cfg = load_config("configs/smoke.yaml", [f"data.shards={packed_sample}", *SMALL, "data.fold=null",
                                             "schedule.name=cosine", "train.epochs=1000", "train.time_limit=10",
                                             "train.loggers=[]"])
    s = train_mod.build_setup(cfg)
    clock, epochs = [0.0], []

    def compiled_epoch(s, epoch, step, stop, bar):
        clock[0] += 100.0
        epochs.append(epoch)
        if len(epochs) > 1:
            return {"stopped": True, "step": step}
        return {"stopped": False, "step": step + s.steps_per_epoch, "train_loss": 1.0, "epoch_time_s": 100.0,
                "images_per_s": None, "data_wait_frac": 0.0, "compile_s": 90.0, "skipped_steps": 0}

    monkeypatch.setattr(train_mod, "train_epoch", compiled_epoch)
    monkeypatch.setattr(train_mod, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=lambda: clock[0]))
    parts = {"model": s.net, "ema": s.ema, "optimizer": s.optimizer, "scheduler": s.scheduler, "scaler": s.scaler}
    runlog, p = RunLog(tmp_path, enabled=True, cfg=cfg), Progress()
    try:
        train_mod.run_epochs(s, p, Checkpointer(tmp_path, parts, cfg, s.manifest, 1, s.device), runlog,
                             SimpleNamespace(set=False), started=0.0)
    finally:
        runlog.close()
        s.close()
    assert p.planned == 1 + int(500 * train_mod.SCHEDULE_MARGIN // 10) == 49


def simulated_run(shards, run_dir, monkeypatch, overrides, train_s, val_s, stop_in_epoch=None):
    """run_epochs of a real setup on a simulated clock: epoch e trains train_s(e) seconds, a
    validation takes val_s; a stop signal arrives during epoch ``stop_in_epoch``. Returns the
    progress, the validated epochs, the clock at the end and last.pt's planned length."""
    from types import SimpleNamespace

    from dist_lc.checkpoint import Checkpointer, Progress
    from dist_lc.run_log import RunLog

    cfg = load_config("configs/smoke.yaml", [f"data.shards={shards}", *SMALL, "train.loggers=[]", *overrides])
    s = train_mod.build_setup(cfg)
    clock, validated = [0.0], []

    def epoch(s, epoch, step, stop, bar):
        clock[0] += train_s(epoch + 1)
        if epoch + 1 == stop_in_epoch:
            return {"stopped": True, "step": step}
        return {"stopped": False, "step": step + s.steps_per_epoch, "train_loss": 1.0, "epoch_time_s": 1.0,
                "images_per_s": None, "data_wait_frac": 0.0, "skipped_steps": 0}

    def validate(s, net, epoch):
        clock[0] += val_s
        validated.append(epoch)
        return {"val_kl": 1.0 / epoch}, None, None

    monkeypatch.setattr(train_mod, "train_epoch", epoch)
    monkeypatch.setattr(train_mod, "validate", validate)
    monkeypatch.setattr(train_mod, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=lambda: clock[0]))
    parts = {"model": s.net, "ema": s.ema, "optimizer": s.optimizer, "scheduler": s.scheduler, "scaler": s.scaler}
    runlog, p = RunLog(run_dir, enabled=True, cfg=cfg), Progress()
    ckpt = Checkpointer(run_dir, parts, cfg, s.manifest, 1, s.device)
    try:
        train_mod.run_epochs(s, p, ckpt, runlog, SimpleNamespace(set=False), started=0.0)
    finally:
        runlog.close()
        s.close()
    saved = torch.load(ckpt.last, map_location="cpu", weights_only=False)
    return p, validated, clock[0], saved["planned_epochs"]


@pytest.mark.parametrize("train_s, val_s, limit_s, epochs", [(10, 20, 75, 2),   # 2 × (10 + 20) = 60: a third would end at 90
                                                             (10, 40, 55, 1)])  # the first validation alone shows it
def test_the_time_limit_counts_the_validations(packed_sample, tmp_path, monkeypatch, train_s, val_s, limit_s,
                                               epochs):
    p, validated, clock, _ = simulated_run(packed_sample, tmp_path, monkeypatch,
                                           ["train.epochs=100", f"train.time_limit={limit_s / 60}"],
                                           lambda e: train_s, val_s)
    assert (p.epoch, validated) == (epochs, list(range(1, epochs + 1))) and clock <= limit_s
    assert f"stopping after epoch {epochs}" in (tmp_path / "train.log").read_text()   # cut short of its 100


def test_a_schedule_fitted_to_the_time_limit_ends_validated_and_is_saved_before_a_stop(packed_sample, tmp_path,
                                                                                     monkeypatch):
    """The second epoch is 4× dearer than the first: the fitted cosine must not end at it unvalidated,
    and the length fitted after epoch 2 must be in the last.pt a resume reads."""
    common = ["train.epochs=1000", "train.time_limit=1.6667", "schedule.name=cosine", "train.val_from=0.5"]
    p, validated, clock, _ = simulated_run(packed_sample, tmp_path / "a", monkeypatch, common,
                                           lambda e: 10 if e == 1 else 40, 10)
    assert validated[-1] == p.epoch and clock <= 100
    p, _, _, saved = simulated_run(packed_sample, tmp_path / "b", monkeypatch, ["train.epochs=1000",
                                   "train.time_limit=10", "schedule.name=cosine"], lambda e: 10 if e == 1 else 40, 1,
                                   stop_in_epoch=3)
    assert p.epoch == 2 and saved == p.planned < 1000


def test_a_run_stopped_for_time_ends_its_schedule_where_it_stops(packed_sample, tmp_path, monkeypatch):
    """Epochs of 10 s and validations of 5 s in 40 s: the schedule fitted after epoch 1 ends after epoch 2,
    after which a third does not fit. The run ends there and so does its schedule, in the log and in
    last.pt (it was lengthened to epoch 3 when there was no time for it: a resume re-warmed the rate).
    It ends at its schedule's end, which the limit fitted: no stop for time is said (the CV report
    would mark the fold as cut short)."""
    p, validated, clock, saved = simulated_run(packed_sample, tmp_path, monkeypatch,
                                               ["train.epochs=1000", f"train.time_limit={40 / 60}",
                                                "schedule.name=cosine"], lambda e: 10, 5)
    ends = [int(line.split("now ends after epoch ")[1].split()[0]) for line in
            (tmp_path / "train.log").read_text().splitlines() if "now ends after epoch" in line]
    assert p.epoch == 2 and validated == [1, 2] and clock <= 40
    assert ends[-1] == saved == p.planned == 2, ends
    assert "stopping after epoch" not in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gradient_clipping_bounds_the_true_gradient(packed_sample, precision):
    """SGD with lr 1 moves the weights by exactly the clipped gradient; under fp16 the clip applies to
    the unscaled gradient (the scaler's factor of 65536 would otherwise shrink the step by as much)."""
    
    clip = 1e-3
    cfg = load_config("configs/smoke.yaml", [f"data.shards={packed_sample}", "data.crop=16", "data.workers=0",
                                             "model.filters=4", "model.upconv_filters=4", "model.norm=group",
                                             "model.groups=4", f"train.precision={precision}", "optim.name=sgd",
                                             "optim.lr=1.0", "optim.momentum=0", f"optim.clip_grad_norm={clip}",
                                             "train.batch_size=4", "train.micro_batch_size=4",
                                             "schedule.name=constant"])
    s = train_mod.build_setup(cfg)
    if s.scaler.is_enabled():   # a scale that does not overflow fp16 on the first step (the scaler would skip it)
        s.scaler.scale(torch.ones(()))
        s.scaler.update(new_scale=64.0)
    with s.train_data.batches(0) as it:
        batch = next(it)
    before = [p.detach().clone() for p in s.net.parameters()]
    train_mod.train_step(s, [batch])
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(s.net.parameters(), before)))
    assert moved == pytest.approx(clip, rel=0.02)


# ----------------------------------------------------------------------------- tracking

def test_tensorboard_gets_prediction_plots_and_the_config_and_mlflow_the_run(tiny_shards, tmp_path):
    import os

    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "tracked"
    run_train(tiny_shards, run, "train.epochs=2", "train.plot_every=1", "train.loggers=[tensorboard,mlflow]",
              "train.experiment=landcover")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "predictions" in events.Tags()["images"] and len(events.Images("predictions")) == 2
    assert any("config" in tag for tag in events.Tags()["tensors"])
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("landcover")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "tracked" and found.info.status == "FINISHED"
    assert found.data.params["train.epochs"] == "2" and found.data.params["model.filters"] == "8"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val_kl")] == [1, 2]
    run_train(tiny_shards, run, "train.epochs=3", "train.loggers=[tensorboard,mlflow]", "train.experiment=landcover")
    (again,) = client.search_runs([experiment.experiment_id])   # the resumed run continues the same MLflow run
    assert [m.step for m in client.get_metric_history(again.info.run_id, "val_kl")] == [1, 2, 3]


def test_a_metrics_row_with_an_unknown_key_is_an_error_not_a_dropped_value(tmp_path):
    from dist_lc.run_log import RunLog, read_metrics

    log = RunLog(tmp_path, enabled=True, cfg=load_config(None, ["train.loggers=[]"]))
    try:
        log.epoch({"epoch": 1, "step": 4, "train_loss": 0.5}, best=False)
        with pytest.raises(ValueError, match="metrics.csv has no column 'val_accuracy'"):
            log.epoch({"epoch": 2, "step": 8, "train_loss": 0.4, "val_accuracy": 0.9}, best=False)
    finally:
        log.close()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == ["1"]   # nothing of the refused row


def test_resuming_over_a_metrics_file_with_a_foreign_column_is_refused_in_one_line(tmp_path):
    """Rewriting it with this version's columns would drop that column's values without a word."""
    from lc_common.errors import InputError

    from dist_lc.run_log import RunLog

    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss,old_metric\n1,4,0.5,0.7\n")
    with pytest.raises(InputError) as err:
        RunLog(tmp_path, enabled=True, resume_epoch=1, cfg=load_config(None, ["train.loggers=[]"]))
    assert str(err.value).startswith(f"{tmp_path / 'metrics.csv'}: metrics.csv has no column 'old_metric'")
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,step,train_loss,old_metric\n")


# ----------------------------------------------------------------------------- command-line help

def _actions(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prefix, action


def test_every_option_of_every_command_has_a_help_line():
    parsers = [(cli.build_parser()[0], "dist-lc"), (shard_cli._parser(), "lc-shard")]
    missing = [f"{prefix} {'/'.join(a.option_strings) or a.dest}" for parser, prefix in parsers
               for prefix, a in _actions(parser, prefix) if not (a.help and a.help.strip())]
    assert not missing, missing


def test_help_of_synth_says_what_each_option_is():
    out = subprocess.run([sys.executable, "-m", "dist_lc", "synth", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60).stdout
    assert "train tiles with masks (default: 150)" in out and "random seed" in out


def test_cuda_graphs_refuse_gradient_accumulation_in_one_line():
    """A CUDA graph's replay would overwrite the gradients the previous micro-step left in its memory."""
    from dist_lc.config import batch_layout
    from lc_common.errors import InputError

    t = load_config(None, ["train.compile_mode=reduce-overhead", "train.batch_size=32",
                           "train.micro_batch_size=8"]).train
    with pytest.raises(InputError, match=r"^config key 'train.compile_mode': reduce-overhead .*cannot accumulate"):
        train_mod.check_compile_mode(t, batch_layout(t, 1), torch.device("cuda"))
    train_mod.check_compile_mode(t, batch_layout(t, 4), torch.device("cuda"))   # 8 per rank: no accumulation
    train_mod.check_compile_mode(t, batch_layout(t, 1), torch.device("cpu"))    # no CUDA graphs on a CPU


def test_auto_trains_eager_where_the_node_lacks_the_compiler_and_true_is_refused(monkeypatch, tmp_path):
    """Triton builds its CUDA kernels with a C compiler ($CC, gcc or clang) and the Python headers,
    which a compute node may lack."""
    import shutil
    import sysconfig

    from dist_lc import compiling
    from lc_common.errors import InputError

    cuda = torch.device("cuda")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compiling.agreed_compile("auto", cuda) == (False, "train.compile auto: training eager, no C compiler on "
                                                      "this node ($CC, gcc or clang), which Triton needs to build "
                                                      "its CUDA kernels")
    with pytest.raises(InputError, match=r"config key 'train.compile': true, but no C compiler"):
        compiling.agreed_compile(True, cuda)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang" else None)
    assert compiling.agreed_compile("auto", cuda) == (True, None)
    assert compiling.agreed_compile("auto", torch.device("cpu")) == (False, None)
    monkeypatch.setenv("CC", "/opt/no/cc")   # a $CC that is not there is what Triton would run
    assert "$CC ('/opt/no/cc') is not a compiler" in compiling.agreed_compile("auto", cuda)[1]
    monkeypatch.delenv("CC")
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})   # no Python.h
    assert compiling.agreed_compile("auto", cuda)[1] == (f"train.compile auto: training eager, no Python headers on "
                                                         f"this node ({tmp_path}/Python.h: python3-devel or "
                                                         "python3-dev), which Triton needs to build its CUDA kernels")


def test_auto_trains_eager_with_syncbatchnorm_where_dynamo_breaks_the_graph(monkeypatch):
    """torch.compile breaks its graph at every SyncBatchNorm: compiling a distributed run with them
    loses the fusions it is for. ``auto`` trains eager and says why; ``true`` still compiles."""
    import shutil

    from dist_lc import compiling

    cuda = torch.device("cuda")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(compiling, "_missing_for_triton", lambda: None)
    assert compiling.agreed_compile("auto", cuda, sync_batchnorm=True) == (
        False, "train.compile auto: training eager, train.sync_batchnorm: torch.compile breaks its graph at every "
               "SyncBatchNorm (train.compile=true compiles anyway)")
    assert compiling.agreed_compile(True, cuda, sync_batchnorm=True) == (True, None)
    assert compiling.agreed_compile("auto", cuda, sync_batchnorm=False) == (True, None)


def test_a_resume_that_changes_channels_last_gives_the_optimizer_state_its_parameters_layout():
    """load_state_dict keeps the saved layout of Adam's moments; the fused CUDA kernels refuse state of
    another layout than its parameters' ("must have same dtype, device, and layout")."""
    from dist_lc.checkpoint import load_optimizer

    def step(net, optimizer):
        net(torch.rand(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
        optimizer.step()

    saved_net = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    saved_opt = torch.optim.AdamW(saved_net.parameters())
    step(saved_net, saved_opt)
    net = torch.nn.Conv2d(4, 8, 3)   # the resumed run trains without channels_last
    net.load_state_dict(saved_net.state_dict())
    optimizer = torch.optim.AdamW(net.parameters())
    load_optimizer(optimizer, saved_opt.state_dict())
    weight = net.weight
    assert weight.is_contiguous()
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizer.state[weight][key]
        assert state.stride() == weight.stride(), key
        assert torch.equal(state, saved_opt.state[saved_net.weight][key]), key
    step(net, optimizer)


def test_cudnn_and_cublas_workspace_failures_are_out_of_memory():
    """Near the memory limit a convolution fails in cuDNN, a plain RuntimeError, before the caching
    allocator's OutOfMemoryError: the micro-batch probe must take it as "does not fit"."""
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.is_out_of_memory(RuntimeError("GET was unable to find an engine to execute this computation"))
    assert memory.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not memory.is_out_of_memory(RuntimeError("Given groups=1, weight of size [8, 4, 3, 3], expected input"))
    assert not memory.is_out_of_memory(ValueError("unable to find an engine"))


@pytest.mark.parametrize("when", ["before", "first-step"])
def test_a_compiler_that_does_not_work_is_one_line_not_a_traceback(tiny_shards, tmp_path, when):
    """train.compile true with no working C++ compiler: refused before anything starts (exit 2), or,
    where the check passed and the compilation itself fails, one line at the first step (exit 1)."""
    skip_check = "import dist_lc.compiling as c; c.missing_compiler = lambda device: None; " if when != "before" else ""
    code = (f"{skip_check}import sys; from dist_lc.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["train", "--config", "configs/smoke.yaml", "--run-dir", str(tmp_path / "run"),
            *[a for s in (f"data.shards={tiny_shards}", "data.workers=0", "train.epochs=1", "train.compile=true",
                          "train.plot_every=0", "data.crop=64", "model.filters=8", "model.upconv_filters=8",
                          "model.num_layers=0", "train.device=cpu") for a in ("--set", s)]]
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CXX": "/nonexistent/g++"})
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    if when == "before":
        assert run.returncode == 2 and last.startswith("error: config key 'train.compile': true, but no working C++ "
                                                       "compiler on this node"), run.stderr[-2000:]
    else:
        assert run.returncode == 1 and last.startswith("error: rank 0: torch.compile failed (InvalidCxxCompiler: "
                                                       "No working C++ compiler"), run.stderr[-2000:]
        assert last.endswith("set train.compile=false to train eager")


def test_an_mlflow_server_that_does_not_answer_is_one_line_at_the_start(tiny_shards, tmp_path):
    """Not MLflow's four minutes of retries then a traceback: its HTTP retries are bounded, and the
    refusal names the key and the reason."""
    import socket
    import time

    with socket.socket() as free:   # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    run = dist_lc(["train", "--config", "configs/smoke.yaml", "--run-dir", str(tmp_path / "run"),
                   *sets(tiny_shards, "train.epochs=1", "train.loggers=[mlflow]",
                         f"train.mlflow_uri=http://127.0.0.1:{port}")])
    assert time.monotonic() - started < 90
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        f"error: train.mlflow_uri http://127.0.0.1:{port}: MLflow does not take the run ([Errno 111] Connection "
        "refused); check the server, or drop mlflow from train.loggers"), run.stderr[-2000:]


def test_epochs_mlflow_does_not_take_are_warnings_and_the_run_stops_trying(tmp_path, monkeypatch):
    from dist_lc import run_log
    from dist_lc.config import load_config

    said = []
    cfg = load_config(None, [f"train.mlflow_uri={(tmp_path / 'mlruns').as_uri()}"])
    (tmp_path / "run").mkdir()
    tracked = run_log.MLflowRun(tmp_path / "run", cfg, resumed=False, warn=said.append)
    calls = []

    def refused(*args, **kwargs):
        calls.append(1)
        raise OSError(111, "Connection refused")

    monkeypatch.setattr(tracked.client, "log_batch", refused)
    for epoch in range(1, 6):
        tracked.epoch({"epoch": epoch, "step": epoch, "train_loss": 1.0})
    assert len(calls) == run_log.MLFLOW_GIVE_UP == len(said)
    assert said[0].startswith("warning: MLflow at file:") and "did not take epoch 1 ([Errno 111] Connection refused)" \
        in said[0]
    assert said[-1].endswith("(no more tries: metrics.csv has every epoch)")
