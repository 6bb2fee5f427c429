"""``vitpipe plot``: the paper's analyses of a trained ViT, as PNGs.

(a) cosine similarity of each position embedding with all others (Fig. 7 centre);
(b) mean attention distance per head against depth (Fig. 7 right);
(c) attention rollout over sample images (Fig. 6; Abnar & Zuidema 2020);
(d) training curves from a run's metrics.jsonl.
The math is in small pure functions; the drawing below them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_path
from pretrain.metrics import VAL_METRICS, read_metrics
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


def attention_rollout(maps: list[torch.Tensor], global_pool: str = "token") -> torch.Tensor:
    """(B, P): how much what the model pools attends to each patch through all layers (residual included): the
    class token's row, or for average pooling the mean of the patch tokens' rows."""
    n = maps[0].shape[-1]
    rollout = torch.eye(n).expand(maps[0].shape[0], n, n)
    for attn in maps:
        a = 0.5 * attn.mean(1) + 0.5 * torch.eye(n)
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 1:, 1:].mean(1) if global_pool == "avg" else rollout[:, 0, 1:]


ROLLOUT_FROM = {"token": "class token to patches", "avg": "average of the patch tokens (the model's pooling) to "
                                                           "patches"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)


def plot_position_similarity(model: VisionTransformer, path: Path, name: str = "") -> None:
    plt = _plt()
    gh, gw = model.cfg.grid_size
    sim = position_similarity(model.pos_embed.detach(), (gh, gw)).numpy()
    fig, axes = plt.subplots(gh, gw, figsize=(gw * 0.7 + 1.6, gh * 0.7 + 1.3), squeeze=False)
    for i in range(gh):
        for j in range(gw):
            ax = axes[i][j]
            im = ax.imshow(sim[i, j], cmap="viridis", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(i + 1), fontsize=7, rotation=0, labelpad=8, va="center")
            if i == gh - 1:
                ax.set_xlabel(str(j + 1), fontsize=7)
    fig.suptitle(f"{name}: position embedding similarity" if name else "Position embedding similarity")
    fig.supxlabel("input patch column")
    fig.supylabel("input patch row")
    bar = fig.colorbar(im, ax=axes, fraction=0.03)
    bar.set_label("cosine similarity with the other positions")
    _save(fig, path)


def plot_attention_distance(model: VisionTransformer, images: torch.Tensor, path: Path, name: str = "") -> np.ndarray:
    plt = _plt()
    maps = attention_maps(model.eval(), images)
    dist = torch.stack([mean_attention_distance(a, model.cfg.grid_size, model.cfg.patch_size) for a in maps]).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = "os^Dv<>ph*"
    for head in range(dist.shape[1]):
        ax.scatter(np.arange(1, len(dist) + 1), dist[:, head], s=16, marker=markers[head % len(markers)],
                   label=f"head {head + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(np.arange(1, len(dist) + 1))
    ax.set_ylim(0, max(model.cfg.image_size))
    ax.set_title(f"{name + ': ' if name else ''}mean attention distance per head\n"
                 f"({len(images)} images, {model.cfg.image_size[0]}x{model.cfg.image_size[1]} px)", fontsize=10)
    if dist.shape[1] <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return dist


def plot_rollout(model: VisionTransformer, images: torch.Tensor, raw: list[np.ndarray], path: Path,
                 name: str = "") -> None:
    plt = _plt()
    rollout = attention_rollout(attention_maps(model.eval(), images), model.cfg.global_pool)
    gh, gw = model.cfg.grid_size
    fig, axes = plt.subplots(3, len(raw), figsize=(1.5 * len(raw) + 1.2, 5.2), squeeze=False)
    for k, img in enumerate(raw):
        heat = rollout[k].view(1, 1, gh, gw)
        heat = torch.nn.functional.interpolate(heat, size=img.shape[:2], mode="bilinear").squeeze().numpy()
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-12)
        axes[0][k].imshow(img, interpolation="nearest")
        im = axes[1][k].imshow(heat, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        axes[2][k].imshow((img * heat[..., None]).astype(np.uint8), interpolation="nearest")
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    for row, label in enumerate(("input", "rollout", "input x\nrollout")):
        axes[row][0].set_ylabel(label, fontsize=9)
    fig.suptitle(f"{name + ': ' if name else ''}attention rollout ({ROLLOUT_FROM[model.cfg.global_pool]}, all layers)",
                 fontsize=10)
    bar = fig.colorbar(im, ax=axes, fraction=0.03)
    bar.set_label("attention, scaled to [0, 1] per image")
    _save(fig, path)


STAGE_TITLES = {"pretrain": "pretraining", "finetune": "fine-tuning"}
FAMILIES = {"loss": ("training loss", "loss"), "accuracy": ("training accuracy (batches)", "accuracy"),
            "knn_top1": ("kNN monitor top-1 (frozen features)", "kNN top-1"),
            "lr": ("learning rate", "learning rate")}
FROM_EVALUATIONS = {"knn_top1"}  # read from val_metrics.jsonl beside metrics.jsonl (one line per checkpoint)
PERCENT = {"accuracy", "knn_top1"}
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]


@dataclass
class Panel:
    """One axes of the training-curves figure: one metric of the runs of one (stage, objective)."""

    row: int
    col: int
    title: str
    key: str
    lines: dict[str, list[tuple[int, float]]]  # run name -> (step, value) as logged


def _run_kind(metrics: Path) -> tuple[str, str | None]:
    """(stage, objective) from the run's config.json beside its metrics.jsonl."""
    config = Path(metrics).parent / "config.json"
    meta = json.loads(config.read_text()) if config.is_file() else {}
    return meta.get("stage", "training"), (meta.get("objective") or {}).get("name")


