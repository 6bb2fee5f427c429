"""Position embeddings as pure functions: resampling learned ones (the same arithmetic as timm's), and the
fixed 2D sin-cos table (MAE's ``util/pos_embed.py``) of MAE's decoder and of ``pos_embed=sincos`` encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bicubic", "bilinear")


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings (gh*gw, dim), row-major; half the channels encode the
    column, half the row, each as [sin, cos] of 10000^(-2i/(dim/2))-scaled positions (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embeddings need a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def sincos_position_table(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """The whole table (1, 1 + gh*gw, dim) as MAE lays it out: the class token's position all zeros, then the grid."""
    patches = sincos_pos_embed_2d(dim, grid)
    return torch.cat([patches.new_zeros(1, dim), patches])[None]


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
