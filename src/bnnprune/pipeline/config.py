"""The one loader for `params.yaml`: typed groups, defaults in one place, clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bnnprune.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad value in params.yaml: the message names the key, the value and what is allowed."""


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass(frozen=True)
class Subset:
    train: int | None = field(default=None, metadata=_range(1))
    val: int | None = field(default=None, metadata=_range(1))
    test: int | None = field(default=None, metadata=_range(1))


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "synthetic"] = "fashion-mnist"
    root: str | None = None
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 1.0, True, True))
    subset: Subset = field(default_factory=Subset)
    seed: int = field(default=0, metadata=_range(0))


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "cnn"  # cnn | nin | alexnet | birealnet | "package.module:factory"
    width: float = field(default=1.0, metadata=_range(0.0, 16.0, True))
    kwargs: dict = field(default_factory=dict)  # a user's factory(**kwargs)
    binary: list[str] = field(default_factory=list)  # a user's binary layer classes


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=4, metadata=_range(1, 10000))
    batch_size: int = field(default=128, metadata=_range(1, 65536))
    lr: float = field(default=0.005, metadata=_range(0.0, 10.0, True))
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    seed: int = field(default=0, metadata=_range(0))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = field(default=0, metadata=_range(0, 1024))
    flip_window: int = field(default=1, metadata=_range(1, 10000))
    flip_granularity: Literal["step", "epoch"] = "step"
    # near-convergence interval: extra epochs at a constant low LR after the schedule, whose
    # flips are counted apart from the window's (prune.interval: tail)
    tail_epochs: int = field(default=0, metadata=_range(0, 10000))
    tail_lr: float = field(default=0.00025, metadata=_range(0.0, 10.0, True))
    # processes: > 1 runs the stage under torchrun with DistributedDataParallel (batch_size
    # stays the global batch; it must be a multiple of nproc)
    nproc: int = field(default=1, metadata=_range(1, 1024))
    # knowledge distillation from the unpruned model (finetune only; ReActNet's recipe is 1.0):
    # loss = (1 - distill) * cross-entropy + distill * KL(teacher softmax || student softmax)
    distill: float = field(default=0.0, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class PruneConfig:
    criterion: Literal["flip", "latent", "random"] = "flip"
    tau: float = field(default=2.0, metadata=_range(0.0))  # insensitive: flip count > tau
    min_channels: int = field(default=8, metadata=_range(1))
    round_to: int = field(default=8, metadata=_range(1, 4096))  # kept counts: multiples of it
    interval: Literal["window", "tail"] = "window"  # which flip counts: train.flip_window/tail
    target_bop_reduction: float | None = field(default=None,
                                               metadata=_range(0.0, 1.0, False, True))
    # the global ranking never removes more than this share of a group's channels
    max_pruning_ratio: float = field(default=0.75, metadata=_range(0.0, 1.0, True))
    iterations: int = field(default=1, metadata=_range(1, 100))
    retrain_epochs: int = field(default=1, metadata=_range(1, 10000))
    seed: int = field(default=0, metadata=_range(0))


METHODS = ("flip", "flip_tail", "latent", "flip_random", "uniform_random", "uniform_flip",
           "global_flip", "scratch")


@dataclass(frozen=True)
class StudyConfig:
    budgets: list[float] = field(default_factory=lambda: [0.5],
                                 metadata=_range(0.0, 1.0, True, True))  # BOP reductions
    methods: list[Literal[METHODS]] = field(  # type: ignore[valid-type]
        default_factory=lambda: ["flip", "latent", "flip_random", "uniform_random"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata=_range(0))
    # budgets at which the `scratch` control (flip-allocated widths trained anew for
    # train.epochs, then recovered) runs over `seeds`: a full training per cell, so apart
    scratch_budgets: list[float] = field(default_factory=list,
                                         metadata=_range(0.0, 1.0, True, True))
    recovery_steps: int = field(default=60, metadata=_range(0, 10**7))
    batch_size: int = field(default=128, metadata=_range(1, 65536))
    lr: float = field(default=0.001, metadata=_range(0.0, 10.0, True))
    sensitivity_ratio: float = field(default=0.5, metadata=_range(0.0, 1.0, True, True))
    channel_samples: int = field(default=32, metadata=_range(2, 100000))  # per binary layer
    sensitivity_images: int = field(default=2000, metadata=_range(1))  # validation images
    bootstrap: int = field(default=2000, metadata=_range(100, 10**6))


@dataclass(frozen=True)
class ExportConfig:
    exporter: Literal["folded", "dynamo", "legacy"] = "folded"  # see export.py
    opset: int = field(default=18, metadata=_range(13, 23))
    tolerance: float = field(default=1e-4, metadata=_range(0.0, 1.0, True))  # max |logit diff|
    # images allowed over `tolerance` because a binary input sits on the sign threshold
    max_outlier_fraction: float = field(default=0.25, metadata=_range(0.0, 1.0))
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64, 256],
                                           metadata=_range(1, 65536))
    latency_repeats: int = field(default=20, metadata=_range(1, 10000))
    threads: int = field(default=2, metadata=_range(0, 1024))


