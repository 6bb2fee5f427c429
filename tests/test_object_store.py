"""Shards on an object store, through fsspec, against a real S3-compatible server on localhost (conftest's ``s3``)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from data_tools.loader import eval_loader, resolve_shards, train_loader
from data_tools.shard import ShardError, ShardOptions, shard
from data_tools.sources import read_source
from data_tools.store import filesystem
from data_tools.transforms import EvalTransform, TrainTransform
from data_tools.verify import inspect, verify
from vitpipe.cli import main

from .corpus import bad_files, write_files, write_folder
from .helpers import ROOT, S3_ENV


def bucket(s3, name: str) -> str:
    if not s3.exists(name):
        s3.mkdir(name)
    return name


def objects(s3, prefix: str) -> dict[str, bytes]:
    s3.invalidate_cache()
    return {p[len(prefix) + 1:]: s3.cat_file(p) for p in s3.find(prefix)}


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_shard_to_s3_is_the_local_result_and_reads_back_streaming(s3, tmp_path):
    src = write_folder(tmp_path / "src", {"a": 12, "b": 9})
    opts = ShardOptions(samples_per_shard=5)
    shard(str(src), tmp_path / "local", opts, progress=False)
    url = f"s3://{bucket(s3, 'roundtrip')}/sets/train"
    index = shard(str(src), url, opts, progress=False)
    assert objects(s3, "roundtrip/sets/train") == files(tmp_path / "local")  # byte for byte; no lock, no tmp
    assert index["complete"] and index["total_samples"] == 21

    assert verify(url) == ([], [])
    assert "21 samples in 5 shards" in inspect(url)[0]
    shards = resolve_shards(url)
    assert shards.num_samples == 21 and shards.classes == ["a", "b"]
    assert shards.urls[0].startswith(url + "/shard-")
    labels = [int(x) for batch in eval_loader(shards, EvalTransform(16), 4, workers=2) for x in batch["labels"]]
    assert sorted(labels) == [0] * 12 + [1] * 9

    s3.pipe_file("roundtrip/sets/train/shard-000001.tar", b"damaged")
    s3.pipe_file("roundtrip/sets/train/stray.tar", b"")
    problems, notes = verify(url)
    assert problems == [f"shard-000001.tar: size 7 != {index['shards'][1]['bytes']} in index; sha256 differs from index; "
                        "unreadable tar after 0 samples (truncated: cut inside a tar header)"]
    assert notes == ["stray.tar: a tar not listed in index.json"]


def _shard_cmd(src, url):
    return [sys.executable, "-m", "vitpipe", "shard", str(src), url, "--samples-per-shard", "10",
            "--resize-shorter", "40"]


def _listed(s3, key: str) -> int:
    s3.invalidate_cache()
    try:
        return len(json.loads(s3.cat_file(key))["shards"])
    except FileNotFoundError:
        return 0


def _modified(name: str, key: str):
    """When the server stored an object (the server's own record, finer than the HTTP header's seconds)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[name].keys[key].last_modified


