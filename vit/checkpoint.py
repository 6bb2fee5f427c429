"""Checkpoint folders: ``config.json`` (how to rebuild the model) + ``model.safetensors``.

``load_model`` reads our folders and timm- or transformers-format folders alike; every
problem becomes a ``CheckpointError`` whose message names the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.errors import VitpipeError
from vit import convert
from vit.card import model_card, public
from vit.model import VisionTransformer, ViTConfig
from common.io import atomic_path, write_json

FORMAT = "vitpipe"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


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


def save_checkpoint(model: VisionTransformer, folder: str | Path, info: ModelInfo | None = None) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``, each atomically."""
    return save_state_dict(model.cfg, model.state_dict(), folder, info)


def save_state_dict(cfg: ViTConfig, state: dict, folder: str | Path, info: ModelInfo | None = None) -> Path:
    """``save_checkpoint`` for weights held apart from a model (e.g. gathered from ZeRO-3 shards)."""
    info = info or ModelInfo()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if info.labels is not None and cfg.num_classes and len(info.labels) != cfg.num_classes:
        raise CheckpointError(f"{len(info.labels)} label names for a model with {cfg.num_classes} classes")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    provenance = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info.provenance}
    write_json(folder / CONFIG, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "labels": info.labels,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "provenance": provenance,
    })
    return folder


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


def load_model(folder: str | Path, **overrides) -> tuple[VisionTransformer, ModelInfo]:
    """Rebuild the model from a vitpipe, timm or transformers checkpoint folder.

    ``overrides`` change config fields that do not touch the weights' shapes (dropout rates).
    """
    folder = Path(folder)
    meta = read_config(folder)
    state = read_weights(folder / WEIGHTS)
    try:
        cfg, state, info = _interpret(folder, meta, state)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: {e}") from None
    model = VisionTransformer(cfg)
    check_state_dict(model, state, str(folder / WEIGHTS))
    model.load_state_dict(state)
    return model, info


def _interpret(folder: Path, meta: dict, state: dict) -> tuple[ViTConfig, dict, ModelInfo]:
    if meta.get("format") == FORMAT:
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {version!r} (this vitpipe reads {FORMAT_VERSION})")
        norm = meta.get("normalization") or {}
        info = ModelInfo(
            labels=meta.get("labels"),
            mean=tuple(norm.get("mean", INCEPTION_MEAN)),
            std=tuple(norm.get("std", INCEPTION_STD)),
            provenance=meta.get("provenance") or {},
        )
        return ViTConfig.from_dict(meta["model"]), state, info
    if "architecture" in meta:
        cfg, state, labels, mean, std = convert.from_timm(meta, state)
        return cfg, state, ModelInfo(labels=labels, mean=mean, std=std, source_format="timm")
    if meta.get("model_type") == "vit":
        processor = folder / "preprocessor_config.json"
        processor = json.loads(processor.read_text()) if processor.is_file() else None
        cfg, state, labels, mean, std = convert.from_transformers(meta, state, processor)
        return cfg, state, ModelInfo(labels=labels, mean=mean, std=std, source_format="transformers")
    raise ValueError("unknown checkpoint format: expected a vitpipe, timm or transformers (model_type 'vit') config")


EXPORT_FORMATS = ("vitpipe", "timm", "transformers")


def export_checkpoint(model: VisionTransformer, info: ModelInfo, out: str | Path, fmt: str,
                      metrics: dict | None = None, repo: str = "REPO_ID") -> list[str]:
    """Write ``out`` in the given format, loadable by that library's own code, with a model card.

    Returns notes for the user (e.g. what a format could not hold).
    """
    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    card = model_card(model.cfg, fmt, info.labels, info.provenance, metrics, repo)
    if fmt == FORMAT:  # the local paths in the provenance stay in the run folder
        save_checkpoint(model, out, dataclasses.replace(info, provenance=public(info.provenance)))
        _write_card(out, card)
        return []
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    args = (model.cfg, state, info.labels, info.mean, info.std)
    try:  # convert before writing anything: a model the format cannot hold leaves no folder behind
        if fmt == "timm":
            meta, state, note = convert.to_timm(*args)
            extra = {}
        else:
            meta, state, processor, note = convert.to_transformers(*args)
            extra = {"preprocessor_config.json": processor}
    except ValueError as e:
        raise CheckpointError(f"cannot export to {fmt}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    for name, obj in extra.items():
        write_json(out / name, obj)
    write_json(out / CONFIG, meta)
    _write_card(out, card)
    return [note] if note else []


def _write_card(out: Path, card: str) -> None:
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(card)
