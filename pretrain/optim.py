"""The optimizer's pieces: the learning-rate schedule, MAE's layer-wise lr decay and the parameter groups."""

from __future__ import annotations

import math

import torch

from pretrain.config import Config, ConfigError
from vit import VisionTransformer


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 over ``warmup`` steps, then linear or cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def layer_id(name: str, depth: int) -> int:
    """MAE's (and BEiT's) layer of a ViT parameter: 0 for the patch and position embeddings and the
    class token, 1..depth for the blocks, depth + 1 for what follows them (norm, fc_norm, head)."""
    if name.startswith(("patch_embed.", "pos_embed", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(module: torch.nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Weight decay on weight matrices and kernels only: not on biases, norms, embeddings or tokens.

    Each group has an ``lr_scale`` (the loop multiplies the scheduled lr by it): 1, or with
    ``layer_decay`` (MAE's layer-wise lr decay) ``layer_decay ** (depth + 1 - layer_id)`` for the
    ViT inside ``module``, one group per layer and decay; parameters outside the ViT (an
    objective's) count as its top layer. The top layer (scale 1) comes first.
    """
    prefix, depth = "", 0
    if layer_decay is not None:
        found = next(((n, m) for n, m in module.named_modules() if isinstance(m, VisionTransformer)), None)
        if found is None:
            raise ConfigError("optim.layer_decay: the trained module holds no VisionTransformer")
        prefix, depth = (found[0] + "." if found[0] else ""), len(found[1].blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        layer = layer_id(name[len(prefix):], depth) if layer_decay is not None and name.startswith(prefix) \
            else depth + 1
        scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - layer)
        groups.setdefault((layer, flat), {"params": [], "weight_decay": 0.0 if flat else weight_decay,
                                          "lr_scale": scale})["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


def build_optimizer(cfg: Config, module: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: AdamW's one-kernel update (where the parameters will live on CUDA; the CPU keeps the
    for-each update its published results were made with)."""
    o = cfg.optim
    groups = param_groups(module, o.weight_decay, o.layer_decay)
    for g in groups:
        g["lr"] = o.lr * g["lr_scale"]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=fused or None)
