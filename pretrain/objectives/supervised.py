"""Supervised classification: softmax cross-entropy (optional label smoothing) or sigmoid BCE.

The sigmoid BCE is big_vision's ``sigmoid_xent``: summed over the classes, averaged over the batch
(torch's default mean over classes too would shrink the loss, and its gradient, by the class count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.objective_options import SupervisedOptions
from pretrain.objectives.base import Normalization, Objective
from vit import VisionTransformer


def sigmoid_xent(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every class's sigmoid (B, C) against ``target`` in [0, 1], summed over the
    classes and averaged over the batch, as big_vision's ``sigmoid_xent``."""
    per_class = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return per_class.sum(dim=-1).mean()


class Supervised(Objective):
    Options = SupervisedOptions
    metrics = ("accuracy",)
    uses_labels = True

    def __init__(self, model: VisionTransformer, options: SupervisedOptions, norm: Normalization | None = None):
        super().__init__()
        self.label_smoothing, self.multilabel = options.label_smoothing, options.multilabel

    def forward(self, model: VisionTransformer, batch: dict, generator=None) -> tuple[torch.Tensor, dict]:
        logits = model(batch["pixel_values"])
        labels = batch["labels"]
        if self.multilabel:
            target = labels.float() if labels.ndim == 2 else F.one_hot(labels, logits.shape[-1]).float()
            if self.label_smoothing:
                target = target * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
            loss = sigmoid_xent(logits, target)
            hits = target.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1) > 0.5
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            hits = logits.argmax(-1) == labels
        return loss, {"accuracy": hits.float().mean().detach()}
