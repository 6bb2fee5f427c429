"""Pretrain a ViT: a config, a fresh model and an objective, handed to the one training loop.

examples:
  vitpipe pretrain --config configs/pretrain/tiny.yaml data.train=shards/train
  vitpipe pretrain --config configs/pretrain/tiny_mae.yaml data.train=shards/train train.max_steps=2000
  vitpipe pretrain --config configs/pretrain/tiny_mae.yaml data.train=shards/train train.epochs=5 --print-config
  vitpipe pretrain --config runs/tiny-mae/config.json          # a run folder's resolved config: repeat (or resume) it
  accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m pretrain \\
      --config configs/pretrain/tiny.yaml data.train=shards/train
"""

from __future__ import annotations

import argparse

from common.devices import is_main_process
from common.errors import exit_status
from common.images import INCEPTION_MEAN, INCEPTION_STD
from data_tools.loader import resolve_shards
from pretrain.config import Config, ConfigError, load_config, resolve_epochs
from pretrain.config_help import config_text, stage_parser
from pretrain.loop import train
from pretrain.objectives import OBJECTIVES, build_objective
from vit import ModelInfo, create_model


def build_model(cfg: Config, classes: list[str] | None):
    m = cfg.model
    num_classes = m.num_classes
    uses_labels = OBJECTIVES[cfg.objective.name].uses_labels
    if num_classes is None:
        num_classes = len(classes) if classes and uses_labels else 0
    if uses_labels and not num_classes:
        raise ConfigError(f"model.num_classes: the training shards have no classes; set it (or use a "
                          f"self-supervised objective.name: {', '.join(n for n, o in OBJECTIVES.items() if not o.uses_labels)})")
    try:
        return create_model(m.name, image_size=m.image_size, num_classes=num_classes,
                            head=m.head if num_classes else "none", global_pool=m.global_pool, embed_dim=m.embed_dim,
                            depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim, drop_rate=m.drop_rate,
                            drop_path_rate=m.drop_path_rate)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def pretrain(cfg: Config):
    if cfg.init is not None:
        raise ConfigError(f"init: a fine-tuning key (vitpipe finetune init={cfg.init} ...); pretraining starts "
                          "from a fresh model")
    cfg.data.mean = cfg.data.mean or list(INCEPTION_MEAN)
    cfg.data.std = cfg.data.std or list(INCEPTION_STD)
    shards = resolve_shards(cfg.data.train, cfg.data.num_samples)
    resolve_epochs(cfg, shards.num_samples)
    import torch

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every rerun
    model = build_model(cfg, shards.classes)
    labels = shards.classes if model.cfg.num_classes and shards.classes and \
        len(shards.classes) == model.cfg.num_classes else None
    info = ModelInfo(labels=labels, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                     provenance={"data": str(cfg.data.train)})
    return train(cfg, model, build_objective(cfg, model), info, "pretrain", shards)


def parser(prog: str = "pretrain") -> argparse.ArgumentParser:
    return stage_parser(prog, __doc__, Config(), skip=("init",))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def run() -> None:
        cfg = load_config(args.config, args.overrides, stage="pretrain", need_data=not args.print_config)
        if args.print_config:
            print(config_text(cfg, "pretrain"), end="")
            return
        final = pretrain(cfg)
        if is_main_process():  # once per launch
            print(f"final model: {final}")

    return exit_status("pretrain", run)
