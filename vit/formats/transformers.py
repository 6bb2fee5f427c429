"""transformers' layout for ``ViTForImageClassification``: ``config.json``, ``preprocessor_config.json`` (a
``ViTImageProcessor`` that prepares images as our evaluation does) and the weights under transformers' names.

transformers splits the fused qkv projection and renames everything. Tensor names are written as transformers
4.x names them, which 4.x loads and 5.x converts on load; both 4.x and 5.x names are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from common.images import INCEPTION_MEAN, INCEPTION_STD
from vit.checkpoint import ModelInfo
from vit.formats.base import Export, exportable_head
from vit.model import ViTConfig

NAME = "transformers"
HOW_TO_LOAD = """```python
from transformers import ViTForImageClassification, ViTImageProcessor
model = ViTForImageClassification.from_pretrained("{repo}")
processor = ViTImageProcessor.from_pretrained("{repo}")  # converts grayscale / RGBA images to RGB
logits = model(**processor(images=image, return_tensors="pt")).logits
```

vitpipe reads this folder too: `model, info = vit.load_model(folder)`."""
PROCESSOR = "preprocessor_config.json"

_TO_HF = [
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
# both the transformers 4.x names (which 5.x still reads) and the 5.x names
_LAYER = r"vit\.(?:encoder\.layer|layers)\.(\d+)"
_FROM_HF = [
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


def recognises(meta: dict) -> bool:
    return meta.get("model_type") == "vit"


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(f"^{pattern}", repl, key)
        if n:
            return new
    raise KeyError(f"no conversion for tensor {key}")


def refuses(cfg: ViTConfig) -> str | None:
    """Why this layout cannot hold a model of ``cfg`` (None: it can)."""
    if cfg.global_pool != "token":
        return ("transformers' ViTForImageClassification classifies from the class token; a global-average-pooling "
                "model cannot be exported to it (use --format timm, or fine-tune with model.global_pool=token)")
    return None


def write(cfg: ViTConfig, state: dict, info: ModelInfo) -> Export:
    if why := refuses(cfg):
        raise ValueError(why)
    num_classes, state, note = exportable_head(cfg, state)
    names = list(info.labels) if info.labels and num_classes else [f"LABEL_{i}" for i in range(num_classes)]
    return Export(_hf_state(state), {PROCESSOR: _processor(cfg, info),
                                     "config.json": _hf_config(cfg, num_classes, names)}, note)


def _hf_state(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", k)
        if m:
            base = f"vit.encoder.layer.{m.group(1)}.attention.attention"
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{base}.{name}.{m.group(2)}"] = part.contiguous()
        else:
            out[_rename(k, _TO_HF)] = v
    return out


def _hf_config(cfg: ViTConfig, num_classes: int, names: list[str]) -> dict:
    return {
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


# PIL's numbers for the filters we resize with, as image processors record them
_RESAMPLE = {"bilinear": 2, "bicubic": 3}


def _processor(cfg: ViTConfig, info: ModelInfo) -> dict:
    """What our EvalTransform does: any PIL mode to RGB (alpha on white), resize with the model's filter,
    normalise."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": cfg.in_chans == 3,
        "do_resize": True,
        "size": {"height": cfg.image_size[0], "width": cfg.image_size[1]},
        "resample": _RESAMPLE[info.resize_filter],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(info.mean),
        "image_std": list(info.std),
    }


def read(folder: Path, meta: dict, state: dict) -> tuple[ViTConfig, dict, ModelInfo]:
    if meta.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {meta['hidden_act']!r}: vitpipe's ViT uses exact gelu")
    state = _our_state(state)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
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
    processor = folder / PROCESSOR
    processor = json.loads(processor.read_text()) if processor.is_file() else {}
    # ViTImageProcessor's defaults where the folder has no processor: 0.5 normalisation, bilinear; a filter we do
    # not resize with (nearest, lanczos) becomes bicubic, the closest of ours to lanczos
    resample = {v: k for k, v in _RESAMPLE.items()}.get(processor.get("resample", _RESAMPLE["bilinear"]), "bicubic")
    info = ModelInfo(labels=labels, mean=tuple(processor.get("image_mean", INCEPTION_MEAN)),
                     std=tuple(processor.get("image_std", INCEPTION_STD)), source_format=NAME, resize_filter=resample)
    return cfg, state, info


def _our_state(state: dict) -> dict:
    ours = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith("vit.pooler.") or k == "vit.embeddings.mask_token":
            continue
        m = re.fullmatch(_LAYER + r"\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[0]] = v
            continue
        ours[_rename(k, _FROM_HF)] = v
    for (layer, kind), parts in qkv.items():
        ours[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return ours
