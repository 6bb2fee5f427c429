"""Turn a pretrained ViT into a fine-tuning model: new zero head, new resolution, resampled positions."""

from __future__ import annotations

import torch

from vit import VisionTransformer, resample_abs_pos_embed


def prepare_for_finetune(model: VisionTransformer, num_classes: int, image_size: tuple[int, int] | None = None,
                         interpolation: str = "bicubic") -> VisionTransformer:
    """Remove the whole pretraining head, add a zero-initialised linear head for ``num_classes``, and
    move to ``image_size`` (same patch size) with the position embeddings 2D-interpolated from the
    old grid to the new one; the class-token embedding is kept as it is. Changes ``model`` in place.
    """
    if num_classes < 1:
        raise ValueError(f"model.num_classes: need at least one class, got {num_classes}")
    cfg = model.cfg
    if image_size is not None and tuple(image_size) != cfg.image_size:
        h, w = image_size
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"model.image_size: {h}x{w} is not divisible by the checkpoint's patch size "
                             f"{cfg.patch_size}")
        old_grid = cfg.grid_size
        cfg.image_size = (h, w)
        with torch.no_grad():
            new = resample_abs_pos_embed(model.pos_embed.data, cfg.grid_size, old_grid, 1, interpolation)
        model.pos_embed = torch.nn.Parameter(new)
    model.reset_head(num_classes=num_classes, head="linear")
    return model
