"""The Vision Transformer, its checkpoint folders and conversions to timm / transformers."""

from vit.checkpoint import CheckpointError, ModelInfo, export_checkpoint, load_model, save_checkpoint
from vit.model import VisionTransformer, ViTConfig, config_for, create_model
from vit.pos_embed import resample_abs_pos_embed

__all__ = [
    "CheckpointError", "ModelInfo", "ViTConfig", "VisionTransformer", "config_for", "create_model",
    "export_checkpoint", "load_model", "resample_abs_pos_embed", "save_checkpoint",
]
