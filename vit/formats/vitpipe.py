"""vitpipe's own layout: the checkpoint folder every stage writes (``vit.checkpoint``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.redact import redacted
from vit.card import public
from vit.checkpoint import CONFIG, FORMAT, ModelInfo, checkpoint_config, parse_checkpoint_config
from vit.formats.base import Export
from vit.model import ViTConfig

NAME = FORMAT
HOW_TO_LOAD = """```python
from vit import load_model
model, info = load_model("path/to/this/folder")   # labels, normalisation and provenance in info
```"""


def recognises(meta: dict) -> bool:
    return meta.get("format") == FORMAT


def read(folder: Path, meta: dict, state: dict) -> tuple[ViTConfig, dict, ModelInfo]:
    cfg, info = parse_checkpoint_config(meta)
    return cfg, state, info


def refuses(cfg: ViTConfig) -> str | None:
    return None  # our folder holds every model


def write(cfg: ViTConfig, state: dict, info: ModelInfo) -> Export:
    """Our folder, holding everything; the local paths in the provenance stay in the run folder."""
    public_info = dataclasses.replace(info, provenance=public(redacted(info.provenance)))
    return Export(state, {CONFIG: checkpoint_config(cfg, public_info)})
