"""No hang on a stalled object store: every request has a timeout and a bounded number of tries, so an endpoint
that stops answering (its server process stopped with SIGSTOP) is one line, and the staging folder goes."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from data_tools import shard as shard_module
from data_tools import store
from data_tools.loader import LoaderError, eval_loader, resolve_shards
from data_tools.shard import ShardError, ShardOptions, shard
from data_tools.store import StoreError, client_options, store_attempts, store_timeout
from data_tools.transforms import EvalTransform

from .corpus import write_folder
from .helpers import S3_ENV, free_port, launch, launch_env, vitpipe_cmd

TIMEOUT, ATTEMPTS = 2, 2  # small, so that the test is quick; the defaults are 60 s and 3


@pytest.fixture
def stoppable_s3(tmp_path):
    """A moto S3 server in a process of its own (the session's ``s3`` runs in this one, which SIGSTOP would stop),
    and the environment that reaches it; continued and ended whatever the test does."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(launch_env(), **{k: v.format(port=port) for k, v in S3_ENV.items()}, VITPIPE_STORE_TIMEOUT=str(TIMEOUT),
               VITPIPE_STORE_ATTEMPTS=str(ATTEMPTS), TMPDIR=str(tmp_path / "staging"))
    env.pop("AWS_PROFILE", None)
    (tmp_path / "staging").mkdir()
    try:
        for _ in range(300):  # the server imports moto first: up to a minute on a loaded machine
            if launch([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"],
                      env).returncode == 0:
                break
            time.sleep(0.2)
        yield server, env
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=60)


def test_store_settings_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("VITPIPE_STORE_TIMEOUT", raising=False)
    monkeypatch.delenv("VITPIPE_STORE_ATTEMPTS", raising=False)
    assert (store_timeout(), store_attempts()) == (60.0, 3)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    assert store_attempts() == 4
    monkeypatch.setenv("VITPIPE_STORE_ATTEMPTS", "2")
    monkeypatch.setenv("VITPIPE_STORE_TIMEOUT", "0.5")
    assert client_options("s3") == {"use_listings_cache": False, "config_kwargs": {
        "connect_timeout": 0.5, "read_timeout": 0.5, "retries": {"max_attempts": 2, "mode": "standard"}}}
    assert client_options("gs") == {}
    for name, value in (("VITPIPE_STORE_TIMEOUT", "-1"), ("VITPIPE_STORE_ATTEMPTS", "two")):
        monkeypatch.setenv(name, value)
        with pytest.raises(StoreError, match=f"{name}: expected a positive"):
            client_options("s3")
        monkeypatch.setenv(name, "1")


