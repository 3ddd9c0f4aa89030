"""Typed run configuration: YAML → dataclasses, ``base:`` recipes, ``--set a.b=c`` overrides.

The one place that loads a config. Every key is declared once, here, with its type (choices are
``Literal`` types), its default, a one-line help and its allowed range; the loader checks all of
them and names the key of any error in one line ("did you mean" for unknown keys). The resolved
config is saved as ``config.yaml`` in every run folder and inside every checkpoint.

A recipe may start from another: ``base: benchmark.yaml`` (relative to the recipe's folder) is
loaded first and the recipe's own keys are merged over it, section by section; ``--set``
overrides come last. :func:`describe` prints the resolved config with every key's help and default
(``dist-lc train --print-config``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lc_common.atomic import write_bytes_atomic
from lc_common.errors import InputError, one_line, said
from lc_common.tiles import IMAGE_SHAPE

BASE_KEY = "base"


def option(default, help: str, *, min=None, max=None, factory=None):
    """A config field: its default, one line of help, and the inclusive range of a number."""
    meta = {"help": help, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    shards: str = option("", "shard folder or URL written by `lc-shard pack` (https://, file://, pipe:CMD)")
    fold: int | None = option(0, "validation fold (train on the others); null: train on all folds, no validation",
                              min=0)
    crop: int | None = option(None, "random square crop in pixels at train time (validation sees whole tiles)",
                              min=8, max=IMAGE_SHAPE[0])
    augment: bool = option(True, "random flips and 90/180/270° rotations, image and mask alike")
    normalize: Literal["manifest", "max"] = option(
        "manifest", "manifest: per-band standardisation from the shards' statistics | max: divide by 24356")
    workers: int = option(2, "DataLoader worker processes per rank (0: read in the training process)",
                          min=0, max=64)
    shuffle_buffer: int = option(64, "samples in each worker's shuffle buffer (training only)", min=0)
    wait_timeout_s: float = option(300.0, "seconds a rank waits for a batch from its loader workers before it "
                                   "fails (below train.dist_timeout_s, so that its cause is the one reported)",
                                   min=1.0)


@dataclass
class ModelConfig:
    num_layers: int = option(2, "U-Net depth: the input is halved num_layers + 1 times", min=0, max=6)
    filters: int = option(64, "channels of every 3×3 convolution", min=1)
    upconv_filters: int = option(96, "channels of the first convolution after each skip concatenation", min=1)
    norm: Literal["batch", "group"] = option("batch", "normalisation layers: BatchNorm or GroupNorm")
    bn_momentum: float = option(0.01, "BatchNorm momentum, torch convention (Keras 0.99 is 0.01)", min=0.0, max=1.0)
    bn_eps: float = option(1e-3, "epsilon of the normalisation layers", min=0.0)
    groups: int = option(8, "GroupNorm groups (norm: group)", min=1)
    init: Literal["he_normal", "torch"] = option("he_normal", "weight init: Keras' he_normal/glorot or torch's")
    indices: bool = option(False, "add NDVI and NDWI (from the raw bands) as input channels")


@dataclass
class LossConfig:
    class_weights: Literal["none", "inverse_frequency", "sqrt_inverse_frequency"] = option(
        "inverse_frequency", "per-class weights of the pixel cross-entropy (no_data and clouds always 0)")
    kl_weight: float = option(0.0, "weight of the tile-proportion KL term (the score itself)", min=0.0)
    prior_correction: bool = option(False, "subtract the log class weights from the logits at prediction")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "rmsprop", "adagrad", "sgd"] = option("adam", "optimizer")
    lr: float = option(1e-3, "learning rate (peak of the schedule)", min=1e-12)
    weight_decay: float = option(0.0, "weight decay (decoupled for adamw)", min=0.0)
    momentum: float = option(0.9, "momentum (sgd, rmsprop)", min=0.0, max=1.0)
    clip_grad_norm: float | None = option(None, "clip the gradients' global L2 norm to this (null: no clipping)",
                                          min=1e-9)
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = option(
        "auto", "the optimizer's kernels; auto: fused on CUDA where the optimizer has one, else torch's default")


@dataclass
class ScheduleConfig:
    name: Literal["plateau", "cosine", "constant"] = option(
        "plateau", "plateau: ×factor after patience epochs without improvement | cosine (after warmup) | constant")
    patience: int = option(20, "plateau: epochs without a better validation score", min=0)
    factor: float = option(0.5, "plateau: learning-rate multiplier, below 1", min=1e-6, max=1.0)
    warmup_epochs: int = option(0, "cosine: epochs of linear warmup", min=0)
    min_lr: float = option(0.0, "learning rate at the end of the cosine (and plateau's floor); above optim.lr, "
                           "the cosine stays at optim.lr", min=0.0)


@dataclass
class TrainConfig:
    epochs: int = option(90, "epochs to train (the cosine schedule's length)", min=1)
    batch_size: int = option(32, "effective batch: micro-batch × accumulation × ranks (exact, whatever the layout)",
                             min=1)
    micro_batch_size: int | Literal["auto"] = option(
        8, "the most tiles one device computes at once; accumulation is derived per world size. auto: the "
        "largest that fits (CUDA: trial steps; CPU: train.memory_limit_gb), same on every rank", min=1)
    memory_limit_gb: float | None = option(None, "micro_batch_size auto on a CPU: the memory one rank may use "
                                           "(null: 80% of the available memory, shared by the node's ranks)",
                                           min=0.1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto: bf16 where the device runs it natively, fp16 + gradient scaler on older GPUs, else fp32")
    channels_last: bool = option(True, "NHWC tensors: faster convolutions with oneDNN (CPU) and tensor cores")
    compile: bool | Literal["auto"] = option("auto", "torch.compile the model; auto: on CUDA, not on a CPU "
                                             "(where it does not pay), nor where a node lacks the C compiler or "
                                             "Python headers Triton needs (said in the log); its first step is "
                                             "timed apart")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = option(
        "default", "torch.compile's mode: default (fused kernels: BatchNorm's normalisation and ReLU in one "
        "pass); reduce-overhead adds CUDA graphs (one launch per graph, for launch-bound steps; more GPU "
        "memory; no gradient accumulation); max-autotune also times kernel choices (minutes of compilation)")
    sync_batchnorm: bool = option(False, "BatchNorm statistics over all ranks (SyncBatchNorm)")
    seed: int = option(0, "seed of initialisation, data order and augmentation", min=0)
    deterministic: bool = option(False, "torch.use_deterministic_algorithms (slower)")
    time_limit: float | None = option(None, "minutes (more than 0); stop at the last epoch boundary that fits "
                                      "(null: no limit)", min=0.0)
    val_every: int = option(1, "epochs between validations (the first and the last epoch are always validated)",
                            min=1)
    val_from: float = option(0.0, "validate only from this share of the planned epochs on (0: from the start); "
                             "a cosine schedule's best epochs are its last ones", min=0.0, max=1.0)
    early_stop: int | None = option(None, "stop after this many validations without a better score "
                                    "(null: never)", min=1)
    early_stop_min_delta: float = option(0.0, "early_stop: how much lower a score must be to count as better",
                                         min=0.0)
    fit_schedule: bool = option(True, "with time_limit and a cosine schedule, fit the schedule after the first "
                                "epochs so that it ends inside the time limit; shorten it later if epochs slow down")
    loggers: list[Literal["tensorboard", "mlflow"]] = option(
        None, "where metrics go besides metrics.csv (always written)", factory=lambda: ["tensorboard"])
    mlflow_uri: str | None = option(None, "MLflow tracking URI (null: MLFLOW_TRACKING_URI, else a file store "
                                    "mlruns/ beside the run folder)")
    experiment: str | None = option(None, "MLflow experiment (null: the recipe's name; dist-lc cv: its folder's name)")
    plot_every: int = option(10, "epochs between prediction plots (0: never)", min=0)
    plot_tiles: int = option(4, "validation tiles in each prediction plot", min=0, max=64)
    ema_decay: float | None = option(None, "decay of an exponential moving average of the weights, evaluated "
                                     "and saved (0 < decay < 1; null: none)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: CUDA when visible, else CPU")
    dist_timeout_s: int = option(600, "seconds a rank waits in a collective for its peers before it fails "
                                 "(bounds how long a job outlives a dead rank)", min=10)


@dataclass
class LauncherConfig:
    """Where `dist-lc cv` runs each job (Slurm through submitit, or local processes); see docs/slurm.md."""
    executor: Literal["local", "slurm"] = option("local", "local processes or Slurm jobs (`cv --executor` wins)")
    nodes: int = option(1, "nodes per job (Slurm only; the local executor has one)", min=1)
    tasks_per_node: int = option(1, "ranks per node: one per GPU (= gpus_per_node on GPU nodes)", min=1)
    gpus_per_node: int = option(0, "GPUs per node (0: CPU ranks, gloo)", min=0)
    jobs_per_gpu: int = option(1, "local executor: jobs sharing each GPU at once (when one leaves it idle, e.g. "
                               "small crops); each may use 1/N of the GPU's memory", min=1)
    cpus_per_task: int = option(1, "CPU cores per rank: data.workers + 1 is a good start", min=1)
    mem_gb: float | None = option(None, "memory per node in GB; null: the partition's default", min=0.1)
    partition: str | None = option(None, "Slurm partition")
    account: str | None = option(None, "Slurm account to charge")
    time_min: int = option(60, "minutes per job attempt; longer trainings are requeued and resume", min=1)
    max_parallel: int = option(0, "jobs at once; 0: local: what the machine allows, slurm: no cap", min=0)
    max_requeues: int = option(3, "timeouts tolerated per job (preemptions are unlimited)", min=0)
    signal_delay_s: int = option(120, "seconds before time_min at which the stop signal (USR2) comes", min=0)
    wait_min: int | None = option(None, "minutes `cv` waits for its jobs; null: derived from time_min", min=1)
    task_failed_grace_s: float = option(15.0, "local executor: seconds a job's other tasks get to record why they "
                                        "stop after one failed, before they are ended (Slurm: srun ends them)", min=0)
    setup: list = option(None, "shell lines run before each job (module load ...)", factory=list)
    slurm_extra: dict = option(None, "extra #SBATCH options, e.g. {qos: high}", factory=dict)


@dataclass
class CVConfig:
    folds: list | None = option(None, "folds to run (null: every fold of the shards)")
    tta: bool = option(False, "average the 8 flips/rotations when predicting out-of-fold and test tiles")
    calibrate: bool = option(True, "fit a per-class calibration on the out-of-fold tiles (applied when it helps)")
    second_stage: bool = option(True, "fit boosted trees on the out-of-fold log-proportions and tile features "
                                "(applied when their cross-fitted score is the lowest)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cv: CVConfig = field(default_factory=CVConfig)


# ----------------------------------------------------------------------------- choices

def _literal_values(typ) -> tuple:
    """The values of the ``Literal`` in an annotation, also inside ``X | None``, ``int | Literal[...]``
    and ``list[Literal[...]]``; () when it has none."""
    if typing.get_origin(typ) is Literal:
        return typing.get_args(typ)
    return tuple(value for arg in typing.get_args(typ) for value in _literal_values(arg))


def choices(section, name: str) -> tuple:
    """The choices that a field of a config section declares: command-line options and dispatch
    tables derive theirs from here, so that a choice is listed once."""
    values = _literal_values(typing.get_type_hints(section)[name])
    if not values:
        raise TypeError(f"{section.__name__}.{name} declares no choices")
    return values


def dispatch_table(section, name: str, table: dict) -> dict:
    """``table`` (choice → what implements it), checked when its module is imported to hold exactly
    the field's declared choices: a choice added to the config without an implementation then fails
    at once, instead of falling through to another choice at run time."""
    declared = choices(section, name)
    missing = [c for c in declared if c not in table]
    undeclared = [c for c in table if c not in declared]
    if missing or undeclared:
        raise TypeError(f"{section.__name__}.{name}: no implementation of {missing}; "
                        f"implemented but not declared: {undeclared}")
    return table


def pick(table: dict, choice: str, what: str):
    """The entry of a dispatch table for ``choice``; a ValueError naming an unknown one (a caller that
    did not go through the config's checks)."""
    try:
        return table[choice]
    except (KeyError, TypeError):
        raise ValueError(f"{what}: {choice!r} is not one of {', '.join(table)}") from None


# ----------------------------------------------------------------------------- reading values

def _did_you_mean(word: str, known, prefix: str = "") -> str:
    hint = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f" (did you mean {prefix + hint[0]!r}?)" if hint else ""


def _kind_name(typ) -> str:
    if typing.get_origin(typ) is Literal:
        return " or ".join(map(repr, typing.get_args(typ)))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(typ, typ.__name__)


def _coerce(value, typ, key: str):
    """Check/convert a YAML value against a field annotation; InputError naming the key otherwise."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise InputError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _from_dict(typ, value, key + ".")
    args = typing.get_args(typ)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _coerce(value, kinds[0], key)
        for kind in kinds:   # e.g. int | Literal["auto"]: the first kind that takes the value
            try:
                return _coerce(value, kind, key)
            except InputError:
                pass
        raise InputError(f"config key {key!r}: expected {' or '.join(map(_kind_name, kinds))}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value]
    if origin is Literal:
        if value not in args:
            raise InputError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, args))}"
                             + _did_you_mean(value, args))
        return value
    if typ is float:  # PyYAML reads 1e-3 (no dot) as a string: accept it as the number it is
        try:
            if not isinstance(value, bool):
                number = float(value)
                if math.isfinite(number):
                    return number
        except (TypeError, ValueError):
            pass
        raise InputError(f"config key {key!r}: expected a number, got {value!r}")
    if typ is bool and not isinstance(value, bool):
        raise InputError(f"config key {key!r}: expected true/false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"config key {key!r}: expected an integer, got {value!r}")
    if typ in (str, list, dict) and not isinstance(value, typ):
        raise InputError(f"config key {key!r}: expected {typ.__name__}, got {value!r}")
    return value


def _from_dict(cls, data: dict, prefix: str = ""):
    types = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in types]
    if unknown:
        k = unknown[0]
        more = _did_you_mean(k, types, prefix) or f" (known: {', '.join(types)})"
        raise InputError(f"unknown config key {prefix + str(k)!r}{more}")
    return cls(**{k: _coerce(v, types[k], prefix + k) for k, v in data.items()})


def _check_ranges(obj, prefix: str = "") -> None:
    """Every number within its field's declared range (one line naming the key, value and range)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = (f"{lo} to {hi}" if lo is not None and hi is not None
                       else f"at least {lo}" if lo is not None else f"at most {hi}")
            raise InputError(f"config key {key!r}: {value!r} is out of range (allowed: {allowed})")


