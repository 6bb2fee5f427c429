"""Typed run configs: YAML files plus ``key=value`` overrides; unknown keys and wrong types are errors.

One ``Config`` serves both stages: fine-tuning only adds ``init`` and a few model keys.

The type check is our own, not OmegaConf's or pydantic's: both convert silently where we refuse
(``data.augment=1`` becomes true, ``train.seed="7"`` 7), OmegaConf resolves ``${...}`` inside any
string (a ``pipe:`` shard command's shell variables), and their multi-line messages would have to be
translated back into ``key: expected TYPE, got VALUE``, which needs the same walk over the types.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from common.errors import VitpipeError
from pretrain.objectives import ObjectiveOptions, options_for

CHANNELS = 3  # RGB: the loader decodes every image to three channels


class ConfigError(VitpipeError, ValueError):
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
    pos_embed: Literal["learned", "sincos"] | None = "learned"  # sincos: MAE's fixed 2D table, not trained


@dataclass
class DataConfig:
    train: str | list[str] | None = None  # folder or s3://... with index.json, shard list, brace pattern, pipe:, URL
    val: str | list[str] | None = None
    num_samples: int | None = None  # only for shards without an index.json
    batch_size: int = 256  # global: across processes and accumulation steps
    workers: int = 2
    shuffle_buffer: int = 2000
    stall_timeout: float = 600  # seconds a shard may yield no sample before the run stops naming it; 0: no limit
    resampled: bool = False  # draw shards with replacement forever (the usual choice for pretraining)
    record_keys: bool = False  # one line per optimizer step in OUTPUT_DIR/samples/rank{R}.jsonl: its samples' keys
    augment: bool = True  # random-resized crop + flip; false: resize and centre crop only
    crop_scale_min: float = 0.08
    resize_filter: Literal["bicubic", "bilinear"] = "bicubic"  # the crop's resampling (antialiased), train and eval
    decode: Literal["cpu", "gpu"] = "cpu"  # gpu: workers hand over JPEG bytes, decoded in batches on the CUDA device
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
    warmup_epochs: float | None = None  # instead of warmup_steps: passes over the training shards
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int | None = 1000  # optimizer steps; or give train.epochs instead (exactly one of the two)
    epochs: float | None = None  # instead of max_steps: passes over the training shards (their index's sample count)
    threads: int | None = None  # torch threads per process; null: OMP_NUM_THREADS, else the cores / local processes
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
    resume_mismatch: Literal["refuse", "allow"] = "refuse"  # a checkpoint made with other result-changing keys
    keep_best: bool = False  # keep best/: the model of the checkpoint with the best train.best_metric
    best_metric: str | None = None  # knn_top1, val_loss, val_<objective metric>; null: knn_top1 with data.monitor, else val_loss
    best_mode: Literal["auto", "max", "min"] = "auto"  # auto: min for a *loss metric, else max


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
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off (yes/on) as a bool: mixed_precision=no
            value = next((w for w in (("no", "off", "false") if not value else ("yes", "on", "true"))
                          if w in typing.get_args(hint)), value)
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
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")  # nan passes every < and > check
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
            scope = f"objective {obj.name}" if isinstance(obj, ObjectiveOptions) else ""
            raise ConfigError(f"{full}: unknown config key for {scope or 'this section'}{_did_you_mean(obj, key, prefix)}"
                              f" (known: {', '.join(sorted(prefix + n for n in names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {full}.* keys, got {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _check(value, hints[key], full))


def _did_you_mean(obj, key: str, prefix: str) -> str:
    """``; did you mean KEY?`` for a close key of this section, or at the top level a section's key of that name
    (``max_steps`` -> ``train.max_steps``); empty when nothing is close."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    candidates = {prefix + name: name for name, value in fields.items() if not dataclasses.is_dataclass(value)}
    if not prefix:
        candidates.update({f"{section}.{f.name}": f.name for section, value in fields.items()
                           if dataclasses.is_dataclass(value) for f in dataclasses.fields(value)})
    close = difflib.get_close_matches(key, list(candidates.values()), n=1, cutoff=0.6)
    found = [full for full, name in candidates.items() if close and name == close[0]]
    return f"; did you mean {found[0]}?" if found else ""


