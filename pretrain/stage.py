"""The one stage runner: pretraining and fine-tuning are each a ``Stage`` (name, help text, defaults, and the
function that turns a resolved config into a final checkpoint); the command line, ``--print-config``, the config's
``stage`` check, one-line errors and the closing line are the same for both."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.devices import is_main_process
from common.errors import exit_status
from data_tools.loader import ShardSet, resolve_shards
from pretrain.config import Config, load_config, resolve_epochs
from pretrain.config_help import config_text, stage_parser
from vit import ModelInfo


@dataclass(frozen=True)
class Stage:
    name: str  # "pretrain" / "finetune": the config's ``stage``, the program name, the error prefix
    doc: str  # the help text above the config keys, with examples
    defaults: Callable[[], Config]
    run: Callable[[Config], Path]
    skip: tuple[str, ...] = field(default=())  # top-level config keys the help leaves out

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        return stage_parser(prog or self.name, self.doc, self.defaults(), skip=self.skip)

    def main(self, argv: list[str] | None = None) -> int:
        args = self.parser().parse_args(argv)

        def run() -> None:
            cfg = load_config(args.config, args.overrides, base=self.defaults(), stage=self.name,
                              need_data=not args.print_config)
            if args.print_config:
                print(config_text(cfg, self.name), end="")
                return
            final = self.run(cfg)
            if is_main_process():  # once per launch
                print(f"final model: {final}")

        return exit_status(self.name, run)


def training_shards(cfg: Config) -> ShardSet:
    """The training shards; a length in epochs becomes steps."""
    shards = resolve_shards(cfg.data.train, cfg.data.num_samples)
    resolve_epochs(cfg, shards.num_samples)
    return shards


def run_info(cfg: Config, shards: ShardSet, num_classes: int | None, provenance: dict) -> ModelInfo:
    """What the run's checkpoints record: class names (the shards', when they number the head's classes), the
    normalisation and resize filter, and where the weights came from."""
    labels = shards.classes if num_classes and shards.classes and len(shards.classes) == num_classes else None
    return ModelInfo(labels=labels, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), provenance=provenance,
                     resize_filter=cfg.data.resize_filter)
