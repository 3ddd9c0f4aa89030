"""The search space: SPACE.yaml read and checked against the config's declarations, and a trial's
parameters turned into config overrides.

A space file maps config keys to a distribution each::

    optim.lr: {float: [1.0e-4, 1.0e-2], log: true}   # low, high; log-uniform
    optim.weight_decay: {float: [0.0, 1.0e-3]}       # uniform (step: 1.0e-4 for a grid)
    model.filters: {int: [16, 48], step: 8}           # 16, 24, ..., 48 (log: true also works)
    optim.name: [adam, adamw, rmsprop, adagrad]       # categorical (also {categorical: [...]})

Everything is checked before anything runs, each problem one line naming the file and the key:
the key is declared (with a did-you-mean), it may vary between trials (not the launcher, cv,
data.fold or data.shards, shared by every job), the distribution fits its declared type (no float
distribution on an integer key), categorical values are declared choices, the bounds lie inside the
key's declared range, and the config's own checks pass for every choice, for every value of an
integer range of up to 256 values (a log range too: a trial can draw any integer in it), and for the
bounds of a larger or a float range.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from lc_common.errors import InputError, one_line

from ..config import Config, apply_overrides, from_dict, normalized, yaml_problem
from ..cv.plan import FORBIDDEN_GRID

KINDS = ("float", "int", "categorical")
OPTIONS = {"float": ("log", "step"), "int": ("log", "step"), "categorical": ()}
CHECK_EVERY_VALUE_UP_TO = 256   # an int range this small has each value checked by the config (a larger, as many)
MAX_STEPS = 1e12               # a float step cutting a range finer: a step written wrong


@dataclass(frozen=True)
class Declared:
    """What the config declares for one key: its annotation and its inclusive range."""
    key: str
    annotation: object
    min: float | None
    max: float | None

    @property
    def kinds(self) -> list:
        """The annotation's alternatives without None (``int | Literal["auto"]`` → int, Literal)."""
        typ = self.annotation
        args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
        return [a for a in args if a is not type(None)]

    @property
    def is_float(self) -> bool:
        return float in self.kinds

    @property
    def is_int(self) -> bool:
        return int in self.kinds

    @property
    def choices(self) -> tuple:
        """The declared choices when every value of the key is one (a ``Literal``), else ()."""
        kinds = self.kinds
        if kinds and all(typing.get_origin(k) is Literal for k in kinds):
            return tuple(v for k in kinds for v in typing.get_args(k))
        return ()

    def describe(self) -> str:
        names = [k.__name__ if isinstance(k, type) else "one of " + ", ".join(map(str, typing.get_args(k)))
                 for k in self.kinds]
        return " or ".join(names)


def declared_keys() -> dict[str, Declared]:
    """Every config key, ``section.name``, with its declaration (walked from the dataclasses)."""
    out = {}
    for section, cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            out[key] = Declared(key, hints[f.name], f.metadata.get("min"), f.metadata.get("max"))
    return out


@dataclass(frozen=True)
class Param:
    """One searched key and its distribution."""
    key: str
    kind: str                   # one of KINDS
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    @property
    def numeric(self) -> bool:
        return self.kind != "categorical"

    def distribution(self):
        """The Optuna distribution of this parameter."""
        from optuna import distributions as d

        if self.kind == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return d.CategoricalDistribution(self.choices)

    def points(self) -> float:
        """How many values it can take (math.inf for a continuous range)."""
        if self.kind == "categorical":
            return len(self.choices)
        if self.kind == "int":
            return len(range(self.low, self.high + 1, self.step or 1))
        return round((self.high - self.low) / self.step) + 1 if self.step else math.inf

    def values_to_check(self) -> list:
        """The values whose configs are checked before the search starts: every choice, every value
        of a small integer range (log or not); of a larger one, its first and last values and an even
        spread between (a value its ranks cannot divide shows among consecutive ones, where a spread
        alone could step over it); a float range's two bounds."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            values = range(self.low, self.high + 1, self.step or 1)
            if len(values) <= CHECK_EVERY_VALUE_UP_TO:
                return list(values)
            ends, spread = CHECK_EVERY_VALUE_UP_TO // 4, CHECK_EVERY_VALUE_UP_TO // 2
            between = values[ends:-ends]
            picked = {*values[:ends], *values[-ends:], *between[::math.ceil(len(between) / spread)]}
            return sorted(picked)
        return [self.low, self.high]

    def to_dict(self) -> dict:
        """As written in a space file (what tune.json keeps)."""
        if self.kind == "categorical":
            return {"categorical": list(self.choices)}
        spec = {self.kind: [self.low, self.high]}
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        return spec


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    source: str = ""

    @property
    def numeric(self) -> bool:
        return all(p.numeric for p in self.params)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def param(self, key: str) -> Param:
        return next(p for p in self.params if p.key == key)

    def distributions(self) -> dict:
        return {p.key: p.distribution() for p in self.params}

    def points(self) -> float:
        """How many distinct trials it holds (math.inf when a key is continuous)."""
        return math.prod(p.points() for p in self.params)

    def to_dict(self) -> dict:
        return {p.key: p.to_dict() for p in self.params}


# ----------------------------------------------------------------------------- a trial's config

def overrides(params: dict) -> list[str]:
    """A trial's parameters as ``--set`` overrides (JSON values are YAML: exact numbers, quoted strings)."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def trial_config(base: dict, params: dict) -> dict:
    """The resolved base config with a trial's parameters, validated by the config and by the
    executor that runs its jobs (e.g. a batch its ranks divide): InputError."""
    from ..cv.launch import check_launcher   # submitit and the launch: only a launcher checks a trial

    config = normalized(apply_overrides(copy.deepcopy(base), overrides(params)))
    check_launcher(from_dict(config), config["launcher"]["executor"])
    return config


