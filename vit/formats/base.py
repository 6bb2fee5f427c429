"""What every format module shares: the interface (``Format``), the files an export writes, and the pretraining
head no library can hold.

A format is a module with (``Format``, checked over every registered format by tests/test_export.py):

- ``NAME``: its ``--format`` name (and the model card's ``library_name``);
- ``HOW_TO_LOAD``: the model card's "How to load it" text, ``{repo}`` standing for the hub repository;
- ``recognises(meta) -> bool``: whether a folder's ``config.json`` (``meta``) is in this layout;
- ``read(folder, meta, state) -> (ViTConfig, state, ModelInfo)``: our model from such a folder, with state in our
  tensor names;
- ``refuses(cfg) -> str | None``: why the layout cannot hold a model of this config (one line saying what to use
  instead), None when it can; a fine-tune says so when it starts, not at export time;
- ``write(cfg, state, info) -> Export``: the files of an export. A model the layout cannot hold (``refuses``) is a
  ``ValueError``; it is raised before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from vit.checkpoint import ModelInfo
from vit.model import ViTConfig


@dataclass
class Export:
    """An export's files: the tensors of ``model.safetensors``, the JSON files by name in the order they are
    written (``config.json`` last), and a note for the user on what the format could not hold."""

    weights: dict[str, torch.Tensor]
    files: dict[str, dict]
    note: str | None = None


@runtime_checkable
class Format(Protocol):
    """The interface of a format module (see the module's docstring)."""

    NAME: str
    HOW_TO_LOAD: str

    def recognises(self, meta: dict) -> bool: ...

    def read(self, folder: Path, meta: dict, state: dict) -> tuple[ViTConfig, dict, ModelInfo]: ...

    def refuses(self, cfg: ViTConfig) -> str | None: ...

    def write(self, cfg: ViTConfig, state: dict, info: ModelInfo) -> Export: ...


def exportable_head(cfg: ViTConfig, state: dict) -> tuple[int, dict, str | None]:
    """timm and transformers have no slot for the pretraining head's tanh layer.

    Its output layer is meaningless without it, so the whole head goes and the export is a
    feature extractor (num_classes 0); the returned note says so.
    """
    if cfg.head == "pretrain" and cfg.num_classes:
        kept = {k: v for k, v in state.items() if not k.startswith(("pre_logits.", "head."))}
        return 0, kept, "the pretraining head (tanh MLP) has no slot in this format: exported without a head (num_classes=0)"
    return (cfg.num_classes if cfg.head != "none" else 0), state, None
