"""The training loop in real processes: single CPU, 2 CPU ranks via accelerate, DeepSpeed ZeRO-2/3."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from data_tools.shard import ShardOptions, shard
from vit import load_model
from vit.checkpoint import read_weights

from .corpus import write_patterns
from .helpers import ROOT, TINY_MAE, deepspeed_args, finetune_cmd, launch, pretrain_cmd, vitpipe_cmd


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """3 learnable classes (stripes, checkerboards) x 40 images of 16 px, 4 mixed shards."""
    root = tmp_path_factory.mktemp("patterns")
    write_patterns(root / "src", per_class=40, size=16)
    shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=30), progress=False)
    return root / "shards"


def metrics(out):
    keep = ("step", "epoch", "loss", "accuracy", "lr", "grad_norm", "skipped_samples")
    return [{k: r[k] for k in keep} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(shards, tmp_path, env, run_here):
    """The run to kill is a process of its own; the uninterrupted run and the resume run here."""
    args = [f"data.train={shards}", "train.max_steps=24", "train.checkpoint_every=8", "train.log_every=2",
            "data.workers=2", "model.drop_path_rate=0.1"]
    whole = run_here(pretrain_cmd(*args, f"train.output_dir={tmp_path / 'whole'}"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(*args, f"train.output_dir={out}"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / "step_00000008" / "trainer.json"
    while proc.poll() is None and not target.is_file():
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere after the first checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    resumed = run_here(pretrain_cmd(*args, f"train.output_dir={out}"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert metrics(out) == metrics(tmp_path / "whole")
    a, b = read_weights(out / "final" / "model.safetensors"), read_weights(tmp_path / "whole" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # keep_last


@pytest.mark.slow
def test_two_cpu_ranks_match_one_process(shards, tmp_path, env, run_here):
    """Same global batch (all 64 samples, no augmentation): one SGD step gives the same weights."""
    args = [f"data.train={shards}", "objective.name=supervised", "model.head=linear", "data.batch_size=64", "data.augment=false",
            "train.max_steps=1", "optim.name=sgd", "optim.lr=0.5", "optim.clip_grad_norm=null",
            "schedule.warmup_steps=0", "schedule.decay=constant", "data.workers=0", f"data.val={shards}"]
    one = run_here(pretrain_cmd(*args, f"train.output_dir={tmp_path / 'one'}"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(pretrain_cmd(*args, f"train.output_dir={tmp_path / 'two'}", launcher="cpu_2proc.yaml"), env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("final model:") == 1  # once per launch, not once per rank
    assert two.stdout.count("vitpipe pretrain:") == 1  # the start banner too
    assert "2 processes on cpu, 1 torch thread each (OMP_NUM_THREADS)" in two.stdout
    assert "64 samples; global batch 64 (32 per process)" in two.stdout
    a, _ = load_model(tmp_path / "one" / "final")
    b, _ = load_model(tmp_path / "two" / "final")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    assert a.head.weight.abs().max() > 0  # the zero-initialised head took a real step
    assert metrics(tmp_path / "one")[0]["loss"] == pytest.approx(metrics(tmp_path / "two")[0]["loss"], rel=1e-5)
    # validation after the step: every sample once across the two ranks, the same loss as one process
    val = [json.loads((tmp_path / run_ / "val_metrics.jsonl").read_text()) for run_ in ("one", "two")]
    assert val[0]["val_samples"] == val[1]["val_samples"] == 64
    assert val[0]["val_loss"] == pytest.approx(val[1]["val_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")  # with -n N --dist loadgroup: one worker makes the deepspeed_run launches
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_trains_checkpoints_and_resumes(shards, tmp_path, env, deepspeed_run, zero):
    pytest.importorskip("deepspeed")
    out = deepspeed_run(zero, tmp_path / f"zero{zero}")  # 3 steps, checkpointed at step 3
    second = launch(pretrain_cmd(*deepspeed_args(shards, out), "train.max_steps=6",
                                 launcher=f"deepspeed_zero{zero}.yaml"), env, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000003" in second.stdout
    # DeepSpeed told the CPU is meant: only accelerate's launcher process, before our code runs, still warns
    assert "DS_ACCELERATOR" in env or (second.stdout + second.stderr).count("unable to detect") <= 1
    assert second.stdout.count("final model:") == 1  # once per launch, not once per rank
    banner = next(line for line in second.stdout.splitlines() if line.startswith("vitpipe pretrain:"))
    assert f"(DeepSpeed ZeRO-{zero})" in second.stdout and re.search(r", 0\.\d\dM parameters", banner)  # unpartitioned
    steps = [r["step"] for r in metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    model, _ = load_model(out / "final")  # gathered full weights, not ZeRO shards
    assert model.cfg.embed_dim == 64 and torch.isfinite(model.pos_embed).all()


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "optim.lrr: unknown config key"),
    ("train.max_steps=ten", "train.max_steps: expected int"),
    ("model.image_size=30", "not divisible by the patch size 4"),
    ("data.batch_size=30", "global batch 30 is not divisible by 1 processes x 4 accumulation steps"),
    ("train.resume=/no/such/ckpt", "train.resume: /no/such/ckpt does not exist"),
])
def test_bad_input_fails_before_training(shards, tmp_path, run_here, override, message):
    out = tmp_path / "out"
    res = run_here(pretrain_cmd(f"data.train={shards}", f"train.output_dir={out}", "train.grad_accum=4", override))
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (out / "metrics.jsonl").exists()


def test_missing_and_empty_shards(tmp_path, run_here):
    res = run_here(pretrain_cmd(f"data.train={tmp_path / 'nothing'}"))
    assert res.returncode == 2 and "shard does not exist" in res.stderr
    empty = tmp_path / "empty"
    (empty / "src" / "a").mkdir(parents=True)
    (empty / "src" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    shard(str(empty / "src"), empty / "shards", progress=False)
    res = run_here(pretrain_cmd(f"data.train={empty / 'shards'}"))
    assert res.returncode == 2 and "no shards (every input was skipped?)" in res.stderr


def test_non_finite_loss_stops_with_the_last_good_checkpoint(shards, tmp_path, run_here):
    out = tmp_path / "nan"
    res = run_here(pretrain_cmd(f"data.train={shards}", f"train.output_dir={out}", "optim.name=sgd", "optim.lr=1e12",
                           "optim.clip_grad_norm=null", "schedule.warmup_steps=0", "train.checkpoint_every=1",
                                "objective.mpp_target=pixels", "data.workers=0"))
    assert res.returncode == 2 and "loss is" in res.stderr and "Last good checkpoint" in res.stderr, res.stderr[-1500:]
    assert not (out / "final").exists()


@pytest.mark.slow
def test_torch_compile_run_writes_a_loadable_model(shards, tmp_path, env):
    """In its own process: torch.compile's caches and compile workers stay out of the test process."""
    out = tmp_path / "compiled"
    res = launch(pretrain_cmd(f"data.train={shards}", f"train.output_dir={out}", "train.compile=true",
                              "train.max_steps=2", "train.checkpoint_every=2", "data.workers=0"), env)
    assert res.returncode == 0, res.stderr[-2000:]
    model, _ = load_model(out / "final")
    assert model.cfg.depth == 2


