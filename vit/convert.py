"""Conversions between our state dict and timm's / transformers' formats.

Our parameter names are timm's, so the timm direction only drops what timm has no slot for;
transformers splits the fused qkv projection and renames everything.
"""

from __future__ import annotations

import math
import re

import torch

from vit.model import SIZES, ViTConfig

TIMM_SIZE_NAMES = {"ti": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}
# timm's registered plain-ViT entry points (each builds VisionTransformer from its arguments, so model_args can
# describe any width, depth, heads, patch and image size); a model with none of these sizes uses the generic one
TIMM_ARCHITECTURES = {
    ("ti", 16), ("s", 8), ("s", 16), ("s", 32), ("b", 8), ("b", 16), ("b", 32), ("l", 14), ("l", 16), ("l", 32),
    ("h", 14),
}
TIMM_GENERIC_ARCHITECTURE = "vit_base_patch16_224"
TIMM_LAYER_NORM_EPS = 1e-6  # timm's ViT LayerNorm; its hub config has no way to set another


def exportable_head(cfg: ViTConfig, state: dict) -> tuple[int, dict, str | None]:
    """timm and transformers have no slot for the pretraining head's tanh layer.

    Its output layer is meaningless without it, so the whole head goes and the export is a
    feature extractor (num_classes 0); the returned note says so.
    """
    if cfg.head == "pretrain" and cfg.num_classes:
        kept = {k: v for k, v in state.items() if not k.startswith(("pre_logits.", "head."))}
        return 0, kept, "the pretraining head (tanh MLP) has no slot in this format: exported without a head (num_classes=0)"
    return (cfg.num_classes if cfg.head != "none" else 0), state, None


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


def to_timm(cfg: ViTConfig, state: dict, labels, mean, std) -> tuple[dict, dict, str | None]:
    """timm's hub layout: ``config.json`` names a registered entry point and carries ``model_args``,
    so ``timm.create_model("local-dir:DIR" / "hf-hub:ORG/NAME", pretrained=True)`` rebuilds exactly this model."""
    if cfg.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        raise ValueError(f"the model's LayerNorm eps is {cfg.layer_norm_eps:g} and timm's ViT fixes it at "
                         f"{TIMM_LAYER_NORM_EPS:g} (its hub config cannot set it): export to transformers or vitpipe")
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
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if labels and num_classes:
        meta["label_names"] = list(labels)
    return meta, dict(state), note


def from_timm(meta: dict, state: dict):
    pretrained = meta.get("pretrained_cfg") or {}
    arch = meta["architecture"]
    args = {}
    m = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:\..*)?", arch)
    if m:  # hub configs often carry only the name: its sizes are timm's (and the paper's)
        width, depth, heads, _ = SIZES[{"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h"}[m[1]]]
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
    labels = meta.get("label_names")
    mean = tuple(pretrained.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(pretrained.get("std", (0.5, 0.5, 0.5)))
    return cfg, state, labels, mean, std


_HF_RENAMES = [
    (r"cls_token", "vit.embeddings.cls_token"),
    (r"pos_embed", "vit.embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"vit.embeddings.patch_embeddings.projection.\1"),
    (r"blocks\.(\d+)\.norm1\.", r"vit.encoder.layer.\1.layernorm_before."),
    (r"blocks\.(\d+)\.norm2\.", r"vit.encoder.layer.\1.layernorm_after."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
    (r"norm\.(weight|bias)", r"vit.layernorm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(f"^{pattern}", repl, key)
        if n:
            return new
    raise KeyError(f"no conversion for tensor {key}")


def to_transformers(cfg: ViTConfig, state: dict, labels, mean, std) -> tuple[dict, dict, dict, str | None]:
    """Returns (config.json, state dict, preprocessor_config.json, note).

    Tensor names are transformers 4.x's, which 4.x loads and 5.x converts on load.
    """
    if cfg.global_pool != "token":
        raise ValueError("transformers' ViTForImageClassification classifies from the class token; "
                         "a global-average-pooling model cannot be exported to it (use --format timm)")
    num_classes, state, note = exportable_head(cfg, state)
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", k)
        if m:
            base = f"vit.encoder.layer.{m.group(1)}.attention.attention"
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{base}.{name}.{m.group(2)}"] = part.contiguous()
        else:
            out[_rename(k, _HF_RENAMES)] = v
    names = list(labels) if labels and num_classes else [f"LABEL_{i}" for i in range(num_classes)]
    config = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": list(cfg.image_size) if cfg.image_size[0] != cfg.image_size[1] else cfg.image_size[0],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": True,
        "encoder_stride": cfg.patch_size,
        "num_labels": num_classes,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "torch_dtype": "float32",
    }
    processor = {  # what our EvalTransform does: any PIL mode to RGB (alpha on white), bicubic, normalise
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": cfg.in_chans == 3,
        "do_resize": True,
        "size": {"height": cfg.image_size[0], "width": cfg.image_size[1]},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }
    return config, out, processor, note


def from_transformers(meta: dict, state: dict, processor: dict | None = None):
    if meta.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {meta['hidden_act']!r}: vitpipe's ViT uses exact gelu")
    reverse = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("vit.pooler.") or k == "vit.embeddings.mask_token":
            continue
        m = re.fullmatch(r"vit\.(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[0]] = v
            continue
        reverse[_rename(k, _OURS_FROM_HF)] = v
    for (layer, kind), parts in qkv.items():
        reverse[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
    image_size = meta.get("image_size", 224)
    cfg = ViTConfig(
        image_size=image_size if isinstance(image_size, int) else tuple(image_size),
        patch_size=int(meta.get("patch_size", 16)),
        in_chans=int(meta.get("num_channels", 3)),
        embed_dim=int(meta["hidden_size"]),
        depth=int(meta["num_hidden_layers"]),
        num_heads=int(meta["num_attention_heads"]),
        mlp_dim=int(meta["intermediate_size"]),
        num_classes=num_classes,
        head="linear" if num_classes else "none",
        layer_norm_eps=float(meta.get("layer_norm_eps", 1e-12)),
    )
    id2label = meta.get("id2label") or {}
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)] if id2label and num_classes else None
    processor = processor or {}
    mean = tuple(processor.get("image_mean", (0.5, 0.5, 0.5)))
    std = tuple(processor.get("image_std", (0.5, 0.5, 0.5)))
    return cfg, reverse, labels, mean, std


# both the transformers 4.x names (which 5.x still reads) and the 5.x names
_LAYER = r"vit\.(?:encoder\.layer|layers)\.(\d+)"
_OURS_FROM_HF = [
    (r"vit\.embeddings\.cls_token", "cls_token"),
    (r"vit\.embeddings\.position_embeddings", "pos_embed"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_LAYER + r"\.layernorm_before\.", r"blocks.\1.norm1."),
    (_LAYER + r"\.layernorm_after\.", r"blocks.\1.norm2."),
    (_LAYER + r"\.attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"\.(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"\.(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"vit\.layernorm\.", "norm."),
    (r"classifier\.", "head."),
]
