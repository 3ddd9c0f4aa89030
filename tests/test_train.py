"""The trainer with real processes: torchrun (gloo on CPU), resume after SIGKILL, two nodes, bad input."""
from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from dist_lc import precision
from dist_lc import train as train_mod
from dist_lc.run_dir import diverged
from torchrun_util import REPO, dist_lc, free_port, torchrun

SMOKE = ["--config", "configs/smoke.yaml"]


def small(shards, *extra):
    """The smoke recipe shrunk further for tests: 32-pixel crops, one loader worker."""
    return ["--set", f"data.shards={shards}", "--set", "data.crop=32", "--set", "data.workers=1", *extra]


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_ranks_torchrun_trains_on_real_shards(packed_sample, tmp_path):
    run = tmp_path / "run"
    torchrun(["-m", "dist_lc", "train", *SMOKE, *small(packed_sample), "--run-dir", str(run)])
    rows = read_metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["val_kl"])) for r in rows)
    assert int(rows[-1]["val_tiles"]) == 60  # fold 0 of 300 tiles, each counted once over 2 ranks
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert (run / "config.yaml").is_file() and list((run / "plots").glob("*.png"))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * (240 // 16)


def test_validation_of_two_ranks_scores_what_predict_and_eval_score(packed_sample, sample_root, tmp_path):
    """Every rank validates with rank 0's BatchNorm statistics, those the checkpoint holds: the val_kl
    of metrics.csv is the score of `dist-lc predict` + `dist-lc eval` of that checkpoint (bf16)."""
    from dist_lc.evaluate import evaluate_csv
    from lc_common.atomic import write_csv_atomic
    from dist_lc.predict import predict

    run = tmp_path / "run"
    torchrun(["-m", "dist_lc", "train", *SMOKE, "--set", f"data.shards={packed_sample}", "--set", "data.workers=1",
              "--set", "train.epochs=1", "--set", "train.plot_every=0", "--run-dir", str(run)])
    val_kl = float(read_metrics(run)[-1]["val_kl"])
    write_csv_atomic(tmp_path / "f0.csv", predict([run / "checkpoints" / "best.pt"], packed_sample, "fold:0", workers=0))
    assert evaluate_csv(sample_root / "train_labels.csv", tmp_path / "f0.csv")["kl"] == pytest.approx(val_kl, rel=1e-4)


@pytest.mark.parametrize("world,batch,micro,compiled", [(2, 8, 4, False), (1, 16, 4, False), (2, 8, 2, True)])
def test_ddp_and_accumulation_equal_one_big_batch(packed_sample, tmp_path, world, batch, micro, compiled):
    """(2 ranks × micro b) == (1 rank × batch 2b); (accumulation 4 × b) == (batch 4b): GroupNorm, SGD, 2 steps.

    Compiled: the compiled network inside DDP, with accumulation (no_sync), against the compiled
    single process; the network is wide enough that dynamo splits its graph at DDP's gradient
    buckets (as for the full-size networks). The worker compiles with dynamo's aot_eager backend
    (tests/workers/equivalence.py says why), so the two may differ by no more than the compiled single
    process differs from the eager one, or 1e-5 (a lost or doubled micro-batch gradient would differ by
    about as much as the weights moved)."""
    worker = str(REPO / "tests" / "workers" / "equivalence.py")
    extra = ["compile", "wide"] if compiled else []

    def run(out, micro_batch, nproc=1, *flags):
        args = [worker, str(packed_sample), str(out), str(batch), str(micro_batch), "2", *flags]
        if nproc == 1:
            subprocess.run([sys.executable, *args], check=True, timeout=300, cwd=REPO)
        else:
            torchrun(args, nproc=nproc)
        return torch.load(out, weights_only=True)

    a, b = run(tmp_path / "big.pt", batch, 1, *extra), run(tmp_path / "split.pt", micro, world, *extra)
    floats = [k for k, v in a["final"].items() if v.is_floating_point()]
    moved = max(float((a["final"][k] - a["init"][k]).abs().max()) for k in floats)
    assert moved > 1e-3  # the steps changed the weights far more than any tolerance below
    if not compiled:
        for name, value in a["final"].items():
            torch.testing.assert_close(value, b["final"][name], rtol=1e-5, atol=1e-5, msg=f"{name} differs")
        return
    assert b["ddp_buckets"] >= 2 and a["ddp_buckets"] == 0   # the split graph ran, under DDP only
    eager = run(tmp_path / "eager.pt", batch, 1, "wide")
    apart = {k: float((a["final"][k] - b["final"][k]).abs().max()) for k in floats}
    compile_noise = max(float((a["final"][k] - eager["final"][k]).abs().max()) for k in floats)
    worst = max(apart, key=apart.get)
    assert apart[worst] <= max(compile_noise, 1e-5), (worst, apart[worst], compile_noise, moved)


def test_the_multi_node_example_runs_on_8_ranks_as_2_nodes_of_4(packed_sample, tmp_path):
    """docs/slurm.md's two-node example (2 × 4 GPUs, configs/benchmark.yaml: batch 32, micro-batch 8) as
    2 torchrun "nodes" × 4 CPU ranks: the micro-batch becomes 4 per rank, the batch stays 32."""
    port, run = free_port(), tmp_path / "run"
    common = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lc2node"]
    sets = [f"data.shards={packed_sample}", "data.crop=32", "data.workers=0", "model.filters=8",
            "model.upconv_filters=8", "train.epochs=1", "train.plot_every=0", "train.precision=fp32"]
    args = ["-m", "dist_lc", "train", "--config", "configs/benchmark.yaml", *[a for x in sets for a in ("--set", x)],
            "--run-dir", str(run)]
    from torchrun_util import env

    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", *common, *args],
                              cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "torchrun: 8 rank(s) on cpu" in "".join(outs)
    assert "7 steps/epoch of 32 tiles (4 × 1 accumulation × 8 ranks)" in "".join(outs)   # 240 tiles // 32
    assert len(read_metrics(run)) == 1


def test_time_limit_stops_at_an_epoch_boundary(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc = dist_lc(["train", *SMOKE, *small(tiny_shards), "--set", "train.epochs=50",
                    "--set", "train.time_limit=0.01", "--set", "train.ema_decay=0.9", "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_metrics(run)) == 1 and read_metrics(run)[0]["val_kl"]  # the last epoch is validated
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["ema"] is not None  # validated and saved with EMA weights


def test_a_run_that_reaches_its_last_epoch_within_the_time_limit_is_not_said_to_be_cut_short(tiny_shards,
                                                                                              tmp_path):
    """Its one epoch is its schedule's last: the limit, too short for another, stops nothing."""
    run = tmp_path / "run"
    proc = dist_lc(["train", *SMOKE, *small(tiny_shards), "--set", "train.epochs=1", "--set", "train.time_limit=0.01",
                    "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_metrics(run)) == 1 and "stopping after epoch" not in (run / "train.log").read_text()


def test_a_nan_score_of_an_early_epoch_is_not_the_run_s_best():
    """As RunLog.rows reads metrics.csv back: a NaN written as "nan", an epoch not validated as None."""
    rows = [{"epoch": 1.0, "val_kl": float("nan"), "train_loss": 0.9, "epoch_time_s": 1.0},
            {"epoch": 2.0, "val_kl": 0.3, "train_loss": 0.5, "epoch_time_s": 1.0},
            {"epoch": 3.0, "val_kl": None, "train_loss": 0.4, "epoch_time_s": 1.0}]
    summary = train_mod.summarise_rows(rows)
    assert (summary["best_epoch"], summary["best_val_kl"], summary["final_train_loss"]) == (2, 0.3, 0.4)


def test_unsettled_batchnorm_statistics_are_reported(tiny_shards, tmp_path):
    """Keras' momentum over a short run leaves the running statistics near (0, 1): the log says so."""
    run = tmp_path / "run"
    proc = dist_lc(["train", *SMOKE, *small(tiny_shards), "--set", "train.epochs=1",
                    "--set", "model.bn_momentum=0.01", "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run / "train.log").read_text().splitlines()
    assert any("BatchNorm normalises over 8 tiles at a time, not the batch's 16" in x for x in log)
    line = next(x for x in log if "BatchNorm running statistics" in x)
    assert "still their initial values (model.bn_momentum 0.01)" in line and "warning" in line


def test_unsettled_share_is_one_minus_momentum_to_the_passes():
    from dist_lc.config import from_dict

    cfg = from_dict({"model": {"norm": "batch", "bn_momentum": 0.01}})
    assert math.isclose(train_mod.unsettled_batchnorm(cfg, 56), 0.99 ** 56)
    assert train_mod.unsettled_batchnorm(from_dict({"model": {"norm": "group"}}), 1) == 0.0


@pytest.mark.parametrize("override,message", [
    (["--set", "data.shards=/nonexistent/shards"], "shard folder does not exist"),
    (["--set", "data.fold=7"], "has folds 0..4"),
    (["--set", "train.epoch=3"], "unknown config key 'train.epoch'"),
    (["--set", "train.epochs=0"], "'train.epochs': 0 is out of range (allowed: at least 1)"),
])
def test_bad_input_is_one_clear_error(packed_sample, tmp_path, override, message):
    proc = dist_lc(["train", *SMOKE, "--set", f"data.shards={packed_sample}", *override,
                    "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_manifest_is_refused(packed_sample, tmp_path):
    (tmp_path / "shards").mkdir()
    proc = dist_lc(["train", *SMOKE, "--set", f"data.shards={tmp_path / 'shards'}", "--run-dir", str(tmp_path / "r")])
    assert proc.returncode == 2 and "no manifest" in proc.stderr


def test_nan_loss_stops_with_error_and_saves_nothing_new(packed_sample, tmp_path):
    run = tmp_path / "run"
    proc = dist_lc(["train", *SMOKE, *small(packed_sample), "--set", "optim.name=sgd",
                    "--set", "optim.lr=1e30", "--set", "train.precision=fp32", "--run-dir", str(run)])
    assert proc.returncode == 1
    assert "loss is not finite" in proc.stderr.strip().splitlines()[-1]
    assert not (run / "checkpoints" / "last.pt").exists()
    assert diverged(run)   # what a search reads: the recipe's outcome, not a broken job


def test_ctrl_c_ends_a_training_in_one_line_and_the_same_command_resumes(tiny_shards, tmp_path):
    """SIGINT to the process group, as a terminal sends it: one line and 130, not a traceback."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dist_lc", "train", *SMOKE, *small(tiny_shards, "--set", "train.epochs=50"),
           "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err[-3000:]   # ended by it, as a shell expects
    assert err.strip().splitlines()[-1] == ("dist-lc train: stopped by SIGINT (Ctrl-C); last.pt holds the last "
                                            "whole epoch: the same command resumes there")
    again = dist_lc(["train", *SMOKE, *small(tiny_shards, "--set", "train.epochs=2"), "--run-dir", str(run)])
    assert again.returncode == 0 and "resuming after epoch" in (run / "train.log").read_text(), again.stderr[-3000:]


def test_peak_memory_is_the_process_own_not_its_parents():
    """ru_maxrss survives exec (a child of a big process reports the parent's peak); peak_mem_mb must not."""
    ballast = bytearray(1536 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: 1.5 GiB resident here
    code = "import torch; from dist_lc.memory import peak_memory_mb; print(peak_memory_mb(torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    del ballast
    assert float(out.stdout.split()[-1]) < 1024, out.stdout  # torch imported: a few hundred MB


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_uses_bf16_on_cpu_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert precision.resolve_precision("auto", cpu) is expected
    assert precision.resolve_precision("bf16", cpu) is torch.bfloat16   # asked for explicitly: honoured
    assert precision.resolve_precision("fp32", cpu) is None


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda_is_native_bf16_else_fp16(monkeypatch, native_bf16, expected):
    """A V100 or T4 emulates bf16: is_bf16_supported() alone says yes there; auto must choose fp16."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda", 0)
    assert precision.resolve_precision("auto", cuda) is expected and asked == [False]
    assert precision.resolve_precision("bf16", cuda) is torch.bfloat16   # asked for explicitly: honoured
    assert precision.resolve_precision("fp16", cuda) is torch.float16


def test_fp16_skips_a_non_finite_step_as_the_scaler_intends_then_gives_up(packed_sample, monkeypatch):
    from dist_lc.config import load_config
    
    cfg = load_config("configs/smoke.yaml", [f"data.shards={packed_sample}", "data.crop=16", "data.workers=0",
                                             "model.filters=4", "model.upconv_filters=4", "train.precision=fp16",
                                             "train.batch_size=4", "train.micro_batch_size=4"])
    monkeypatch.setattr(train_mod, "FP16_SKIPS_ALLOWED", 2)   # fp16 on a CPU is slow: give up sooner
    s = train_mod.build_setup(cfg)
    with s.train_data.batches(0) as it:
        batches = [next(it) for _ in range(3)]
    real = s.loss_fn.forward
    before = {k: v.detach().clone() for k, v in s.net.named_parameters()}
    scale = s.scaler.get_scale()
    monkeypatch.setattr(s.loss_fn, "forward", lambda *a: real(*a) * float("inf"))
    train_mod.train_step(s, [batches[0]])                 # skipped, not fatal
    assert s.fp16_skips == 1 and s.scaler.get_scale() < scale
    assert all(torch.equal(before[k], v) for k, v in s.net.named_parameters())
    monkeypatch.setattr(s.loss_fn, "forward", real)
    train_mod.train_step(s, [batches[1]])                 # a finite step updates the weights again
    assert s.fp16_skips == 0 and any(not torch.equal(before[k], v) for k, v in s.net.named_parameters())
    monkeypatch.setattr(s.loss_fn, "forward", lambda *a: real(*a) * float("nan"))
    with pytest.raises(train_mod.TrainingError, match="in a row under fp16"):
        for _ in range(train_mod.FP16_SKIPS_ALLOWED + 1):
            train_mod.train_step(s, [batches[2]])


def test_a_non_finite_gradient_under_a_finite_loss_stops_a_clipped_run_before_its_weights_turn_nan(packed_sample):
    from dist_lc.config import load_config

    cfg = load_config("configs/smoke.yaml", [f"data.shards={packed_sample}", "data.crop=16", "data.workers=0",
                                             "model.filters=4", "model.upconv_filters=4", "train.precision=fp32",
                                             "train.batch_size=4", "train.micro_batch_size=4", "optim.clip_grad_norm=1"])
    s = train_mod.build_setup(cfg)
    with s.train_data.batches(0) as it:
        batch = next(it)
    weight = next(v for v in s.net.parameters() if v.ndim == 4)
    weight.register_hook(lambda grad: grad * float("nan"))
    before = {k: v.detach().clone() for k, v in s.net.named_parameters()}
    with pytest.raises(train_mod.Diverged, match="loss or gradient norm is not finite"):
        train_mod.train_step(s, [batch])
    assert all(torch.equal(before[k], v) for k, v in s.net.named_parameters())


def test_weights_turned_nan_by_an_epoch_last_step_are_neither_validated_nor_saved(tiny_shards, tmp_path, monkeypatch):
    """Without clipping no step looks at the gradients: NaN gradients under a finite loss on an
    epoch's last step turn the weights NaN where no later loss reports it before last.pt is written."""
    from dist_lc.config import load_config

    real = train_mod.build_setup

    def poisoned(cfg, group=None):
        s = real(cfg, group)
        calls, last = [], s.steps_per_epoch * s.layout.accum
        weight = next(v for v in s.net.parameters() if v.ndim == 4)
        weight.register_hook(lambda grad: calls.append(1) or (grad * float("nan") if len(calls) == last else grad))
        return s

    monkeypatch.setattr(train_mod, "build_setup", poisoned)
    cfg = load_config("configs/smoke.yaml", [f"data.shards={tiny_shards}", "data.crop=16", "data.workers=0",
                                             "model.filters=4", "model.upconv_filters=4", "train.precision=fp32",
                                             "train.loggers=[]", "train.plot_every=0", "train.epochs=2",
                                             "train.batch_size=8", "train.micro_batch_size=4"])
    with pytest.raises(train_mod.Diverged, match=r"the weights are not finite \(NaN/inf\) after epoch 1 .*clip_grad_norm"):
        train_mod.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "metrics.csv").exists() or len(read_metrics(tmp_path / "run")) == 0


def test_a_skipped_fp16_step_is_left_out_of_the_epoch_loss(packed_sample, monkeypatch):
    """The scaler skips a step whose gradients are not finite; its loss (inf here) must not make the
    epoch's train_loss, the score of a run without validation fold, inf."""
    from types import SimpleNamespace

    from dist_lc.config import load_config
    from dist_lc.run_log import _NoBar

    cfg = load_config("configs/smoke.yaml", [f"data.shards={packed_sample}", "data.crop=16", "data.workers=0",
                                             "model.filters=4", "model.upconv_filters=4", "train.precision=fp16",
                                             "train.batch_size=48", "train.micro_batch_size=48"])
    s = train_mod.build_setup(cfg)
    real, calls = s.loss_fn.forward, []

    def first_is_inf(*args):
        calls.append(1)
        return real(*args) * (float("inf") if len(calls) == 1 else 1.0)

    monkeypatch.setattr(s.loss_fn, "forward", first_is_inf)
    try:
        result = train_mod.train_epoch(s, 0, 0, SimpleNamespace(set=False), _NoBar())
    finally:
        s.close()
    assert math.isfinite(result["train_loss"]), result
    assert result["skipped_steps"] == 1 and s.steps_per_epoch == 5


def test_auto_precision_is_the_same_on_every_rank(packed_sample, tmp_path):
    """A rank whose device runs bf16 natively and one whose device does not (mixed GPUs; here CPUs
    told so) train in the same precision: that of the less capable one."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import os, sys\n"
        "from dist_lc import distributed, precision\n"
        "from dist_lc.config import load_config\n"
        "from dist_lc.train import build_setup\n"
        "precision.cpu_has_native_bf16 = lambda: os.environ['RANK'] == '0'\n"
        f"cfg = load_config('configs/smoke.yaml', ['data.shards={packed_sample}', 'data.workers=0',\n"
        "                                          'train.precision=auto'])\n"
        "with distributed.process_group('cpu', 30) as group:\n"
        "    s = build_setup(cfg, group)\n"
        "    s.close()\n"
        # One write per line: the ranks share an unbuffered pipe, and print() writes its parts apart.
        "    sys.stdout.write(f\"rank {os.environ['RANK']} dtype {s.dtype}\\n\")\n")
    proc = torchrun([str(script)], timeout=120)
    assert sorted(x for x in proc.stdout.splitlines() if x.startswith("rank ")) == \
        ["rank 0 dtype None", "rank 1 dtype None"], proc.stdout + proc.stderr[-2000:]


def test_a_torn_or_stray_failure_note_does_not_hide_a_peers_cause(tmp_path):
    """A note another rank was writing when it died (or a stray file) is skipped, not a ValueError."""
    from lc_common.errors import InputError
    from dist_lc.run_dir import FAILURES, first_peer_failure, record_failure

    (tmp_path / FAILURES).mkdir()
    (tmp_path / FAILURES / "rank1").write_text("1712")       # cut short after its time stamp
    (tmp_path / FAILURES / "rank_old").write_text("notes")   # no rank number
    assert first_peer_failure(tmp_path, 0, wait_s=0) is None
    record_failure(tmp_path, 2, InputError("shard x: truncated"))
    assert first_peer_failure(tmp_path, 0, wait_s=0) == (2, "input", "InputError: shard x: truncated")
    assert sorted(p.name for p in (tmp_path / FAILURES).iterdir()) == ["rank1", "rank2", "rank_old"]


def test_a_rank_whose_own_failure_note_is_the_first_blames_no_peer(tmp_path):
    """Ranks 0 and 1 both fail in a collective, after a third that left no note: each named the other
    as the one that failed first."""
    from dist_lc.run_dir import FAILURES, first_peer_failure

    (tmp_path / FAILURES).mkdir()
    (tmp_path / FAILURES / "rank0").write_text("100.000 error RuntimeError: Connection closed by peer\n")
    (tmp_path / FAILURES / "rank1").write_text("100.500 error RuntimeError: Connection closed by peer\n")
    assert first_peer_failure(tmp_path, 0, wait_s=0) is None
    assert first_peer_failure(tmp_path, 1, wait_s=0) == (0, "error", "RuntimeError: Connection closed by peer")


def test_a_run_lock_that_cannot_be_opened_is_one_line(tmp_path):
    """(A .lock of another user, mode 0644, in a shared folder; as root, a folder in its place.) Rank 0
    answers it as a problem, which the other ranks wait for in a broadcast."""
    from lc_common.errors import InputError
    from dist_lc.run_dir import RunLock

    (tmp_path / ".lock").mkdir()
    with pytest.raises(InputError, match=rf"^{tmp_path / '.lock'}: cannot open the lock \(Is a dir"):
        with RunLock(tmp_path):
            pass


@pytest.mark.parametrize("where, line", [
    ("train_step", "rank 0: out of cpu memory at train.micro_batch_size 8 (CUDA out of memory); lower "
                   "train.micro_batch_size, or set it to auto (the largest that fits, the batch kept exact)"),
    ("build_network", "rank 0: out of cpu memory while setting up the model and optimizer (CUDA out of memory); "
                      "is another process holding the GPU?"),
], ids=["in-a-step", "setting-up"])
def test_running_out_of_memory_is_one_line_naming_what_to_change(packed_sample, tmp_path, monkeypatch, capsys,
                                                                where, line):
    """In a step: the micro-batch; at set-up, before any step: a GPU that another process fills."""
    from dist_lc import cli

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")

    monkeypatch.setattr(train_mod, where, out_of_memory)
    rc = cli.main(["train", *SMOKE, *small(packed_sample), "--set", "data.workers=0", "--set", "train.loggers=[]",
                   "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and [x for x in err if x.startswith("error: ")] == [f"error: {line}"] == err[-1:], err


def test_a_validation_fold_without_a_scored_pixel_is_refused():
    """Only no_data and clouds in the fold: its KL would be 0 at every epoch, the first one best."""
    from types import SimpleNamespace

    import numpy as np

    from dist_lc.config import load_config
    from dist_lc.train import split_folds
    from lc_common.errors import InputError

    pixels = {0: [5, 5, 0, 0, 0, 0, 0, 0, 0, 0], 1: [0, 0, 3, 0, 0, 0, 0, 0, 0, 1]}
    manifest = SimpleNamespace(num_folds=2, root="shards", class_pixels=lambda folds: np.asarray(pixels[folds[0]]))
    assert split_folds(load_config("configs/smoke.yaml", ["data.fold=1"]), manifest) == ([0], [1])
    with pytest.raises(InputError, match=r"^config key 'data.fold': fold 0 of shards has no pixel of a scored class"):
        split_folds(load_config("configs/smoke.yaml", ["data.fold=0"]), manifest)


def test_the_plotted_map_is_the_map_of_the_metrics():
    """The scored class with the highest score (logits plus the prior correction's bias), never no_data
    or clouds, as the confusion matrix and ``dist-lc map`` take it."""
    import torch

    from dist_lc.train import keep_shown

    scores = torch.zeros(1, 10, 2, 2)
    scores[:, 0] = 5.0   # no_data's logit is the highest: the plot showed it
    scores[:, 3] = 1.0
    batch = {"key": ["7"], "image": torch.zeros(1, 2, 2, 4), "mask": torch.zeros(1, 2, 2, dtype=torch.uint8)}
    shown = {"key": [], "image": [], "mask": [], "pred": []}
    keep_shown(shown, batch, scores, limit=4)
    assert (shown["pred"][0] == 3).all()
