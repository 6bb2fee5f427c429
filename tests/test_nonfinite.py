"""train.on_nonfinite: a non-finite step stops the run, is skipped, or rolls back to the last checkpoint; every
event logged and counted, the counts bounded, and no checkpoint from a non-finite state. In this process the fault
is injected by the test: the training forward passes it names return a NaN loss (what an fp16 overflow or a bad
batch does). Launched (2 ranks, DDP and DeepSpeed ZeRO-2), where nothing can be injected, the run genuinely
diverges: see DIVERGING."""

import json
import math
import re
import signal

import pytest
import torch

import pretrain.evaluation
import pretrain.loop
import pretrain.nonfinite
from common.errors import TrainingError
from pretrain.checkpoints import best_so_far, latest_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.nonfinite import check_policy
from vit.checkpoint import read_weights

from .helpers import TINY, launch, poison_weights_at, pretrain_cmd


def nan_at(monkeypatch, *calls, crash_at=None):
    """The training forward passes numbered ``calls`` (from 1, one per step with ``grad_accum=1``) give a NaN
    loss; the one numbered ``crash_at`` ends the run (as a kill would)."""
    class Faulty(pretrain.loop.Task):
        count = 0

        def forward(self, batch, generator=None):
            loss, extra = super().forward(batch, generator)
            if not self.training:
                return loss, extra
            Faulty.count += 1
            if Faulty.count == crash_at:
                raise TrainingError("killed by the test")
            return (loss * float("nan") if Faulty.count in calls else loss), extra

    monkeypatch.setattr(pretrain.loop, "Task", Faulty)


def records(out, name="metrics.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def untimed(lines):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "mfu")} for r in lines]


def model_weights(out, step):
    return read_weights(out / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(run_here, shards, out, *overrides):
    return run_here(pretrain_cmd(f"data.train={shards}", f"train.output_dir={out}", "data.workers=0",
                                 "train.log_every=1", *overrides))


def test_skip_drops_the_update_counts_it_and_goes_on(shards, tmp_path, run_here, monkeypatch):
    nan_at(monkeypatch, 3)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=skip", "train.max_steps=5", "train.checkpoint_every=1",
              "train.keep_last=5", "data.record_keys=true")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: step 3: loss is nan; update skipped (1 within 1000 steps)" in res.stdout
    assert same(model_weights(out, 3), model_weights(out, 2))  # the update was not applied
    assert not same(model_weights(out, 4), model_weights(out, 3))
    assert all(torch.isfinite(w).all() for w in read_weights(out / "final" / "model.safetensors").values())
    lines = records(out)
    assert [r for r in lines if "event" in r] == [
        {"step": 3, "event": "nonfinite", "value": "loss is nan", "action": "skip"}]
    logged = {r["step"]: r for r in lines if "event" not in r}
    assert logged[3]["loss"] is None and logged[3]["nonfinite_steps"] == 1
    assert [logged[s]["nonfinite_steps"] for s in (1, 2, 4, 5)] == [0, 0, 0, 0]
    trained = [r["step"] for r in records(out, "samples/rank0.jsonl")]
    assert trained == [1, 2, 4, 5]  # the skipped step's samples were not trained on
    assert json.loads((out / "checkpoints" / "step_00000005" / "trainer.json").read_text())[
        "position"]["nonfinite_steps"] == [3]


@pytest.mark.parametrize("calls,window,stops_at", [((2, 3), 10, 3), ((2, 5), 3, None)])
def test_skip_stops_after_more_than_max_nonfinite_within_the_window(shards, tmp_path, run_here, monkeypatch,
                                                                    calls, window, stops_at):
    nan_at(monkeypatch, *calls)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=skip", "train.max_nonfinite=1",
              f"train.nonfinite_window={window}", "train.max_steps=6", "train.checkpoint_every=1", "train.keep_last=6")
    if stops_at is None:  # the first skip left the window before the second
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.count("update skipped (1 within 3 steps)") == 2
        return
    assert res.returncode == 2
    last = out / "checkpoints" / f"step_{stops_at - 1:08d}"
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: step {stops_at}: loss is nan; 2 skipped steps within the last {window} is more than "
        f"train.max_nonfinite=1 allows; stopping. Last good checkpoint: {last}")
    assert not (out / "final").exists()


