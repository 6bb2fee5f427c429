"""Checking a checkpoint before resuming from it: its files against its sha256 manifest, its recorded recipe
against the run's (the keys that change the result), its weights' shapes against the model's, and every
``torch.load`` with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from common.args import differing_keys
from common.io import write_json
from common.redact import redacted
from pretrain.config import Config, ConfigError
from vit.checkpoint import WEIGHTS, CheckpointError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vitpipe-checkpoint-manifest"

# keys that change how a run goes, not what it computes: resuming with other values is fine (bit-exact
# resume also needs the same data.workers and number of processes: with others the rest of the epoch is re-dealt)
NOT_RESULT = {
    "train.max_steps", "train.checkpoint_every", "train.keep_last", "train.log_every", "train.output_dir",
    "train.resume", "train.resume_mismatch", "train.compile", "train.peak_tflops", "model.grad_checkpointing",
    "data.workers", "data.val", "data.monitor", "data.monitor_bank", "data.record_keys", "train.threads", "train.keep_best",
    "train.best_metric", "train.best_mode", "train.on_nonfinite", "train.max_nonfinite", "train.nonfinite_window",
    "data.stall_timeout",
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() and p != folder / MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file under ``folder`` (call it last, before the folder is renamed)."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in _files(folder)}
    write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def verify_manifest(folder: Path, unverified: str = "refuse") -> str | None:
    """Raise CheckpointError naming the first file that was added, removed or changed since it was written.

    A checkpoint with no manifest (an older vitpipe wrote none) is refused unless ``unverified="allow"``
    (``train.resume_mismatch=allow``): then its files as they are now are recorded, and the returned note says so.
    """
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            raise ValueError("not a checkpoint manifest")
    except FileNotFoundError:
        if unverified == "allow":
            write_manifest(folder)
            return (f"{path}: missing (an older vitpipe wrote none); resuming {folder} unverified, as "
                    f"train.resume_mismatch=allow says, and recording its files in {MANIFEST} now")
        raise CheckpointError(f"{path}: missing, so the checkpoint cannot be verified (incomplete, or written by an "
                              "older vitpipe); refusing to resume from it. If it is complete, "
                              "train.resume_mismatch=allow resumes it and records its manifest") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); refusing to resume from {folder}") from None
    present = _files(folder)
    for name in present:
        if name not in listed:
            raise CheckpointError(f"{folder / name}: not in {MANIFEST} (added after the checkpoint was written); "
                                  "refusing to resume from it")
    for name, entry in listed.items():
        file = folder / name
        if name not in present:
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing; refusing to resume from {folder}")
        if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: changed since the checkpoint was written (sha256 differs from "
                                  f"{MANIFEST}); refusing to resume from {folder}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# keys added since checkpoints were first written, with the value that does what the runs before them did
ADDED_KEYS = {"data.resize_filter": "bicubic", "data.decode": "cpu"}


def config_changes(recorded: dict, current: dict) -> list[str]:
    """``key (was, now)`` for every result-changing key whose value differs."""
    old, new = {**ADDED_KEYS, **_flat(recorded)}, _flat(json.loads(json.dumps(current)))
    return [f"{k} ({_short(old.get(k))}, now {_short(new.get(k))})" for k in differing_keys(old, new)
            if k not in NOT_RESULT]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(ckpt: Path, cfg: Config, stage: str, model: torch.nn.Module | None = None) -> str | None:
    """Verify ``ckpt`` against its manifest, then compare its recipe with ``cfg`` (and its weights' shapes with
    ``model``'s: no ``resume_mismatch`` can resume a model of another shape).

    A changed recipe raises ConfigError naming the keys, unless ``train.resume_mismatch=allow``; then
    the returned note names them.
    """
    unverified = verify_manifest(ckpt, cfg.train.resume_mismatch)
    if model is not None:
        check_shapes(ckpt / "model" / WEIGHTS, model)
    model_config = ckpt / "model" / "config.json"
    provenance = json.loads(model_config.read_text()).get("provenance", {})
    if "config" not in provenance:
        raise CheckpointError(f"{model_config}: records no training config, so it cannot be checked against this "
                              "run's; refusing to resume from it")
    changes = config_changes({"stage": provenance.get("stage"), **provenance["config"]},
                             redacted({"stage": stage, **cfg.to_dict()}))  # as it was recorded
    if not changes:
        return unverified
    listed = "; ".join(changes)
    if cfg.train.resume_mismatch == "allow":
        mismatch = f"resuming {ckpt} although these keys changed: {listed}"
        return f"{unverified}\nnote: {mismatch}" if unverified else mismatch
    raise ConfigError(f"train.resume: {ckpt} was made with other values of {listed}; set "
                      "train.resume_mismatch=allow to continue anyway, or train.resume=none with another "
                      "train.output_dir to start over")


def check_shapes(weights: Path, model: torch.nn.Module) -> None:
    """The checkpoint's tensors have the names and shapes of ``model``'s; read from the safetensors header only."""
    with safe_open(str(weights), framework="pt") as f:
        held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = [f"{k} {held.get(k, 'missing')} vs {wanted.get(k, 'missing')}" for k in sorted(held.keys() | wanted.keys())
              if held.get(k) != wanted.get(k)]
    if differ:
        raise ConfigError(f"train.resume: {weights.parent.parent} holds a model of another shape than this run's "
                          f"({len(differ)} tensors differ, e.g. {differ[0]}: checkpoint vs run); it cannot be resumed "
                          "whatever train.resume_mismatch says: train.resume=none with another train.output_dir to "
                          "start over")


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's ZeRO checkpoints hold beside tensors: plain records, no behaviour on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(safe_globals: list = ()):
    """Within the block every ``torch.load`` loads tensors and plain data only, whatever the caller asked.

    DeepSpeed's checkpoint engine calls ``torch.load(weights_only=False)``, which runs any code a pickle
    names; here such a file is refused with one line naming it instead.
    """
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            reason = _weights_only_reason(e)
            if "global" in reason.lower():
                raise CheckpointError(f"{f}: refused to load: it names code, not just tensors and plain data "
                                      f"({reason})") from None
            raise CheckpointError(f"{f}: damaged or not a torch file ({reason})") from None
        except (RuntimeError, EOFError) as e:
            raise CheckpointError(f"{f}: damaged or not a torch file ({(str(e).splitlines() or ['empty'])[0]})") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            yield
    finally:
        torch.load = original


def _weights_only_reason(e: Exception) -> str:
    """The line of torch's weights-only refusal that says what was refused (the rest is advice)."""
    advice = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(advice):
            return line.split(" was not an allowed global")[0]
    return type(e).__name__
