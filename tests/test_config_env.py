"""Config loading (unknown keys, types, overrides, round trip) and reading the distributed environment."""
from __future__ import annotations

import os

import pytest

from lc_common.errors import InputError
from dist_lc.config import batch_layout, describe, from_dict, load_config, save_config, to_dict, read_yaml
from dist_lc.distributed import first_host, read_env


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = load_config("configs/benchmark.yaml", ["train.epochs=3", "data.crop=128", "optim.lr=3e-4",
                                                 "launcher.slurm_extra={qos: high}", "data.fold=null"])
    assert (cfg.train.epochs, cfg.data.crop, cfg.optim.lr, cfg.data.fold) == (3, 128, 3e-4, None)
    assert cfg.launcher.slurm_extra == {"qos": "high"}
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(from_dict(read_yaml(tmp_path / "config.yaml"))) == to_dict(cfg)


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")  # PyYAML reads this as a string
    assert load_config(path).optim.lr == 1e-3


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.epochs=abc", "'train.epochs': expected an integer"),
    ("train.channels_last=3", "'train.channels_last': expected true/false"),
    ("optim.lr=fast", "'optim.lr': expected a number"),
    ("optim.name=lamb", "'optim.name': 'lamb' is not one of"),
    ("data.crop=100", "'data.crop': 100 must be divisible by 8"),
    ("data.crop=512", "'data.crop': 512 is out of range (allowed: 8 to 256)"),
    ("optim.lr=-0.1", "'optim.lr': -0.1 is out of range"),
    ("optim.lr=0", "'optim.lr': 0.0 is out of range"),
    ("train.epochs=0", "'train.epochs': 0 is out of range (allowed: at least 1)"),
    ("train.time_limit=0", "'train.time_limit': 0 is out of range (allowed: more than 0 minutes; null: no time "
                           "limit)"),
    ("data.workers=-1", "'data.workers': -1 is out of range (allowed: 0 to 64)"),
    ("train.ema_decay=1.5", "'train.ema_decay': 1.5 is out of range"),
    ("schedule.factor=1", "'schedule.factor': 1 is out of range"),
    ("optim.lr=.nan", "'optim.lr': expected a number"),
    ("train.precision=bf61", "'train.precision': 'bf61' is not one of auto, fp32, bf16, fp16 (did you mean 'bf16'?)"),
    ("train.dist_timeout_s=120", "'data.wait_timeout_s': 300 s is not below train.dist_timeout_s 120 s"),
    ("train.epochs=[1", "invalid YAML value"),
    ("train", "expected key=value"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(InputError) as err:
        load_config("configs/benchmark.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_a_file_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  filter: 32\n")
    with pytest.raises(InputError, match="unknown config key 'model.filter' .did you mean 'model.filters'"):
        load_config(path)


def test_a_loader_wait_longer_than_the_collective_timeout_is_refused_only_with_workers():
    """Without loader workers a rank never waits on them, so the two timeouts need no order."""
    cfg = load_config("configs/benchmark.yaml", ["data.workers=0", "train.dist_timeout_s=20"])
    assert cfg.data.wait_timeout_s > cfg.train.dist_timeout_s


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="config file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_single_process_without_launcher_variables():
    env = read_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_torchrun_variables_win_over_slurm():
    """torchrun inside an sbatch allocation: the torchrun ranks count, not Slurm's."""
    env = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (3, 4, 1, "n1", "torchrun")


def test_srun_step_variables():
    env = read_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]",
                    "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu07" and env.source == "slurm"
    assert env.master_port == read_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8",
                                        "SLURM_JOB_ID": "4242"}).master_port  # same port on every task
    ports = {read_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_ID": job,
                       "SLURM_STEP_ID": step}).master_port for job in ("4242", "24242", "42_42") for step in "01"}
    assert len(ports) == 6 and all(1024 < p < 32768 for p in ports)   # other steps, other jobs: other ports
    uneven = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "4,2",
              "SLURM_NODEID": "1", "SLURM_LOCALID": "1"}
    assert read_env(uneven).local_world_size == 2
    assert read_env({**uneven, "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "2"}).local_world_size == 1


def test_a_rank_uses_no_more_threads_than_slurm_granted_its_task():
    """A cluster without CPU binding leaves each job the node's whole mask: --cpus-per-task bounds the threads."""
    from dist_lc.distributed import _cpu_threads

    step = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_JOB_ID": "7"}
    assert read_env(step).cpus_per_task is None
    granted = read_env({**step, "SLURM_CPUS_PER_TASK": "1"})
    assert granted.cpus_per_task == 1 and _cpu_threads(granted) == 1
    assert _cpu_threads(read_env(step)) == max(1, len(os.sched_getaffinity(0)))


def test_concurrent_local_jobs_get_disjoint_cores():
    from dist_lc.cv.executors import cpu_slice

    cores = sorted(os.sched_getaffinity(0))
    assert cpu_slice(0, 1) is None  # one job at a time: the whole machine
    slices = [cpu_slice(k, len(cores)) for k in range(len(cores))]
    assert sorted(c for s in slices for c in s) == cores
    assert all(len(s) == 1 for s in slices)
    assert cpu_slice(len(cores), len(cores) + 1) == (cores[len(cores) % len(cores)],)  # more jobs than cores


def test_batch_script_outside_srun_is_a_single_process():
    """The batch step sees SLURM_NTASKS=2 but is one process: it must not wait for a second rank."""
    env = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "vm"})
    assert env.world_size == 1 and env.source == "single"


