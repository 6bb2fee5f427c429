"""Faults and bad input: one writer per folder, resume checks, no code from checkpoints, one-line errors."""

import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from common.lock import LOCK, FolderBusy, FolderLock
from data_tools.shard import ShardOptions, shard
from data_tools.verify import verify
from pretrain.checkpoints import latest_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.resume_checks import weights_only_loads, write_manifest
from vit.checkpoint import CheckpointError
from vitpipe.cli import main as cli

from .corpus import write_folder
from .helpers import ROOT, TINY, deepspeed_args, free_port, launch, poison_weights_at, pretrain_cmd


def wait_for(condition, proc=None):
    while not condition():
        assert proc is None or proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else proc.returncode
        time.sleep(0.05)


def holder_pid(folder, name=LOCK):
    try:
        return json.loads((folder / name).read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


# ---- config validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("model.image_size=0", "model.image_size: must be N or [H, W] with sizes >= 1, got 0"),
    ("model.image_size=[32, -32]", "model.image_size: must be N or [H, W] with sizes >= 1"),
    ("model.image_size=[32, 32, 32]", "model.image_size: must be N or [H, W]"),
    ("data.crop_scale_min=2.0", "data.crop_scale_min: must be in (0, 1], got 2.0"),
    ("data.crop_scale_min=0", "data.crop_scale_min: must be in (0, 1]"),
    ("schedule.warmup_steps=-5", "schedule.warmup_steps: must be >= 0, got -5"),
    ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio: must be in [0, 1], got 1.5"),
    ("data.mean=[0.5]", "data.mean: needs one value per channel (3), got [0.5]"),
    ("data.std=[0.5, 0.5, 0.5, 0.5]", "data.std: needs one value per channel (3)"),
    ("data.std=[0.5, 0, 0.5]", "data.std: must be > 0"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer: must be >= 1, got 0"),
    ("optim.betas=[0.9]", "optim.betas: must be two values in [0, 1), got [0.9]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: must be two values in [0, 1)"),
    ("data.workers=-1", "data.workers: must be >= 0, got -1"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate: must be in [0, 1)"),
    ("optim.lr=-0.1", "optim.lr: must be >= 0"),
])
def test_impossible_config_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.train=x", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_output_dir_naming_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="train.output_dir: .* exists and is not a folder"):
        load_config(TINY, ["data.train=x", f"train.output_dir={tmp_path / 'file'}"])


def test_duplicate_yaml_keys_are_refused_naming_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  output_dir: runs/a\nmodel:\n  name: vit_ti4\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["data.train=x"])
    assert str(e.value) == f"{path}:5: not valid YAML: duplicate key 'train' (first at line 1)"
    path.write_text("model:\n  name: vit_ti4\n  depth: 2\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4: not valid YAML: duplicate key 'depth' \(first at line 3\)"):
        load_config(path, ["data.train=x"])
    path.write_text("base: &b {depth: 2}\nmodel:\n  <<: *b\n  depth: 3\n")  # a merge key may be overridden
    assert yaml_loads(path) == {"base": {"depth": 2}, "model": {"depth": 3}}


def yaml_loads(path):
    import yaml

    from pretrain.config import _StrictLoader

    return yaml.load(path.read_text(), Loader=_StrictLoader)


# ---- one line for user errors, a traceback for bugs ---------------------------------------------------------