def test_a_stalled_endpoint_is_one_line_for_shard_and_verify(stoppable_s3, tmp_path):
    server, env = stoppable_s3
    src = write_folder(tmp_path / "src", {"a": 4, "b": 4}, size=(24, 24))
    make_bucket = "import s3fs; s3fs.S3FileSystem().mkdir('stall')"
    assert launch([sys.executable, "-c", make_bucket], env).returncode == 0
    res = launch(vitpipe_cmd("shard", str(src), "s3://stall/before", "--samples-per-shard", "4"), env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    server.send_signal(signal.SIGSTOP)
    for argv in (["shard", str(src), "s3://stall/during", "--samples-per-shard", "4"], ["verify", "s3://stall/before"]):
        res = launch(vitpipe_cmd(*argv), env, timeout=300)  # a hang fails here instead of stalling the suite
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
        assert "s3://stall/" in lines[0] and "timeout" in lines[0].lower(), lines[0]
        assert f"no answer in {ATTEMPTS} tries of {TIMEOUT} s; VITPIPE_STORE_TIMEOUT" in lines[0]
    assert os.listdir(tmp_path / "staging") == []


@pytest.fixture
def here(stoppable_s3, monkeypatch, tmp_path):
    """The stoppable server's environment in this process (a fresh s3fs client before and after)."""
    import s3fs

    server, env = stoppable_s3
    for key in ("AWS_PROFILE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith(("AWS_", "VITPIPE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("stall")
    yield server
    server.send_signal(signal.SIGCONT)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_stall_mid_upload_is_one_error_and_the_staging_folder_goes(here, tmp_path, monkeypatch):
    src = write_folder(tmp_path / "src", {"a": 6, "b": 6}, size=(24, 24))
    read = shard_module.read_bytes
    seen = []

    def stop_at_the_fifth_input(inp, corpus):  # the first shard (4 inputs) is uploading or up
        seen.append(inp)
        if len(seen) == 5:
            here.send_signal(signal.SIGSTOP)
        return read(inp, corpus)

    monkeypatch.setattr(shard_module, "read_bytes", stop_at_the_fifth_input)
    with pytest.raises(ShardError, match=rf"s3://stall/mid/shard-000000.tar: .*no answer in {ATTEMPTS} tries of {TIMEOUT} s"):
        shard(str(src), "s3://stall/mid", ShardOptions(samples_per_shard=4, shuffle=False), progress=False)
    assert len(seen) >= 5 and os.listdir(tmp_path / "staging") == []


def test_a_stall_mid_read_ends_the_stream_with_one_error(here, tmp_path, monkeypatch):
    src = write_folder(tmp_path / "src", {"a": 6, "b": 6}, size=(24, 24))
    shard(str(src), "s3://stall/read", ShardOptions(samples_per_shard=4), progress=False)
    shards = resolve_shards("s3://stall/read")
    opened = store.open_url

    def stop_once_open(url):  # the shard's size is known, its bytes are not: the stall hits the reads
        f = opened(url)
        here.send_signal(signal.SIGSTOP)
        return f

    monkeypatch.setattr(store, "open_url", stop_once_open)
    with pytest.raises(LoaderError, match=rf"s3://stall/read/shard-000000.tar: .*no answer in {ATTEMPTS} tries"):
        list(eval_loader(shards, EvalTransform(16), 4, workers=0))
    here.send_signal(signal.SIGCONT)
    monkeypatch.setattr(store, "open_url", opened)
    here.send_signal(signal.SIGSTOP)  # before the open: the open's request is the one that waits
    with pytest.raises(StoreError, match=rf"s3://stall/read/shard-000000.tar: .*no answer in {ATTEMPTS} tries"):
        list(eval_loader(shards, EvalTransform(16), 4, workers=0))


HUNG = "pipe:exec sleep 3600"  # a shard that never produces; exec: the killed process is the command itself


@pytest.mark.parametrize("workers", [0, 2])
def test_an_eval_stream_that_never_produces_stops_naming_the_shard(shards, workers):
    """Validation and the kNN monitor read through eval_loader: data.stall_timeout holds there too, in the
    loading process and in a worker."""
    from common.errors import user_message
    from data_tools.stall import StalledRead

    good = sorted(str(p) for p in shards.glob("*.tar"))[0]
    s = resolve_shards([f"pipe:cat {good}", HUNG], num_samples=20)
    with pytest.raises(StalledRead) as e:
        list(eval_loader(s, EvalTransform(16), 4, workers=workers, stall_timeout=1))
    message = user_message(e.value)
    assert message == (f"{HUNG} (rank 0, worker {1 if workers else 0}): no sample for 1 s (data.stall_timeout); "
                       "stopping. Check the storage or the command, then rerun to resume")


@pytest.mark.parametrize("key", ["data.val", "data.monitor"])
def test_a_stalled_validation_or_monitor_shard_stops_the_run_in_one_line(shards, tmp_path, run_here, monkeypatch,
                                                                         key):
    """A labelled shard set whose one shard is a ``pipe:`` command that never produces (in-process: the set is
    the real folder's with its shard swapped, as an index.json cannot name a command)."""
    import dataclasses

    import pretrain.evaluation

    from .helpers import pretrain_cmd

    monkeypatch.setattr(pretrain.evaluation, "resolve_shards", lambda source, *a, **k: (
        dataclasses.replace(resolve_shards(str(shards)), urls=[HUNG], counts=None, digests=None)))
    res = run_here(pretrain_cmd(f"data.train={shards}", f"{key}={shards}", "data.stall_timeout=1",
                                "train.max_steps=2", "train.checkpoint_every=2", f"train.output_dir={tmp_path}"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: {HUNG} (rank 0, worker 0): no sample for 1 s (data.stall_timeout); stopping. "
        "Check the storage or the command, then rerun to resume")
