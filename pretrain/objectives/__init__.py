"""Training objectives, found by name in ``OBJECTIVES``.

An objective is one module: an ``Options`` dataclass (the config's ``objective`` section, whose
``name`` selects the objective) and an ``nn.Module`` that maps (model, batch, generator) to a
loss and a dict of scalar metrics named in ``metrics``. Adding one = one module + one line below.
"""

from __future__ import annotations

from torch import nn

from pretrain.objectives.base import Normalization, Objective, ObjectiveOptions, patchify
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

OBJECTIVES: dict[str, type[Objective]] = {o.Options.name: o for o in (Supervised, MaskedPatchPrediction,
                                                                      MaskedAutoencoder)}

__all__ = [
    "OBJECTIVES", "MaskedAutoencoder", "MaskedPatchPrediction", "Normalization", "Objective", "ObjectiveOptions",
    "Supervised", "Task", "build_objective", "corrupt", "corruption_plan", "downsampled_target", "mae_loss",
    "masked_patch_loss", "mean_color_target", "options_for", "patchify", "quantize_colors", "random_masking",
]


def options_for(name: str) -> ObjectiveOptions:
    """Default options of the objective called ``name``; an unknown name is a ValueError listing the known."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name: unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[name].Options()


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
