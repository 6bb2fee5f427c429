"""Checkpoints: written whole (``step_N.tmp``, then a rename) with a sha256 manifest, found, verified against their
manifest and the run's recipe (the keys that change the result), and restored without unpickling anything but
tensors and plain data; ``final/`` at the end.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from common.errors import TrainingError
from common.io import fresh_tmp_dir, replace_dir, tmp_beside, write_json
from pretrain.config import Config, ConfigError
from pretrain.launch import on_main
from vit import ModelInfo
from vit.checkpoint import CheckpointError, save_state_dict

if TYPE_CHECKING:
    from pretrain.loop import Run
    from pretrain.metrics import Window

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vitpipe-checkpoint-manifest"

# keys that change how a run goes, not what it computes: resuming with other values is fine (bit-exact
# resume also needs the same data.workers and number of processes: the data stream depends on them)
NOT_RESULT = {
    "train.max_steps", "train.checkpoint_every", "train.keep_last", "train.log_every", "train.output_dir",
    "train.resume", "train.resume_mismatch", "train.compile", "train.peak_tflops", "model.grad_checkpointing",
    "data.workers", "data.val", "data.monitor", "data.monitor_bank",
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


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError naming the first file that was added, removed or changed since it was written."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            raise ValueError("not a checkpoint manifest")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing, so the checkpoint cannot be verified (incomplete, or written by an "
                              "older vitpipe); refusing to resume from it") from None
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


def config_changes(recorded: dict, current: dict) -> list[str]:
    """``key (was, now)`` for every result-changing key whose value differs."""
    old, new = _flat(recorded), _flat(json.loads(json.dumps(current)))
    return [f"{k} ({_short(old.get(k))}, now {_short(new.get(k))})" for k in sorted(old.keys() | new.keys())
            if k not in NOT_RESULT and old.get(k) != new.get(k)]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(ckpt: Path, cfg: Config, stage: str) -> str | None:
    """Verify ``ckpt`` against its manifest, then compare its recipe with ``cfg``.

    A changed recipe raises ConfigError naming the keys, unless ``train.resume_mismatch=allow``; then
    the returned note names them.
    """
    verify_manifest(ckpt)
    model_config = ckpt / "model" / "config.json"
    provenance = json.loads(model_config.read_text()).get("provenance", {})
    if "config" not in provenance:
        raise CheckpointError(f"{model_config}: records no training config, so it cannot be checked against this "
                              "run's; refusing to resume from it")
    changes = config_changes({"stage": provenance.get("stage"), **provenance["config"]},
                             {"stage": stage, **cfg.to_dict()})
    if not changes:
        return None
    listed = "; ".join(changes)
    if cfg.train.resume_mismatch == "allow":
        return f"resuming {ckpt} although these keys changed: {listed}"
    raise ConfigError(f"train.resume: {ckpt} was made with other values of {listed}; set "
                      "train.resume_mismatch=allow to continue anyway, or train.resume=none with another "
                      "train.output_dir to start over")


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


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch of which epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def find_resume(cfg: Config) -> Path | None:
    r = cfg.train.resume
    if r == "none":
        return None
    if r != "auto":
        path = Path(r)
        if not (path / TRAINER_STATE).is_file():
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {TRAINER_STATE})")
        return path
    return latest_checkpoint(cfg.train.output_dir)


def step_folders(root: Path) -> list[Path]:
    """Checkpoint folders that were renamed into place, oldest first (``step_N.tmp`` ones were not)."""
    return sorted(p for p in root.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: one still named ``.tmp`` was interrupted mid-write."""
    done = [p for p in step_folders(Path(output_dir) / CHECKPOINTS) if (p / TRAINER_STATE).is_file()]
    return done[-1] if done else None


def restore(accelerator, resume_from: Path | None, window: Window) -> Position:
    """Load the checkpoint's full state (weights, optimizer, ...) into the prepared objects and the metrics
    window it was in; where it stopped."""
    if resume_from is None:
        return Position()
    deepspeed = accelerator.state.deepspeed_plugin is not None
    with weights_only_loads(deepspeed_safe_globals() if deepspeed else []):
        accelerator.load_state(str(resume_from / "state"))
    trainer = json.loads((resume_from / TRAINER_STATE).read_text())
    pos = Position(**trainer["position"])
    if "window" in trainer:  # a checkpoint between two log lines (a stop signal's)
        window.load(trainer["window"])
    accelerator.print(f"resumed from {resume_from} at step {pos.step}")
    return pos


def save_training_checkpoint(run: Run) -> Path:
    """Full state (for resume) + a model folder, written to ``step_N.tmp`` and renamed when complete."""
    accelerator, pos, cfg = run.accelerator, run.pos, run.cfg
    root = run.out / CHECKPOINTS
    final = root / f"step_{pos.step:08d}"
    tmp = tmp_beside(final)
    state = accelerator.get_state_dict(run.task)  # gathers ZeRO-3 shards; every rank must call it
    on_main(accelerator, lambda: refuse_nonfinite(state, run.out, final.name))
    if accelerator.is_main_process:
        fresh_tmp_dir(final)
    accelerator.wait_for_everyone()
    with _writing(tmp):
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the manifest hashes them
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.task).model
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if weights.keys() != model.state_dict().keys():
            raise TrainingError(f"gathered weights do not match the model ({len(weights)} of "
                                f"{len(model.state_dict())} tensors); not writing {final.name}")
        provenance = {"stage": run.stage, "objective": cfg.objective.name, "step": pos.step, "config": cfg.to_dict()}
        info = run.info
        with _writing(tmp):
            save_state_dict(model.cfg, weights, tmp / "model", ModelInfo(info.labels, info.mean, info.std,
                                                                          {**info.provenance, **provenance}))
        write_json(tmp / TRAINER_STATE, {"position": pos.__dict__, "stage": run.stage,
                                         **({"window": run.window.state()} if run.window.steps else {})})
        write_manifest(tmp)
        replace_dir(tmp, final)
        for old in step_folders(root)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def refuse_nonfinite(state: dict, out: Path, name: str) -> None:
    """No checkpoint from a non-finite state: a TrainingError naming the first non-finite tensor and the newest
    checkpoint, which is finite (every one was checked so before it was written). Reads every weight once."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            last = latest_checkpoint(out)
            raise TrainingError(f"weights are not finite ({key.removeprefix('_orig_mod.')}); not writing {name}. "
                                f"Last good checkpoint: {last or 'none (no checkpoint written yet)'}")


@contextmanager
def _writing(folder: Path):
    """torch's and safetensors' writers report a full (or failing) disk as RuntimeError or SafetensorError,
    not OSError: one line naming the folder instead."""
    try:
        yield
    except (RuntimeError, SafetensorError) as e:
        if not any(mark in str(e) for mark in ("inline_container", "PytorchStreamWriter", "I/O error")):
            raise
        free = shutil.disk_usage(folder).free / 2**20
        raise TrainingError(f"{folder}: writing the checkpoint failed ({free:.1f} MiB free on that disk; "
                            f"{str(e).splitlines()[0]})") from None


def finish(run: Run) -> Path:
    """``final/``: a copy of the last checkpoint's model folder, renamed into place when complete."""
    final = run.out / "final"
    if run.accelerator.is_main_process:
        tmp = fresh_tmp_dir(final)
        shutil.copytree(run.out / CHECKPOINTS / f"step_{run.pos.step:08d}" / "model", tmp, dirs_exist_ok=True)
        replace_dir(tmp, final)
    run.accelerator.wait_for_everyone()
    return final
