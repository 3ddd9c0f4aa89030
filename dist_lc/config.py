"""Typed run configuration: YAML → dataclasses, ``--set a.b=c`` overrides, unknown keys are errors.

The one place that loads a config. The resolved config is saved as ``config.yaml`` in every run folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shard_tools.errors import InputError


@dataclass
class DataConfig:
    shards: str = ""                 # shard folder written by `lc-shard pack`
    fold: int | None = 0             # validation fold (train on the others); null = train on all, no validation
    crop: int | None = None          # random square crop at train time (validation sees whole tiles)
    augment: bool = True             # flips and 90/180/270° rotations, image and mask alike
    normalize: str = "manifest"      # "manifest": per-band standardisation | "max": divide by 24356 (benchmark)
    workers: int = 2                 # DataLoader workers per rank
    shuffle_buffer: int = 64         # samples per worker shuffle buffer


@dataclass
class ModelConfig:
    num_layers: int = 2
    filters: int = 64
    upconv_filters: int = 96
    norm: str = "batch"              # "batch" | "group"
    bn_momentum: float = 0.01        # torch convention; Keras momentum 0.99 == 0.01
    bn_eps: float = 1e-3
    groups: int = 8
    init: str = "he_normal"          # "he_normal" (Keras) | "torch"
    indices: bool = False            # add NDVI and NDWI as input channels (computed from the raw bands)


@dataclass
class LossConfig:
    class_weights: str = "inverse_frequency"   # "none" | "inverse_frequency" | "sqrt_inverse_frequency"
    kl_weight: float = 0.0                     # weight of the tile-proportion KL term
    prior_correction: bool = False             # subtract log class weights from logits at prediction


@dataclass
class OptimConfig:
    name: str = "adam"               # adam | adamw | rmsprop | adagrad | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9            # sgd / rmsprop only


@dataclass
class ScheduleConfig:
    name: str = "plateau"            # plateau (benchmark) | cosine (with warmup) | constant
    patience: int = 20               # plateau: epochs without val improvement
    factor: float = 0.5              # plateau: lr multiplier
    warmup_epochs: int = 0           # cosine: linear warmup length
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 90
    batch_size: int = 32             # effective batch = micro_batch_size × accumulation × world size
    micro_batch_size: int = 8        # per device per forward/backward
    precision: str = "auto"          # auto | fp32 | bf16 | fp16
    channels_last: bool = True      # NHWC: faster convolutions with oneDNN on CPU and tensor cores on GPU
    compile: bool = False
    sync_batchnorm: bool = False
    seed: int = 0
    deterministic: bool = False
    time_limit: float | None = None  # minutes; stop at the last epoch boundary that fits
    val_every: int = 1               # epochs between validations (and at the last epoch / time limit)
    plot_every: int = 10             # epochs between prediction plots (0 = never)
    plot_tiles: int = 4
    ema_decay: float | None = None   # exponential moving average of weights, evaluated and saved
    device: str = "auto"             # auto | cpu | cuda


@dataclass
class LauncherConfig:
    """Where `dist-lc cv` runs each job (Slurm through submitit, or local processes); see docs/slurm.md."""
    executor: str = "local"          # local | slurm (`cv --executor` overrides)
    nodes: int = 1                   # Slurm only (the local executor has one node)
    tasks_per_node: int = 1          # one task per device (= gpus_per_node on GPU nodes)
    gpus_per_node: int = 0
    cpus_per_task: int = 1           # loader workers + 1 is a good start
    mem_gb: float | None = None      # per node; null = the partition's default
    partition: str | None = None
    account: str | None = None
    time_min: int = 60               # per job (one attempt); longer trainings are requeued and resume
    max_parallel: int = 0            # jobs at once; 0 = local: what the machine allows, slurm: no cap
    max_requeues: int = 3            # timeouts tolerated per job (preemptions are unlimited)
    signal_delay_s: int = 120        # the stop signal (USR2) comes this long before time_min is up
    wait_min: int | None = None      # how long `cv` waits for its jobs; null = derived from time_min
    setup: list = field(default_factory=list)         # shell lines run before the job (module load ...)
    slurm_extra: dict = field(default_factory=dict)   # extra #SBATCH options, e.g. {qos: high}


@dataclass
class CVConfig:
    folds: list | None = None        # folds to run (null = all in the manifest)
    tta: bool = False                # 8 flips/rotations when predicting oof and test
    calibrate: bool = True           # fit per-class calibration on out-of-fold predictions


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


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, typ, key: str):
    """Check/convert a YAML value against a field annotation; InputError naming the key otherwise."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise InputError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _from_dict(typ, value, key + ".")
    args = typing.get_args(typ)
    if type(None) in args:
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is float:  # PyYAML reads 1e-3 (no dot) as a string: accept it as the number it is
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
        raise InputError(f"config key {key!r}: expected a number, got {value!r}")
    origin = typing.get_origin(typ) or typ
    if origin is bool and not isinstance(value, bool):
        raise InputError(f"config key {key!r}: expected true/false, got {value!r}")
    if origin is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"config key {key!r}: expected an integer, got {value!r}")
    if origin in (str, list, dict) and not isinstance(value, origin):
        raise InputError(f"config key {key!r}: expected {origin.__name__}, got {value!r}")
    return value


def _from_dict(cls, data: dict, prefix: str = ""):
    types = _field_types(cls)
    unknown = [k for k in data if k not in types]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(k, list(types), n=1)
        more = f" (did you mean {prefix + hint[0]!r}?)" if hint else f" (known: {', '.join(types)})"
        raise InputError(f"unknown config key {prefix + k!r}{more}")
    return cls(**{k: _coerce(v, types[k], prefix + k) for k, v in data.items()})


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
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config is a mapping of sections")
    return raw


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (or defaults) plus ``--set`` overrides, validated."""
    raw = read_yaml(path) if path else {}
    cfg = _from_dict(Config, apply_overrides(raw, overrides or []))
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """A config saved in a run folder or a checkpoint, back into objects."""
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
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


CHOICES = {
    "data.normalize": ("manifest", "max"),
    "model.norm": ("batch", "group"),
    "model.init": ("he_normal", "torch"),
    "loss.class_weights": ("none", "inverse_frequency", "sqrt_inverse_frequency"),
    "optim.name": ("adam", "adamw", "rmsprop", "adagrad", "sgd"),
    "schedule.name": ("plateau", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "launcher.executor": ("local", "slurm"),
}


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise InputError(f"config key {key!r}: {value!r} is not one of {', '.join(allowed)}")
    t = cfg.train
    if t.val_every < 1:
        raise InputError(f"config: train.val_every must be at least 1, got {t.val_every}")
    if t.micro_batch_size <= 0 or t.batch_size <= 0:
        raise InputError("config: train.batch_size and train.micro_batch_size must be positive")
    if t.batch_size % t.micro_batch_size:
        raise InputError(f"config: train.micro_batch_size {t.micro_batch_size} does not divide "
                         f"train.batch_size {t.batch_size}")
    factor = 2 ** (cfg.model.num_layers + 1)  # the U-Net halves the image num_layers + 1 times
    if cfg.data.crop is not None and cfg.data.crop % factor:
        raise InputError(f"config: data.crop {cfg.data.crop} must be divisible by {factor} "
                         f"(2**(model.num_layers + 1))")
