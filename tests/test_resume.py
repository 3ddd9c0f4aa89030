"""Resuming a run folder: what may differ between a run and the last.pt it resumes, what is refused
in one line, and the run folder's lock taken before any set-up."""
from __future__ import annotations

import fcntl
import shutil

import pytest
import torch
import yaml

from dist_lc import cli
from dist_lc import train as train_mod
from dist_lc.checkpoint import Checkpointer
from dist_lc.config import load_config
from lc_common.errors import InputError
from torchrun_util import torchrun

STEPS = 6   # 48 training tiles in batches of 8


def sets(shards, *extra) -> list[str]:
    """A tiny cosine run of the smoke recipe: 6 steps an epoch, fold 0 validated."""
    return [f"data.shards={shards}", "data.crop=32", "data.workers=0", "model.filters=8", "model.upconv_filters=8",
            "train.plot_every=0", "train.precision=fp32", "train.loggers=[]", "train.batch_size=8",
            "train.micro_batch_size=4", "schedule.name=cosine", "optim.lr=0.002", "schedule.min_lr=0.00002", *extra]


def small(shards, *extra):
    return load_config("configs/smoke.yaml", sets(shards, *extra))


@pytest.fixture(scope="module")
def one_epoch(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("one-epoch") / "run"
    train_mod.train(small(tiny_shards, "train.epochs=1"), run)
    return run


@pytest.fixture
def run(one_epoch, tmp_path):
    """A copy of the one-epoch run, to resume."""
    shutil.copytree(one_epoch, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("change, said", [
    ("optim.lr=0.01", "optim config (optim.lr: 0.002 there, 0.01 now)"),          # the loaded state would win
    ("schedule.name=plateau", "schedule config (schedule.name: cosine there, plateau now)"),   # did not load
    ("optim.name=sgd", "optim config (optim.name: adam there, sgd now)"),
    ("data.fold=1", "data config (data.fold: 0 there, 1 now)"),      # trained on the new validation fold
    ("loss.class_weights=inverse_frequency", "loss config (loss.class_weights: none there, inverse_frequency now)"),
])
def test_another_training_config_is_refused_in_one_line(tiny_shards, run, capsys, change, said):
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    rc = cli.main(["train", "--config", "configs/smoke.yaml",
                   *[a for s in sets(tiny_shards, "train.epochs=2", change) for a in ("--set", s)],
                   "--run-dir", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"error: {run / 'checkpoints' / 'last.pt'}: written with another {said}; resume with the "
                      "config it was trained with, or use a fresh --run-dir"), err
    assert {name: (run / name).read_bytes() for name in before} == before   # config.yaml not rewritten


def test_a_longer_cosine_run_is_refitted_and_where_it_runs_may_change(tiny_shards, run):
    """train.epochs 1 → 2 with other timeouts, kernels, precision and micro-batch: the cosine that
    last.pt holds (one epoch long) is set to two, so the run anneals at its new end instead of idling at
    min_lr."""
    result = train_mod.train(small(tiny_shards, "train.epochs=2", "train.dist_timeout_s=60", "data.wait_timeout_s=30",
                                   "optim.implementation=for_loop", "train.micro_batch_size=2",
                                   "train.precision=bf16"), run)
    assert result.epochs_done == 2
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["scheduler"]["lr_lambdas"][0]["total"] == 2 * STEPS
    assert "train.epochs 1 → 2: the run ends after epoch 2, and the cosine schedule with it" in \
        (run / "train.log").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_checkpoint_whose_config_this_version_cannot_read_is_one_line_naming_it(tiny_shards, run):
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"]["train"]["epochz"] = 3
    torch.save(state, last)
    with pytest.raises(InputError) as err:
        train_mod.train(small(tiny_shards, "train.epochs=1"), run)
    assert str(err.value).startswith(f"{last}: its config cannot be read by this version (unknown config key "
                                     "'train.epochz'"), err.value
    assert str(err.value).endswith("use a fresh --run-dir")


def test_an_fp16_run_resumes_a_checkpoint_without_scaler_state(tiny_shards, one_epoch):
    """train.precision auto: bf16 (no scaler) where it started, fp16 after a requeue onto an older GPU."""
    s = train_mod.build_setup(small(tiny_shards, "train.epochs=1"))
    try:
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        parts = {"model": s.net, "ema": s.ema, "optimizer": s.optimizer, "scheduler": s.scheduler, "scaler": scaler}
        p, resumed = Checkpointer(one_epoch, parts, s.cfg, s.manifest, 1, s.device).resume()
    finally:
        s.close()
    assert torch.load(one_epoch / "checkpoints" / "last.pt", weights_only=True)["scaler"] == {}
    assert p.epoch == 1 and scaler.get_scale() == 65536.0
    assert resumed.notes == ["fp16 gradient scaler: the checkpoint holds no scaler state (it was trained without "
                             "fp16); starting from a fresh scale of 65536"]


def test_an_unreadable_checkpoint_config_stops_every_rank_in_one_line(tiny_shards, run, tmp_path):
    """micro_batch_size auto: rank 0 reads the micro-batch chosen earlier from last.pt and hands every
    rank the value or the error; a rank 0 that failed alone left the others in the broadcast."""
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"]["train"]["epochz"] = 3
    torch.save(state, last)
    (run / "config.yaml").write_text("train: [\n")   # no longer read: last.pt's config is what resumes
    logs = tmp_path / "logs"
    overrides = sets(tiny_shards, "train.micro_batch_size=auto", "train.dist_timeout_s=10")
    args = [a for s in overrides for a in ("--set", s)]
    proc = torchrun(["--tee", "3", "--log-dir", str(logs), "-m", "dist_lc", "train", "--config", "configs/smoke.yaml",
                     *args, "--run-dir", str(run)], check=False, timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        text = "".join(p.read_text() for p in logs.glob(f"*/attempt_*/{rank}/stderr.log"))
        lines = [x for x in text.splitlines() if x.strip()]
        assert lines and lines[-1].startswith(f"error: {last}: its config cannot be read by this version"), \
            f"rank {rank}: {text[-2000:]}"


def test_the_run_folder_is_locked_before_the_set_up(tiny_shards, tmp_path, monkeypatch):
    """The set-up's micro-batch trials would run on the GPU of the training that holds the folder."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(train_mod, "build_setup", lambda *a: pytest.fail("set up while the folder is taken"))
    with open(run / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 1 on elsewhere")
        holder.flush()
        with pytest.raises(InputError, match=r"run folder in use by another training \(pid 1 on elsewhere\)"):
            train_mod.train(small(tiny_shards, "train.epochs=1"), run)


def test_a_refused_set_up_leaves_no_run_folder(tmp_path):
    with pytest.raises(InputError, match="shard folder does not exist"):
        train_mod.train(load_config("configs/smoke.yaml", [f"data.shards={tmp_path / 'none'}"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the checkpoint files themselves

def tiny_parts(seed: int = 0, **adam) -> dict:
    """A Checkpointer's parts around a 4 → 2 linear layer (no data, no set-up)."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(net.parameters(), **adam)
    return {"model": net, "ema": None, "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            "scaler": torch.amp.GradScaler("cpu", enabled=False)}


class Shards:
    identity = "the same shards"


def tiny_checkpointer(run, parts=None) -> Checkpointer:
    cfg = load_config("configs/smoke.yaml", [])
    return Checkpointer(run, parts or tiny_parts(), cfg, Shards(), 2, torch.device("cpu"))


def epoch_of(path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


def test_a_best_pt_whose_last_pt_was_never_written_is_dropped_on_resume(tmp_path):
    """best.pt of an epoch whose last.pt a crash prevented would stand beside a history that no longer
    has that epoch (the redo need not improve again): the resume keeps the earlier best.pt; when the
    crash came after last.pt, the epoch's best.pt takes its name."""
    from dist_lc.checkpoint import BEST, NEXT_BEST, Progress

    run, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ckpt = tiny_checkpointer(run)
    ckpt.save_best(Progress(epoch=1, step=6, best=0.5))
    ckpt.save_last(Progress(epoch=1, step=6, best=0.5))
    assert epoch_of(folder / BEST) == 1 and not (folder / NEXT_BEST).exists()
    ckpt.save_best(Progress(epoch=2, step=12, best=0.4))   # then killed before last.pt
    p, _ = tiny_checkpointer(run).resume()
    assert p.epoch == 1 and epoch_of(folder / BEST) == 1 and not (folder / NEXT_BEST).exists()
    ckpt.save_best(Progress(epoch=2, step=12, best=0.4))
    torch.save(ckpt.state(Progress(epoch=2, step=12, best=0.4)), folder / "last.pt")   # killed after last.pt
    p, _ = tiny_checkpointer(run).resume()
    assert p.epoch == 2 and epoch_of(folder / BEST) == 2 and not (folder / NEXT_BEST).exists()


def test_a_resume_runs_the_optimizer_kernels_this_launch_chose(tmp_path):
    """The loaded state dict would bring back the saved run's kernels (a CPU run resumed on CUDA
    never fused; a kernel chosen to work around a problem silently ignored)."""
    from dist_lc.checkpoint import Progress

    tiny_checkpointer(tmp_path, tiny_parts(foreach=False)).save_last(Progress(epoch=1, step=6, best=0.5))
    parts = tiny_parts(foreach=True)
    tiny_checkpointer(tmp_path, parts).resume()
    assert [g["foreach"] for g in parts["optimizer"].param_groups] == [True]


def test_an_empty_checkpoint_is_one_line_naming_it(tmp_path):
    """A 0-byte file (an interrupted copy of a run folder): torch raises an EOFError without a message."""
    from dist_lc.checkpoint import load

    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'last.pt'}: not a dist_lc checkpoint \(EOFError: "):
        load(tmp_path / "last.pt")


RESUME_APART = """
import os, sys, torch
sys.path.insert(0, os.getcwd())   # the checkout under test (torchrun runs this with the repository as its cwd)
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from dist_lc import distributed
from lc_common.errors import InputError
from test_resume import tiny_checkpointer
with distributed.process_group("cpu", 60):
    try:   # the same run folder as two nodes see it: each its own copy
        p, _ = tiny_checkpointer(os.path.join(sys.argv[1], "node" + os.environ["RANK"])).resume()
        said = f"resumed epoch {p.epoch}"
    except InputError as exc:
        said = f"error: {exc}"
    sys.stdout.write(said + "\\n")   # one write: the ranks share the stream (print writes the newline apart)
    sys.stdout.flush()
"""


@pytest.mark.parametrize("node1", ["same file", "older", "none"])
def test_ranks_that_read_different_last_pt_stop_together_in_one_line(tmp_path, node1):
    """A run folder on node-local disk (or a stale network view after a requeue): each rank would train
    from its own epoch and weights, then wait in collectives the others never join."""
    from dist_lc.checkpoint import Progress

    tiny_checkpointer(tmp_path / "node0").save_last(Progress(epoch=3, step=18, best=0.3))
    if node1 == "same file":
        shutil.copytree(tmp_path / "node0", tmp_path / "node1")
    if node1 == "older":
        tiny_checkpointer(tmp_path / "node1").save_last(Progress(epoch=1, step=6, best=0.5))
    script = tmp_path / "resume_apart.py"
    script.write_text(RESUME_APART)
    proc = torchrun([str(script), str(tmp_path)], timeout=120)
    said = sorted(x for x in proc.stdout.splitlines() if x.startswith(("resumed", "error")))
    missing = f"{tmp_path / 'node1' / 'checkpoints' / 'last.pt'}: checkpoint does not exist"
    expected = {
        "same file": ["resumed epoch 3", "resumed epoch 3"],
        "older": [f"error: {tmp_path / f'node{r}' / 'checkpoints' / 'last.pt'}: the ranks read different "
                  "checkpoints (rank 0: epoch 3, rank 1: epoch 1); the run folder must be one that every node "
                  "shares (--run-dir on a shared filesystem)" for r in (0, 1)],
        "none": [f"error: {missing}", f"error: rank 1 failed first: {missing}"],
    }[node1]
    assert said == sorted(expected), proc.stdout + proc.stderr[-2000:]


def test_a_resumed_run_counts_the_validation_cost_of_its_earlier_launches_until_it_validates(tmp_path):
    """train.val_every > 1 after a requeue: until this launch's first validation, the time checks
    would count validation as free, and the one forced at the limit could overrun it (killed before
    last.pt: the epoch lost). last.pt carries the dearest validation so far; a checkpoint of an
    earlier release, none."""
    from dist_lc.checkpoint import Progress
    from dist_lc.train import validation_costs

    tiny_checkpointer(tmp_path).save_last(Progress(epoch=2, step=12, best=0.4, validation_s=3.5))
    p, _ = tiny_checkpointer(tmp_path).resume()
    assert p.validation_s == 3.5
    assert validation_costs([], p) == [3.5] and validation_costs([1.0], p) == [1.0]
    # a compiling first validation counts until a second one is measured
    assert validation_costs([40.0], p, True) == [40.0] and validation_costs([40.0, 2.0, 3.0], p, True) == [2.0, 3.0]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    del state["validation_s"]
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    p, _ = tiny_checkpointer(tmp_path).resume()
    assert p.validation_s is None and validation_costs([], p) == []


def test_a_full_disk_inside_torch_save_at_best_pt_is_one_line_naming_it(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError whose context is the OSError: the error
    still names best.pt (the file is written under another name until its epoch's last.pt)."""
    from lc_common.errors import WriteError
    from dist_lc import checkpoint
    from dist_lc.checkpoint import Progress

    def full(state, f):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(WriteError) as err:
        tiny_checkpointer(tmp_path).save_best(Progress(epoch=1, step=6, best=0.5))
    assert str(err.value) == f"{tmp_path / 'checkpoints' / 'best.pt'}: cannot write: No space left on device"