# ----------------------------------------------------------------------------- files and overrides

def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["train.epochs=3", "data.crop=null"]`` applied to a nested dict (values parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise InputError(f"--set {item!r}: invalid YAML value ({said(exc)})") from None
    return raw


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: sections merge key by key, other values are replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_NOT_A_FILE = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _refuse_unless_regular(path: Path, mode: int) -> None:
    """Only a regular file is a recipe: reading a FIFO would wait for a writer, /dev/zero would never end."""
    for test, what in _NOT_A_FILE:
        if test(mode):
            raise InputError(f"{path}: is {what}, not a config file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: is not a regular file, not a config file")


def _read_bytes(path: Path) -> bytes:
    """A recipe's bytes; whatever cannot be read is one line naming the file and the reason."""
    try:
        _refuse_unless_regular(path, os.stat(path).st_mode)
        # non-blocking: should the file have become a FIFO since, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path}: config file does not exist") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file: {exc.strerror or one_line(exc)}") from None
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file: {exc.strerror or one_line(exc)}") from None
    finally:
        os.close(fd)


def _read_text(path: Path) -> str:
    """A recipe's text: UTF-8 (a leading byte-order mark is allowed), refused in one line otherwise."""
    data = _read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                         "save the recipe as UTF-8") from None


def shard_folder(cfg: Config) -> str:
    """``data.shards``; unset, one line saying so (empty, it would name the current folder, and the
    complaint would be a missing manifest there)."""
    if not str(cfg.data.shards).strip():
        raise InputError("config key 'data.shards' is empty: give the folder `lc-shard pack` wrote "
                         "(--set data.shards=DIR)")
    return cfg.data.shards


def yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + one_line(getattr(exc, "problem", None) or said(exc))


def _read_one(path: Path) -> dict:
    try:
        raw = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config is a mapping of sections")
    return raw


def _check_own_keys(path: Path, raw: dict) -> None:
    """A recipe's own keys checked alone (names, types, ranges), so that an error names the file in
    which it stands, also when that file is the base of the recipe given."""
    try:
        _check_ranges(_from_dict(Config, raw))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def read_yaml(path, _chain: tuple = ()) -> dict:
    """A recipe as a dict, its ``base:`` recipes merged under it (cycles refused)."""
    path = Path(path)
    key = Path(os.path.realpath(path))   # unlike Path.resolve, no exception on a symbolic link loop
    if key in _chain:
        cycle = " → ".join(p.name for p in (*_chain, key)[list(_chain).index(key):])
        raise InputError(f"{path}: base recipes form a cycle ({cycle})")
    raw = _read_one(path)
    base = raw.pop(BASE_KEY, None)
    _check_own_keys(path, raw)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise InputError(f"{path}: config key 'base': expected the file name of a recipe, got {base!r}")
    return merge(read_yaml(path.parent / base, (*_chain, key)), raw)


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (or defaults) plus ``--set`` overrides, validated."""
    raw = read_yaml(path) if path else {}
    return from_dict(apply_overrides(raw, overrides or []))


def from_dict(data: dict) -> Config:
    """A config (a recipe, or one saved in a run folder or a checkpoint) back into objects, validated."""
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def normalized(data: dict) -> dict:
    """A saved config as this version reads it (fields added since it was written take their
    defaults): what resume and array plans compare, so an added field does not orphan old runs."""
    return to_dict(from_dict(data))


def save_config(cfg: Config, path) -> None:
    write_bytes_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


# ----------------------------------------------------------------------------- checks and derived values

def validate(cfg: Config) -> None:
    _check_ranges(cfg)
    t = cfg.train
    factor = 2 ** (cfg.model.num_layers + 1)  # the U-Net halves the image num_layers + 1 times
    if cfg.data.crop is not None and cfg.data.crop % factor:
        raise InputError(f"config key 'data.crop': {cfg.data.crop} must be divisible by {factor} "
                         f"(2**(model.num_layers + 1))")
    if IMAGE_SHAPE[0] % factor:
        raise InputError(f"config key 'model.num_layers': {cfg.model.num_layers} halves a {IMAGE_SHAPE[0]}-pixel "
                         f"tile to fractions (at most {int(math.log2(IMAGE_SHAPE[0])) - 1})")
    if t.time_limit is not None and t.time_limit <= 0:   # 0 would read as "no limit" where null says so
        raise InputError(f"config key 'train.time_limit': {t.time_limit:g} is out of range (allowed: more than 0 "
                         "minutes; null: no time limit)")
    if cfg.schedule.factor >= 1.0:   # torch's ReduceLROnPlateau refuses 1 (it would never reduce)
        raise InputError(f"config key 'schedule.factor': {cfg.schedule.factor:g} is out of range (allowed: "
                         "below 1)")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise InputError(f"config key 'train.ema_decay': {t.ema_decay} is out of range (allowed: between 0 "
                         "and 1, exclusive; null: no EMA)")
    if cfg.data.workers and cfg.data.wait_timeout_s >= t.dist_timeout_s:
        # the stuck rank must fail first: its peers, timing out in a collective, cannot name the cause
        raise InputError(f"config key 'data.wait_timeout_s': {cfg.data.wait_timeout_s:g} s is not below "
                         f"train.dist_timeout_s {t.dist_timeout_s} s (a rank waiting on its loader would be "
                         "reported by its peers' collective timeout instead of its own cause)")
    if cfg.model.norm == "group":
        for key in ("filters", "upconv_filters"):
            if getattr(cfg.model, key) % cfg.model.groups:
                raise InputError(f"config key 'model.{key}': {getattr(cfg.model, key)} channels are not divisible "
                                 f"by model.groups {cfg.model.groups} (GroupNorm)")


@dataclass(frozen=True)
class BatchLayout:
    """How the effective batch is computed on ``world`` ranks: ``micro × accum × world == batch``."""
    batch: int
    micro: int
    accum: int
    world: int


def per_rank_batch(train: TrainConfig, world: int) -> int:
    """Tiles per rank and optimizer step; an error naming both ways out when the ranks do not divide the batch."""
    if train.batch_size % world:
        raise InputError(f"config key 'train.batch_size': {train.batch_size} tiles cannot be split evenly over "
                         f"{world} ranks; set train.batch_size to a multiple of {world} (and scale optim.lr with "
                         f"it) or run on a number of ranks that divides {train.batch_size}")
    return train.batch_size // world


def batch_layout(train: TrainConfig, world: int, micro_cap: int | None = None) -> BatchLayout:
    """The largest micro-batch up to ``train.micro_batch_size`` (or ``micro_cap`` when it is auto) that
    divides the batch per rank; the accumulation follows."""
    per_rank = per_rank_batch(train, world)
    cap = micro_cap if train.micro_batch_size == "auto" else train.micro_batch_size
    cap = per_rank if cap is None else cap
    micro = max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)
    return BatchLayout(train.batch_size, micro, per_rank // micro, world)


# ----------------------------------------------------------------------------- printing

def yaml_value(value) -> str:
    """A value as it would stand in a recipe (null, true, [a, b]), for messages and --print-config."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _choices_note(typ) -> str:
    """``one of: a, b; `` (a list: ``any of``) for a field whose values are all declared choices (``int | Literal["auto"]``
    says its one choice in its help)."""
    kinds = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    kinds = [k for k in kinds if k is not type(None)]
    if not kinds or not all(_literal_values(k) for k in kinds):
        return ""
    which = "any of" if typing.get_origin(typ) is list else "one of"
    return f"{which}: {', '.join(map(str, _literal_values(typ)))}; "


def describe(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its help and default (``--print-config``)."""
    lines = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        lines.append(f"{section.name}:")
        rows = []
        for f in dataclasses.fields(obj):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            one_of = _choices_note(typing.get_type_hints(type(obj))[f.name])
            rows.append((f"  {f.name}: {yaml_value(getattr(obj, f.name))}",
                         f"# {f.metadata.get('help', '')} [{one_of}default: {yaml_value(default)}]"))
        width = max(len(a) for a, _ in rows)
        lines += [f"{a:<{width}}  {b}" for a, b in rows]
    return "\n".join(lines)
