"""The objectives by name, each with its options: the config's ``objective`` section, whose ``name`` picks one.

No torch here, so a config loads (and ``--help`` lists every objective's keys) without it. The objective
itself, the ``nn.Module`` that computes the loss, is the module of the same name in ``pretrain/objectives/``
(``mae`` -> ``pretrain/objectives/mae.py``), found from the name when a run builds it.

Adding an objective: its module, and its options below under one registration line, e.g.

    @OBJECTIVE_OPTIONS.register("simclr")
    @dataclass
    class SimCLROptions(ObjectiveOptions):
        name: str = "simclr"
        temperature: float = field(0.1, help="softmax temperature of the contrastive loss", range="(0, inf)")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.registry import Registry
from pretrain.fields import field


@dataclass
class ObjectiveOptions:
    name: str = ""

    def validate(self) -> None:
        """Raise ValueError naming the ``objective.*`` keys of values impossible together (a single value's
        limits are its field's ``range``)."""


OBJECTIVE_OPTIONS: Registry[type[ObjectiveOptions]] = Registry("objective")


@OBJECTIVE_OPTIONS.register("supervised")
@dataclass
class SupervisedOptions(ObjectiveOptions):
    name: str = "supervised"
    label_smoothing: float = field(0.0, range="[0, 1)")
    multilabel: bool = field(False, help="sigmoid BCE instead of softmax: summed over classes, mean over batch "
                                         "(big_vision)")


@OBJECTIVE_OPTIONS.register("mpp")
@dataclass
class MaskedPatchPredictionOptions(ObjectiveOptions):
    name: str = "mpp"
    mpp_target: Literal["mean_color", "downsampled", "pixels"] = "mean_color"
    corrupt_ratio: float = field(0.5, range="(0, 1]")
    mask_prob: float = field(0.8, help="of the corrupted: replaced by the [mask] embedding")
    random_prob: float = field(0.1, help="... by another patch's embedding; the rest are left unchanged")
    color_bits: int = field(3, range="[1, 8]")

    def validate(self) -> None:
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
            raise ValueError("objective.mask_prob + objective.random_prob: must be within [0, 1]")


@OBJECTIVE_OPTIONS.register("mae")
@dataclass
class MaskedAutoencoderOptions(ObjectiveOptions):
    name: str = "mae"
    mask_ratio: float = field(0.75, range="[0, 1)")
    decoder_dim: int = field(512, range=">= 1")
    decoder_depth: int = field(8, range=">= 1")
    decoder_heads: int = field(16, range=">= 1")
    norm_pix_loss: bool = True

    def validate(self) -> None:
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ValueError(f"objective.decoder_dim: {self.decoder_dim} must be divisible by 4 and by "
                             f"objective.decoder_heads ({self.decoder_heads})")


def options_for(name: str) -> ObjectiveOptions:
    """Default options of the objective called ``name``; an unknown name is a ValueError listing the known."""
    if name not in OBJECTIVE_OPTIONS:
        raise ValueError(f"objective.name: unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVE_OPTIONS))})")
    return OBJECTIVE_OPTIONS.get(name)()
