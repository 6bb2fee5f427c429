"""Checkpoint formats, found by name in ``FORMATS``: vitpipe's own folders, timm's and transformers' hub layouts.

A format is one module implementing ``vit.formats.base.Format``: it recognises and reads its layout,
writes it, refuses in one line what it cannot hold, and says on the model card how to load it.
``load_model`` and ``export_checkpoint`` pick the module. Adding a format = one module + one ``FORMATS.add`` line
below. Reading, the highest-priority format that recognises a ``config.json`` wins: the libraries' layouts, named
by their own keys, first; a new format (priority 0) next; vitpipe's own last, since a layout may carry our config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.io import atomic_path
from common.registry import Registry
from vit.card import model_card
from vit.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    ModelInfo,
    check_state_dict,
    read_config,
    read_weights,
    write_folder,
)
from vit.formats import timm, transformers, vitpipe
from vit.formats.base import Format
from vit.model import VisionTransformer, ViTConfig

FORMATS: Registry[Format] = Registry("export format", CheckpointError)
FORMATS.add(timm.NAME, timm, priority=10)
FORMATS.add(transformers.NAME, transformers, priority=10)
FORMATS.add(vitpipe.NAME, vitpipe, priority=-10)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise CheckpointError(f"unknown export format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS.get(name)


def formats_refusing(cfg) -> dict[str, str]:
    """The formats that cannot hold a model of ``cfg`` (a ``ViTConfig``), each with why."""
    return {name: why for name, fmt in FORMATS.items() if (why := fmt.refuses(cfg))}


def format_of(meta: dict) -> Format:
    """The format whose ``config.json`` this is (the highest-priority one that recognises it); none is a
    ValueError."""
    if found := FORMATS.first(lambda fmt: fmt.recognises(meta)):
        return found[1]
    raise ValueError(f"unknown checkpoint format: expected the config.json of a ViT in {', '.join(FORMATS)} format")


def load_model(folder: str | Path, **overrides) -> tuple[VisionTransformer, ModelInfo]:
    """Rebuild the model from a checkpoint folder in any format.

    ``overrides`` change config fields that do not touch the weights' shapes (dropout rates).
    """
    folder = Path(folder)
    meta = read_config(folder)
    state = read_weights(folder / WEIGHTS)
    try:
        cfg, state, info = format_of(meta).read(folder, meta, state)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        cfg.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: {e}") from None
    check_before_building(cfg, state, folder)
    model = VisionTransformer(cfg)
    model.load_state_dict(state)
    return model, info


def check_before_building(cfg: ViTConfig, state: dict, folder: Path) -> None:
    """The weights match what ``config.json`` describes, checked before the model is allocated: a config.json
    that asks for a huge model beside small weights is one line, not gigabytes. The block count is compared
    first (a skeleton of a million blocks would itself take long), then every shape on a weightless skeleton
    (torch's meta device)."""
    held = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if held != cfg.depth:
        raise CheckpointError(f"{folder / CONFIG}: asks for depth {cfg.depth} but {folder / WEIGHTS} holds {held} "
                              "blocks")
    with torch.device("meta"):
        skeleton = VisionTransformer(cfg)
    check_state_dict(skeleton, state, f"{folder / WEIGHTS} (against {folder / CONFIG})")


def export_checkpoint(model: VisionTransformer, info: ModelInfo, out: str | Path, fmt: str,
                      metrics: dict | None = None, repo: str = "REPO_ID") -> list[str]:
    """Write ``out`` in the given format, loadable by that library's own code, with a model card.

    Returns notes for the user (e.g. what a format could not hold).
    """
    layout = get_format(fmt)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:  # convert before writing anything: a model the format cannot hold leaves no folder behind
        export = layout.write(model.cfg, state, info)
    except ValueError as e:
        raise CheckpointError(f"cannot export to {fmt}: {e}") from None
    card = model_card(model.cfg, fmt, layout.HOW_TO_LOAD, info.labels, info.provenance, metrics, repo)
    write_folder(out, export.weights, export.files)
    with atomic_path(Path(out) / "README.md") as tmp:
        tmp.write_text(card)
    return [export.note] if export.note else []
