"""Every choice that a config field declares (its ``Literal``) is implemented, and nowhere else listed.

The choices are walked from the config's own declarations, so a choice added to a ``Literal`` is a
new case here: it fails until the code that dispatches on it builds what the choice names (a
fallback to another choice is what these cases catch) and this file knows what that is.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from dist_lc import cli, config
from dist_lc.config import Config, LauncherConfig, TrainConfig, load_config
from lc_common.errors import InputError

COUNTS = np.array([0, 20643, 60971025, 404760981, 277012377, 96473046, 333407133, 9775295, 1071, 29404605.0])


def declared_choices() -> list[tuple[str, str]]:
    """(``section.field``, choice) for every choice of every config field that declares some."""
    found = []
    for section, cls in typing.get_type_hints(Config).items():
        for name, hint in typing.get_type_hints(cls).items():
            found += [(f"{section}.{name}", choice) for choice in config._literal_values(hint)]
    return found


def expected(table: dict, choice: str):
    """What this file expects of ``choice``; a choice it does not know yet fails with its name."""
    if choice not in table:
        pytest.fail(f"choice {choice!r} is declared but tests/test_choices.py does not know what it builds")
    return table[choice]


# ----------------------------------------------------------------------------- one check per dispatched field

def check_normalize(choice, tmp_path):
    from dist_lc.model import normalisation_stats

    manifest = SimpleNamespace(channel_mean=np.array([1.0, 2.0, 3.0, 4.0]), channel_std=np.array([5.0, 6.0, 7.0, 8.0]))
    want = expected({"manifest": ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]),
                     "max": ([0.0] * 4, [24356.0] * 4)}, choice)
    mean, std = normalisation_stats(choice, manifest)
    assert (list(mean), list(std)) == want


def _net(**model):
    from dist_lc.model import build_network

    torch.manual_seed(0)
    return build_network(config.ModelConfig(**{"filters": 16, "upconv_filters": 16, "groups": 4, **model}))


def check_norm(choice, tmp_path):
    want = expected({"batch": nn.BatchNorm2d, "group": nn.GroupNorm}, choice)
    kinds = {type(m) for m in _net(norm=choice).modules()
             if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))}
    assert kinds == {want}


def check_init(choice, tmp_path):
    """he_normal: Keras' (zero biases, std sqrt(2 / fan_in)); torch: torch's own (uniform biases,
    std 1 / sqrt(3 fan_in))."""
    std_times_root_fan_in, zero_biases = expected({"he_normal": (math.sqrt(2.0), True),
                                                   "torch": (1 / math.sqrt(3.0), False)}, choice)
    convs = [m for m in _net(init=choice).modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    widest = max(convs, key=lambda m: m.weight.numel())
    fan_in = widest.weight[0].numel()
    assert widest.weight.std().item() * math.sqrt(fan_in) == pytest.approx(std_times_root_fan_in, rel=0.1)
    assert all(bool((m.bias == 0).all()) for m in convs) is zero_biases


def check_class_weights(choice, tmp_path):
    from dist_lc.losses import class_weights

    scored = COUNTS[2:]
    inverse = scored.sum() / (8 * scored)
    want = expected({"none": np.ones(8), "inverse_frequency": inverse,
                     "sqrt_inverse_frequency": np.sqrt(inverse) / np.sqrt(inverse).mean()}, choice)
    w = class_weights(COUNTS, choice).numpy()
    assert w[:2].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(w[2:], want, rtol=1e-6)


def check_optimizer(choice, tmp_path):
    from dist_lc.optim import build_optimizer

    cfg = load_config(None, [f"optim.name={choice}"])
    optimizer = build_optimizer(cfg, nn.Linear(2, 2).parameters())
    assert type(optimizer).__name__.lower() == choice   # Adam, AdamW, RMSprop, Adagrad, SGD
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr


def check_schedule(choice, tmp_path):
    from dist_lc.optim import WarmupCosine, build_optimizer, build_scheduler

    cfg = load_config(None, [f"schedule.name={choice}", "schedule.warmup_epochs=1", "train.epochs=10"])
    scheduler = build_scheduler(cfg, build_optimizer(cfg, nn.Linear(2, 2).parameters()), steps_per_epoch=5)
    lambdas = getattr(scheduler, "lr_lambdas", [None])
    kind = ("plateau" if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            else "cosine" if isinstance(lambdas[0], WarmupCosine)
            else "constant" if all(lambdas[0](step) == 1.0 for step in (0, 1, 25, 49, 1000)) else "something else")
    assert kind == expected({"plateau": "plateau", "cosine": "cosine", "constant": "constant"}, choice)


def check_micro_batch(choice, tmp_path):
    """auto: the micro-batch that the memory probe found (here 4), instead of the configured number."""
    t = load_config(None, [f"train.micro_batch_size={choice}", "train.batch_size=16"]).train
    layout = config.batch_layout(t, world=1, micro_cap=4)
    assert (layout.micro, layout.accum) == expected({"auto": (4, 4)}, choice)


def check_precision(choice, tmp_path):
    from dist_lc.precision import cpu_has_native_bf16, resolve_precision

    auto = torch.bfloat16 if cpu_has_native_bf16() else None   # on a CPU: native bf16, else fp32
    want = expected({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": auto}, choice)
    assert resolve_precision(choice, torch.device("cpu")) is want


def check_logger(choice, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from dist_lc.run_log import MLflowRun, RunLog

    kind = expected({"tensorboard": ("writer", SummaryWriter), "mlflow": ("mlflow", MLflowRun)}, choice)
    cfg = load_config(None, [f"train.loggers=[{choice}]", f"train.mlflow_uri={(tmp_path / 'mlruns').as_uri()}"])
    log = RunLog(tmp_path / "run", enabled=True, cfg=cfg)
    try:
        started = {"writer": log.writer, "mlflow": log.mlflow}
        assert isinstance(started.pop(kind[0]), kind[1])
        assert set(started.values()) == {None}   # only the logger named
    finally:
        log.close()


def check_device(choice, tmp_path):
    from dist_lc.distributed import pick_device, read_env

    cuda = torch.cuda.is_available()
    want = expected({"cpu": "cpu", "cuda": "cuda" if cuda else InputError, "auto": "cuda" if cuda else "cpu"}, choice)
    if want is InputError:
        with pytest.raises(InputError, match="cuda"):
            pick_device(read_env({}), choice)
        return
    assert pick_device(read_env({}), choice).type == want


def check_executor(choice, tmp_path):
    from dist_lc.cv.executors import executor_class

    want = expected({"local": "LocalExecutor", "slurm": "SlurmExecutor"}, choice)
    assert type(executor_class(choice)(LauncherConfig(), tmp_path, 1).engine).__name__ == want   # submitit's


def check_implementation(choice, tmp_path):
    """Which kernels the optimizer was built with (on a CPU, ``auto`` leaves torch's default)."""
    from dist_lc.optim import build_optimizer

    cfg = load_config(None, ["optim.name=adam", f"optim.implementation={choice}"])
    defaults = build_optimizer(cfg, nn.Linear(2, 2).parameters(), torch.device("cpu")).defaults
    built = "fused" if defaults.get("fused") else {True: "foreach", False: "for_loop", None: "default"}[defaults["foreach"]]
    assert built == expected({"auto": "default", "fused": "fused", "foreach": "foreach", "for_loop": "for_loop"},
                             choice)


def check_compile(choice, tmp_path):
    from dist_lc.compiling import compiles

    want = expected({"auto": {"cpu": False, "cuda": True}}, choice)
    assert {kind: compiles(choice, torch.device(kind)) for kind in ("cpu", "cuda")} == want


def check_compile_mode(choice, tmp_path):
    """The inductor options each mode turns on (CUDA graphs, kernel autotuning), as torch.compile reads them."""
    import torch._inductor

    graphs, autotune = "triton.cudagraphs", "max_autotune"
    want = expected({"default": set(), "reduce-overhead": {graphs}, "max-autotune-no-cudagraphs": {autotune},
                     "max-autotune": {graphs, autotune}}, choice)
    options = torch._inductor.list_mode_options(choice)
    assert {key for key in (graphs, autotune) if options.get(key)} == want


CHECKS = {
    "data.normalize": check_normalize,
    "model.norm": check_norm,
    "model.init": check_init,
    "loss.class_weights": check_class_weights,
    "optim.name": check_optimizer,
    "optim.implementation": check_implementation,
    "train.compile": check_compile,
    "train.compile_mode": check_compile_mode,
    "schedule.name": check_schedule,
    "train.micro_batch_size": check_micro_batch,
    "train.precision": check_precision,
    "train.loggers": check_logger,
    "train.device": check_device,
    "launcher.executor": check_executor,
}


@pytest.mark.parametrize("key, choice", declared_choices(), ids=[f"{k}={c}" for k, c in declared_choices()])
def test_every_declared_choice_builds_what_it_names(key, choice, tmp_path):
    if key not in CHECKS:
        pytest.fail(f"{key} declares choices but tests/test_choices.py has no check of what each one builds")
    CHECKS[key](choice, tmp_path)


def test_the_checks_are_of_declared_fields():
    assert set(CHECKS) == {key for key, _ in declared_choices()}


# ----------------------------------------------------------------------------- declared once

def _option_choices(parser: argparse.ArgumentParser, command: str, option: str):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


@pytest.mark.parametrize("command, option, section, name", [
    ("predict", "--device", TrainConfig, "device"), ("map", "--device", TrainConfig, "device"),
    ("cv", "--executor", LauncherConfig, "executor"), ("demo", "--executor", LauncherConfig, "executor"),
])
def test_command_line_options_offer_the_configs_choices(command, option, section, name):
    parser, _ = cli.build_parser()
    assert _option_choices(parser, command, option) == config.choices(section, name)


def test_a_dispatch_table_must_cover_the_declared_choices_exactly():
    with pytest.raises(TypeError, match=r"OptimConfig.name: no implementation of \['sgd'\]"):
        config.dispatch_table(config.OptimConfig, "name", dict.fromkeys(("adam", "adamw", "rmsprop", "adagrad")))
    with pytest.raises(TypeError, match=r"implemented but not declared: \['lamb'\]"):
        config.dispatch_table(config.OptimConfig, "name", dict.fromkeys(("adam", "adamw", "rmsprop", "adagrad",
                                                                          "sgd", "lamb")))
    with pytest.raises(TypeError, match="declares no choices"):
        config.choices(TrainConfig, "epochs")


def test_a_choice_that_bypassed_the_config_is_refused_not_replaced():
    """A caller that builds from a config it did not load (a config object edited in code) gets an
    error naming the choice, not another optimizer or schedule."""
    from dist_lc.optim import build_optimizer, build_scheduler

    cfg = load_config(None)
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="lamb"))
    with pytest.raises(ValueError, match="optim.name: 'lamb' is not one of adam, adamw"):
        build_optimizer(bad, nn.Linear(2, 2).parameters())
    bad = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, name="onecycle"))
    with pytest.raises(ValueError, match="schedule.name: 'onecycle' is not one of"):
        build_scheduler(bad, build_optimizer(cfg, nn.Linear(2, 2).parameters()), 5)