def curve_panels(runs: dict[str, Path]) -> list[Panel]:
    """A row per (stage, objective), pretraining above fine-tuning, a panel per metric family that any of its runs
    logs: a masked-patch loss never shares axes with a classification loss, and MAE (loss only) gets no accuracy."""
    groups: dict[tuple[str, str | None], dict[str, tuple[list[dict], list[dict]]]] = {}
    for run, metrics in runs.items():
        rows = read_metrics(Path(metrics))
        evaluations = read_metrics(Path(metrics).parent / VAL_METRICS)
        groups.setdefault(_run_kind(metrics), {})[run] = (rows, evaluations)
    rank = {stage: i for i, stage in enumerate(STAGE_TITLES)}
    panels = []
    for row, (stage, objective) in enumerate(sorted(groups, key=lambda g: (rank.get(g[0], len(rank)), str(g[1])))):
        title = STAGE_TITLES.get(stage, stage) + (f" ({objective})" if objective else "")
        col = 0
        for key, (what, _) in FAMILIES.items():
            lines = {run: [(r["step"], r[key]) for r in (evaluations if key in FROM_EVALUATIONS else rows)
                           if r.get(key) is not None]
                     for run, (rows, evaluations) in groups[(stage, objective)].items()}
            lines = {run: points for run, points in lines.items() if points}
            if lines:
                panels.append(Panel(row, col, f"{title}: {what}", key, lines))
                col += 1
    return panels


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """``curve_panels`` drawn: each run in its own line style and markers, so equal curves stay visible."""
    plt = _plt()
    from matplotlib.ticker import PercentFormatter

    panels = curve_panels(runs)
    nrows, ncols = max(p.row for p in panels) + 1, max(p.col for p in panels) + 1
    fig = plt.figure(figsize=(4.6 * ncols, 3.3 * nrows + 0.5), layout="constrained")
    rows = fig.subfigures(nrows, 1, squeeze=False)[:, 0]
    # each row as wide as the figure with its own number of panels: no empty axes where a row has fewer
    axes = [row.subplots(1, sum(p.row == r for p in panels), squeeze=False)[0] for r, row in enumerate(rows)]
    for p in panels:
        ax = axes[p.row][p.col]
        for k, (run, points) in enumerate(p.lines.items()):
            style, marker = STYLES[k % len(STYLES)]
            ax.plot(*zip(*points), linestyle=style, marker=marker, markersize=4, linewidth=1.6,
                    markevery=max(1, len(points) // 12), label=run)
        ax.set_title(p.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(FAMILIES[p.key][1])
        if p.key in PERCENT:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if p.key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Training curves: {', '.join(runs)}")
    _save(fig, path)


def sample_images(model: VisionTransformer, info: ModelInfo, shards, n: int = 8):
    """``n`` eval-transformed images from shards, and the same images as uint8 arrays for display."""
    from data_tools.loader import resolve_shards, train_loader
    from data_tools.transforms import EvalTransform

    # a shuffled stream (eval transform, no augmentation) so the samples span the classes
    transform = EvalTransform(model.cfg.image_size, tuple(info.mean), tuple(info.std), interpolation=info.resize_filter)
    batch = next(iter(train_loader(resolve_shards(shards), transform, n, shuffle_buffer=2000)))
    return transform.to_device(batch, "cpu")["pixel_values"], list(batch["images"].numpy())


def plot_all(model: VisionTransformer, info: ModelInfo, out: str | Path, images=None,
             metrics: dict[str, Path] | None = None, name: str = "") -> list[Path]:
    """Every plot into ``out``; ``name`` (the checkpoint, e.g. ``pretrained_finetune/final``) titles the model's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "position_similarity.png"]
    plot_position_similarity(model, written[0], name)
    if images is not None:
        x, raw = sample_images(model, info, images)
        plot_attention_distance(model, x, out / "attention_distance.png", name)
        plot_rollout(model, x, raw, out / "attention_rollout.png", name)
        written += [out / "attention_distance.png", out / "attention_rollout.png"]
    if metrics:
        plot_curves(metrics, out / "training_curves.png")
        written.append(out / "training_curves.png")
    return written