# ----------------------------------------------------------------------------- reading a space file

def load_space(path, base: dict) -> Space:
    """The space of a file, every parameter checked against ``base`` (a resolved config dict)."""
    path = Path(path)
    raw = _read(path)
    known = declared_keys()
    params = tuple(_param(path, key, spec, known, base) for key, spec in raw.items())
    return Space(params, str(path))


def space_from_dict(data: dict, source: str = "") -> Space:
    """A space as tune.json keeps it (checked when it was first read)."""
    return Space(tuple(_shape(Path(source or "tune.json"), key, spec) for key, spec in data.items()), source)


def _read(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: space file does not exist")
    if not path.is_file():
        raise InputError(f"{path}: is not a regular file, not a space file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save the space file as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the space file: {exc.strerror or one_line(exc)}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: invalid YAML: {yaml_problem(exc)}") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: a space file maps config keys to distributions (e.g. "
                         "'optim.lr: {float: [1.0e-4, 1.0e-2], log: true}'); this one is "
                         f"{'empty' if not raw else 'not a mapping'}")
    return raw


def _param(path: Path, key, spec, known: dict[str, Declared], base: dict) -> Param:
    key = _check_key(path, key, known)
    param = _shape(path, key, spec)
    decl = known[key]

    def fail(problem: str):
        raise InputError(f"{path}: {key}: {problem}")

    if param.kind == "float" and not decl.is_float:
        fail("a float distribution on an integer key: use int" if decl.is_int
             else f"a float distribution on a key that is not a number ({decl.describe()}): list its values")
    if param.kind == "int" and not decl.is_int:
        fail("an int distribution on a float key: use float (step: 1 for whole numbers)" if decl.is_float
             else f"an int distribution on a key that is not a number ({decl.describe()}): list its values")
    if param.numeric:
        _check_range(param, decl, fail)
    else:
        if decl.is_float:
            param = dataclasses.replace(param, choices=tuple(_as_number(v) for v in param.choices))
        _check_choices(param, decl, fail)
    for value in param.values_to_check():
        try:
            trial_config(base, {key: value})
        except InputError as exc:
            fail(f"{value!r} is refused by the config: {_strip_key(str(exc), key)}")
    return param


def _check_key(path: Path, key, known: dict[str, Declared]) -> str:
    if not isinstance(key, str) or not key.strip():
        raise InputError(f"{path}: {key!r}: a key is a config key such as optim.lr")
    key = key.strip()
    if key.startswith(FORBIDDEN_GRID) or key in FORBIDDEN_GRID:
        raise InputError(f"{path}: {key}: cannot vary between trials (the launcher, cv, data.fold and data.shards "
                         "are shared by every job)")
    if key not in known:
        sections = {k.split(".")[0] for k in known}
        if key in sections:
            raise InputError(f"{path}: {key}: is a section of the config, not a key")
        hint = difflib.get_close_matches(key, list(known), n=1)
        raise InputError(f"{path}: {key}: unknown config key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return key


def _shape(path: Path, key: str, spec) -> Param:
    """The distribution as written, checked on its own (not yet against the config)."""
    def fail(problem: str):
        raise InputError(f"{path}: {key}: {problem}")

    if isinstance(spec, list):
        spec = {"categorical": spec}
    if not isinstance(spec, dict):
        fail(f"expected a distribution ({{float: [low, high]}}, {{int: [low, high]}} or a list of values), "
             f"got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    if len(kinds) != 1:
        fail(f"give exactly one of {', '.join(KINDS)}" + (f" (got {', '.join(map(str, spec))})" if spec else ""))
    kind = kinds[0]
    for option in spec:
        if option != kind and option not in OPTIONS[kind]:
            hint = difflib.get_close_matches(str(option), OPTIONS[kind], n=1)
            allowed = ", ".join(OPTIONS[kind]) or "nothing"
            fail(f"unknown option {option!r} of a {kind} distribution"
                 + (f" (did you mean {hint[0]!r}?)" if hint else f" (it takes {allowed})"))
    if kind == "categorical":
        return Param(key, kind, choices=_choices(spec[kind], fail))
    return _numeric(key, kind, spec, fail)


def _choices(values, fail) -> tuple:
    if not isinstance(values, list) or not values:
        fail("a categorical distribution is a non-empty list of values")
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            fail(f"categorical values are numbers, strings, true/false or null, not {value!r}")
    if len({json.dumps(v) for v in values}) != len(values):
        fail(f"a value is listed twice ({values})")
    return tuple(values)


def _number(value, integer: bool, fail, what: str):
    """A bound or a step: PyYAML reads 1e-3 (no dot) as a string, so numbers in text are accepted."""
    if isinstance(value, bool):
        fail(f"{what} {value!r} is not a number")
    if integer:
        if not isinstance(value, int):
            fail(f"{what} {value!r} is not a whole number (an int distribution)")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        fail(f"{what} {value!r} is not a number")
    if not math.isfinite(number):
        fail(f"{what} {value!r} is not finite")
    return number


def _numeric(key: str, kind: str, spec: dict, fail) -> Param:
    bounds, integer = spec[kind], kind == "int"
    if not isinstance(bounds, list) or len(bounds) != 2:
        fail(f"expected {kind}: [low, high], got {bounds!r}")
    low, high = (_number(b, integer, fail, name) for b, name in zip(bounds, ("low", "high")))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        fail(f"log: expected true/false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, integer, fail, "step")
        if step <= 0:
            fail(f"step {step!r} must be positive")
        if log:
            fail("step and log cannot be combined")
    if not low < high:
        fail(f"low {low!r} must be below high {high!r}")
    if log and low <= 0:
        fail(f"a log distribution needs low > 0 (got {low!r})")
    if step is not None and not integer and not (high - low) / step <= MAX_STEPS:
        fail(f"step {step!r} cuts [{low!r}, {high!r}] into more than {MAX_STEPS:.0e} values")
    if step is not None and not _multiple(high - low, step):
        fail(f"high - low ({high - low!r}) is not a multiple of step {step!r}")
    return Param(key, kind, low, high, log, step)


def _as_number(value):
    """PyYAML reads 1e-9 (no dot) as a string; a float key's choices keep the number it means, as
    the config itself reads such values."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _multiple(span: float, step: float) -> bool:
    n = round(span / step)
    return n >= 1 and math.isclose(n * step, span, rel_tol=1e-9, abs_tol=1e-12)


def _check_range(param: Param, decl: Declared, fail) -> None:
    lo, hi = decl.min, decl.max
    if (lo is not None and param.low < lo) or (hi is not None and param.high > hi):
        allowed = (f"{lo} to {hi}" if lo is not None and hi is not None
                   else f"at least {lo}" if lo is not None else f"at most {hi}")
        fail(f"bounds [{param.low}, {param.high}] lie outside the key's declared range ({allowed})")


def _check_choices(param: Param, decl: Declared, fail) -> None:
    declared = decl.choices
    for value in param.choices:
        if declared and value not in declared:
            hint = difflib.get_close_matches(str(value), [str(c) for c in declared], n=1)
            fail(f"{value!r} is not a declared choice ({', '.join(map(str, declared))})"
                 + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _strip_key(message: str, key: str) -> str:
    """The config's message without the ``config key 'k': `` that the caller already names."""
    prefix = f"config key {key!r}: "
    return message[len(prefix):] if message.startswith(prefix) else message
