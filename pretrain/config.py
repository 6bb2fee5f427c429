"""Typed run configs: YAML files plus ``key=value`` overrides; unknown keys and wrong types are errors.

One ``Config`` serves both stages: fine-tuning only adds ``init`` and a few model keys. Each field carries
its help and range (``pretrain.fields``); the ``objective`` section is the chosen objective's options
(``pretrain.objective_options``). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from pretrain.config_merge import overrides_tree, with_overrides
from pretrain.fields import ConfigError, checked, field, out_of_range
from pretrain.objective_options import ObjectiveOptions, options_for

CHANNELS = 3  # RGB: the loader decodes every image to three channels


@dataclass
class ModelConfig:
    name: str = field("vit_ti16", help="vit_<ti|s|b|l|h><patch>")
    image_size: int | list[int] | None = field(224, help="fine-tuning: null keeps the checkpoint's")
    num_classes: int | None = field(None, help="default: the classes in the training shards' index", range=">= 0")
    head: Literal["pretrain", "linear", "none"] = "pretrain"
    global_pool: Literal["token", "avg"] | None = field("token", help="fine-tuning: null keeps the checkpoint's")
    embed_dim: int | None = field(None, help="the four below override the named size (small test models)",
                                  range=">= 1")
    depth: int | None = field(None, range=">= 1")
    num_heads: int | None = field(None, range=">= 1")
    mlp_dim: int | None = field(None, range=">= 1")
    drop_rate: float = field(0.0, range="[0, 1)")
    drop_path_rate: float = field(0.0, range="[0, 1)")
    grad_checkpointing: bool = False
    pos_embed_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    pos_embed: Literal["learned", "sincos"] | None = field("learned", help="sincos: MAE's fixed 2D table, not trained")


@dataclass
class DataConfig:
    train: str | list[str] | None = field(None, help="folder or s3://... with index.json, shard list, brace pattern, "
                                                     "pipe:, URL")
    val: str | list[str] | None = None
    num_samples: int | None = field(None, help="only for shards without an index.json", range=">= 1")
    batch_size: int = field(256, help="global: across processes and accumulation steps", range=">= 1")
    workers: int = field(2, range=">= 0")
    shuffle_buffer: int = field(2000, range=">= 1")
    stall_timeout: float = field(600, help="seconds a shard may yield no sample before the run stops naming it; "
                                           "0: no limit", range=">= 0")
    resampled: bool = field(False, help="draw shards with replacement forever (the usual choice for pretraining)")
    record_keys: bool = field(False, help="one line per optimizer step in OUTPUT_DIR/samples/rank{R}.jsonl: its "
                                          "samples' keys")
    augment: bool = field(True, help="random-resized crop + flip; false: resize and centre crop only")
    crop_scale_min: float = field(0.08, range="(0, 1]")
    resize_filter: Literal["bicubic", "bilinear"] = field("bilinear", help="the crop's resampling (antialiased), "
                                                                          "train and eval")
    decode: Literal["cpu", "gpu"] = field("cpu", help="gpu: workers hand over JPEG bytes, decoded in batches on the "
                                                      "CUDA device")
    monitor: str | list[str] | None = field(None, help="labelled shards: kNN top-1 of frozen features at every "
                                                       "checkpoint")
    monitor_bank: str | list[str] | None = field(None, help="the kNN's labelled bank; null: leave-one-out on "
                                                            "data.monitor")
    mean: list[float] | None = field(None, help="null: the checkpoint's when fine-tuning, else 0.5 (the paper's "
                                                "[-1, 1])")
    std: list[float] | None = None


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = field(1e-3, range=">= 0")
    weight_decay: float = field(0.1, range=">= 0")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = field(0.9, range="[0, 1)")
    clip_grad_norm: float | None = field(1.0, range="(0, inf)")
    layer_decay: float | None = field(None, help="layer-wise lr decay (MAE fine-tuning): layer l gets lr * "
                                                 "decay^(L+1-l)", range="(0, 1]")


@dataclass
class ScheduleConfig:
    warmup_steps: int = field(0, range=">= 0")
    warmup_epochs: float | None = field(None, help="instead of warmup_steps: passes over the training shards",
                                        range="[0, inf)")
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = field(0.0, range="[0, 1]")


@dataclass
class TrainConfig:
    max_steps: int | None = field(1000, help="optimizer steps; or give train.epochs instead (exactly one of the "
                                             "two)", range=">= 0")
    epochs: float | None = field(None, help="instead of max_steps: passes over the training shards (their index's "
                                            "sample count)", range="(0, inf)")
    threads: int | None = field(None, help="torch threads per process; null: OMP_NUM_THREADS, else the cores / local "
                                           "processes", range=">= 1")
    grad_accum: int = field(1, range=">= 1")
    checkpoint_every: int = field(500, range=">= 1")
    keep_last: int = field(2, range=">= 1")
    output_dir: str = "runs/pretrain"
    resume: str = field("auto", help="auto | none | a checkpoint path")
    seed: int = field(0, range=">= 0")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = field(10, range=">= 1")
    compile: bool = False
    peak_tflops: float | None = field(None, help="for MFU; measured with a matmul when not given", range="(0, inf)")
    resume_mismatch: Literal["refuse", "allow"] = field("refuse", help="a checkpoint made with other result-changing "
                                                                      "keys")
    keep_best: bool = field(False, help="keep best/: the model of the checkpoint with the best train.best_metric")
    best_metric: str | None = field(None, help="knn_top1, val_loss, val_<objective metric>; null: knn_top1 with "
                                               "data.monitor, else val_loss")
    best_mode: Literal["auto", "max", "min"] = field("auto", help="auto: min for a *loss metric, else max")
    on_nonfinite: Literal["stop", "skip", "rollback"] = field(
        "stop", help="a step whose loss or clipped gradient norm is not finite: stop the run; skip its update; or "
                     "reload the newest checkpoint and go on with the data after that step")
    max_nonfinite: int = field(5, help="skip: the most steps skipped within train.nonfinite_window steps; rollback: "
                                       "the most rollbacks in the run; one more stops it", range=">= 0")
    nonfinite_window: int = field(1000, help="steps (train.on_nonfinite=skip)", range=">= 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveOptions = field(default_factory=lambda: options_for("supervised"), help="its own keys")
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: str | None = field(None, help="fine-tuning: the checkpoint folder to start from")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
            setattr(obj, key, checked(value, hints[key], full))


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
    given = overrides_tree([(text, *parse_override(text)) for text in overrides])
    values = with_overrides(values, given, cfg.objective.name)
    objective = values.get("objective")
    if isinstance(objective, dict) and "name" in objective and objective["name"] != cfg.objective.name:
        try:
            cfg.objective = options_for(objective["name"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _apply(cfg, values)
    validate(cfg, need_data)
    return cfg


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


def validate(cfg: Config, need_data: bool = True) -> None:
    """Checks that need no data and no model: every impossible value is refused naming its key (and a missing
    ``data.train`` unless not ``need_data``)."""
    m, d, t, op, s = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.schedule
    if problem := next(out_of_range(cfg, ""), None):
        raise ConfigError(problem)
    sizes = m.image_size if isinstance(m.image_size, list) else [m.image_size, m.image_size]
    if m.image_size is not None and (len(sizes) != 2 or min(sizes) < 1):
        raise ConfigError(f"model.image_size: must be N or [H, W] with sizes >= 1, got {m.image_size}")
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
        cfg.objective.validate()
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
