"""timm's hub layout: ``config.json`` names a registered entry point and carries ``model_args``, so
``timm.create_model("local-dir:DIR" / "hf-hub:ORG/NAME", pretrained=True)`` rebuilds exactly our model.

Our parameter names are timm's: writing only drops what timm has no slot for.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from common.images import INCEPTION_MEAN, INCEPTION_STD
from vit.checkpoint import ModelInfo
from vit.formats.base import Export, exportable_head
from vit.model import SIZES, ViTConfig

NAME = "timm"
HOW_TO_LOAD = """```python
import timm
model = timm.create_model("hf-hub:{repo}", pretrained=True)                   # from the hub
model = timm.create_model("local-dir:path/to/this/folder", pretrained=True)  # from disk
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)  # PIL image (convert("RGB") first) -> normalised tensor
```

vitpipe reads this folder too: `model, info = vit.load_model(folder)`."""

TIMM_SIZE_NAMES = {"ti": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}
# timm's registered plain-ViT entry points (each builds VisionTransformer from its arguments, so model_args can
# describe any width, depth, heads, patch and image size); a model with none of these sizes uses the generic one
TIMM_ARCHITECTURES = {
    ("ti", 16), ("s", 8), ("s", 16), ("s", 32), ("b", 8), ("b", 16), ("b", 32), ("l", 14), ("l", 16), ("l", 32),
    ("h", 14),
}
TIMM_GENERIC_ARCHITECTURE = "vit_base_patch16_224"
TIMM_LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm; its hub config has no way to set another


def recognises(meta: dict) -> bool:
    return "architecture" in meta


def timm_architecture(cfg: ViTConfig) -> str:
    """The timm entry point whose name describes ``cfg`` (its default sizes match), else the generic one."""
    for size, (width, depth, heads, mlp) in SIZES.items():
        if (size, cfg.patch_size) in TIMM_ARCHITECTURES and \
                (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (width, depth, heads, mlp):
            return f"vit_{TIMM_SIZE_NAMES[size]}_patch{cfg.patch_size}_224"
    return TIMM_GENERIC_ARCHITECTURE


def mlp_ratio(embed_dim: int, mlp_dim: int) -> float:
    """The ratio timm turns back into exactly ``mlp_dim`` (it computes ``int(embed_dim * ratio)``)."""
    ratio = mlp_dim / embed_dim
    while int(embed_dim * ratio) < mlp_dim:  # e.g. 61 / 28 * 28 = 60.99999...
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def refuses(cfg: ViTConfig) -> str | None:
    """Why this layout cannot hold a model of ``cfg`` (None: it can)."""
    if cfg.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        return (f"the model's LayerNorm eps is {cfg.layer_norm_eps:g} and timm's ViT fixes it at "
                f"{TIMM_LAYER_NORM_EPS:g} (its hub config cannot set it): export to transformers or vitpipe")
    return None


def write(cfg: ViTConfig, state: dict, info: ModelInfo) -> Export:
    if why := refuses(cfg):
        raise ValueError(why)
    num_classes, state, note = exportable_head(cfg, state)
    model_args = {
        "img_size": list(cfg.image_size),
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": mlp_ratio(cfg.embed_dim, cfg.mlp_dim),
        "global_pool": cfg.global_pool,
    }
    meta = {
        "architecture": timm_architecture(cfg),
        "num_classes": num_classes,
        "num_features": cfg.embed_dim,
        "global_pool": cfg.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "vitpipe",
            "custom_load": False,
            "input_size": [cfg.in_chans, *cfg.image_size],
            "fixed_input_size": True,
            "interpolation": info.resize_filter,
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(info.mean),
            "std": list(info.std),
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if info.labels and num_classes:
        meta["label_names"] = list(info.labels)
    return Export(dict(state), {"config.json": meta}, note)


def read(folder: Path, meta: dict, state: dict) -> tuple[ViTConfig, dict, ModelInfo]:
    pretrained = meta.get("pretrained_cfg") or {}
    args = _model_args(meta)
    img = args.get("img_size") or pretrained.get("input_size", [3, 224, 224])[1:]
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    cfg = ViTConfig(
        image_size=img if isinstance(img, int) else tuple(img),
        patch_size=int(args["patch_size"]),
        in_chans=int(args.get("in_chans") or pretrained.get("input_size", [3])[0]),
        embed_dim=int(args["embed_dim"]),
        depth=int(args["depth"]),
        num_heads=int(args["num_heads"]),
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_classes=num_classes,
        head="linear" if num_classes else "none",
        global_pool=args.get("global_pool", "token"),
    )
    state = {k: v for k, v in state.items() if not k.startswith("pre_logits.")}
    # timm's data config resizes bicubic unless told otherwise; a filter we do not resize with becomes that too
    interpolation = pretrained.get("interpolation")
    info = ModelInfo(labels=meta.get("label_names"), mean=tuple(pretrained.get("mean", INCEPTION_MEAN)),
                     std=tuple(pretrained.get("std", INCEPTION_STD)), source_format=NAME,
                     resize_filter=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic")
    return cfg, state, info


def _model_args(meta: dict) -> dict:
    """The architecture's arguments: those its name implies, updated by ``model_args``; a ViT variant we do not
    build is a ValueError."""
    arch = meta["architecture"]
    args = {}
    m = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:\..*)?", arch)
    if m:  # hub configs often carry only the name: its sizes are timm's (and the paper's)
        width, depth, heads, _ = SIZES[{v: k for k, v in TIMM_SIZE_NAMES.items()}[m[1]]]
        args = {"embed_dim": width, "depth": depth, "num_heads": heads, "patch_size": int(m[2]), "img_size": int(m[3])}
    args.update(meta.get("model_args") or {})
    missing = {"embed_dim", "depth", "num_heads", "patch_size"} - set(args)
    if missing:
        raise ValueError(f"timm architecture {arch!r} is not a plain ViT this loader knows "
                         f"(model_args lacks {', '.join(sorted(missing))})")
    variant = {k: args[k] for k in ("no_embed_class", "reg_tokens", "pre_norm", "qk_norm", "init_values")
               if args.get(k)}
    if args.get("class_token") is False or variant or args.get("global_pool", "token") not in ("token", "avg"):
        raise ValueError(f"timm model_args {dict(variant, global_pool=args.get('global_pool'))} describe a ViT "
                         "variant vitpipe does not build")
    return args
