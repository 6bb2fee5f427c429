"""Training objectives, found by name in ``OBJECTIVES``.

An objective is one module here, named as the objective: an ``nn.Module`` (an ``Objective``) that maps
(model, batch, generator) to a loss and a dict of scalar metrics named in ``metrics``. Its options, the
config's ``objective`` section, are registered under its name in ``pretrain.objective_options``, which
loads without torch; the module is found from that name. Adding one = its module + its options there.
"""

from __future__ import annotations

import importlib

from torch import nn

from pretrain.objective_options import OBJECTIVE_OPTIONS, ObjectiveOptions, options_for
from pretrain.objectives.base import Normalization, Objective, patchify
from pretrain.objectives.mae import MaskedAutoencoder, mae_loss, random_masking
from pretrain.objectives.mpp import (
    MaskedPatchPrediction,
    corrupt,
    corruption_plan,
    downsampled_target,
    masked_patch_loss,
    mean_color_target,
    quantize_colors,
)
from pretrain.objectives.supervised import Supervised
from vit import VisionTransformer


def objective_class(name: str) -> type[Objective]:
    """The ``Objective`` in ``pretrain/objectives/<name>.py`` that takes the options registered as ``name``."""
    options = OBJECTIVE_OPTIONS.get(name)
    module = importlib.import_module(f"{__name__}.{name}")
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Objective) and c.Options is options]
    if len(found) != 1:
        raise LookupError(f"{module.__file__}: expected one Objective whose Options is {options.__name__}, "
                          f"found {len(found)}")
    return found[0]


OBJECTIVES: dict[str, type[Objective]] = {name: objective_class(name) for name in OBJECTIVE_OPTIONS}

__all__ = [
    "OBJECTIVES", "MaskedAutoencoder", "MaskedPatchPrediction", "Normalization", "Objective", "ObjectiveOptions",
    "Supervised", "Task", "build_objective", "corrupt", "corruption_plan", "downsampled_target", "mae_loss",
    "masked_patch_loss", "mean_color_target", "objective_class", "options_for", "patchify", "quantize_colors",
    "random_masking",
]


def build_objective(cfg, model: VisionTransformer) -> Objective:
    options = cfg.objective
    return OBJECTIVES[options.name](model, options, Normalization(tuple(cfg.data.mean), tuple(cfg.data.std)))


class Task(nn.Module):
    """Model + objective as one module, so DDP / DeepSpeed see (and shard) every trained parameter."""

    def __init__(self, model: VisionTransformer, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict, generator=None):
        return self.objective(self.model, batch, generator)
