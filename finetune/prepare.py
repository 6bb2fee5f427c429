"""Turn a pretrained ViT into a fine-tuning model: new zero head, pooling, new resolution, resampled positions."""

from __future__ import annotations

from vit import VisionTransformer
from vit.model import ViTConfig, fits_patches


def prepare_for_finetune(model: VisionTransformer, num_classes: int, image_size: tuple[int, int] | None = None,
                         interpolation: str = "bicubic", head: str = "linear",
                         global_pool: str | None = None, pos_embed: str | None = None) -> VisionTransformer:
    """Remove the whole pretraining head, add a zero-initialised ``head`` (``linear``, or ``pretrain``:
    a fresh tanh layer before it) for ``num_classes``, switch to ``global_pool`` (None keeps the
    checkpoint's; the final norm's weights move with it), and move to ``image_size`` (same patch
    size) with learned position embeddings 2D-interpolated from the old grid to the new one (the
    class-token embedding kept as it is) or the fixed sin-cos table recomputed for it; ``pos_embed``
    (None keeps the checkpoint's) switches between the two first. Changes ``model`` in place.
    """
    if num_classes < 1:
        raise ValueError(f"model.num_classes: need at least one class, got {num_classes}")
    if head not in ("linear", "pretrain"):
        raise ValueError(f"model.head: fine-tuning needs a classifier head (linear or pretrain), got {head!r}")
    if pos_embed is not None:
        try:
            model.set_pos_embed(pos_embed)
        except ValueError as e:
            raise ValueError(f"model.pos_embed: {e}") from None
    if image_size is not None:
        (h, w), p = image_size, model.cfg.patch_size
        if not fits_patches((h, w), p):
            raise ValueError(f"model.image_size: {h}x{w} is not divisible by the checkpoint's patch size {p}")
        model.set_image_size((h, w), interpolation)
    if global_pool is not None:
        model.set_global_pool(global_pool)
    model.reset_head(num_classes=num_classes, head=head)
    return model


def finetune_changes(before: ViTConfig, after: ViTConfig, interpolation: str) -> list[str]:
    """What ``prepare_for_finetune`` changed, in words for the start banner: resolution and position grid,
    pooling, head."""
    changes = []
    if before.image_size != after.image_size:
        (h0, w0), (h1, w1), (g0, g1) = before.image_size, after.image_size, (before.grid_size, after.grid_size)
        how = "sin-cos recomputed" if after.pos_embed == "sincos" else interpolation
        changes.append(f"resolution {h0}x{w0} -> {h1}x{w1}, position embeddings {g0[0]}x{g0[1]} -> {g1[0]}x{g1[1]} "
                       f"({how})")
    if before.pos_embed != after.pos_embed:
        changes.append(f"position embeddings {before.pos_embed} -> {after.pos_embed}"
                       f"{' (the sin-cos table trained from here on)' if after.pos_embed == 'learned' else ''}")
    if before.global_pool != after.global_pool:
        changes.append(f"pooling {before.global_pool} -> {after.global_pool}")
    head = "a linear head" if after.head == "linear" else "a pretraining head (tanh layer + linear)"
    replaced = f"replaces the pretraining head ({before.num_classes} outputs)" if before.head == "pretrain" and \
        before.num_classes else f"replaces the {before.num_classes}-class head" if before.num_classes else "added"
    changes.append(f"{head} for {after.num_classes} classes, zero-initialised ({replaced})")
    return changes
