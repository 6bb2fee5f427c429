"""The pretraining stage: a config, a fresh ViT and an objective, handed to the one loop.

    accelerate launch [--config_file configs/accelerate/X.yaml] -m pretrain --config configs/pretrain/Y.yaml [key=value ...]
    vitpipe pretrain --config configs/pretrain/Y.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from data_tools.loader import LoaderError, resolve_shards
from pretrain.config import Config, ConfigError, load_config
from pretrain.loop import TrainingError, train
from pretrain.objectives import OBJECTIVES, build_objective
from vit import CheckpointError, ModelInfo, create_model

USER_ERRORS = (ConfigError, LoaderError, CheckpointError, TrainingError, ValueError, FileNotFoundError)


def build_model(cfg: Config, classes: list[str] | None):
    m = cfg.model
    num_classes = m.num_classes
    uses_labels = OBJECTIVES[cfg.objective.name].uses_labels
    if num_classes is None:
        num_classes = len(classes) if classes and uses_labels else 0
    if uses_labels and not num_classes:
        raise ConfigError(f"model.num_classes: the training shards have no classes; set it (or use a "
                          f"self-supervised objective.name: {', '.join(n for n, o in OBJECTIVES.items() if not o.uses_labels)})")
    size = tuple(m.image_size) if isinstance(m.image_size, list) else m.image_size
    try:
        return create_model(m.name, image_size=size, num_classes=num_classes, head=m.head if num_classes else "none",
                            global_pool=m.global_pool, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                            mlp_dim=m.mlp_dim, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def pretrain(cfg: Config):
    cfg.data.mean = cfg.data.mean or [0.5, 0.5, 0.5]
    cfg.data.std = cfg.data.std or [0.5, 0.5, 0.5]
    shards = resolve_shards(cfg.data.train, cfg.data.num_samples)
    import torch

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every rerun
    model = build_model(cfg, shards.classes)
    labels = shards.classes if model.cfg.num_classes and shards.classes and \
        len(shards.classes) == model.cfg.num_classes else None
    info = ModelInfo(labels=labels, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                     provenance={"data": str(cfg.data.train)})
    return train(cfg, model, build_objective(cfg, model), info, "pretrain", shards)


def parse_args(argv, prog: str, doc: str):
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--config", help="YAML recipe, e.g. configs/pretrain/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 data.batch_size=64")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "pretrain", __doc__.splitlines()[0])
    try:
        final = pretrain(load_config(args.config, args.overrides))
    except USER_ERRORS as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    print(f"final model: {final}")
    return 0