def test_rollback_reloads_the_last_checkpoint_and_goes_on_with_the_later_data(shards, tmp_path, run_here,
                                                                             monkeypatch):
    common = ("train.max_steps=8", "train.checkpoint_every=2", "train.keep_last=8", "data.record_keys=true")
    clean = tmp_path / "clean"
    assert run(run_here, shards, clean, *common).returncode == 0
    nan_at(monkeypatch, 5)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=rollback", *common)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = out / "checkpoints" / "step_00000004"
    assert (f"warning: step 5: loss is nan; rolled back to {ckpt} (rollback 1); the data of step 5 is not trained "
            "on") in res.stdout
    clean_keys = {r["step"]: r["keys"] for r in records(clean, "samples/rank0.jsonl")}
    keys = {r["step"]: r["keys"] for r in records(out, "samples/rank0.jsonl")}
    assert [r["step"] for r in records(out, "samples/rank0.jsonl")] == list(range(1, 9))
    # steps 1-4 as the clean run; the batch of step 5 is dropped and the data goes on after it
    assert [keys[s] for s in range(1, 5)] == [clean_keys[s] for s in range(1, 5)]
    assert [keys[s] for s in range(5, 8)] == [clean_keys[s] for s in range(6, 9)]
    assert same(model_weights(out, 4), model_weights(clean, 4))
    lines = records(out)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # one history: step 5's lines once
    assert lines[4] == {"step": 5, "event": "nonfinite", "value": "loss is nan", "action": "rollback", "to_step": 4}
    assert json.loads((out / "checkpoints" / "step_00000008" / "trainer.json").read_text())[
        "position"]["rollbacks"] == 1


def test_a_run_resumed_after_a_rollback_is_the_uninterrupted_one(shards, tmp_path, run_here, monkeypatch):
    common = ("train.on_nonfinite=rollback", "train.max_steps=8", "train.checkpoint_every=2",
              "model.drop_path_rate=0.1")
    nan_at(monkeypatch, 3)
    whole = tmp_path / "whole"
    assert run(run_here, shards, whole, *common).returncode == 0
    nan_at(monkeypatch, 3, crash_at=8)  # after the checkpoint at step 6, taken after the rollback
    out = tmp_path / "killed"
    res = run(run_here, shards, out, *common)
    assert res.returncode != 0 and not (out / "final").exists()
    nan_at(monkeypatch)
    res = run(run_here, shards, out, *common)
    assert res.returncode == 0 and "resumed from" in res.stdout and "rolled back" not in res.stdout, res.stderr
    assert untimed(records(out)) == untimed(records(whole))
    assert same(read_weights(out / "final" / "model.safetensors"), read_weights(whole / "final" / "model.safetensors"))
    trainer = [json.loads((o / "checkpoints" / "step_00000008" / "trainer.json").read_text()) for o in (out, whole)]
    assert trainer[0] == trainer[1] and trainer[0]["position"]["rollbacks"] == 1


def test_rollback_is_bounded_and_needs_a_checkpoint(shards, tmp_path, run_here, monkeypatch):
    nan_at(monkeypatch, 1)
    res = run(run_here, shards, tmp_path / "early", "train.on_nonfinite=rollback", "train.max_steps=4")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "pretrain: error: step 1: loss is nan; no checkpoint to roll back to yet; stopping")
    nan_at(monkeypatch, 3, 4)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=rollback", "train.max_nonfinite=1", "train.max_steps=6",
              "train.checkpoint_every=2")
    assert res.returncode == 2 and res.stdout.count("rolled back") == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "pretrain: error: step 3: loss is nan; rollback number 2 is more than train.max_nonfinite=1 allows; "
        f"stopping. Last good checkpoint: {out / 'checkpoints' / 'step_00000002'}")


