"""Checkpoint folders: ``config.json`` (how to rebuild the model) + ``model.safetensors``.

This module writes and reads vitpipe's own folders and reads any ``model.safetensors`` safely;
``vit.formats`` adds the other libraries' layouts. Every problem becomes a ``CheckpointError``
whose message names the file and what is wrong.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.errors import VitpipeError
from common.images import INCEPTION_MEAN, INCEPTION_STD
from common.io import atomic_path, write_json
from common.redact import redacted
from vit.model import VisionTransformer, ViTConfig

FORMAT = "vitpipe"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(VitpipeError, ValueError):
    """A checkpoint folder that cannot be used; the message is one line for the user."""


@dataclass
class ModelInfo:
    """What travels beside the weights."""

    labels: list[str] | None = None
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD
    provenance: dict = field(default_factory=dict)
    source_format: str = FORMAT
    resize_filter: str = "bicubic"  # what evaluation resizes with: the training's (a folder that names none: bicubic)


def save_checkpoint(model: VisionTransformer, folder: str | Path, info: ModelInfo | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``, each atomically."""
    return save_state_dict(model.cfg, model.state_dict(), folder, info)


def save_state_dict(cfg: ViTConfig, state: dict, folder: str | Path, info: ModelInfo | None = None) -> Path:
    """``save_checkpoint`` for weights held apart from a model (e.g. gathered from ZeRO-3 shards)."""
    return write_folder(folder, state, {CONFIG: checkpoint_config(cfg, info or ModelInfo())})


def write_folder(folder: str | Path, state: dict, files: dict[str, dict]) -> Path:
    """``model.safetensors``, then each JSON file in order (``config.json`` last: it makes the folder a
    checkpoint), each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    for name, obj in files.items():
        write_json(folder / name, obj)
    return folder


def checkpoint_config(cfg: ViTConfig, info: ModelInfo) -> dict:
    """Our ``config.json``: the model config, labels, normalisation, resize filter and provenance (with its
    creation time)."""
    if info.labels is not None and cfg.num_classes and len(info.labels) != cfg.num_classes:
        raise CheckpointError(f"{len(info.labels)} label names for a model with {cfg.num_classes} classes")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "labels": info.labels,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "resize_filter": info.resize_filter,
        "provenance": redacted({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info.provenance}),
    }


def parse_checkpoint_config(meta: dict) -> tuple[ViTConfig, ModelInfo]:
    """``checkpoint_config`` read back; a wrong version or config is a ValueError, KeyError or TypeError."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported format_version {version!r} (this vitpipe reads {FORMAT_VERSION})")
    norm = meta.get("normalization") or {}
    info = ModelInfo(
        labels=meta.get("labels"),
        mean=tuple(norm.get("mean", INCEPTION_MEAN)),
        std=tuple(norm.get("std", INCEPTION_STD)),
        provenance=meta.get("provenance") or {},
        resize_filter=meta.get("resize_filter", "bicubic"),
    )
    return ViTConfig.from_dict(meta["model"]), info


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint folder holds config.json and {WEIGHTS})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning every kind of damage into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
    header_len = struct.unpack("<Q", head)[0]
    if header_len > size - 8:
        raise CheckpointError(f"{path}: not a safetensors file, or truncated (header claims {header_len} bytes, file has {size})")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({msg})") from None


def check_state_dict(model: VisionTransformer, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
