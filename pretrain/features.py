"""The one feature extractor every evaluator reads: a frozen model's pooled features, pre-logits or logits,
with the labels of every sample one rank sees.

``pooled``: the pooled token (class token or average, after the final norm), what fine-tuning starts from and what
the kNN monitor compares; ``pre_logits``: then a pretraining head's tanh layer (the paper's few-shot
representation); ``logits``: the head's output (top-1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from data_tools.loader import ShardSet, eval_loader
from vit import VisionTransformer

KINDS = ("pooled", "pre_logits", "logits")


def features(model: VisionTransformer, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """``kind`` (one of ``KINDS``) of a batch's encoded ``tokens``."""
    pooled = model.pool(tokens)
    if kind == "pooled":
        return pooled
    pre = model.pre_logits(pooled)
    return pre if kind == "pre_logits" else model.head(pre)


def width(model: VisionTransformer, kind: str) -> int:
    return model.cfg.num_classes if kind == "logits" else model.num_features


@torch.no_grad()
def extract(model: VisionTransformer, shards: ShardSet, transform, batch_size: int, rank: int, world: int,
            workers: int, device, kind: str = "pooled",
            on_batch: Callable[[dict], None] | None = None, stall_timeout: float = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``kind`` features and labels of this rank's share of ``shards``, and how many samples it lost (damaged
    shards, images that do not decode). ``on_batch`` sees every batch, empty ones included (a progress bar)."""
    if kind not in KINDS:
        raise ValueError(f"feature kind {kind!r}: expected one of {', '.join(KINDS)}")
    feats, labels, skipped = [], [], 0
    for batch in eval_loader(shards, transform, batch_size, rank=rank, world_size=world, workers=workers,
                             stall_timeout=stall_timeout):
        skipped += int(batch["skipped"])
        if on_batch is not None:
            on_batch(batch)
        if len(batch["labels"]):
            tokens = model.forward_features(transform.to_device(batch, device)["pixel_values"])
            feats.append(features(model, tokens, kind).float().cpu())
            labels.append(batch["labels"])
    if not feats:  # a rank that saw nothing: the same width as the others
        return torch.empty(0, width(model, kind)), torch.empty(0, dtype=torch.long), skipped
    return torch.cat(feats), torch.cat(labels), skipped