def test_stop_is_the_default_and_names_the_finite_checkpoint(shards, tmp_path, run_here, monkeypatch):
    nan_at(monkeypatch, 3)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.max_steps=6", "train.checkpoint_every=2")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "pretrain: error: step 3: loss is nan; stopping (train.on_nonfinite=skip or rollback would go on). "
        f"Last good checkpoint: {out / 'checkpoints' / 'step_00000002'}")
    assert all(torch.isfinite(w).all() for w in model_weights(out, 2).values())


def test_a_nonfinite_gradient_norm_is_a_nonfinite_step(shards, tmp_path, run_here, monkeypatch):
    """A finite loss whose gradients overflow: caught by the clipped norm before the update."""
    real = pretrain.nonfinite.apply_update
    calls = []

    def overflowing(run, values):
        calls.append(1)
        if len(calls) == 2:
            next(p for p in run.task.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return real(run, values)

    monkeypatch.setattr(pretrain.loop, "apply_update", overflowing)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=skip", "train.max_steps=3", "train.checkpoint_every=1",
              "train.keep_last=3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: step 2: gradient norm is inf; update skipped" in res.stdout
    assert same(model_weights(out, 2), model_weights(out, 1))


def flattering_validation(monkeypatch):
    """Weights that are not finite evaluate as the best so far (as a kNN vote among NaN features may)."""
    real = pretrain.evaluation.validate

    def validate(*args, **kwargs):
        record = real(*args, **kwargs)
        return {**record, "val_loss": record["val_loss"] if math.isfinite(record["val_loss"]) else -1.0}

    monkeypatch.setattr(pretrain.evaluation, "validate", validate)


def all_finite(weights):
    return all(torch.isfinite(w).all() for w in weights.values())


def test_weights_an_update_left_not_finite_at_a_checkpoint_roll_back(shards, tmp_path, run_here, monkeypatch):
    """A finite loss and gradient norm whose update leaves a NaN weight at a checkpoint step: nothing is written,
    the run rolls back to the newest checkpoint and goes on; its evaluation of that step counts for nothing."""
    poison_weights_at(monkeypatch, 4)
    flattering_validation(monkeypatch)
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=rollback", "train.max_steps=6", "train.checkpoint_every=2",
              "train.keep_last=6", f"data.val={shards}", "train.keep_best=true")
    assert res.returncode == 0, res.stderr[-2000:]
    what = "weights are not finite (model.patch_embed.proj.weight)"
    ckpt = out / "checkpoints" / "step_00000002"
    assert (f"warning: step 4: {what}; rolled back to {ckpt} (rollback 1); the data of steps 3-4 is not trained "
            "on") in res.stdout
    lines = records(out)
    assert [r for r in lines if "event" in r] == [
        {"step": 4, "event": "nonfinite", "value": what, "action": "rollback", "to_step": 2}]
    assert [r["step"] for r in lines if "event" not in r] == list(range(1, 7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in (2, 4, 6)]
    assert all(all_finite(model_weights(out, s)) for s in (2, 4, 6))
    assert all_finite(read_weights(out / "final" / "model.safetensors"))
    assert json.loads((out / "checkpoints" / "step_00000006" / "trainer.json").read_text())[
        "position"]["rollbacks"] == 1
    evaluated = records(out, "val_metrics.jsonl")
    assert [r["step"] for r in evaluated] == [2, 4, 6] and all(r["val_loss"] > 0 for r in evaluated)
    step, value = best_so_far(evaluated, "val_loss", "min")
    assert (evaluated[-1]["best_step"], evaluated[-1]["best_val_loss"]) == (step, value)
    assert same(read_weights(out / "best" / "model.safetensors"), model_weights(out, step))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_weights_an_update_left_not_finite_stop_the_run_under_stop_and_skip(shards, tmp_path, run_here,
                                                                            monkeypatch, policy):
    """``skip`` cannot take back an update already applied."""
    poison_weights_at(monkeypatch, 4)
    out = tmp_path / "run"
    res = run(run_here, shards, out, *(("train.on_nonfinite=skip",) if policy == "skip" else ()),
              "train.max_steps=6", "train.checkpoint_every=2")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "pretrain: error: step 4: weights are not finite (model.patch_embed.proj.weight); not writing step_00000004; "
        "stopping (train.on_nonfinite=rollback would go on). Last good checkpoint: "
        f"{out / 'checkpoints' / 'step_00000002'}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


def test_weights_not_finite_at_a_stop_signal_roll_back_and_stop_at_the_checkpoint(shards, tmp_path, run_here,
                                                                                 monkeypatch):
    poison_weights_at(monkeypatch, 3)
    asked = []
    monkeypatch.setattr(pretrain.loop, "agreed_stop",
                        lambda accelerator, stop: asked.append(1) or (signal.SIGTERM if len(asked) == 3 else None))
    out = tmp_path / "run"
    res = run(run_here, shards, out, "train.on_nonfinite=rollback", "train.max_steps=6", "train.checkpoint_every=2")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
    ckpt = out / "checkpoints" / "step_00000002"
    assert (f"warning: step 3: weights are not finite (model.patch_embed.proj.weight); rolled back to {ckpt} "
            "(rollback 1); the data of step 3 is not trained on") in res.stdout
    assert res.stderr.strip().splitlines()[-1] == (
        "pretrain: stopped at step 2 on SIGTERM; rerun the same command to continue")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


def test_skip_is_refused_under_deepspeed_and_the_policy_keys_do_not_block_a_resume():
    cfg = load_config(TINY, need_data=False, overrides=["train.on_nonfinite=skip"])
    check_policy(cfg, deepspeed=False)
    with pytest.raises(ConfigError, match="train.on_nonfinite=skip: DeepSpeed updates the weights inside backward"):
        check_policy(cfg, deepspeed=True)
    check_policy(load_config(TINY, need_data=False, overrides=["train.on_nonfinite=rollback"]), deepspeed=True)
    from pretrain.resume_checks import config_changes

    before = load_config(TINY, need_data=False, overrides=[]).to_dict()
    after = load_config(TINY, need_data=False, overrides=["train.on_nonfinite=rollback", "train.max_nonfinite=9",
                                                          "data.stall_timeout=60"])
    assert config_changes(before, after.to_dict()) == []  # rerunning a stopped run with a policy resumes it


# SGD at lr 1e12 with no clipping or warmup on raw-pixel targets: step 1's loss is finite (the fresh weights), its
# update is huge but finite (checkpointed, checkpoint_every=1), and every later step's loss is NaN. Measured on 2
# CPU ranks: DDP and DeepSpeed ZeRO-2 alike (DeepSpeed also logs its own "OVERFLOW! Skipping step").
DIVERGING = ("optim.name=sgd", "optim.lr=1e12", "optim.clip_grad_norm=null", "schedule.warmup_steps=0",
             "objective.mpp_target=pixels", "train.max_steps=6", "train.checkpoint_every=1", "train.keep_last=6",
             "train.log_every=1", "data.workers=0")


def diverge(shards, out, env, launcher, *overrides):
    return launch(pretrain_cmd(f"data.train={shards}", f"train.output_dir={out}", *DIVERGING, *overrides,
                               launcher=launcher), env, timeout=900)


def warnings(res):
    return [line for line in res.stdout.splitlines() if line.startswith("warning: ")]


def assert_stopped(res, line):
    """Every rank stopped with exit status 2 on ``line`` (accelerate's launcher turns the ranks' 2 into its own 1;
    a rank still running when the first one ended may be ended by the launcher's SIGTERM first): no hang, no
    traceback, no other error."""
    assert res.returncode == 1, res.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", res.stderr), res.stderr[-3000:]
    errors = {x for x in res.stderr.splitlines() if x.startswith("pretrain: error:")}
    assert errors == {f"pretrain: error: {line}"} and "TrainingError" not in res.stderr, res.stderr[-3000:]


def assert_every_checkpoint_finite(out, steps):
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in steps]
    for s in steps:
        assert all(torch.isfinite(w).all() for w in model_weights(out, s).values())
    assert not (out / "final").exists()


