"""The online kNN monitor: representation quality while training, without fine-tuning.

DINO's weighted k-nearest-neighbour classifier (Caron et al. 2021, ``eval_knn.py``) on frozen,
L2-normalised pooled features: the k most cosine-similar bank samples vote for their class
with weight exp(similarity / T). With one labelled set the monitor is leave-one-out: every
sample is a query against all the others, so no split is needed and nothing depends on order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_tools.loader import ShardSet, eval_loader
from vit import VisionTransformer


def knn_predict(bank_x: torch.Tensor, bank_y: torch.Tensor, query_x: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07, leave_one_out: bool = False, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each query. ``leave_one_out``: the queries are the bank, each row excluding itself."""
    bank = F.normalize(bank_x.float(), dim=1)
    queries = F.normalize(query_x.float(), dim=1)
    k = min(k, bank.shape[0] - int(leave_one_out))
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T
        if leave_one_out:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -float("inf")
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_y[idx], (top.double() / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def pooled_features(model: VisionTransformer, shards: ShardSet, transform, batch_size: int, rank: int, world: int,
                    workers: int, device, stall_timeout: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's pooled representation (what fine-tuning reads) of this rank's share of ``shards``."""
    feats, labels = [], []
    for batch in eval_loader(shards, transform, batch_size, rank=rank, world_size=world, workers=workers,
                             stall_timeout=stall_timeout):
        if len(batch["labels"]):
            tokens = model.forward_features(transform.to_device(batch, device)["pixel_values"])
            feats.append(model.forward_head(tokens, pre_logits=True).float().cpu())
            labels.append(batch["labels"])
    if not feats:
        return torch.empty(0, model.num_features), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(bank: tuple[torch.Tensor, torch.Tensor], queries: tuple[torch.Tensor, torch.Tensor] | None,
             num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Accuracy of ``knn_predict``; ``queries=None``: leave-one-out on the bank."""
    leave_one_out = queries is None
    qx, qy = bank if leave_one_out else queries
    pred = knn_predict(bank[0], bank[1], qx, num_classes, k, temperature, leave_one_out)
    return (pred == qy).double().mean().item() if len(qy) else float("nan")