@pytest.mark.parametrize("nodelist,first", [("vm", "vm"), ("node[01-04,07]", "node01"), ("a1,b2", "a1"),
                                            ("gpu[3,5]", "gpu3")])
def test_first_host_of_a_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the parser, not scontrol
    assert first_host(nodelist) == first


def test_a_recipe_can_start_from_a_base_recipe(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 64\noptim:\n  lr: 0.01\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=0.02"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (3, 64, 0.02)   # child, base, --set


def test_base_recipes_in_a_cycle_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(InputError, match=r"base recipes form a cycle \(a.yaml → b.yaml → a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(InputError, match="missing.yaml: config file does not exist"):
        load_config(tmp_path / "c.yaml")


def test_cv5_is_the_benchmark_recipe_with_its_changes():
    cv5, bench = to_dict(load_config("configs/cv5.yaml")), to_dict(load_config("configs/benchmark.yaml"))
    for section in ("model", "loss", "optim", "schedule"):
        assert cv5[section] == bench[section], section
    assert cv5["launcher"]["executor"] == "slurm" and cv5["cv"]["tta"] is True


@pytest.mark.parametrize("recipe", ["benchmark", "cv5", "recommended", "smoke", "demo"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_shipped_recipes_run_on_1_2_4_and_8_ranks(recipe, world):
    t = load_config(f"configs/{recipe}.yaml").train
    layout = batch_layout(t, world)
    assert layout.micro * layout.accum * world == t.batch_size and layout.micro <= t.micro_batch_size


def test_a_batch_that_ranks_cannot_share_names_both_ways_out():
    with pytest.raises(InputError) as err:
        batch_layout(load_config("configs/benchmark.yaml").train, 3)
    assert "multiple of 3" in str(err.value) and "optim.lr" in str(err.value) and "divides 32" in str(err.value)


def test_print_config_lists_every_key_with_help_and_default():
    text = describe(load_config("configs/smoke.yaml"))
    cfg = to_dict(load_config("configs/smoke.yaml"))
    for section, keys in cfg.items():
        assert f"\n{section}:" in f"\n{text}"
        for key in keys:
            line = next(x for x in text.splitlines() if x.startswith(f"  {key}:"))
            assert "# " in line and "default: " in line.split("# ", 1)[1]
    assert "  epochs: 2 " in text and "[default: 90]" in text   # smoke's value, the built-in default
    assert "[one of: adam, adamw, rmsprop, adagrad, sgd; default: adam]" in text   # choices from the Literal
    assert "[any of: tensorboard, mlflow; default: [tensorboard]]" in text


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "rank 3 of world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "not a port"),
])
def test_a_bad_launcher_environment_is_one_clear_error(environ, message):
    with pytest.raises(InputError, match=message):
        read_env(environ)


def test_a_process_group_the_caller_opened_is_left_open(tmp_path, monkeypatch):
    """A script that opened its own group and calls into dist_lc keeps its group afterwards."""
    import torch.distributed as dist

    from dist_lc.distributed import process_group

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with process_group("cpu"):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_more_local_ranks_than_gpus_is_one_line(monkeypatch):
    """Two ranks on one of several GPUs fail deep in NCCL; one GPU per task (srun's binding) is fine."""
    from dist_lc.distributed import DistEnv, pick_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    with pytest.raises(InputError, match=r"^rank 6: local rank 2, but its node shows 2 GPUs: one rank per GPU"):
        pick_device(DistEnv(rank=6, world_size=8, local_rank=2, local_world_size=4), "cuda")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.set_device", lambda index: None)
    assert pick_device(DistEnv(rank=6, world_size=8, local_rank=2, local_world_size=4), "cuda").index == 0


@pytest.mark.parametrize("environ, name", [
    ({"SLURM_JOB_ID": "4242", "TORCHELASTIC_RUN_ID": "6c1e-a-new-uuid-each-start"}, "4242"),   # torchrun --standalone in a job
    ({"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "80"}, "77_3"),
    ({"TORCHELASTIC_RUN_ID": "my-rdzv"}, "my-rdzv"),
])
def test_a_launch_keeps_its_name_across_requeues(monkeypatch, environ, name):
    """The default run folder's name: a requeued Slurm job keeps its id, also when it runs torchrun
    --standalone, whose rendezvous id is new at every start (the requeue would start over)."""
    from dist_lc.distributed import launch_id

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert launch_id() == name


def test_what_rank_0_does_alone_ends_every_rank_alike(tmp_path):
    """distributed.on_main: rank 0's value on every rank; its InputError raised by every rank; any
    other exception raised on rank 0 and named on the others, none left waiting in the broadcast."""
    from torchrun_util import torchrun

    script = tmp_path / "on_main.py"
    script.write_text(
        "import os, sys\n"
        "from lc_common.errors import InputError\n"
        "from dist_lc import distributed\n"
        "def bad_input(): raise InputError('x.tif: truncated')\n"
        "def bug(): return {}['key']\n"
        "with distributed.process_group('cpu', 30):\n"
        "    for fn in (lambda: os.environ['RANK'], bad_input, bug):\n"
        "        try:\n"
        "            got = repr(distributed.on_main(fn))\n"
        "        except Exception as exc:\n"
        "            got = f'{type(exc).__name__}: {exc}'\n"
        # One write per line: the ranks share an unbuffered pipe.
        "        sys.stdout.write(f\"rank {os.environ['RANK']} {got}\\n\")\n")
    proc = torchrun([str(script)], timeout=120)
    lines = sorted(x for x in proc.stdout.splitlines() if x.startswith("rank "))
    assert lines == ["rank 0 '0'", "rank 0 InputError: x.tif: truncated", "rank 0 KeyError: 'key'",
                     "rank 1 '0'", "rank 1 InputError: x.tif: truncated",
                     "rank 1 RuntimeError: rank 0 failed: KeyError: 'key'"], proc.stdout + proc.stderr[-2000:]


UNTIMED = """
import sys, time
sys.path.insert(0, {repo!r})
from dist_lc import distributed

with distributed.process_group("cpu", timeout_s=2):
    if distributed.is_main():
        time.sleep(6)   # three collective timeouts: a broadcast would have ended rank 1 meanwhile
    got = distributed.broadcast_untimed({{"verdict": [0, "error", "a full disk"]}}, poll_s=0.2)
    print("rank", distributed.read_env().rank, "got", got, flush=True)
"""


def test_a_word_from_rank_0_waits_past_the_collective_timeout(tmp_path):
    """What rank 0 does alone in a time that grows with the work (the overviews of a large map)."""
    from torchrun_util import REPO, torchrun

    script = tmp_path / "untimed.py"
    script.write_text(UNTIMED.format(repo=str(REPO)))
    proc = torchrun([str(script)], nproc=2, timeout=120)
    assert proc.stdout.count("got {'verdict': [0, 'error', 'a full disk']}") == 2, proc.stdout + proc.stderr[-2000:]


def test_a_rank_whose_launcher_died_before_it_started_to_watch_exits():
    """Reparented while it imported torch: its parent now is not the launcher it expects."""
    import subprocess
    import sys

    from torchrun_util import REPO

    code = ("import time; from dist_lc import distributed; "
            "distributed.watch_parent(expected=b'submitit.local._local'); time.sleep(30)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1 and "the launcher of this rank was gone before it started" in proc.stderr, proc.stderr