def assert_rolled_back_twice_then_stopped(res, out):
    """DIVERGING with train.on_nonfinite=rollback train.max_nonfinite=2: step 2 is NaN three times."""
    ckpt = out / "checkpoints" / "step_00000001"
    assert warnings(res) == [f"warning: step 2: loss is nan; rolled back to {ckpt} (rollback {n}); the data of "
                             "step 2 is not trained on" for n in (1, 2)]  # the main process's, once per event
    assert_stopped(res, "step 2: loss is nan; rollback number 3 is more than train.max_nonfinite=2 allows; "
                        f"stopping. Last good checkpoint: {ckpt}")
    assert latest_checkpoint(out) == ckpt
    assert_every_checkpoint_finite(out, [1])
    lines = records(out)
    assert [r["step"] for r in lines if "event" not in r] == [1] and math.isfinite(lines[0]["loss"])
    assert [r for r in lines if "event" in r] == 2 * [
        {"step": 2, "event": "nonfinite", "value": "loss is nan", "action": "rollback", "to_step": 1}]


@pytest.mark.slow
def test_two_ddp_ranks_that_diverge_roll_back_together_until_the_limit(shards, tmp_path, env):
    out = tmp_path / "run"
    res = diverge(shards, out, env, "cpu_2proc.yaml", "train.on_nonfinite=rollback", "train.max_nonfinite=2")
    assert_rolled_back_twice_then_stopped(res, out)


