"""Checkpoints: written whole (``step_N.tmp``, then a rename) with a sha256 manifest, found, and restored without
unpickling anything but tensors and plain data (the checks before resuming: ``resume_checks``); the data stream's
position; ``final/`` at the end; ``best/``.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from common.disk import free_space
from common.errors import TrainingError
from common.io import check_inside, current_umask, fresh_tmp_dir, open_append, replace_dir, tmp_beside, write_json
from data_tools.loader import ShardSet
from data_tools.positions import redeal, shard_set_changes
from pretrain.config import Config, ConfigError, best_metric, best_mode
from pretrain.launch import on_main
from pretrain.metrics import VAL_METRICS, read_metrics, rewind_metrics
from pretrain.resume_checks import deepspeed_safe_globals, weights_only_loads, write_manifest
from vit.checkpoint import CheckpointError, save_state_dict

if TYPE_CHECKING:
    from pretrain.loop import Run
    from pretrain.metrics import Window

CHECKPOINTS = "checkpoints"
BEST = "best"
TRAINER_STATE = "trainer.json"
LOADER_STATE = "loader.json"  # every (rank, logical worker)'s data stream state: a resume reads nothing before it
LOADER_FORMAT = "vitpipe-loader-state-1"
@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch of which epoch; and what
    ``train.on_nonfinite`` counts: the steps skipped within its window, the rollbacks made."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    nonfinite_steps: list[int] = field(default_factory=list)
    rollbacks: int = 0


@dataclass
class DataTrail:
    """What the run keeps of its data stream besides the Position: each logical worker's stream state after its
    last micro-batch of the epoch in progress (a checkpoint saves them), and with ``data.record_keys`` the keys
    of the step in progress, appended to ``record`` one line per step."""

    shards: dict  # ShardSet.describe(): what the saved states refer to
    record: Path | None = None
    epoch: int = -1
    states: dict = field(default_factory=dict)
    keys: list = field(default_factory=list)
    step_epoch: int = 0

    def took(self, batch: dict, epoch: int) -> None:
        """A micro-batch of ``epoch`` is being trained on: take its stream state and keys off it."""
        stream, keys = batch.pop("stream"), batch.pop("keys")
        if epoch != self.epoch:
            self.epoch, self.states = epoch, {}
        self.states[str(stream["worker"])] = stream["state"]
        if self.record is not None:
            self.step_epoch = epoch if not self.keys else self.step_epoch
            self.keys.extend(keys)

    def step_done(self, step: int) -> None:
        if self.record is None:
            return
        with open_append(self.record) as f:
            f.write(json.dumps({"step": step, "epoch": self.step_epoch, "keys": self.keys}) + "\n")
        self.keys = []

    def step_dropped(self, step: int) -> None:
        """The step in progress trained on nothing (a non-finite step): its keys are not recorded. A rollback to
        ``step`` also cuts the record back there."""
        self.keys = []
        if self.record is not None:
            rewind_metrics(self.record, step)


def sample_record(out: Path, rank: int) -> Path:
    """``samples/rank{R}.jsonl`` (a resume first cuts it back to its step: ``metrics.record_run``)."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    return out / "samples" / f"rank{rank}.jsonl"


@dataclass
class StreamResume:
    """How the first epoch's loader of a resumed run goes on (``train_loader``'s ``resume``; None: replay) on this
    rank, and the line the log says about it."""

    resume: dict | None
    line: str | None = None


