"""Resuming at scale: the data stream goes on from each worker's saved state (no replay, bit-identical), another
number of processes or workers re-deals the rest of the epoch (each sample once), changed shards are refused, and
``data.record_keys`` says what every step trained on."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_tools.loader import resolve_shards, train_loader
from data_tools.positions import piece_size, redeal, shard_piece, shard_set_changes, shares, split
from data_tools.tars import read_tar
from data_tools.transforms import EvalTransform, TrainTransform
from pretrain.resume_checks import write_manifest
from vit.checkpoint import read_weights

from .helpers import ROOT, TINY, accelerate_launch, launch, pretrain_cmd
from .test_loader import states_before

# 64 samples in 4 shards of 16, 8 a step: 8 steps an epoch, so a checkpoint at step 3 is mid-epoch
RUN = ["data.batch_size=8", "data.shuffle_buffer=6", "train.checkpoint_every=3", "train.keep_last=5",
       "train.log_every=1", "data.record_keys=true"]
EPOCH = [*RUN, "train.max_steps=8"]


def all_keys(shards) -> list[str]:
    return sorted(f"{p.name}/{s['__key__']}" for p in Path(shards).glob("*.tar") for s in read_tar(p))


def trained(out) -> dict[int, list[str]]:
    """step -> the keys every rank trained on in it, from samples/rank*.jsonl (the last line for a step wins)."""
    steps: dict[int, list[str]] = {}
    for path in sorted((out / "samples").glob("rank*.jsonl")):
        last = {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}
        for step, r in last.items():
            assert r["epoch"] == (step - 1) // 8
            steps.setdefault(step, []).extend(r["keys"])
    return steps


def metrics(out) -> list[dict]:
    keep = ("step", "epoch", "loss", "accuracy", "lr", "grad_norm")
    return [{k: r[k] for k in keep} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def from_checkpoint(run, dest, step=3):
    """A fresh output folder holding ``run``'s checkpoint at ``step``, its metrics and its sample records (the
    resume cuts them back to ``step``)."""
    name = f"step_{step:08d}"
    shutil.copytree(run / "checkpoints" / name, dest / "checkpoints" / name)
    shutil.copytree(run / "samples", dest / "samples")
    shutil.copy(run / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


def two_procs(*overrides):
    return pretrain_cmd(*overrides, launcher="cpu_2proc.yaml")


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory, env):
    """Uninterrupted runs of one epoch (8 steps), checkpointed at steps 3 and 6: on 1 process and on 2, with 2
    loader workers each."""
    runs = {}
    for procs, cmd in ((1, pretrain_cmd), (2, two_procs)):
        out = tmp_path_factory.mktemp(f"whole{procs}") / "run"
        res = launch(cmd(f"data.train={shards}", f"train.output_dir={out}", "data.workers=2", *EPOCH), env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[procs] = out
    return runs


def same_run(a, b):
    assert metrics(a) == metrics(b)
    assert trained(a) == trained(b)
    x, y = read_weights(a / "final" / "model.safetensors"), read_weights(b / "final" / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_two_ranks_with_workers_resume_mid_epoch_bit_identically(shards, whole, tmp_path, env):
    out = from_checkpoint(whole[2], tmp_path / "run")
    res = launch(two_procs(f"data.train={shards}", f"train.output_dir={out}", "data.workers=2", *EPOCH), env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "replay" not in res.stdout and "layout" not in res.stdout
    same_run(out, whole[2])


@pytest.mark.slow
def test_resampled_from_s3_without_workers_resumes_mid_epoch_bit_identically(s3, shards, tmp_path, run_here):
    s3.mkdir("resume")
    s3.put(str(shards) + "/", "resume/shards", recursive=True)
    args = ["data.train=s3://resume/shards", "data.workers=0", "data.resampled=true", *EPOCH]
    assert run_here(pretrain_cmd(*args, f"train.output_dir={tmp_path / 'whole'}")).returncode == 0
    out = from_checkpoint(tmp_path / "whole", tmp_path / "run")
    res = run_here(pretrain_cmd(*args, f"train.output_dir={out}"))
    assert res.returncode == 0 and "resumed from" in res.stdout and "note" not in res.stdout, res.stderr[-3000:]
    same_run(out, tmp_path / "whole")


def each_once(steps: dict[int, list[str]], shards) -> None:
    epoch = Counter(k for step in range(1, 9) for k in steps[step])
    assert sorted(epoch) == all_keys(shards) and set(epoch.values()) == {1}


@pytest.mark.slow
def test_elastic_resume_trains_each_sample_of_the_epoch_once(shards, whole, tmp_path, env, run_here):
    each_once(trained(whole[2]), shards)  # the uninterrupted runs do
    each_once(trained(whole[1]), shards)
    shrunk = from_checkpoint(whole[2], tmp_path / "2to1")
    res = run_here(pretrain_cmd(f"data.train={shards}", f"train.output_dir={shrunk}", "data.workers=2", *EPOCH))
    assert res.returncode == 0, res.stderr[-3000:]
    notes = [line for line in res.stdout.splitlines() if "bit-comparable" in line]
    assert notes == [f"note: {shrunk / 'checkpoints' / 'step_00000003'} was written by 2 process(es) x 2 loader "
                     "worker(s) and resumes on 1 x 2: the run is no longer bit-comparable to an uninterrupted one; "
                     "the 40 samples of epoch 0 not yet trained on are re-dealt over the new layout, each once"]
    each_once(trained(shrunk), shards)
    grown = from_checkpoint(whole[1], tmp_path / "1to2")
    res = launch(two_procs(f"data.train={shards}", f"train.output_dir={grown}", "data.workers=0", *EPOCH), env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("no longer bit-comparable") == 1
    each_once(trained(grown), shards)


@pytest.mark.parametrize("resampled,workers", [(False, 0), (False, 2), (True, 0)])
def test_the_stream_resumes_from_s3_by_ranged_reads_bit_identically(s3, shards, resampled, workers):
    if not s3.exists("ranged"):
        s3.mkdir("ranged")
        s3.put(str(shards) + "/", "ranged/shards", recursive=True)
    s = resolve_shards("s3://ranged/shards")

    def run(**kw):
        return list(train_loader(s, TrainTransform(16), 4, world_size=2, rank=0, workers=workers, seed=5,
                                 resampled=resampled, shuffle_buffer=6, **kw))

    whole = run()
    resumed = run(skip_batches=5, resume=json.loads(json.dumps(states_before(whole, 5))))
    for x, y in zip(whole[5:], resumed, strict=True):
        assert torch.equal(x["images"], y["images"]) and x["keys"] == y["keys"]


@pytest.mark.parametrize("old,new", [((2, 2), (1, 0)), ((1, 0), (2, 2)), ((2, 1), (4, 1))])
def test_a_re_dealt_epoch_gives_each_sample_not_yet_trained_on_once(shards, old, new):
    """The loop's bookkeeping in-process: epoch 0 on ``old`` (ranks, workers) up to batch 3, the rest on ``new``."""
    s = resolve_shards(shards)
    (world, workers), done, global_batch = old, 3, 8

    def loaders(world, workers, plan=None, **kw):
        return [list(train_loader(s, EvalTransform(16), global_batch // world, rank=r, world_size=world,
                                  workers=workers, seed=2, shuffle_buffer=5, resume=plan and plan[r], **kw))
                for r in range(world)]

    before = loaders(world, workers)
    seen = [k for batches in before for b in batches[:done] for k in b["keys"]]
    saved = {"epoch": 0, "batch": done, "processes": world, "workers": max(1, workers),
             "ranks": [states_before(batches, done) for batches in before]}
    world, workers = new
    plan, left, wanted = redeal(json.loads(json.dumps(saved)), [16] * 4, 2, world, max(1, workers), 8,
                                global_batch // world)
    assert left == wanted == 64 - len(seen)
    after = [b for batches in loaders(world, workers, plan, skip_batches=done) for b in batches]
    assert len(after) == (8 - done) * world
    rest = [k for b in after for k in b["keys"]]
    assert sorted(seen + rest) == all_keys(shards)


def test_a_re_dealt_epoch_re_deals_again(shards):
    """2 ranks until batch 2, then 1 rank x 2 workers until batch 5, then 4 ranks: each sample once."""
    s = resolve_shards(shards)

    def loaders(world, workers, plan=None, done=0):
        return [list(train_loader(s, EvalTransform(16), 8 // world, rank=r, world_size=world, workers=workers,
                                  seed=2, shuffle_buffer=5, skip_batches=done, resume=plan and plan[r]))
                for r in range(world)]

    def saved(runs, done, upto, workers):
        return json.loads(json.dumps({"epoch": 0, "batch": done, "processes": len(runs), "workers": workers,
                                      "ranks": [states_before(batches, upto) for batches in runs]}))

    first = loaders(2, 0)
    plan, _, _ = redeal(saved(first, 2, 2, 1), [16] * 4, 2, 1, 2, 8, 8)
    second = loaders(1, 2, plan, done=2)
    plan, left, wanted = redeal(saved(second, 5, 3, 2), [16] * 4, 2, 4, 1, 8, 2)
    assert left == wanted == 24
    third = loaders(4, 0, plan, done=5)
    keys = [k for runs, upto in ((first, 2), (second, 3), (third, 3)) for batches in runs for b in batches[:upto]
            for k in b["keys"]]
    assert sorted(keys) == all_keys(shards) and sum(map(len, third)) == 12


def test_changed_shards_are_refused_unless_allowed_and_old_checkpoints_replay(shards, tmp_path, run_here):
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    out = tmp_path / "run"
    args = [f"data.train={data}", f"train.output_dir={out}", "data.workers=0", *RUN]
    assert run_here(pretrain_cmd(*args, "train.max_steps=3")).returncode == 0
    ckpt = out / "checkpoints" / "step_00000003"
    index = json.loads((data / "index.json").read_text())
    dropped = index["shards"].pop()
    index["total_samples"] -= dropped["count"]
    (data / "index.json").write_text(json.dumps(index))
    refused = run_here(pretrain_cmd(*args, "train.max_steps=4"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"pretrain: error: train.resume: {ckpt / 'loader.json'} does not fit the training shards (4 shards then, "
        f"3 now; missing {dropped['name']}); set train.resume_mismatch=allow to train the rest of epoch 0 on these "
        "shards"]
    allowed = run_here(pretrain_cmd(*args, "train.max_steps=4", "train.resume_mismatch=allow"))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert f"warning: the training shards changed since {ckpt} (4 shards then, 3 now" in allowed.stdout
    (data / "index.json").write_text(json.dumps({**index, "shards": index["shards"] + [dropped],
                                                 "total_samples": 64}))
    (ckpt / "loader.json").unlink()  # as a checkpoint written before loader states were saved
    write_manifest(ckpt)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    old = run_here(pretrain_cmd(*args, "train.max_steps=4"))
    assert old.returncode == 0, old.stderr[-2000:]
    assert f"note: {ckpt} holds no loader state (written by an older vitpipe): the data stream replays epoch 0's " \
        "first 3 batches" in old.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")
def test_deepspeed_checkpoint_on_another_number_of_processes_is_refused_with_how_to_convert(
        shards, tmp_path, env, deepspeed_run):
    pytest.importorskip("deepspeed")
    out = deepspeed_run(2, tmp_path / "zero2")  # 2 processes, checkpointed at step 3
    cmd = [*accelerate_launch(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
           "-m", "pretrain", "--config", TINY, f"data.train={shards}", f"train.output_dir={out}",
           "train.checkpoint_every=3", "data.workers=0", "train.max_steps=6"]
    res = launch(cmd, env, timeout=900)
    assert res.returncode != 0, res.stderr[-3000:]  # accelerate's launcher turns our 2 into 1
    line = [x for x in res.stderr.splitlines() if "pretrain: error:" in x]
    assert len(line) == 1 and "2 process(es)" in line[0] and "ds_to_universal" in line[0], res.stderr[-3000:]


def test_shares_cut_shards_between_workers_and_shrink_in_proportion_when_samples_run_short():
    counts = [10, 10]
    refs = {"refs": [[0, 0, 1], [1, 5, 9]]}
    parts = split([refs, shard_piece(0), shard_piece(1)], [5, 9, 8], counts)
    assert parts == [[refs, {**shard_piece(0), "take": 3}],
                     [{**shard_piece(0), "skip": 3}, {**shard_piece(1), "take": 2}],
                     [{**shard_piece(1), "skip": 2}]]
    assert [sum(piece_size(p, counts) for p in part) for part in parts] == [5, 9, 8]
    assert shares(22, [8, 8]) == [8, 8]  # the 6 left over wait for the next epoch
    assert shares(10, [4, 4, 4]) == [4, 3, 3]


def test_a_changed_shard_set_is_named():
    old = {"names": ["a.tar", "b.tar", "c.tar"], "counts": [2, 2, 2], "digests": ["x", "y", "z"]}
    assert shard_set_changes(old, old) is None
    assert shard_set_changes(old, {**old, "names": ["a.tar", "c.tar", "d.tar"]}) == \
        "3 shards then, 3 now; missing b.tar; new d.tar"
    assert shard_set_changes(old, {**old, "names": ["b.tar", "a.tar", "c.tar"]}) == \
        "3 shards then, 3 now; in another order"
    assert shard_set_changes(old, {**old, "digests": ["x", "q", "z"]}) == \
        "b.tar: contents (sha256 in index.json) changed"