@pytest.mark.slow
def test_two_ddp_ranks_that_diverge_skip_together_until_the_limit(shards, tmp_path, env):
    out = tmp_path / "run"
    res = diverge(shards, out, env, "cpu_2proc.yaml", "train.on_nonfinite=skip", "train.max_nonfinite=1")
    assert warnings(res) == ["warning: step 2: loss is nan; update skipped (1 within 1000 steps)"]
    assert_stopped(res, "step 3: loss is nan; 2 skipped steps within the last 1000 is more than "
                        f"train.max_nonfinite=1 allows; stopping. Last good checkpoint: {out / 'checkpoints'}"
                        f"/step_00000002")
    assert_every_checkpoint_finite(out, [1, 2])
    assert same(model_weights(out, 2), model_weights(out, 1))  # neither rank applied step 2's update
    lines = records(out)
    assert [r for r in lines if "event" in r] == [
        {"step": 2, "event": "nonfinite", "value": "loss is nan", "action": "skip"}]
    assert [(r["step"], r["nonfinite_steps"]) for r in lines if "event" not in r] == [(1, 0), (2, 1)]


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")
def test_deepspeed_ranks_that_diverge_roll_back_together_and_skip_is_refused(shards, tmp_path, env):
    """ZeRO-2's engine updates inside backward: a rollback reloads its state (weights and optimizer shards)."""
    pytest.importorskip("deepspeed")
    refused = tmp_path / "skip"
    res = diverge(shards, refused, env, "deepspeed_zero2.yaml", "train.on_nonfinite=skip")
    assert_stopped(res, "train.on_nonfinite=skip: DeepSpeed updates the weights inside backward, before the loss "
                        "can be checked; use train.on_nonfinite=rollback (or stop)")
    assert not (refused / "config.json").exists() and not (refused / "metrics.jsonl").exists()  # before any step
    out = tmp_path / "run"
    res = diverge(shards, out, env, "deepspeed_zero2.yaml", "train.on_nonfinite=rollback", "train.max_nonfinite=2")
    assert_rolled_back_twice_then_stopped(res, out)
