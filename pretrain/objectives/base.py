"""What every objective shares: the module's contract, and two small helpers (its options' base is in
``pretrain.objective_options``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import VitpipeError
from common.images import unnormalize
from pretrain.objective_options import ObjectiveOptions


class ObjectiveError(VitpipeError, ValueError):
    """An objective setting impossible for this model (e.g. at its patch grid); the message names the key."""


class Objective(nn.Module):
    """``forward(model, batch, generator) -> (loss, {metric: scalar tensor})``.

    ``metrics`` names what the loop averages and logs beside the loss (the same on every rank);
    ``uses_labels`` says whether the training shards need classes.
    """

    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions
    metrics: tuple[str, ...] = ()
    uses_labels: ClassVar[bool] = False


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return unnormalize(x, self.mean, self.std)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches in row-major order, pixels as (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
