"""The paper's masked patch prediction (MPP).

It follows appendix B.1.2 of Dosovitskiy et al.: corrupt a fraction (50%) of the patch
*embeddings*; of those, 80% become a learnable [mask] embedding, 10% the embedding of a random
other patch, 10% stay as they are; predict each corrupted patch's 3-bit mean colour (512-way
softmax), or its 4x4 downsized version in 3-bit colour (16 x 512-way), or regress its pixels.
The math is kept in small pure functions below, each unit-tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objective_options import MaskedPatchPredictionOptions
from pretrain.objectives.base import Normalization, Objective, ObjectiveError, patchify
from vit import VisionTransformer


def quantize_colors(rgb: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """(..., 3) colours in [0, 1] -> class ids in [0, 2^(3*bits)): ``bits`` bits per channel, r major."""
    levels = 2**bits
    q = (rgb.clamp(0, 1) * levels).floor().clamp(max=levels - 1).long()
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def mean_color_target(pixels: torch.Tensor, patch: int, bits: int = 3) -> torch.Tensor:
    """Un-normalised images in [0, 1] (B, 3, H, W) -> (B, N) class of each patch's mean colour."""
    b = pixels.shape[0]
    means = patchify(pixels, patch).view(b, -1, patch * patch, 3).mean(dim=2)
    return quantize_colors(means, bits)


def downsampled_target(pixels: torch.Tensor, patch: int, bits: int = 3, cells: int = 4) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, N, cells*cells): each patch averaged to cells x cells, 3-bit colour."""
    b, c, h, w = pixels.shape
    small = F.adaptive_avg_pool2d(pixels, (h // patch * cells, w // patch * cells))
    cellwise = patchify(small, cells).view(b, -1, cells * cells, c)
    return quantize_colors(cellwise, bits)


def corruption_plan(batch: int, num_patches: int, ratio: float, mask_prob: float, random_prob: float,
                    generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, ...]:
    """Which patches to corrupt and how: (corrupted, to_mask, to_random), boolean (B, N) each.

    Exactly round(ratio * N) patches per image are corrupted (so every image, and every rank,
    weighs the same); each corrupted patch independently goes to [mask] / random / unchanged.
    """
    k = round(ratio * num_patches)
    scores = torch.rand(batch, num_patches, generator=generator, device=device)
    chosen = scores.argsort(dim=1)[:, :k]
    corrupted = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    corrupted.scatter_(1, chosen, True)
    u = torch.rand(batch, num_patches, generator=generator, device=device)
    to_mask = corrupted & (u < mask_prob)
    to_random = corrupted & (u >= mask_prob) & (u < mask_prob + random_prob)
    return corrupted, to_mask, to_random


def corrupt(embeddings: torch.Tensor, to_mask: torch.Tensor, to_random: torch.Tensor, mask_token: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply a plan to patch embeddings (B, N, D): [mask] embedding, or a random *other* patch of the same image."""
    b, n, _ = embeddings.shape
    offset = torch.randint(1, n, (b, n), generator=generator, device=embeddings.device) if n > 1 else \
        torch.zeros(b, n, dtype=torch.long, device=embeddings.device)
    source = (torch.arange(n, device=embeddings.device) + offset) % n  # never the patch itself
    shuffled = torch.gather(embeddings, 1, source.unsqueeze(-1).expand_as(embeddings))
    out = torch.where(to_random.unsqueeze(-1), shuffled, embeddings)
    return torch.where(to_mask.unsqueeze(-1), mask_token.to(out.dtype).expand_as(out), out)


def masked_patch_loss(predictions: torch.Tensor, targets: torch.Tensor, corrupted: torch.Tensor,
                      kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (and accuracy, or -mse for regression) over the corrupted patches only."""
    pred, tgt = predictions[corrupted], targets[corrupted]
    if kind == "pixels":
        loss = F.mse_loss(pred.float(), tgt.float())
        return loss, -loss.detach()
    if kind == "downsampled":
        pred = pred.reshape(-1, pred.shape[-1] // tgt.shape[-1])
        tgt = tgt.reshape(-1)
    loss = F.cross_entropy(pred.float(), tgt)
    return loss, (pred.argmax(-1) == tgt).float().mean().detach()


class MaskedPatchPrediction(Objective):
    """The paper's self-supervised objective; owns the [mask] embedding and the prediction head."""

    Options = MaskedPatchPredictionOptions

    def __init__(self, model: VisionTransformer, options: MaskedPatchPredictionOptions, norm: Normalization):
        super().__init__()
        cfg, o = model.cfg, options
        self.patch, self.norm, self.target, self.bits = cfg.patch_size, norm, o.mpp_target, o.color_bits
        self.ratio, self.mask_prob, self.random_prob = o.corrupt_ratio, o.mask_prob, o.random_prob
        if round(o.corrupt_ratio * cfg.num_patches) < 1:  # the loss is a mean over the corrupted patches
            gh, gw = cfg.grid_size
            raise ObjectiveError(f"objective.corrupt_ratio: {o.corrupt_ratio} corrupts 0 of the {cfg.num_patches} "
                                 f"patches ({gh}x{gw} grid); the loss would be NaN (raise it to at least "
                                 f"{0.5 / cfg.num_patches:.4g})")
        self.metrics = () if o.mpp_target == "pixels" else ("accuracy",)
        self.mask_token = nn.Parameter(torch.randn(1, 1, cfg.embed_dim) * 0.02)
        classes = 2 ** (3 * o.color_bits)
        out = {"mean_color": classes, "downsampled": 16 * classes, "pixels": cfg.patch_size**2 * cfg.in_chans}
        self.head = nn.Linear(cfg.embed_dim, out[o.mpp_target])

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        if self.target == "pixels":
            return patchify(images, self.patch)
        pixels = self.norm.unnormalize(images.float())
        if self.target == "mean_color":
            return mean_color_target(pixels, self.patch, self.bits)
        return downsampled_target(pixels, self.patch, self.bits)

    def forward(self, model: VisionTransformer, batch: dict, generator=None) -> tuple[torch.Tensor, dict]:
        images = batch["pixel_values"]
        patches = model.embed(images)
        b, n, _ = patches.shape
        corrupted, to_mask, to_random = corruption_plan(b, n, self.ratio, self.mask_prob, self.random_prob,
                                                        generator, patches.device)
        tokens = model.forward_normed_tokens(corrupt(patches, to_mask, to_random, self.mask_token, generator))
        loss, accuracy = masked_patch_loss(self.head(tokens[:, 1:]), self.targets(images), corrupted, self.target)
        return loss, {"accuracy": accuracy} if self.metrics else {}