def plan_stream_resume(ckpt: Path | None, cfg: Config, shards: ShardSet, world: int, rank: int, deepspeed: bool,
                       batches_per_epoch: int, micro: int) -> StreamResume:
    """Read ``ckpt``'s loader state and decide: the same layout goes on where each worker was (bit-identical);
    another layout re-deals the rest of the epoch (epoch mode) or starts it afresh (resampled); changed shards
    are refused unless ``train.resume_mismatch=allow``. Raises ConfigError with one line."""
    if ckpt is None:
        return StreamResume({})
    pos = Position(**json.loads((ckpt / TRAINER_STATE).read_text())["position"])
    path = ckpt / LOADER_STATE
    if not path.is_file():
        return StreamResume(None, f"note: {ckpt} holds no loader state (written by an older vitpipe): the data stream "
                                  f"replays epoch {pos.epoch}'s first {pos.batch} batches to get back to its position")
    saved = json.loads(path.read_text())
    if saved.get("format") != LOADER_FORMAT:
        raise CheckpointError(f"{path}: not a loader state this vitpipe reads (format {saved.get('format')!r}, "
                              f"expected {LOADER_FORMAT!r})")
    workers = max(1, cfg.data.workers)
    layout = f"{ckpt} was written by {saved['processes']} process(es) x {saved['workers']} loader worker(s) and " \
             f"resumes on {world} x {workers}"
    if deepspeed and saved["processes"] != world:
        raise ConfigError(f"train.resume: {layout}, but a DeepSpeed ZeRO checkpoint's optimizer shards load only on "
                          f"the {saved['processes']} processes that wrote them: resume on those, or convert it to "
                          "DeepSpeed's universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal "
                          f"--input_folder {ckpt}/state/pytorch_model --output_folder DIR) and load that with "
                          "DeepSpeed (checkpoint.load_universal)")
    if pos.batch == 0:  # at an epoch's end: the next epoch starts afresh on any layout
        return StreamResume({})
    if changes := shard_set_changes(saved["shards"], shards.describe()):
        if cfg.train.resume_mismatch != "allow":
            raise ConfigError(f"train.resume: {path} does not fit the training shards ({changes}); set "
                              f"train.resume_mismatch=allow to train the rest of epoch {pos.epoch} on these shards")
        return StreamResume({}, f"warning: the training shards changed since {ckpt} ({changes}): the rest of "
                                f"epoch {pos.epoch} is read afresh from the new shard set")
    if (saved["processes"], saved["workers"]) == (world, workers):
        replays = any(state is None for states in saved["ranks"] for state in states.values())
        return StreamResume(saved["ranks"][rank], "note: some shards cannot be read from an offset (pipe:, http): their "
                                                  "workers replay the epoch up to the position" if replays else None)
    changed = f"note: {layout}: the run is no longer bit-comparable to an uninterrupted one"
    if cfg.data.resampled:
        return StreamResume({}, f"{changed}; resampled streams start afresh for the rest of epoch {pos.epoch}")
    if any(state is None for states in saved["ranks"] for state in states.values()):
        raise ConfigError(f"train.resume: {layout}, but its loader state holds shards that cannot be read from an "
                          f"offset (pipe:, http); resume on {saved['processes']} x {saved['workers']}")
    try:
        plan, left, wanted = redeal(saved, [shards.counts.get(u) if shards.counts else None for u in shards.urls],
                                    cfg.train.seed, world, workers, batches_per_epoch, micro)
    except ValueError as e:
        raise ConfigError(f"train.resume: {layout}, but the rest of the epoch cannot be re-dealt: {e}") from None
    return StreamResume(plan[rank], f"{changed}; the {left} samples of epoch {pos.epoch} not yet trained on are "
                                    f"re-dealt over the new layout{_how_they_fit(left, wanted)}")


def _how_they_fit(left: int, places: int) -> str:
    if left == places:
        return ", each once"
    if left > places:
        return f", each at most once: {left - places} find no place in the epoch's remaining batches"
    return f": they fill {left} of its remaining {places} places, short shares go round again"


