"""``train.on_nonfinite``: what a step whose loss (or clipped gradient norm) is not finite does, and one whose update
left the weights not finite, found when a checkpoint is about to be written.

``stop`` (the default) ends the run naming the last good checkpoint; ``skip`` drops the step's update and goes on,
stopping after more than ``train.max_nonfinite`` skips within ``train.nonfinite_window`` steps; ``rollback`` reloads
the newest checkpoint (weights, optimizer, metrics window) and goes on from there with the data after the
offending step, stopping after more than ``train.max_nonfinite`` rollbacks. Every event is a log line and a
``metrics.jsonl`` line (``"event": "nonfinite"``); log lines count the window's skipped steps (``nonfinite_steps``).
Weights that are not finite are never written (``checkpoints.nonfinite_tensor``): there ``rollback`` rolls back
the same way (from a step already counted, evaluated and logged) and ``stop`` and ``skip`` stop, since the
update is applied already. So the checkpoint a rollback reads is finite.

The decision is taken on values all-reduced over the ranks (the weights are checked on the main process, its
answer broadcast), so every rank takes the same branch; the counts live in the Position, so a resumed run counts
on where the checkpoint left off.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import TrainingError
from pretrain.checkpoints import (
    NonfiniteWeights,
    latest_checkpoint,
    recorded_best,
    restore,
    save_training_checkpoint,
)
from pretrain.config import Config, ConfigError
from pretrain.launch import on_main
from pretrain.metrics import METRICS, VAL_METRICS, append_line, read_metrics, rewind_metrics

if TYPE_CHECKING:
    from pretrain.loop import Run


def check_policy(cfg: Config, deepspeed: bool) -> None:
    """``skip`` needs the update to come after the check; DeepSpeed's engine updates inside ``backward``."""
    if cfg.train.on_nonfinite == "skip" and deepspeed:
        raise ConfigError("train.on_nonfinite=skip: DeepSpeed updates the weights inside backward, before the "
                          "loss can be checked; use train.on_nonfinite=rollback (or stop)")


def apply_update(run: Run, values: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """Clip and apply the step's accumulated gradients unless the step is non-finite, then zero them; the clipped
    norm, and whether the step is finite: its (all-reduced) ``values`` and, when clipping, its gradient norm, read
    in one device sync. Under fp16 the loss scaler owns the gradients: it skips an overflowing update itself and
    lowers the scale, which is routine, so only the loss counts there."""
    clip, fp16 = run.cfg.optim.clip_grad_norm, run.cfg.train.mixed_precision == "fp16"
    norm = run.accelerator.clip_grad_norm_(run.task.parameters(), clip) if clip else None
    checked = values if norm is None or fp16 else torch.cat([values, norm.reshape(1).to(values)])
    finite = bool(torch.isfinite(checked).all())
    if finite or fp16:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, finite


def nonfinite_step(run: Run, values: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
    """The step in progress (its data taken, its update not applied) was non-finite: stop, skip or roll back."""
    cfg, pos = run.cfg.train, run.pos
    step = pos.step + 1
    what = (f"loss is {values[0].item()}" if not torch.isfinite(values).all()
            else f"gradient norm is {float(grad_norm)}")
    last = on_main(run.accelerator, lambda: latest_checkpoint(run.out))  # one choice for every rank
    if cfg.on_nonfinite == "stop":
        raise TrainingError(f"step {step}: {what}; stopping (train.on_nonfinite=skip or rollback would go on). "
                            f"Last good checkpoint: {last or 'none (no checkpoint written yet)'}")
    if cfg.on_nonfinite == "skip":
        pos.nonfinite_steps = [s for s in pos.nonfinite_steps if s > step - cfg.nonfinite_window] + [step]
        count = len(pos.nonfinite_steps)
        check_limit(run, step, what, f"{count} skipped steps within the last {cfg.nonfinite_window}", count, last)
        pos.step = step
        run.trail.step_dropped(step)
        run.window.nonfinite += 1
        report(run, step, what, f"update skipped ({count} within {cfg.nonfinite_window} steps)", action="skip")
        return
    roll_back_from(run, step, what, last)


def save_or_roll_back(run: Run) -> bool:
    """``save_training_checkpoint``: True; or, when the step just taken left the weights not finite (its loss and
    gradient norm were finite), nothing is written and ``rollback`` rolls back: False. ``stop`` and ``skip``
    stop: the update cannot be skipped, it is applied already."""
    try:
        save_training_checkpoint(run)
        return True
    except NonfiniteWeights as e:
        step, what = run.pos.step, f"weights are not finite ({e.tensor})"
        last = on_main(run.accelerator, lambda: latest_checkpoint(run.out))
        if run.cfg.train.on_nonfinite != "rollback":
            raise TrainingError(f"step {step}: {e}; stopping (train.on_nonfinite=rollback would go on). "
                                f"Last good checkpoint: {last or 'none (no checkpoint written yet)'}") from None
        roll_back_from(run, step, what, last)
        return False


def roll_back_from(run: Run, step: int, what: str, last: Path | None) -> None:
    """``rollback`` from the non-finite ``step`` to ``last``, the newest checkpoint: counted and bounded."""
    pos = run.pos
    if last is None:
        raise TrainingError(f"step {step}: {what}; no checkpoint to roll back to yet; stopping")
    pos.rollbacks += 1
    check_limit(run, step, what, f"rollback number {pos.rollbacks}", pos.rollbacks, last)
    roll_back(run, last)
    since = f"steps {pos.step + 1}-{step}" if step > pos.step + 1 else f"step {step}"
    report(run, step, what, f"rolled back to {last} (rollback {pos.rollbacks}); the data of {since} is not trained "
                            "on", action="rollback", to_step=pos.step)


def check_limit(run: Run, step: int, what: str, counted: str, count: int, last) -> None:
    if count > run.cfg.train.max_nonfinite:
        raise TrainingError(f"step {step}: {what}; {counted} is more than train.max_nonfinite="
                            f"{run.cfg.train.max_nonfinite} allows; stopping. Last good checkpoint: "
                            f"{last or 'none (no checkpoint written yet)'}")


def roll_back(run: Run, ckpt) -> None:
    """The weights, optimizer state and metrics window of ``ckpt``; the data stream, its trail and the event
    counts stay where they are. The metric files are cut back to its step (all but the event lines), so they hold
    one history, and ``run.best`` is theirs again (an evaluation of the weights rolled back from may have looked
    the best)."""
    run.window.reset()
    run.pos.step = restore(run.accelerator, ckpt, run.window).step
    run.trail.step_dropped(run.pos.step)
    on_main(run.accelerator, lambda: (rewind_keeping_events(run.out / METRICS, run.pos.step),
                                      rewind_metrics(run.out / VAL_METRICS, run.pos.step)))
    run.best = recorded_best(run.accelerator, run.cfg)


def rewind_keeping_events(path: Path, step: int) -> None:
    """Cut the metrics back to ``step`` but for its event lines: the earlier rollbacks to this same checkpoint
    happened and are counted, though the steps they name are trained again. Reads the whole file: rollbacks are
    few (``train.max_nonfinite``)."""
    events = [r for r in read_metrics(path) if "event" in r and r["step"] > step]
    rewind_metrics(path, step)
    for record in events:
        append_line(path, record)


def report(run: Run, step: int, what: str, action_line: str, **event) -> None:
    if run.accelerator.is_main_process:
        append_line(run.out / METRICS, {"step": step, "event": "nonfinite", "value": what, **event})
    run.accelerator.print(f"warning: step {step}: {what}; {action_line}", flush=True)