def test_mae_pretraining_with_knn_monitor_then_finetuning_beats_chance(patterns, tmp_path, run_here):
    pre = tmp_path / "mae"
    res = run_here(pretrain_cmd(f"data.train={patterns}", f"data.monitor={patterns}", "model.image_size=16",
                                "data.resampled=true", "train.max_steps=40", "train.checkpoint_every=20",
                                "objective.decoder_dim=32", "optim.lr=0.003", "data.workers=0",
                                f"train.output_dir={pre}", config=TINY_MAE))
    assert res.returncode == 0, res.stderr[-2000:]
    losses = [r["loss"] for r in map(json.loads, (pre / "metrics.jsonl").read_text().splitlines())]
    assert losses[-1] < 0.8 * losses[0] and all("accuracy" not in r for r in metrics_rows(pre))
    knn = [json.loads(line) for line in (pre / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in knn] == [20, 40] and all(r["knn_queries"] == 120 for r in knn)
    assert knn[-1]["knn_top1"] > 1 / 3 + 0.2  # leave-one-out kNN on frozen features, 3 classes
    model, info = load_model(pre / "final")  # the encoder alone: no decoder weights in the checkpoint
    assert info.provenance["objective"] == "mae" and not any("decoder" in k for k in model.state_dict())

    ft = tmp_path / "ft"
    res = run_here(finetune_cmd(f"init={pre / 'final'}", f"data.train={patterns}", "train.max_steps=40",
                                "optim.lr=0.003", "data.workers=0", f"train.output_dir={ft}", config="ssl_tiny.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_here(vitpipe_cmd("eval", str(ft / "final"), "--data", str(patterns)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((ft / "final" / "eval.json").read_text())["top1"] > 1 / 3 + 0.3


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
