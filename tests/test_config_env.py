"""Config loading (unknown keys, types, overrides, round trip) and reading the distributed environment."""
from __future__ import annotations

import pytest

from shard_tools.errors import InputError
from dist_lc.config import from_dict, load_config, save_config, to_dict, read_yaml
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
    ("train.micro_batch_size=5", "does not divide train.batch_size 32"),
    ("data.crop=100", "data.crop 100 must be divisible by 8"),
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


def test_batch_script_outside_srun_is_a_single_process():
    """The batch step sees SLURM_NTASKS=2 but is one process: it must not wait for a second rank."""
    env = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "vm"})
    assert env.world_size == 1 and env.source == "single"


@pytest.mark.parametrize("nodelist,first", [("vm", "vm"), ("node[01-04,07]", "node01"), ("a1,b2", "a1"),
                                            ("gpu[3,5]", "gpu3")])
def test_first_host_of_a_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the parser, not scontrol
    assert first_host(nodelist) == first
