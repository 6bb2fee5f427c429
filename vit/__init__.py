"""The Vision Transformer, its checkpoint folders and the formats it exports to (timm, transformers)."""

from vit.checkpoint import CheckpointError, ModelInfo, save_checkpoint
from vit.formats import FORMATS, export_checkpoint, load_model
from vit.model import (
    VisionTransformer,
    ViTConfig,
    config_for,
    create_model,
    fits_patches,
    nonfinite_parameters,
    parse_model_name,
)
from vit.pos_embed import resample_abs_pos_embed

__all__ = [
    "FORMATS", "CheckpointError", "ModelInfo", "ViTConfig", "VisionTransformer", "config_for", "create_model",
    "export_checkpoint", "fits_patches", "load_model", "nonfinite_parameters", "parse_model_name", "resample_abs_pos_embed", "save_checkpoint",
]
