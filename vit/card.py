"""The model card (README.md with YAML front matter) written beside every export.

Built with ``huggingface_hub``'s card classes, so the hub reads its metadata (license, library,
tags, an evaluation ``model-index``). Nothing in it names a local absolute path: ``public`` turns
every path in the provenance, config and metrics into its last two parts (``shards/train``), and no secret:
``common.redact`` masks credentials in them (again: a checkpoint written by an older vitpipe may hold one).
"""

from __future__ import annotations

import re

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from common.redact import redacted
from vit.model import ViTConfig

# an absolute path (or file:// URL, or ~/...) where a path can start: the start, after a space, '=', ':' (not
# '://'), a comma or an opening bracket or quote
_ABS = r"(?:/|~/)(?!/)[^\s,;'\"()\[\]]*"
_LOCAL_PATH = re.compile(rf"file://{_ABS}|(?<![^\s=:,;'\"(\[{{]){_ABS}")


def public_text(text: str) -> str:
    """``text`` with every local absolute path cut to its last two parts: ``/home/me/runs/shards/train`` ->
    ``shards/train``. URLs (``s3://``, ``https://``) and relative paths stay as they are."""
    def cut(m: re.Match) -> str:
        parts = [p for p in m.group(0).removeprefix("file://").split("/") if p and p != "~"]
        return "/".join(parts[-2:]) or "."

    return _LOCAL_PATH.sub(cut, text)


def public(obj):
    """``public_text`` applied to every string in a JSON-like value."""
    if isinstance(obj, str):
        return public_text(obj)
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public(v) for v in obj]
    return obj


def _set(config: dict) -> dict:
    """The config without unset keys (empty strings, nulls): what the card shows."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            v = _set(v)
        if v not in ("", None, {}):
            out[k] = v
    return out


def describe(provenance: dict) -> tuple[str, str]:
    """(how the weights were trained, what they started from), in words, from a checkpoint's provenance."""
    stage, objective, steps = provenance.get("stage"), provenance.get("objective"), provenance.get("step")
    data = provenance.get("data")
    on = f" on {data}" if data else ""
    run = f" for {steps} steps" if steps is not None else ""
    if stage == "init":
        seed = provenance.get("seed")
        return "not trained", "random (vitpipe init" + (f", seed {seed})" if seed is not None else ")")
    if stage == "pretrain":
        return f"pretrained with the {objective} objective{run}{on}", "random"
    if stage == "finetune" or "init_stage" in provenance:  # without a stage: prepared (train.max_steps=0)
        init, init_stage, pretraining = provenance.get("init"), provenance.get("init_stage"), provenance.get("pretraining")
        if init_stage == "init":
            start = f"random weights (vitpipe init: {init}), no pretraining"
        elif pretraining:
            kind = {"pretrain": "pretrained", "finetune": "fine-tuned"}.get(init_stage, "trained")
            start = f"{init}, {kind} with the {pretraining} objective"
        else:
            start = f"{init} (no pretraining recorded)"
        if stage != "finetune":
            return "not trained: prepared for fine-tuning (new head, new resolution)", start
        return f"fine-tuned ({objective}){run}{on}", start
    return "not recorded", str(provenance.get("init", "not recorded"))


def model_card(cfg: ViTConfig, library: str, how_to_load: str, labels, provenance: dict, metrics: dict | None,
               repo: str = "REPO_ID", license: str = "apache-2.0") -> str:
    """The card's text for an export in ``library``'s format; ``how_to_load`` is the format's snippet (``{repo}``
    filled in here). ``provenance`` and ``metrics`` may hold local paths: the card shows them via ``public``."""
    provenance, metrics = public(redacted(provenance)), public(redacted(metrics or {}))
    size = f"{cfg.image_size[0]}x{cfg.image_size[1]}"
    trained, start = describe(provenance)
    results = []
    if "top1" in metrics:
        where = dict(task_type="image-classification", dataset_type="webdataset",
                     dataset_name=str(metrics.get("data") or "held-out images"))
        results = [EvalResult(**where, metric_type="accuracy", metric_name=name, metric_value=round(metrics[key], 4))
                   for key, name in (("top1", "top-1"), ("top5", "top-5")) if key in metrics]
    data = ModelCardData(
        license=license,
        library_name=library,
        tags=["image-classification", "vision-transformer", "vitpipe", library],
        pipeline_tag="image-classification",
        metrics=["accuracy"] if results else None,
        model_name=repo if results else None,
        eval_results=results or None,
    )
    lines = [
        f"# Vision Transformer ({cfg.patch_size}x{cfg.patch_size} patches, {size})", "",
        "A Vision Transformer (Dosovitskiy et al., *An Image is Worth 16x16 Words*, arXiv 2010.11929) trained "
        "with vitpipe.", "",
        "| | |", "|---|---|",
        f"| architecture | width {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}, "
        f"{cfg.global_pool} pooling |",
        f"| resolution | {size} ({cfg.grid_size[0]}x{cfg.grid_size[1]} patches) |",
        f"| classes | {cfg.num_classes if cfg.head != 'none' and cfg.num_classes else 'none (feature extractor)'} |",
        f"| training | {trained} |",
        f"| initialised from | {start} |",
    ]
    if "top1" in metrics:
        top5 = (" / top-5", f" / {metrics['top5']:.2%}") if "top5" in metrics else ("", "")
        lines.append(f"| top-1{top5[0]} | {metrics['top1']:.2%}{top5[1]} on "
                     f"{metrics.get('samples')} images of {metrics.get('data') or 'a held-out set'} |")
    for k, v in (metrics.get("fewshot") or {}).items():
        lines.append(f"| {k} linear | {v['mean']:.2%} ± {v['std']:.2%} |")
    if labels:
        shown = ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")
        lines += ["", f"Labels: {shown}"]
    lines += ["", "## How to load it", "", how_to_load.format(repo=repo)]
    config = provenance.get("config")
    if config:
        lines += ["", "## Training config", "", "The run's config (keys left unset omitted):", "", "```yaml",
                  yaml.safe_dump(_set(config), sort_keys=False).strip(), "```"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