def test_a_killed_upload_resumes_from_the_bucket_byte_identical(s3, tmp_path, env):
    env = {**env, **{k: os.environ[k] for k in S3_ENV}}  # the server's address, set after the session's env
    src = write_folder(tmp_path / "src", {"a": 60, "b": 60}, size=(120, 200))
    write_files(src / "b", bad_files())
    assert subprocess.run(_shard_cmd(src, tmp_path / "whole"), env=env, cwd=ROOT).returncode == 0
    url = f"s3://{bucket(s3, 'killed')}/train"
    proc = subprocess.Popen(_shard_cmd(src, url), env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if _listed(s3, "killed/train/index.json") >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    listed = _listed(s3, "killed/train/index.json")
    # what a store without atomic uploads could leave: the next shard, half there, not in the index
    s3.pipe_file(f"killed/train/shard-{listed:06d}.tar", b"half a shard")
    first = _modified("killed", "train/shard-000000.tar")
    assert subprocess.run(_shard_cmd(src, url), env=env, cwd=ROOT).returncode == 0
    assert _modified("killed", "train/shard-000000.tar") == first  # a complete shard is not uploaded again
    assert objects(s3, "killed/train") == files(tmp_path / "whole")


def test_an_upload_failing_mid_run_is_one_line_and_a_rerun_finishes(s3, tmp_path, monkeypatch):
    """The server is real; the failure is injected (a real server refusing the third upload is out of reach)."""
    src = write_folder(tmp_path / "src", {"a": 10, "b": 10})
    opts = ShardOptions(samples_per_shard=4)
    shard(str(src), tmp_path / "local", opts, progress=False)
    url = f"s3://{bucket(s3, 'failing')}/set"
    fs = filesystem(url)[0]  # the (cached) client the writer will use
    real, uploads = fs.put_file, []

    def refuse_the_third(lpath, rpath, **kw):
        uploads.append(rpath)
        if len(uploads) == 3:
            raise PermissionError(errno.EACCES, "Access Denied")
        return real(lpath, rpath, **kw)

    monkeypatch.setattr(fs, "put_file", refuse_the_third)
    with pytest.raises(ShardError, match=r"failing/set: stopped \(.*shard-000002.tar: Access Denied\); the complete "
                                         "shards and the index are kept: rerun"):
        shard(str(src), url, opts, progress=False)
    s3.invalidate_cache()
    index = json.loads(s3.cat_file("failing/set/index.json"))
    assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar"] and not index["complete"]
    monkeypatch.setattr(fs, "put_file", real)
    shard(str(src), url, opts, progress=False)
    assert objects(s3, "failing/set") == files(tmp_path / "local")


def test_sources_on_s3_class_folders_and_manifests(s3, tmp_path):
    src = write_folder(tmp_path / "src", {"cat": 4, "dog": 3})
    write_files(src, {"stray.jpg": (src / "cat" / "00000.jpg").read_bytes(), ".hidden": b"x"})
    write_files(src / "dog" / ".thumbs", {"t.jpg": b"x"})
    write_files(src / "dog", {"broken.jpg": bad_files()["truncated.jpg"]})
    name = bucket(s3, "sources")
    s3.put(str(src) + "/", f"{name}/photos", recursive=True)
    local, remote = read_source(str(src)), read_source(f"s3://{name}/photos")
    assert remote.classes == local.classes == ["cat", "dog"]
    assert [(i.source, i.label, i.skip) for i in remote.inputs] == [(i.source, i.label, i.skip) for i in local.inputs]

    opts = ShardOptions(samples_per_shard=3)
    a = shard(str(src), tmp_path / "from_local", opts, progress=False)
    b = shard(f"s3://{name}/photos", tmp_path / "from_s3", opts, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["skipped"] == b["skipped"] and len(b["skipped"]) == 4

    def listing(prefix):
        rows = ("cat/00000.jpg", "dog/00001.jpg", "dog/gone.jpg")
        return "path,label\n" + "".join(f"{prefix}{p},{p.split('/')[0]}\n" for p in rows)

    s3.pipe_file(f"{name}/photos/list.csv", listing("").encode())  # paths relative to the manifest's prefix
    (tmp_path / "list.csv").write_text(listing(f"s3://{name}/photos/"))  # a local manifest of s3:// URLs
    for manifest in (f"s3://{name}/photos/list.csv", str(tmp_path / "list.csv")):
        index = shard(manifest, tmp_path / "m", opts, overwrite=True, progress=False)
        assert index["total_samples"] == 2 and index["classes"] == ["cat", "dog"]
        [gone] = index["skipped"]
        assert gone["source"].endswith("dog/gone.jpg") and gone["reason"].startswith("unreadable")


@pytest.mark.parametrize("argv,message", [
    (["shard", "SRC", "s3://no-such-bucket/x"], "s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"),
    (["shard", "s3://no-such-bucket/x", "OUT"], "s3://no-such-bucket/x: The specified bucket does not exist"),
    (["verify", "s3://errors/none"], "s3://errors/none/index.json: missing"),
    (["pretrain", "--config", "TINY", "data.train=s3://errors/none"], "s3://errors/none: no index.json"),
])
def test_bad_urls_are_one_line_and_write_nothing(s3, tmp_path, capsys, monkeypatch, argv, message):
    bucket(s3, "errors")
    monkeypatch.chdir(tmp_path)
    src = write_folder(tmp_path / "src", {"a": 2})
    swap = {"SRC": str(src), "OUT": str(tmp_path / "out"), "TINY": str(ROOT / "configs/pretrain/tiny.yaml")}
    assert main([swap.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no local folder named "foo:" or "s3:"
    assert objects(s3, "errors") == {}


@pytest.mark.parametrize("env,message", [
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "NoCredentialsError: Unable to locate credentials"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}, "Could not connect to the endpoint URL"),
])
def test_no_credentials_or_no_endpoint_is_one_line(s3, tmp_path, capsys, monkeypatch, env, message):
    import s3fs

    for key, value in env.items():
        monkeypatch.delenv(key) if value is None else monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # the cached client holds the session's credentials and endpoint
    try:
        src = write_folder(tmp_path / "src", {"a": 2})
        for argv in (["shard", str(src), "s3://creds/out"], ["verify", "s3://creds/out"]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err, err
            assert "vitpipe-test-secret" not in err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_pretrain_streams_from_s3_under_accelerate_launch(s3, shards, tmp_path, env):
    name = bucket(s3, "train")
    s3.put(str(shards) + "/", f"{name}/shards", recursive=True)
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "cpu_1proc.yaml"), "-m", "pretrain",
              "--config", str(ROOT / "configs" / "pretrain" / "tiny.yaml"), f"data.train=s3://{name}/shards",
              f"train.output_dir={out}", "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2",
              "data.workers=1", "data.batch_size=8"]
    done = subprocess.run(launch, env={**env, **{k: os.environ[k] for k in S3_ENV}}, capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["skipped_samples"] == 0
    assert (out / "final" / "model.safetensors").is_file()  # checkpoints stay local
    assert "vitpipe-test-secret" not in done.stdout + done.stderr + (out / "final" / "config.json").read_text()


def test_the_s3_stream_is_the_local_stream(s3, shards):
    name = bucket(s3, "stream")
    s3.put(str(shards) + "/", f"{name}/shards", recursive=True)
    local, remote = resolve_shards(shards), resolve_shards(f"s3://{name}/shards")
    assert (remote.num_samples, remote.classes) == (local.num_samples, local.classes)
    for a, b in zip(train_loader(local, TrainTransform(16), 8, workers=2, seed=3),
                    train_loader(remote, TrainTransform(16), 8, workers=2, seed=3), strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