MAX_YAML_NODES = 10_000  # a config has a few hundred; aliases may not expand a document past this


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently) and
    a document whose aliases expand it past ``MAX_YAML_NODES`` ("billion laughs": 300 bytes, gigabytes
    expanded, a 3.5 MB error line)."""

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this document past {MAX_YAML_NODES} values (refused)", node.start_mark)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _expanded_size(node, sizes: dict) -> int:
    """How many nodes ``node`` stands for with every alias expanded; linear in the distinct nodes (memoised),
    stopping early once past the limit."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that refers to itself (a recursive alias) counts once
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += _expanded_size(child, sizes)
            if total > MAX_YAML_NODES:
                break
        sizes[id(node)] = total
    return sizes[id(node)]


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    return ConfigError(f"{where}{line}: not valid YAML: {problem or e}")


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"{text}: overrides look like key=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping, read with the strict loader (no duplicate keys, bounded aliases)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(str(path), e) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def load_config(path: str | Path | None, overrides: list[str] = (), base: Config | None = None,
                stage: str | None = None, need_data: bool = True) -> Config:
    """YAML file (may be None) then overrides, on top of ``base`` (the stage's defaults).

    ``objective.name`` (from either) picks the objective, and with it the keys its section accepts;
    an override that switches to another objective than the file's replaces the file's section, and
    one that gives a length in epochs (steps) replaces the file's length in steps (epochs). A file's
    top-level ``stage`` (a run folder's config.json has one) must be ``stage``. ``need_data=False``: no
    ``data.train`` yet (``--print-config`` of a recipe).
    """
    cfg = base or Config()
    values: dict = {}
    if path is not None:
        values = read_yaml(path)
        made_by = values.pop("stage", stage)
        if stage is not None and made_by != stage:
            raise ConfigError(f"stage: {path} is the config of a {made_by} run; run it with vitpipe {made_by}")
    given: dict = {}
    seen: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        _refuse_repeats(seen, keys, text)
        _merge(given, keys, value)
    switched = _section(given, "objective").get("name")
    if switched is not None and switched != _section(values, "objective").get("name", cfg.objective.name):
        values.pop("objective", None)
    _later_length_wins(values, given)
    _merge_all(values, given)
    _length_in_epochs_only(values)
    objective = values.get("objective")
    if isinstance(objective, dict) and "name" in objective and objective["name"] != cfg.objective.name:
        try:
            cfg.objective = options_for(objective["name"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _apply(cfg, values)
    validate(cfg, need_data)
    return cfg


# a length given in steps or in epochs: (section, key in steps, key in epochs)
LENGTHS = (("train", "max_steps", "epochs"), ("schedule", "warmup_steps", "warmup_epochs"))


def _later_length_wins(values: dict, given: dict) -> None:
    """An override's length in steps (epochs) replaces the file's in epochs (steps)."""
    for section, *keys in LENGTHS:
        asked = _section(given, section)
        for key, other in (keys, keys[::-1]):
            if asked.get(key) is not None and other not in asked:
                _section(values, section).pop(other, None)


def _length_in_epochs_only(values: dict) -> None:
    """A length given in epochs alone turns the default length in steps off."""
    for section, steps, epochs in LENGTHS:
        given = _section(values, section)
        if given.get(epochs) is not None and steps not in given:
            given[steps] = None if steps == "max_steps" else 0


def steps_per_epoch(samples: int, global_batch: int) -> int:
    """The loader's epoch: whole global batches only (the last partial one is not trained on in that epoch)."""
    return samples // global_batch


def steps_for_epochs(epochs: float, samples: int, global_batch: int) -> int:
    """Optimizer steps in ``epochs`` of the loader's epochs (a fraction rounds to the nearest step), so a run
    given in epochs ends where an epoch ends and never reads into the next."""
    return round(epochs * steps_per_epoch(samples, global_batch))


def resolve_epochs(cfg: Config, samples: int | None) -> None:
    """Lengths given in epochs become steps (``samples``: the training shards' count); the config then holds
    steps only, so the run folder's config.json repeats the run exactly."""
    t, s = cfg.train, cfg.schedule
    if t.epochs is None and s.warmup_epochs is None:
        return
    if samples is None:
        raise ConfigError("train.epochs: the training shards' sample count is unknown (no index.json); set "
                          "data.num_samples or give train.max_steps")
    if t.epochs is not None:
        t.max_steps, t.epochs = steps_for_epochs(t.epochs, samples, cfg.data.batch_size), None
    if s.warmup_epochs is not None:
        s.warmup_steps, s.warmup_epochs = steps_for_epochs(s.warmup_epochs, samples, cfg.data.batch_size), None


def _refuse_repeats(seen: dict[str, str], keys: list[str], text: str) -> None:
    """A key given twice on one command line (or a key and its section) is a mistake, not a last-wins."""
    key = ".".join(keys)
    for other, earlier in seen.items():
        if other == key or other.startswith(key + ".") or key.startswith(other + "."):
            raise ConfigError(f"{key}: given twice on the command line ({earlier} and {text}); give it once")
    seen[key] = text


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


def validate(cfg: Config, need_data: bool = True) -> None:
    """Checks that need no data and no model: every impossible value is refused naming its key (and a missing
    ``data.train`` unless not ``need_data``)."""
    m, d, t, o, op, s = cfg.model, cfg.data, cfg.train, cfg.objective, cfg.optim, cfg.schedule
    at_least = {"data.batch_size": (d.batch_size, 1), "train.grad_accum": (t.grad_accum, 1),
                "train.checkpoint_every": (t.checkpoint_every, 1), "train.log_every": (t.log_every, 1),
                "train.keep_last": (t.keep_last, 1), "data.shuffle_buffer": (d.shuffle_buffer, 1),
                "data.num_samples": (d.num_samples, 1), "data.workers": (d.workers, 0),
                "data.stall_timeout": (d.stall_timeout, 0),
                "train.max_steps": (t.max_steps, 0), "schedule.warmup_steps": (s.warmup_steps, 0),
                "model.num_classes": (m.num_classes, 0), "model.embed_dim": (m.embed_dim, 1),
                "model.depth": (m.depth, 1), "model.num_heads": (m.num_heads, 1), "model.mlp_dim": (m.mlp_dim, 1),
                "optim.lr": (op.lr, 0), "optim.weight_decay": (op.weight_decay, 0), "train.seed": (t.seed, 0)}
    at_least.update({"train.threads": (t.threads, 1)})
    for key, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
    sizes = m.image_size if isinstance(m.image_size, list) else [m.image_size, m.image_size]
    if m.image_size is not None and (len(sizes) != 2 or min(sizes) < 1):
        raise ConfigError(f"model.image_size: must be N or [H, W] with sizes >= 1, got {m.image_size}")
    within = {"data.crop_scale_min": (d.crop_scale_min, "(0, 1]", lambda v: 0 < v <= 1),
              "schedule.min_lr_ratio": (s.min_lr_ratio, "[0, 1]", lambda v: 0 <= v <= 1),
              "model.drop_rate": (m.drop_rate, "[0, 1)", lambda v: 0 <= v < 1),
              "model.drop_path_rate": (m.drop_path_rate, "[0, 1)", lambda v: 0 <= v < 1),
              "optim.momentum": (op.momentum, "[0, 1)", lambda v: 0 <= v < 1),
              "optim.layer_decay": (op.layer_decay, "(0, 1]", lambda v: 0 < v <= 1),
              "optim.clip_grad_norm": (op.clip_grad_norm, "(0, inf)", lambda v: v > 0),
              "train.peak_tflops": (t.peak_tflops, "(0, inf)", lambda v: v > 0),
              "train.epochs": (t.epochs, "(0, inf)", lambda v: v > 0),
              "schedule.warmup_epochs": (s.warmup_epochs, "[0, inf)", lambda v: v >= 0)}
    for key, (value, text, ok) in within.items():
        if value is not None and not ok(value):
            raise ConfigError(f"{key}: must be in {text}, got {value}")
    if t.seed >= 2**63:
        raise ConfigError(f"train.seed: must be < 2**63, got {t.seed}")
    if (t.max_steps is None) == (t.epochs is None):
        raise ConfigError("train.max_steps, train.epochs: give exactly one of them (the run's length in steps or "
                          f"in epochs), got max_steps={t.max_steps}, epochs={t.epochs}")
    if s.warmup_steps and s.warmup_epochs is not None:
        raise ConfigError("schedule.warmup_steps, schedule.warmup_epochs: give one of them, got "
                          f"warmup_steps={s.warmup_steps}, warmup_epochs={s.warmup_epochs}")
    if t.best_metric is not None and not re.fullmatch(r"knn_top1|val_\w+", t.best_metric):
        raise ConfigError(f"train.best_metric: knn_top1 or val_<metric> (val_loss, val_accuracy, ...), "
                          f"got {t.best_metric!r}")
    if t.keep_best and not (d.val or d.monitor):
        raise ConfigError("train.keep_best: needs data.val or data.monitor (the metric that picks best/)")
    if t.keep_best and best_metric(cfg).startswith("val_") and not d.val:
        raise ConfigError(f"train.best_metric: {best_metric(cfg)} needs data.val")
    if t.keep_best and best_metric(cfg) == "knn_top1" and not d.monitor:
        raise ConfigError("train.best_metric: knn_top1 needs data.monitor")
    if len(op.betas) != 2 or not all(0 <= b < 1 for b in op.betas):
        raise ConfigError(f"optim.betas: must be two values in [0, 1), got {op.betas}")
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if values is not None and len(values) != CHANNELS:
            raise ConfigError(f"{key}: needs one value per channel ({CHANNELS}), got {values}")
    if d.std is not None and min(d.std) <= 0:
        raise ConfigError(f"data.std: must be > 0, got {d.std}")
    try:
        o.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.train is None and need_data:
        raise ConfigError("data.train: required (a shard folder with index.json, a shard list or a pattern)")
    if Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
        raise ConfigError(f"train.output_dir: {t.output_dir} exists and is not a folder")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: {t.resume} does not exist (use auto, none or a checkpoint folder)")


def best_metric(cfg: Config) -> str:
    """The metric that picks best/: ``train.best_metric``, else the kNN monitor's top-1, else the held-out loss."""
    return cfg.train.best_metric or ("knn_top1" if cfg.data.monitor else "val_loss")


def best_mode(cfg: Config) -> str:
    """``max`` or ``min``: ``train.best_mode``, or for ``auto`` min for a loss and max for anything else."""
    if cfg.train.best_mode != "auto":
        return cfg.train.best_mode
    return "min" if best_metric(cfg).endswith("loss") else "max"
