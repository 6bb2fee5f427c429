"""``vitpipe plot``: the paper's analyses of a trained ViT, as PNGs.

(a) cosine similarity of each position embedding with all others (Fig. 7 centre);
(b) mean attention distance per head against depth (Fig. 7 right);
(c) attention rollout over sample images (Fig. 6; Abnar & Zuidema 2020);
(d) training curves from a run's metrics.jsonl.
The math is in small pure functions; the drawing below them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vit import ModelInfo, VisionTransformer


def position_similarity(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + gh*gw, D) -> (gh, gw, gh, gw): cosine similarity of every patch position with every other."""
    p = torch.nn.functional.normalize(pos_embed[0, 1:].float(), dim=-1)
    gh, gw = grid
    return (p @ p.T).view(gh, gw, gh, gw)


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the softmax attention (B, heads, tokens, tokens) for ``images``."""
    x = torch.cat([model.cls_token.expand(len(images), -1, -1), model.embed(images)], 1) + model.pos_embed
    maps = []
    for blk in model.blocks:
        maps.append(blk.attn.attention_probs(blk.norm1(x)))
        x = blk(x)
    return maps


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, H, N, N) -> (H,): pixel distance between query and key patches, weighted by attention.

    Class-token rows and columns are left out; the patches' attention is renormalised over patches.
    """
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).float() * patch
    dist = torch.cdist(coords, coords)  # (P, P)
    a = attn[:, :, 1:, 1:]
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    return (a * dist).sum(-1).mean(dim=(0, 2))


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, P): how much the class token attends to each patch through all layers (residual included)."""
    n = maps[0].shape[-1]
    rollout = torch.eye(n).expand(maps[0].shape[0], n, n)
    for attn in maps:
        a = 0.5 * attn.mean(1) + 0.5 * torch.eye(n)
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 0, 1:]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_position_similarity(model: VisionTransformer, path: Path) -> None:
    plt = _plt()
    gh, gw = model.cfg.grid_size
    sim = position_similarity(model.pos_embed.detach(), (gh, gw)).numpy()
    fig, axes = plt.subplots(gh, gw, figsize=(gw * 0.7 + 1, gh * 0.7 + 0.6), squeeze=False)
    for i in range(gh):
        for j in range(gw):
            ax = axes[i][j]
            im = ax.imshow(sim[i, j], cmap="viridis", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(i + 1), fontsize=7)
            if i == gh - 1:
                ax.set_xlabel(str(j + 1), fontsize=7)
    fig.suptitle("Position embedding similarity (cosine)")
    fig.colorbar(im, ax=axes, fraction=0.02)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention_distance(model: VisionTransformer, images: torch.Tensor, path: Path) -> np.ndarray:
    plt = _plt()
    maps = attention_maps(model.eval(), images)
    dist = torch.stack([mean_attention_distance(a, model.cfg.grid_size, model.cfg.patch_size) for a in maps]).numpy()
    fig, ax = plt.subplots(figsize=(5, 4))
    for head in range(dist.shape[1]):
        ax.scatter(np.arange(1, len(dist) + 1), dist[:, head], s=14, label=f"head {head + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, max(model.cfg.image_size))
    ax.set_title("Mean attention distance per head")
    if dist.shape[1] <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return dist


def plot_rollout(model: VisionTransformer, images: torch.Tensor, raw: list[np.ndarray], path: Path) -> None:
    plt = _plt()
    rollout = attention_rollout(attention_maps(model.eval(), images))
    gh, gw = model.cfg.grid_size
    fig, axes = plt.subplots(2, len(raw), figsize=(1.6 * len(raw), 3.4), squeeze=False)
    for k, img in enumerate(raw):
        heat = rollout[k].view(1, 1, gh, gw)
        heat = torch.nn.functional.interpolate(heat, size=img.shape[:2], mode="bilinear").squeeze().numpy()
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
        axes[0][k].imshow(img)
        axes[1][k].imshow((img * heat[..., None]).astype(np.uint8))
        for ax in (axes[0][k], axes[1][k]):
            ax.axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("attention rollout", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """Loss, accuracy and learning rate against step, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for name, metrics in runs.items():
        rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("loss", "accuracy", "lr")):
            ax.plot(steps, [r[key] for r in rows], label=name)
    for ax, key in zip(axes, ("training loss", "training accuracy (batch)", "learning rate")):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_images(model: VisionTransformer, info: ModelInfo, shards, n: int = 8):
    """``n`` eval-transformed images from shards, and the same images as uint8 arrays for display."""
    from data_tools.loader import resolve_shards, train_loader
    from data_tools.transforms import EvalTransform

    # a shuffled stream (eval transform, no augmentation) so the samples span the classes
    transform = EvalTransform(model.cfg.image_size, tuple(info.mean), tuple(info.std))
    batch = next(iter(train_loader(resolve_shards(shards), transform, n, shuffle_buffer=2000)))
    x = batch["pixel_values"]
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    raw = ((x * std + mean).clamp(0, 1) * 255).permute(0, 2, 3, 1).byte().numpy()
    return x, list(raw)


def plot_all(model: VisionTransformer, info: ModelInfo, out: str | Path, images=None,
             metrics: dict[str, Path] | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "position_similarity.png"]
    plot_position_similarity(model, written[0])
    if images is not None:
        x, raw = sample_images(model, info, images)
        plot_attention_distance(model, x, out / "attention_distance.png")
        plot_rollout(model, x, raw, out / "attention_rollout.png")
        written += [out / "attention_distance.png", out / "attention_rollout.png"]
    if metrics:
        plot_curves(metrics, out / "training_curves.png")
        written.append(out / "training_curves.png")
    return written
