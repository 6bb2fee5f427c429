"""Fine-tune a checkpoint: swap the head, change the resolution, train with the one training loop.

examples:
  vitpipe finetune --config configs/finetune/tiny.yaml init=runs/tiny-pretrain/final data.train=shards/labelled
  vitpipe finetune --config configs/finetune/ssl_tiny.yaml init=runs/tiny-mae/final data.train=shards/labelled
  accelerate launch --config_file configs/accelerate/gpu_8.yaml -m finetune --config configs/finetune/vit_b16_384.yaml \\
      init=runs/vit_b16_supervised/final data.train=/data/imagenet/train optim.lr=0.01
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.devices import is_main_process
from common.images import image_pair
from common.lock import FolderLock
from finetune.prepare import finetune_changes, prepare_for_finetune
from pretrain.config import Config, ConfigError, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from pretrain.loop import train
from pretrain.objectives import build_objective
from pretrain.stage import Stage, run_info, training_shards
from vit import load_model, parse_model_name, save_checkpoint


def finetune_defaults() -> Config:
    """The paper's fine-tuning choices: SGD momentum 0.9, no weight decay, clip 1, cosine with warmup;
    the checkpoint's resolution and pooling unless the config sets them."""
    return Config(
        model=ModelConfig(name="", image_size=None, head="linear", global_pool=None, pos_embed=None),
        optim=OptimConfig(name="sgd", lr=0.01, weight_decay=0.0, momentum=0.9, clip_grad_norm=1.0),
        schedule=ScheduleConfig(warmup_steps=500, decay="cosine"),
        train=TrainConfig(output_dir="runs/finetune"),
    )


def finetune(cfg: Config) -> Path:
    if not cfg.init:
        raise ConfigError("init: required (the checkpoint folder to fine-tune)")
    model, info = load_model(cfg.init, drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    m = model.cfg
    cfg.data.mean = cfg.data.mean or list(info.mean)  # the normalisation the checkpoint was trained with
    cfg.data.std = cfg.data.std or list(info.std)
    if cfg.model.name:
        asked = parse_model_name(cfg.model.name)
        if asked and asked[1] != m.patch_size:
            raise ConfigError(f"model.name: {cfg.model.name} asks for patch size {asked[1]} but {cfg.init} "
                              f"has patch size {m.patch_size}")
    shards = training_shards(cfg)
    num_classes = cfg.model.num_classes or (len(shards.classes) if shards.classes else None)
    if not num_classes:
        raise ConfigError("model.num_classes: not set and the training shards' index lists no classes")
    size = None if cfg.model.image_size is None else image_pair(cfg.model.image_size)
    before = dataclasses.replace(model.cfg)
    try:
        prepare_for_finetune(model, num_classes, size, cfg.model.pos_embed_interpolation, cfg.model.head,
                             cfg.model.global_pool, cfg.model.pos_embed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # the run's config.json records the pooling and position embeddings it used
    cfg.model.global_pool, cfg.model.pos_embed = model.cfg.global_pool, model.cfg.pos_embed
    changes = finetune_changes(before, model.cfg, cfg.model.pos_embed_interpolation)
    info = run_info(cfg, shards, num_classes, {"init": str(cfg.init), "init_stage": info.provenance.get("stage"),
                                               "pretraining": info.provenance.get("objective"),
                                               "data": str(cfg.data.train)})
    if cfg.train.max_steps == 0:
        out = Path(cfg.train.output_dir)
        if not is_main_process():  # one writer per launch: the main process, holding the folder's lock
            return out / "final"
        out.mkdir(parents=True, exist_ok=True)
        with FolderLock(out, "vitpipe finetune"):  # the same one-writer rule as a training run's
            save_checkpoint(model, out / "final", info)
        return out / "final"
    return train(cfg, model, build_objective(cfg, model), info, "finetune", shards, changes)


STAGE = Stage("finetune", __doc__, finetune_defaults, finetune)
parser, main = STAGE.parser, STAGE.main
