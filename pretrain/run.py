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

from common.images import INCEPTION_MEAN, INCEPTION_STD
from pretrain.config import Config, ConfigError
from pretrain.loop import train
from pretrain.objectives import OBJECTIVES, build_objective
from pretrain.stage import Stage, run_info, training_shards
from vit import create_model


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
                            head=m.head if num_classes else "none", global_pool=m.global_pool, pos_embed=m.pos_embed,
                            embed_dim=m.embed_dim,
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
    shards = training_shards(cfg)
    import torch

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every rerun
    model = build_model(cfg, shards.classes)
    info = run_info(cfg, shards, model.cfg.num_classes, {"data": str(cfg.data.train)})
    return train(cfg, model, build_objective(cfg, model), info, "pretrain", shards)


STAGE = Stage("pretrain", __doc__, Config, pretrain, skip=("init",))
parser, main = STAGE.parser, STAGE.main