def save_loader_state(run: Run, folder: Path) -> None:
    """``loader.json``: every rank's stream states (gathered: every rank must call this), written by the main
    process. Grows with ranks x workers x the shuffle buffer, not with the position."""
    from accelerate.utils import gather_object

    accelerator, pos = run.accelerator, run.pos
    mine = run.trail.states if run.trail.epoch == pos.epoch else {}
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    if accelerator.is_main_process:
        write_json(folder / LOADER_STATE, {
            "format": LOADER_FORMAT, "epoch": pos.epoch, "batch": pos.batch, "processes": accelerator.num_processes,
            "workers": max(1, run.cfg.data.workers), "resampled": run.cfg.data.resampled, "shards": run.trail.shards,
            "ranks": ranks})


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, if any; first, that the run's checkpoints folder is inside it (the run
    writes there: a link to elsewhere is refused before any work), and that a fresh start finds none there."""
    check_inside(Path(cfg.train.output_dir) / CHECKPOINTS, cfg.train.output_dir)
    r = cfg.train.resume
    if r == "none":
        held = step_folders(Path(cfg.train.output_dir) / CHECKPOINTS)
        if held:  # a fresh run's step_1.. would sort before them, and pruning would delete what it just wrote
            raise ConfigError(f"train.resume=none: {held[-1].parent} holds checkpoints up to step "
                              f"{int(held[-1].name[5:])}; choose another train.output_dir or train.resume=auto")
        return None
    if r != "auto":
        path = Path(r)
        if not (path / TRAINER_STATE).is_file():
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {TRAINER_STATE})")
        refuse_later_history(path, Path(cfg.train.output_dir) / CHECKPOINTS)
        return path
    return latest_checkpoint(cfg.train.output_dir)


def refuse_later_history(ckpt: Path, root: Path) -> None:
    """Resuming from an older step into a folder that holds later ones would mix two histories (``auto`` would
    pick the other one next time) and pruning would delete the checkpoints just written: refused."""
    held = step_folders(root)
    step = json.loads((ckpt / TRAINER_STATE).read_text())["position"]["step"]
    if held and int(held[-1].name[5:]) > step:
        raise ConfigError(f"train.resume={ckpt}: it is step {step}, but {root} holds checkpoints up to step "
                          f"{int(held[-1].name[5:])} from another history; choose another train.output_dir (or "
                          "move the later checkpoints away)")


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
        try:
            accelerator.load_state(str(resume_from / "state"))
        except RuntimeError as e:  # the objective's own tensors (a decoder) of another shape: torch's long list
            if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
                raise
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key" in line),
                         "")
            raise TrainingError(f"{resume_from / 'state'}: does not fit this run's model and objective ({first}); "
                                "it cannot be resumed: train.resume=none with another train.output_dir to start "
                                "over") from None
    trainer = json.loads((resume_from / TRAINER_STATE).read_text())
    pos = Position(**trainer["position"])
    if "window" in trainer:  # a checkpoint between two log lines (a stop signal's)
        window.load(trainer["window"])
    return pos


def save_training_checkpoint(run: Run) -> Path:
    """Full state (for resume) + a model folder, written to ``step_N.tmp`` and renamed when complete."""
    accelerator, pos, cfg = run.accelerator, run.pos, run.cfg
    root = run.out / CHECKPOINTS
    final = root / f"step_{pos.step:08d}"
    tmp = tmp_beside(final)
    state = accelerator.get_state_dict(run.task)  # gathers ZeRO-3 shards; every rank must call it
    if (bad := on_main(accelerator, lambda: nonfinite_tensor(state))) is not None:  # one answer for every rank
        raise NonfiniteWeights(bad, final.name)
    if accelerator.is_main_process:
        check_inside(root, run.out)
        fresh_tmp_dir(final)
    accelerator.wait_for_everyone()
    with _writing(tmp):
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
        save_loader_state(run, tmp)
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the manifest hashes them
    if accelerator.is_main_process:
        follow_umask(tmp / "state")
        model = accelerator.unwrap_model(run.task).model
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's wrapper
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if weights.keys() != model.state_dict().keys():
            raise TrainingError(f"gathered weights do not match the model ({len(weights)} of "
                                f"{len(model.state_dict())} tensors); not writing {final.name}")
        provenance = {"stage": run.stage, "objective": cfg.objective.name, "step": pos.step, "config": cfg.to_dict()}
        info = replace(run.info, provenance={**run.info.provenance, **provenance})
        with _writing(tmp):
            save_state_dict(model.cfg, weights, tmp / "model", info)
        write_json(tmp / TRAINER_STATE, {"position": pos.__dict__, "stage": run.stage,
                                         **({"window": run.window.state()} if run.window.steps else {})})
        write_manifest(tmp)
        replace_dir(tmp, final)
        for old in step_folders(root)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class NonfiniteWeights(TrainingError):
    """The weights to checkpoint are not finite: nothing was written (what follows is ``train.on_nonfinite``'s:
    ``nonfinite.save_or_roll_back``)."""

    def __init__(self, tensor: str, name: str):
        super().__init__(f"weights are not finite ({tensor}); not writing {name}")
        self.tensor = tensor


def nonfinite_tensor(state: dict) -> str | None:
    """The name of the first tensor of ``state`` that is not finite, if any. Reads every weight once."""
    return next((key.removeprefix("_orig_mod.") for key, tensor in state.items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` the mode any new file gets (0666 less the umask): safetensors creates its
    files 0600, which teammates on a shared disk cannot read. One chmod per file."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


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
        copy_model(run.out / CHECKPOINTS / f"step_{run.pos.step:08d}" / "model", final, "the final model")
    run.accelerator.wait_for_everyone()
    return final


def copy_model(source: Path, dest: Path, what: str) -> None:
    """``dest``: a copy of the checkpoint model folder ``source``, via a tmp folder renamed into place. A write
    that fails (a full disk) is a TrainingError of one line naming ``dest``, the free space and ``source``, and
    leaves no partial copy taking room."""
    tmp = fresh_tmp_dir(dest)
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        replace_dir(tmp, dest)
    except shutil.Error as e:  # copytree gathers each file's failure into a list: say the first
        shutil.rmtree(tmp, ignore_errors=True)
        why = re.sub(r"^\[Errno \d+\] ", "", e.args[0][0][2]).split(": '")[0]  # without the errno and the path
        raise TrainingError(f"{dest}: writing {what} failed ({why}; {free_space(dest)}); the checkpoint it copies "
                            f"is complete: {source}") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"{dest}: writing {what} failed ({e.strerror or e}; {free_space(dest)})") from None


# ---- best/: the checkpoint with the best evaluation metric (train.keep_best) ---------------------------------------

def improves(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def best_so_far(records: list[dict], metric: str, mode: str) -> tuple[int, float] | None:
    """(step, value) of the best ``metric`` among evaluation records (the first of equals), None if none has it."""
    best = None
    for r in records:
        if r.get(metric) is not None and improves(r[metric], best and best[1], mode):
            best = (r["step"], r[metric])
    return best


def recorded_best(accelerator, cfg: Config) -> tuple[int, float] | None:
    """With ``train.keep_best``, the best evaluation ``val_metrics.jsonl`` holds, on every rank; else None."""
    if not cfg.train.keep_best:
        return None
    return on_main(accelerator, lambda: best_so_far(read_metrics(Path(cfg.train.output_dir) / VAL_METRICS),
                                                    best_metric(cfg), best_mode(cfg)))


def check_best_metric(cfg: Config, evaluated: list[str]) -> None:
    """``train.best_metric`` must be one of the metrics evaluated at each checkpoint."""
    if cfg.train.keep_best and best_metric(cfg) not in evaluated:
        raise ConfigError(f"train.best_metric: {best_metric(cfg)} is not evaluated in this run "
                          f"(evaluated: {', '.join(evaluated) or 'nothing'})")


def mark_best(run: Run, record: dict) -> None:
    """Take this evaluation into the run's best, and record the best so far in its metrics line."""
    metric, mode = best_metric(run.cfg), best_mode(run.cfg)
    if record.get(metric) is not None and improves(record[metric], run.best and run.best[1], mode):
        run.best = (run.pos.step, record[metric])
    if run.best is not None:
        record.update({f"best_{metric}": run.best[1], "best_step": run.best[0]})


def keep_best(run: Run) -> None:
    """``best/``: a copy of this step's checkpoint model folder, renamed into place when complete."""
    if run.accelerator.is_main_process:
        copy_model(run.out / CHECKPOINTS / f"step_{run.pos.step:08d}" / "model", run.out / BEST,
                   "the best checkpoint's model")
    run.accelerator.wait_for_everyone()
