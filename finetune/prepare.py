"""Turn a pretrained ViT into a fine-tuning model: new zero head, pooling, new resolution, resampled positions."""

from __future__ import annotations

from vit import VisionTransformer


def prepare_for_finetune(model: VisionTransformer, num_classes: int, image_size: tuple[int, int] | None = None,
                         interpolation: str = "bicubic", head: str = "linear",
                         global_pool: str | None = None) -> VisionTransformer:
    """Remove the whole pretraining head, add a zero-initialised ``head`` (``linear``, or ``pretrain``:
    a fresh tanh layer before it) for ``num_classes``, switch to ``global_pool`` (None keeps the
    checkpoint's; the final norm's weights move with it), and move to ``image_size`` (same patch
    size) with the position embeddings 2D-interpolated from the old grid to the new one; the
    class-token embedding is kept as it is. Changes ``model`` in place.
    """
    if num_classes < 1:
        raise ValueError(f"model.num_classes: need at least one class, got {num_classes}")
    if head not in ("linear", "pretrain"):
        raise ValueError(f"model.head: fine-tuning needs a classifier head (linear or pretrain), got {head!r}")
    if image_size is not None:
        (h, w), p = image_size, model.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"model.image_size: {h}x{w} is not divisible by the checkpoint's patch size {p}")
        model.set_image_size((h, w), interpolation)
    if global_pool is not None:
        model.set_global_pool(global_pool)
    model.reset_head(num_classes=num_classes, head=head)
    return model
