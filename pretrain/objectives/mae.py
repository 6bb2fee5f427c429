"""Masked autoencoders (He et al. 2021, arXiv 2111.06377), after the authors' ``models_mae.py``.

Mask a random ``mask_ratio`` (75%) of each image's patches; the encoder (our ViT, unchanged)
sees only the visible patches with their position embeddings; a light decoder (its own width,
depth, heads, mask token and fixed 2D sin-cos position embeddings) fills the full grid back in
and predicts each masked patch's pixels, per-patch normalised by default. The loss is on the
masked patches only. The decoder belongs to the objective: checkpoints hold the encoder alone.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.objective_options import MaskedAutoencoderOptions
from pretrain.objectives.base import Normalization, Objective, ObjectiveError, patchify
from vit import VisionTransformer, ViTConfig
from vit.model import Block
from vit.pos_embed import sincos_position_table


def random_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, mask, restore): the visible patches' indices (B, K), sorted by a random score; a float
    mask (B, N), 1 on masked patches; and the permutation that puts [visible, masked] back in order.

    Exactly ``N - masked_count(ratio, N)`` patches are kept per image.
    """
    keep_n = num_patches - masked_count(ratio, num_patches)
    order = torch.rand(batch, num_patches, generator=generator, device=device).argsort(dim=1)
    restore = order.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep_n] = 0
    return order[:, :keep_n], torch.gather(mask, 1, restore), restore


def masked_count(ratio: float, num_patches: int) -> int:
    """How many of ``num_patches`` patches a ``ratio`` masks: round(ratio * N), leaving at least one visible."""
    return min(num_patches - 1, round(ratio * num_patches))


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch (B, N, P), averaged over the masked patches only (``mask`` = 1).

    ``norm_pix``: each target patch is standardised by its own mean and variance (MAE's default).
    """
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(Objective):
    Options = MaskedAutoencoderOptions

    def __init__(self, model: VisionTransformer, options: MaskedAutoencoderOptions, norm: Normalization | None = None):
        super().__init__()
        cfg, o = model.cfg, options
        self.patch, self.ratio, self.norm_pix = cfg.patch_size, o.mask_ratio, o.norm_pix_loss
        if masked_count(o.mask_ratio, cfg.num_patches) < 1:  # the loss is a mean over the masked patches
            gh, gw = cfg.grid_size
            raise ObjectiveError(f"objective.mask_ratio: {o.mask_ratio} masks 0 of the {cfg.num_patches} patches "
                             f"({gh}x{gw} grid); the loss would be NaN (raise it to at least "
                             f"{0.5 / cfg.num_patches:.4g})")
        block = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=o.decoder_dim,
                          depth=o.decoder_depth, num_heads=o.decoder_heads, mlp_dim=4 * o.decoder_dim,
                          num_classes=0, head="none", layer_norm_eps=cfg.layer_norm_eps)
        self.decoder_embed = nn.Linear(cfg.embed_dim, o.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, o.decoder_dim))
        # fixed, so not part of any checkpoint
        self.register_buffer("decoder_pos_embed", sincos_position_table(o.decoder_dim, cfg.grid_size),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(block, 0.0) for _ in range(o.decoder_depth))
        self.decoder_norm = nn.LayerNorm(o.decoder_dim, eps=cfg.layer_norm_eps)
        self.decoder_pred = nn.Linear(o.decoder_dim, cfg.patch_size**2 * cfg.in_chans)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder tokens [cls, visible...] -> pixel predictions for every patch (B, N, p*p*C)."""
        x = self.decoder_embed(latent)
        b, n = restore.shape
        filled = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)], dim=1)
        filled = torch.gather(filled, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], filled], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, model: VisionTransformer, batch: dict, generator=None) -> tuple[torch.Tensor, dict]:
        images = batch["pixel_values"]
        patches = model.embed(images)
        keep, mask, restore = random_masking(patches.shape[0], patches.shape[1], self.ratio, generator,
                                             patches.device)
        pred = self.decode(model.forward_normed_tokens(patches, keep), restore)
        return mae_loss(pred, patchify(images, self.patch), mask, self.norm_pix), {}
