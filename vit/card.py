"""The model card (README.md with YAML front matter) written beside every export."""

from __future__ import annotations

import json

import yaml

from vit.model import ViTConfig

LOAD = {
    "timm": """```python
import timm
model = timm.create_model("hf-hub:{repo}", pretrained=True)          # from the hub
model = timm.create_model("local-dir:path/to/this/folder", pretrained=True)  # from disk
```""",
    "transformers": """```python
from transformers import ViTForImageClassification, ViTImageProcessor
model = ViTForImageClassification.from_pretrained("{repo}")
processor = ViTImageProcessor.from_pretrained("{repo}")
```""",
    "vitpipe": """```python
from vit import load_model
model, info = load_model("path/to/this/folder")   # labels, normalisation and provenance in info
```""",
}


def model_card(cfg: ViTConfig, fmt: str, labels, provenance: dict, metrics: dict | None, repo: str = "REPO_ID",
               license: str = "apache-2.0") -> str:
    size = f"{cfg.image_size[0]}x{cfg.image_size[1]}"
    front = {
        "license": license,
        "library_name": {"vitpipe": "vitpipe", "timm": "timm", "transformers": "transformers"}[fmt],
        "tags": ["image-classification", "vision-transformer", "vitpipe", fmt],
        "pipeline_tag": "image-classification",
    }
    data = provenance.get("data")
    if data:
        front["datasets"] = [str(data)]
    if metrics and "top1" in metrics:
        front["metrics"] = ["accuracy"]
        front["model-index"] = [{"name": repo, "results": [{
            "task": {"type": "image-classification"},
            "dataset": {"name": str(metrics.get("data", data or "eval")), "type": "image-folder"},
            "metrics": [{"type": "accuracy", "value": round(metrics["top1"], 4), "name": "top-1"},
                        {"type": "accuracy", "value": round(metrics.get("top5", 0.0), 4), "name": "top-5"}],
        }]}]
    objective = (provenance.get("config") or {}).get("objective", {}).get("name") or provenance.get("pretraining")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Vision Transformer ({cfg.patch_size}x{cfg.patch_size} patches, {size})", "",
        "A Vision Transformer (Dosovitskiy et al., *An Image is Worth 16x16 Words*, arXiv 2010.11929) trained "
        "with [vitpipe](https://pypi.org/project/vitpipe/).", "",
        "| | |", "|---|---|",
        f"| architecture | width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}, "
        f"{cfg.global_pool} pooling |",
        f"| resolution | {size} ({cfg.grid_size[0]}x{cfg.grid_size[1]} patches) |",
        f"| classes | {cfg.num_classes if cfg.head != 'none' else 'none (feature extractor)'} |",
        f"| pretraining objective | {objective or 'unknown'} |",
        f"| initialised from | {provenance.get('init', 'scratch')} |",
        f"| training data | {data or 'unknown'} |",
    ]
    if metrics:
        if "top1" in metrics:
            lines.append(f"| top-1 / top-5 | {metrics['top1']:.2%} / {metrics.get('top5', 0):.2%} on "
                         f"{metrics.get('samples')} images |")
        for k, v in (metrics.get("fewshot") or {}).items():
            lines.append(f"| {k} linear | {v['mean']:.2%} ± {v['std']:.2%} |")
    if labels:
        shown = ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")
        lines += ["", f"Labels: {shown}"]
    lines += ["", "## How to load it", "", LOAD[fmt].format(repo=repo)]
    if fmt != "vitpipe":
        lines += ["", "vitpipe reads this folder too: `vit.load_model(folder)`."]
    config = provenance.get("config")
    if config:
        lines += ["", "## Training config", "", "```json", json.dumps(config, indent=2), "```"]
    return "\n".join(lines) + "\n"
