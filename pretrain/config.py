"""Typed run configs: YAML files plus ``key=value`` overrides; unknown keys and wrong types are errors.

One ``Config`` serves both stages: fine-tuning only adds ``init`` and a few model keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pretrain.objectives import ObjectiveOptions, options_for


class ConfigError(ValueError):
    """A config problem; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "vit_ti16"  # vit_<ti|s|b|l|h><patch>
    image_size: int | list[int] | None = 224  # fine-tuning: null keeps the checkpoint's
    num_classes: int | None = None  # default: the classes in the training shards' index
    head: Literal["pretrain", "linear", "none"] = "pretrain"
    global_pool: Literal["token", "avg"] | None = "token"  # fine-tuning: null keeps the checkpoint's
    embed_dim: int | None = None  # the four below override the named size (small test models)
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass
class DataConfig:
    train: str | list[str] | None = None  # folder with index.json, shard list, brace pattern, pipe: or URL
    val: str | list[str] | None = None
    num_samples: int | None = None  # only for shards without an index.json
    batch_size: int = 256  # global: across processes and accumulation steps
    workers: int = 2
    shuffle_buffer: int = 2000
    resampled: bool = False  # draw shards with replacement forever (the usual choice for pretraining)
    augment: bool = True  # random-resized crop + flip; false: resize and centre crop only
    crop_scale_min: float = 0.08
    monitor: str | list[str] | None = None  # labelled shards: kNN top-1 of frozen features at every checkpoint
    monitor_bank: str | list[str] | None = None  # the kNN's labelled bank; null: leave-one-out on data.monitor
    mean: list[float] | None = None  # null: the checkpoint's when fine-tuning, else 0.5 (the paper's [-1, 1])
    std: list[float] | None = None


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    clip_grad_norm: float | None = 1.0
    layer_decay: float | None = None  # layer-wise lr decay (MAE fine-tuning): layer l gets lr * decay^(L+1-l)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    grad_accum: int = 1
    checkpoint_every: int = 500
    keep_last: int = 2
    output_dir: str = "runs/pretrain"
    resume: str = "auto"  # auto | none | a checkpoint path
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10
    compile: bool = False
    peak_tflops: float | None = None  # for MFU; measured with a matmul when not given


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveOptions = field(default_factory=lambda: options_for("supervised"))  # its own keys
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = None  # fine-tuning: the checkpoint folder to start from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(value, hint, key: str):
    """Return ``value`` converted to ``hint`` (int -> float only) or raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_name(a) for a in typing.get_args(hint))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, typing.get_args(hint)))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or not isinstance(value, hint) or \
            hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            scope = f"objective {obj.name} " if isinstance(obj, ObjectiveOptions) else ""
            raise ConfigError(f"{full}: unknown config key for {scope or 'this section '}"
                              f"(known: {', '.join(sorted(prefix + n for n in names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {full}.* keys, got {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _check(value, hints[key], full))


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"{text}: overrides look like key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = (), base: Config | None = None) -> Config:
    """YAML file (may be None) then overrides, on top of ``base`` (the stage's defaults).

    ``objective.name`` (from either) picks the objective, and with it the keys its section accepts;
    an override that switches to another objective than the file's replaces the file's section.
    """
    cfg = base or Config()
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    given: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        _merge(given, keys, value)
    switched = _section(given, "objective").get("name")
    if switched is not None and switched != _section(values, "objective").get("name", cfg.objective.name):
        values.pop("objective", None)
    _merge_all(values, given)
    objective = values.get("objective")
    if isinstance(objective, dict) and "name" in objective and objective["name"] != cfg.objective.name:
        try:
            cfg.objective = options_for(objective["name"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _apply(cfg, values)
    validate(cfg)
    return cfg


def _section(values: dict, key: str) -> dict:
    return values[key] if isinstance(values.get(key), dict) else {}


def _merge_all(values: dict, given: dict) -> None:
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            _merge_all(values[key], value)
        else:
            values[key] = value


def _merge(values: dict, keys: list[str], value) -> None:
    """Set ``values[k1][k2]... = value``, keeping sibling keys a YAML file set."""
    for k in keys[:-1]:
        if not isinstance(values.get(k), dict):
            values[k] = {}
        values = values[k]
    values[keys[-1]] = value


def validate(cfg: Config) -> None:
    """Cross-field checks that need no data and no model."""
    t, o = cfg.train, cfg.objective
    positive = {"data.batch_size": cfg.data.batch_size, "train.grad_accum": t.grad_accum,
                "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                "train.keep_last": t.keep_last}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps: must be >= 0, got {t.max_steps}")
    if cfg.optim.layer_decay is not None and not 0 < cfg.optim.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay: must be in (0, 1], got {cfg.optim.layer_decay}")
    try:
        o.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.train is None:
        raise ConfigError("data.train: required (a shard folder with index.json, a shard list or a pattern)")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: {t.resume} does not exist (use auto, none or a checkpoint folder)")
