"""Position-embedding resampling: a pure function, the same arithmetic as timm's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bicubic", "bilinear")


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize learned position embeddings (1, prefix + gh*gw, D) from one patch grid to another.

    The prefix (class-token) embeddings are kept as they are; the patch embeddings are laid out
    on their (gh, gw) grid and interpolated in 2D by their location in the image.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != expected:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} tokens, expected {expected} for grid {old_grid}")
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)
    return torch.cat([prefix, grid], dim=1)