@dataclass(frozen=True)
class BenchmarkConfig:
    batch_size: int = field(default=64, metadata=_range(1, 65536))
    threads: int = field(default=2, metadata=_range(0, 1024))  # torch + numba; 0 = default
    warmup: int = field(default=3, metadata=_range(0, 10000))
    repeats: int = field(default=20, metadata=_range(1, 100000))
    # whole-model latency of every backend at these batch sizes too (the speed table)
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64, 256],
                                           metadata=_range(1, 65536))


@dataclass(frozen=True)
class GateConfig:
    min_test_acc: float = field(default=0.90, metadata=_range(0.0, 1.0))
    max_acc_drop_pt: float = field(default=0.5, metadata=_range(None, 100.0))
    min_bops_reduction_pct: float = field(default=50.0, metadata=_range(None, 100.0))
    min_speedup_cpu: float = field(default=1.15, metadata=_range(0.0))


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=3, lr=0.001, flip_window=1))
    prune: PruneConfig = field(default_factory=PruneConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    gate: GateConfig = field(default_factory=GateConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _check_range(key: str, value: Any, meta: dict) -> None:
    if "range" not in meta or value is None:
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(f"{key}[{i}]", v, meta)
        return
    lo, hi, lo_open, hi_open = meta["range"]
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        allowed = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")


def _convert(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(key, value, tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")


def _build(prefix: str, raw: Any, cls: type) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: {raw!r} is not allowed; expected {_type_name(cls)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"{where}: unknown key{hint} (allowed: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(key, raw[name], hints[name])
        _check_range(key, raw[name], dict(f.metadata))  # the value as written (0, not 0.0)
    return cls(**values)


BUILTIN_ARCHS = ("cnn", "nin", "alexnet", "birealnet")


def scratch_error(arch: str) -> ConfigError:
    return ConfigError(f"study method 'scratch' on model.arch {arch!r}: a user's model cannot "
                       f"be rebuilt at its pruned widths (its factory builds the full model); "
                       f"allowed: scratch on the built-in archs ({', '.join(BUILTIN_ARCHS)}), "
                       f"or no 'scratch' in study.methods and an empty study.scratch_budgets")


def _is_factory(spec: str) -> bool:
    module, _, name = spec.partition(":")
    return bool(module) and name.isidentifier() and all(
        part.isidentifier() for part in module.split("."))


def parse_params(raw: dict | None) -> Params:
    """Validate a params mapping (as read from YAML) into typed groups."""
    params = _build("", raw, Params)
    arch = params.model.arch
    if arch not in BUILTIN_ARCHS and not _is_factory(arch):
        raise ConfigError(f"model.arch: {arch!r} is not allowed; allowed: "
                          f"{', '.join(BUILTIN_ARCHS)} or 'package.module:factory'")
    for spec in params.model.binary:
        if not _is_factory(spec):
            raise ConfigError(f"model.binary: {spec!r} is not allowed; allowed: "
                              f"'package.module:ClassName'")
    if _is_factory(arch) and ("scratch" in params.study.methods or params.study.scratch_budgets):
        raise scratch_error(arch)
    if (params.model.kwargs or params.model.binary) and not _is_factory(arch):
        raise ConfigError(f"model.kwargs / model.binary with model.arch {arch!r}; allowed: only "
                          f"with a 'package.module:factory' arch")
    if params.train.distill:
        raise ConfigError(f"train.distill: {params.train.distill!r}; the baseline has no teacher "
                          f"to learn from; allowed: 0 (distil in finetune.distill)")
    if "scratch" in params.study.methods and params.study.scratch_budgets:
        raise ConfigError(f"study.scratch_budgets: {params.study.scratch_budgets} while "
                          f"study.methods also lists 'scratch': both would write the scratch "
                          f"cells; allowed: one of the two")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return parse_params(raw)


def as_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.005, ...}: the form MLflow params take (from a config or a dict)."""
    if dataclasses.is_dataclass(d):
        d = dataclasses.asdict(d)
    out: dict[str, Any] = {}
    for key, value in d.items():
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