@pytest.mark.parametrize("value, message", [
    ("[tensorboard, mlfow]", "config key 'train.loggers': 'mlfow' is not one of tensorboard, mlflow "
                             "(did you mean 'mlflow'?)"),
    ("tensorboard", "config key 'train.loggers': expected a list, got 'tensorboard'"),
    ("[3]", "config key 'train.loggers': 3 is not one of tensorboard, mlflow"),
])
def test_each_logger_is_checked_by_the_loader(value, message):
    with pytest.raises(InputError) as err:
        load_config(None, [f"train.loggers={value}"])
    assert message in str(err.value)


def test_the_shipped_recipes_that_derive_from_recommended_name_it():
    """demo and smoke restate only what differs from the recommended recipe."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    base = config.read_yaml(configs / "recommended.yaml")
    for recipe in ("demo", "smoke"):
        raw = yaml.safe_load((configs / f"{recipe}.yaml").read_text())
        assert raw["base"] == "recommended.yaml"
        for section, keys in raw.items():
            if section != "base":
                same = [k for k, v in keys.items() if base.get(section, {}).get(k, "<unset>") == v]
                assert not same, f"{recipe}.yaml restates {section}.{same[0]} of recommended.yaml"


@pytest.mark.parametrize("has_kernel", [True, False])
@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_auto_fuses_the_optimizer_on_cuda_only_where_torch_has_its_kernel(monkeypatch, name, has_kernel):
    from dist_lc import optim

    monkeypatch.setattr(optim, "has_fused_kernel", lambda n, key: has_kernel and key == "CUDA")
    o = load_config(None, [f"optim.name={name}"]).optim
    assert optim.implementation(o, torch.device("cuda")) == ({"fused": True} if has_kernel else {})
    assert optim.implementation(o, torch.device("cpu")) == {}


def test_the_fused_kernels_auto_asks_for_are_torchs_own():
    """Each fusable optimizer's kernel under the name ``auto`` probes (this CPU build registers them all
    for the CPU): a misspelt name would silently never fuse on CUDA."""
    from dist_lc.optim import FUSABLE, has_fused_kernel

    assert all(has_fused_kernel(name, "CPU") for name in FUSABLE)