def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import data_tools.shard

    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")  # bad input is a VitpipeError; this is not

    monkeypatch.setattr(data_tools.shard, "shard", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli(["shard", str(tmp_path), str(tmp_path / "out")])


def test_an_error_raised_in_a_dataloader_worker_is_still_one_line():
    from torch._utils import ExceptionWrapper

    from common.errors import user_message
    from data_tools.loader import LoaderError

    try:
        raise LoaderError("1000 samples in a row do not decode in a.tar: check them with vitpipe verify")
    except LoaderError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(LoaderError) as e:
        wrapped.reraise()
    assert "Traceback" in str(e.value)
    assert user_message(e.value) == "1000 samples in a row do not decode in a.tar: check them with vitpipe verify"


def test_a_user_error_in_a_loader_worker_reaches_the_cli_user_as_its_one_line(shards, tmp_path):
    """Through the real entry point in its own process: the stall a DataLoader worker raises is one line, not
    torch's worker traceback."""
    good = sorted(str(p) for p in shards.glob("*.tar"))[0]
    hung = "pipe:exec sleep 3600"
    res = subprocess.run(pretrain_cmd(f"data.train=[pipe:cat {good}, {hung}]", "data.num_samples=64",
                                      "data.workers=1", "data.stall_timeout=1", "train.max_steps=50",
                                      f"train.output_dir={tmp_path / 'run'}"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: {hung} (rank 0, worker 0): no sample for 1 s (data.stall_timeout); stopping. "
        "Check the storage or the command, then rerun to resume")


def test_disk_full_while_sharding_is_one_line_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    import data_tools.tars

    src, out = write_folder(tmp_path / "src", {"a": 12, "b": 12}), tmp_path / "out"
    real, calls = data_tools.tars.TarWriter._write, []

    def fills_up(self, data):
        calls.append(len(data))
        if len(calls) > 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    monkeypatch.setattr(data_tools.tars.TarWriter, "_write", fills_up)
    assert cli(["shard", str(src), str(out), "--samples-per-shard", "4"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # the rest is the progress bar
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(out) in lines[0], err
    assert not list(out.glob("*.tmp")) and not (out / LOCK).exists()
    monkeypatch.setattr(data_tools.tars.TarWriter, "_write", real)
    assert cli(["shard", str(src), str(out), "--samples-per-shard", "4"]) == 0
    assert verify(out) == ([], [])


@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs: room for the tiny model's first checkpoint to start, not to finish."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("making a small disk needs root and mount")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_while_training_is_one_line(shards, small_disk, run_here):
    res = run_here(pretrain_cmd(f"data.train={shards}", f"train.output_dir={small_disk / 'run'}", "train.max_steps=4",
                                "train.checkpoint_every=2"))
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "pretrain: error:" in err[-1] and "writing the checkpoint failed" in err[-1] and "MiB free" in err[-1]


# ---- one writer per folder ----------------------------------------------------------------------------------

HOLD_AND_FORK = """
import os, sys, time
from common.lock import FolderLock
FolderLock(sys.argv[1], "a test holder").acquire()
started, child_runs = os.pipe()
if os.fork() == 0:  # a worker forked while the lock is held (a DataLoader or pool worker) outlives the holder
    os.write(child_runs, b"1")  # past fork(), so past the at-fork hooks: killing the holder now is no race
    time.sleep(60)
    os._exit(0)
os.read(started, 1)
print("held", flush=True)
time.sleep(60)
"""


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(FolderBusy) as e:
        FolderLock(tmp_path, "vitpipe test").acquire()
    assert f"{tmp_path}: in use by a test holder (pid {holder.pid} on {socket.gethostname()}, started " \
        in str(e.value)
    os.kill(holder.pid, signal.SIGKILL)  # its forked child lives on, holding a copy of the descriptor
    holder.wait()
    with FolderLock(tmp_path, "vitpipe test") as lock:
        assert holder_pid(tmp_path) == os.getpid() and lock.fd is not None
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_file_does_not_block(tmp_path, shards):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"what": "vitpipe shard", "pid": dead.pid, "host": socket.gethostname(),
                                        "started": "2026-01-01T00:00:00+00:00"}))
    src = write_folder(tmp_path / "src", {"a": 3})
    assert cli(["shard", str(src), str(out)]) == 0
    assert verify(out) == ([], []) and not (out / LOCK).exists()


SLOW_SHARD = """
import sys, time
from pathlib import Path
import data_tools.shard
real = data_tools.shard._encode_one
def waits(inp):
    while not Path(sys.argv[3]).exists():
        time.sleep(0.02)
    return real(inp)
data_tools.shard._encode_one = waits
from vitpipe.cli import main
sys.exit(main(["shard", sys.argv[1], sys.argv[2], "--samples-per-shard", "8"]))
"""


def test_two_shard_runs_into_one_folder(tmp_path, capsys):
    src, out, go = write_folder(tmp_path / "src", {"a": 10, "b": 10}), tmp_path / "out", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", SLOW_SHARD, str(src), str(out), str(go)], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_for(lambda: holder_pid(out) == first.pid, first)
    assert cli(["shard", str(src), str(out), "--samples-per-shard", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by vitpipe shard (pid {first.pid} on" in err[0], err
    go.touch()
    assert first.wait() == 0, first.stderr.read()[-2000:]
    assert verify(out) == ([], [])
    assert json.loads((out / "index.json").read_text())["args"]["samples_per_shard"] == 8
    # the parts of a --part K/N run share a folder; the same part twice does not
    parts, second = tmp_path / "parts", ShardOptions(part=(1, 2))
    parts.mkdir()
    with FolderLock(parts, "another part 1/2", ".vitpipe-part-001.lock"):
        shard(str(src), parts, ShardOptions(part=(0, 2)), progress=False)
        with pytest.raises(FolderBusy, match="in use by another part 1/2"):
            shard(str(src), parts, second, progress=False)
    shard(str(src), parts, second, progress=False)
    assert verify(parts) == ([], []) and json.loads((parts / "index.json").read_text())["total_samples"] == 20


@pytest.mark.slow
def test_two_pretrain_runs_on_one_output_dir(shards, tmp_path, env, run_here):
    out = tmp_path / "run"
    args = [f"data.train={shards}", f"train.output_dir={out}", "data.workers=2"]
    first = subprocess.Popen(pretrain_cmd(*args, "train.max_steps=100000", "train.checkpoint_every=2"), env=env,
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: holder_pid(out) == first.pid and latest_checkpoint(out) is not None, first)
    second = run_here(pretrain_cmd(*args, "train.max_steps=2"))
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines() == [
        f"pretrain: error: {out}: in use by vitpipe pretrain (pid {first.pid} on {socket.gethostname()}, started "
        f"{json.loads((out / LOCK).read_text())['started']}); wait for it to finish or use another folder"]
    os.kill(first.pid, signal.SIGKILL)  # its DataLoader workers may outlive it for a moment
    first.wait()
    third = run_here(pretrain_cmd(*args, "train.max_steps=2"))  # resumes the killed run's checkpoint, past step 2
    assert third.returncode == 0 and "resumed from" in third.stdout, third.stderr[-2000:]
    assert not (out / LOCK).exists()


MACHINE = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
rdzv_backend: static
same_network: true
use_cpu: true
mixed_precision: "no"
"""


@pytest.mark.slow
def test_two_machines_of_one_launch_share_the_output_dir(shards, tmp_path, env):
    """Two `accelerate launch --machine_rank K` on one host (one process each): one launch, one folder."""
    config = tmp_path / "two_machines.yaml"
    config.write_text(MACHINE.format(port=free_port()))
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                               "--machine_rank", str(k), "-m", "pretrain", "--config", TINY, f"data.train={shards}",
                               f"train.output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2"],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-1500:] + results[1][1][-1500:]
    assert (out / "final" / "model.safetensors").is_file() and not (out / LOCK).exists()


# ---- resume checks ------------------------------------------------------------------------------------------

def test_resume_checks_the_recipe_and_the_files(shards, tmp_path, run_here):
    out = tmp_path / "run"
    args = [f"data.train={shards}", f"train.output_dir={out}", "train.checkpoint_every=2"]
    assert run_here(pretrain_cmd(*args, "train.max_steps=2")).returncode == 0
    ckpt = out / "checkpoints" / "step_00000002"

    changed = run_here(pretrain_cmd(*args, "train.max_steps=4", "optim.lr=0.01", "train.seed=1"))
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        f"pretrain: error: train.resume: {ckpt} was made with other values of optim.lr (0.001, now 0.01); "
        "train.seed (0, now 1); set train.resume_mismatch=allow to continue anyway, or train.resume=none with "
        "another train.output_dir to start over"]

    optimizer = ckpt / "state" / "optimizer.bin"
    good = optimizer.read_bytes()
    optimizer.write_bytes(b"garbage")
    damaged = run_here(pretrain_cmd(*args, "train.max_steps=4"))
    assert damaged.returncode == 2 and damaged.stderr.strip().splitlines() == [
        f"pretrain: error: {optimizer}: changed since the checkpoint was written (sha256 differs from "
        f"manifest.json); refusing to resume from {ckpt}"]

    optimizer.write_bytes(good)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.1, "acc')  # the killed run was writing this line
    allowed = run_here(pretrain_cmd(*args, "train.max_steps=4", "optim.lr=0.01", "train.resume_mismatch=allow"))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert f"note: resuming {ckpt} although these keys changed: optim.lr (0.001, now 0.01)" in allowed.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_a_checkpoint_without_manifest_resumes_only_on_request(shards, tmp_path, run_here):
    from pretrain.resume_checks import verify_manifest

    out = tmp_path / "run"
    args = [f"data.train={shards}", f"train.output_dir={out}", "train.checkpoint_every=2"]
    assert run_here(pretrain_cmd(*args, "train.max_steps=2")).returncode == 0
    ckpt = out / "checkpoints" / "step_00000002"
    (ckpt / "manifest.json").unlink()  # as a vitpipe before manifests wrote it
    refused = run_here(pretrain_cmd(*args, "train.max_steps=4"))
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"pretrain: error: {ckpt / 'manifest.json'}: missing, so the checkpoint cannot be verified (incomplete, or "
        "written by an older vitpipe); refusing to resume from it. If it is complete, train.resume_mismatch=allow "
        "resumes it and records its manifest"]
    allowed = run_here(pretrain_cmd(*args, "train.max_steps=4", "train.resume_mismatch=allow"))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert (f"note: {ckpt / 'manifest.json'}: missing (an older vitpipe wrote none); resuming {ckpt} unverified, "
            "as train.resume_mismatch=allow says, and recording its files in manifest.json now") in allowed.stdout
    assert "resumed from" in allowed.stdout and (out / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    verify_manifest(ckpt)  # recorded: later resumes from it are verified again


def test_interrupted_checkpoint_is_never_taken_as_complete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "trainer.json").write_text("{}")
    (root / "step_00000020.tmp").mkdir()  # killed mid-write
    (root / "step_00000020.tmp" / "trainer.json").write_text("{}")
    (root / "step_00000030").mkdir()  # no trainer.json: incomplete
    assert latest_checkpoint(tmp_path) == root / "step_00000010"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_only_loads_refuse_code_and_name_damaged_files(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"module": Payload(marker)}, tmp_path / "payload.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "fine.pt")
    with weights_only_loads():
        with pytest.raises(CheckpointError, match=r"payload.pt: refused to load: it names code.*GLOBAL posix.system"):
            torch.load(tmp_path / "payload.pt", weights_only=False)  # as DeepSpeed asks
        with pytest.raises(CheckpointError, match="garbage.pt: damaged or not a torch file"):
            torch.load(tmp_path / "garbage.pt", weights_only=False)
        assert torch.load(tmp_path / "fine.pt", weights_only=False)["step"] == 3
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the patch is gone after the block
        torch.load(tmp_path / "garbage.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")
def test_deepspeed_checkpoint_carrying_a_pickle_payload_is_refused(shards, tmp_path, env, deepspeed_run):
    """DeepSpeed's own loader unpickles anything: a ZeRO-2 checkpoint whose model states file runs code."""
    pytest.importorskip("deepspeed")
    out, marker = deepspeed_run(2, tmp_path / "zero2"), tmp_path / "code-ran"  # 3 steps, checkpointed at step 3
    zero2 = pretrain_cmd(*deepspeed_args(shards, out), launcher="deepspeed_zero2.yaml")
    ckpt = out / "checkpoints" / "step_00000003"
    states = ckpt / "state" / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, states)
    tampered = launch([*zero2, "train.max_steps=6"], env, timeout=900)
    assert tampered.returncode != 0 and f"pretrain: error: {states}: changed since the checkpoint was written" \
        in tampered.stderr, tampered.stderr[-3000:]
    write_manifest(ckpt)  # a forger who rewrites the manifest as well
    forged = launch([*zero2, "train.max_steps=6"], env, timeout=900)
    assert forged.returncode != 0 and f"pretrain: error: {states}: refused to load: it names code" \
        in forged.stderr, forged.stderr[-3000:]
    assert not marker.exists()


def test_manifest_lists_every_file(tmp_path):
    from pretrain.resume_checks import verify_manifest

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "a.bin").write_bytes(b"a")
    (tmp_path / "trainer.json").write_text("{}")
    write_manifest(tmp_path)
    verify_manifest(tmp_path)
    (tmp_path / "state" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"extra.pt: not in manifest.json \(added after"):
        verify_manifest(tmp_path)
    (tmp_path / "state" / "extra.pt").unlink()
    (tmp_path / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="trainer.json: listed in manifest.json but missing"):
        verify_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing, so the checkpoint cannot be verified"):
        verify_manifest(tmp_path)


# ---- preemption: a stop signal ends the run at a checkpoint ----------------------------------------------------

def logged_step(out, step):
    path = out / "metrics.jsonl"
    return path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                  if line.endswith("}"))


def stop_on_signal(cmd, out, env, sig=signal.SIGTERM, after_step=2, ready=None):
    """Launch ``cmd``, send ``sig`` once ``after_step`` is in metrics.jsonl (or ``ready()`` holds); its exit status
    and stderr."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(ready or (lambda: logged_step(out, after_step)), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def stopped_step(err, prog, sig="SIGTERM"):
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: stopped at step ")]
    assert len(lines) == 1, err[-3000:]  # one line per launch, not one per rank
    step = int(lines[0].split()[4])
    assert lines[0] == f"{prog}: stopped at step {step} on {sig}; rerun the same command to continue"
    return step


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def same_run(a, b):
    keep = ("step", "epoch", "loss", "lr", "grad_norm", "skipped_samples")
    rows = [[{k: r[k] for k in keep} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
            for out in (a, b)]
    wa, wb = final_weights(a), final_weights(b)
    return rows[0] == rows[1] and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigterm_stops_at_a_checkpoint_and_the_rerun_is_the_uninterrupted_run(shards, tmp_path, env, run_here):
    args = [f"data.train={shards}", "train.max_steps=12", "train.checkpoint_every=100", "train.log_every=3",
            "data.workers=2", "model.drop_path_rate=0.1"]
    whole = run_here(pretrain_cmd(*args, f"train.output_dir={tmp_path / 'whole'}"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "stopped"
    status, err = stop_on_signal(pretrain_cmd(*args, f"train.output_dir={out}"), out, env, after_step=3)
    assert status == 128 + signal.SIGTERM, err[-3000:]
    step = stopped_step(err, "pretrain")
    assert 3 <= step < 12 and latest_checkpoint(out).name == f"step_{step:08d}"
    assert not (out / LOCK).exists() and not (out / "final").exists()
    resumed = run_here(pretrain_cmd(*args, f"train.output_dir={out}"))
    assert resumed.returncode == 0 and f"resumed from {latest_checkpoint(out).parent}" in resumed.stdout, \
        resumed.stderr[-2000:]
    assert same_run(out, tmp_path / "whole")


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_stops_every_rank_at_one_step(shards, tmp_path, env):
    """accelerate launch forwards the signal to each rank; they agree on the step and write one checkpoint."""
    args = [f"data.train={shards}", "train.max_steps=10", "train.checkpoint_every=100", "train.log_every=2",
            "data.workers=1"]
    out = tmp_path / "stopped"
    status, err = stop_on_signal(pretrain_cmd(*args, f"train.output_dir={out}", launcher="cpu_2proc.yaml"), out, env)
    assert status != 0, err[-3000:]
    step = stopped_step(err, "pretrain")
    assert 2 <= step < 10 and latest_checkpoint(out).name == f"step_{step:08d}", err[-3000:]
    assert not (out / LOCK).exists()
    resumed = launch(pretrain_cmd(*args, f"train.output_dir={out}", launcher="cpu_2proc.yaml"), env)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    whole = launch(pretrain_cmd(*args, f"train.output_dir={tmp_path / 'whole'}", launcher="cpu_2proc.yaml"), env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert same_run(out, tmp_path / "whole")


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")
def test_sigterm_to_a_deepspeed_launch_checkpoints_every_rank_and_the_rerun_is_the_uninterrupted_run(
        shards, tmp_path, env, deepspeed_run):
    """ZeRO-2 on 2 processes: each rank writes its optimizer shard at the step they stopped at, and the rerun ends as
    the deepspeed_run fixture's uninterrupted run of the same command ended (metrics and weights)."""
    pytest.importorskip("deepspeed")
    from pretrain.resume_checks import verify_manifest

    whole = deepspeed_run(2, tmp_path / "whole")  # 3 steps
    out = tmp_path / "stopped"
    args = [*deepspeed_args(shards, out), "train.max_steps=3"]  # the fixture's run
    # no metrics line before the last step (log_every 5): the signal goes once the run is set up (config.json is
    # written after DeepSpeed made its engine, every rank past its stop handlers), a matmul timing and two steps
    # before the end
    status, err = stop_on_signal(pretrain_cmd(*args, launcher="deepspeed_zero2.yaml"), out, env,
                                 ready=lambda: (out / "config.json").is_file())
    assert status == 128 + signal.SIGTERM, err[-3000:]
    step = stopped_step(err, "pretrain")
    ckpt = latest_checkpoint(out)
    assert 1 <= step < 3 and ckpt == out / "checkpoints" / f"step_{step:08d}", err[-3000:]
    verify_manifest(ckpt)
    assert sorted(p.name for p in (ckpt / "state" / "pytorch_model").glob("*.pt")) == [
        "mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))]
    assert not (out / LOCK).exists() and not (out / "final").exists()
    resumed = launch(pretrain_cmd(*args, launcher="deepspeed_zero2.yaml"), env, timeout=900)
    assert resumed.returncode == 0 and f"resumed from {ckpt} at step {step}" in resumed.stdout, \
        resumed.stderr[-3000:]
    assert same_run(out, whole)


def test_a_second_stop_signal_ends_the_process_at_once():
    """The first signal only asks (the process goes on), the second ends it by the signal's default action."""
    code = ("import os, signal, time\n"
            "from pretrain.launch import StopSignals\n"
            "with StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.2)\n"
            "    assert stop.received == signal.SIGINT, stop.received\n"
            "    print('asked', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "print('not stopped')\n")
    res = launch([sys.executable, "-c", code], timeout=120)
    assert res.stdout == "asked\n" and res.returncode == -signal.SIGTERM, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "second SIGTERM: stopping at once, without a checkpoint"


# ---- non-finite states: never checkpointed, never called good -------------------------------------------------

def test_no_checkpoint_from_nonfinite_weights_and_the_named_one_is_finite(shards, tmp_path, run_here, monkeypatch):
    from safetensors.torch import load_file

    poison_weights_at(monkeypatch, 2)
    out = tmp_path / "run"
    res = run_here(pretrain_cmd(f"data.train={shards}", f"train.output_dir={out}", "train.checkpoint_every=1",
                                "train.max_steps=6", "data.workers=0"))
    assert res.returncode == 2, res.stderr[-2000:]
    written = sorted((out / "checkpoints").glob("step_*"))
    assert [p.name for p in written] == ["step_00000001"]
    assert res.stderr.strip().splitlines()[-1] == (
        "pretrain: error: step 2: weights are not finite (model.patch_embed.proj.weight); not writing step_00000002; "
        f"stopping (train.on_nonfinite=rollback would go on). Last good checkpoint: {written[0]}")
    weights = load_file(written[0] / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
