"""``vitpipe shard --engine ray`` on a real local Ray instance (started once for this module, shut down after)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from common.lock import FolderLock
from data_tools.engines import EngineError, run_engine
from data_tools.images import EncodeOptions
from data_tools.shard import ShardError, ShardOptions, shard
from data_tools.tars import read_tar
from data_tools.verify import verify
from vitpipe.cli import main

from .corpus import bad_files, write_files, write_folder
from .helpers import free_port

PARTS = 3
OPTS = ShardOptions(samples_per_shard=5, encode=EncodeOptions(resize_shorter=40))
CLI_ARGS = ["--samples-per-shard", "5", "--resize-shorter", "40"]


@pytest.fixture(scope="module")
def ray_address(s3):
    """A new local Ray instance of 2 CPUs (never a cluster already running on the machine); the CLI runs of
    the tests join it as drivers of their own. Started after the S3 server, so that its workers find the
    server as any client does, in the environment (``AWS_ENDPOINT_URL``, the test credentials)."""
    import ray

    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """125 inputs (5 of them bad) and what the 3 parts of ``--part K/3`` write for them, run locally."""
    root = tmp_path_factory.mktemp("ray")
    src = write_folder(root / "src", {"a": 60, "b": 60}, size=(120, 200))
    write_files(src / "b", bad_files())
    for k in range(PARTS):
        shard(str(src), root / "reference", replace(OPTS, part=(k, PARTS)), progress=False)
    return src, root / "reference"


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shard_set(files_by_name):
    """The shard set among a folder's files: its tars and index.json (not the part records of a part run)."""
    return {name: data for name, data in files_by_name.items() if name.endswith(".tar") or name == "index.json"}


def shard_names(folder):
    return [s["name"] for s in json.loads((folder / "index.json").read_text())["shards"]]


def complete_shards(out):
    """{shard path: mtime_ns} of every shard the part indices record as complete."""
    names = [s["name"] for p in out.glob("index.part-*.json") for s in json.loads(p.read_text())["shards"]]
    return {out / n: (out / n).stat().st_mtime_ns for n in names}


def first_input(folder, k):
    """The position and source of part k's first input, as the shards and the record of ``folder`` give them."""
    index = json.loads((folder / f"index.part-{k:03d}-of-{PARTS:03d}.json").read_text())
    first = index["ranges"][0] * OPTS.samples_per_shard
    skipped = {s["input"]: s["source"] for s in index["skipped"]}
    return first, skipped.get(first) or json.loads(next(iter(read_tar(folder / index["shards"][0]["name"])))["json"])["source"]


def cli(src, out, address, *extra):
    return subprocess.Popen([sys.executable, "-m", "vitpipe", "shard", str(src), str(out), "--engine", "ray",
                             "--ray-address", address, "--parts", str(PARTS), *CLI_ARGS, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc, what):
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.01)


def test_ray_writes_what_one_run_and_the_local_parts_write(ray_address, corpus, tmp_path):
    src, reference = corpus
    index = run_engine("ray", str(src), tmp_path / "out", OPTS, workers=2, parts=PARTS, progress=False)
    assert index["total_samples"] == 120 and len(index["skipped"]) == 5 and "part" not in index["args"]
    assert files(tmp_path / "out") == files(reference)  # every tar, part record and index.json, byte for byte
    one = shard(str(src), tmp_path / "one", OPTS, progress=False)
    assert shard_set(files(tmp_path / "out")) == files(tmp_path / "one") and one == index  # whatever the engine
    assert verify(tmp_path / "out", decode=False) == ([], [])
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert run_engine("ray", str(src), tmp_path / "out", OPTS, parts=2, progress=False) == index  # the set is there
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps
    (tmp_path / "out" / "index.json").unlink()  # as if the run had been killed before its merge
    with pytest.raises(ShardError, match=r"holds shards of another run: index.part-000-of-003.json \(another --parts"):
        run_engine("ray", str(src), tmp_path / "out", OPTS, parts=2, progress=False)
    with pytest.raises(ShardError, match=r"index.part-000-of-003.json \(different samples_per_shard\);"):
        run_engine("ray", str(src), tmp_path / "out", replace(OPTS, samples_per_shard=6), parts=PARTS, progress=False)
    run_engine("ray", str(src), tmp_path / "out", OPTS, parts=2, overwrite=True, progress=False)
    assert shard_set(files(tmp_path / "out")) == files(tmp_path / "one")  # 2 parts: the same set again
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == [
        "index.json", "index.part-000-of-002.json", "index.part-001-of-002.json"]


def test_ray_writes_to_an_object_store(ray_address, corpus, s3, tmp_path):
    src, reference = corpus
    s3.mkdir("ray-out")
    index = run_engine("ray", str(src), "s3://ray-out/set", OPTS, parts=PARTS, progress=False)
    s3.invalidate_cache()
    stored = {p.removeprefix("ray-out/set/"): s3.cat_file(p) for p in s3.find("ray-out/set")}
    assert stored == files(reference)  # byte for byte what the local parts write
    assert index["total_samples"] == 120 and verify("s3://ray-out/set", decode=False) == ([], [])


def test_killed_driver_rerun_keeps_the_complete_shards(ray_address, corpus, tmp_path):
    src, reference = corpus
    out = tmp_path / "out"
    proc = cli(src, out, ray_address)
    wait_until(lambda: len(complete_shards(out)) >= 3, proc, "3 shards were complete")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = complete_shards(out)
    assert not (out / "index.json").exists() and len(kept) < len(shard_names(reference))  # killed midway
    rerun = cli(src, out, ray_address)
    assert rerun.wait() == 0, rerun.stderr.read()[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not rewritten
    assert files(out) == files(reference)  # nothing left of the killed run (.tmp, locks), nothing missing


def test_a_killed_worker_is_retried_and_its_part_resumes(ray_address, corpus, tmp_path):
    src, reference = corpus
    out = tmp_path / "out"
    proc = cli(src, out, ray_address)
    lock, part_index = out / ".vitpipe-part-000.lock", out / "index.part-000-of-003.json"
    holder = {}

    def part_0_running_with_a_shard_done():
        try:
            holder.update(json.loads(lock.read_text()))
            index = json.loads(part_index.read_text())
        except (OSError, ValueError):
            return False
        return not index["complete"] and len(index["shards"]) >= 1

    wait_until(part_0_running_with_a_shard_done, proc, "part 0 had a shard")
    kept = complete_shards(out)
    os.kill(holder["pid"], signal.SIGKILL)  # the Ray worker running part 0 dies
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert files(out) == files(reference)


def test_a_part_waits_for_its_lock_held_by_a_run_still_stopping(ray_address, corpus, tmp_path):
    src, reference = corpus
    out = tmp_path / "out"
    out.mkdir()
    lock = FolderLock(out, "a killed run's task, still stopping", ".vitpipe-part-002.lock").acquire()
    threading.Timer(2.0, lock.release).start()
    run_engine("ray", str(src), out, OPTS, parts=PARTS, progress=False)
    assert files(out) == files(reference)


def test_a_part_that_keeps_failing_is_reported_with_its_inputs(ray_address, corpus, tmp_path):
    src, reference = corpus
    out = tmp_path / "out"
    obstacle = out / "shard-000008.tar.tmp" / "x"  # a folder where part 1 must clear a stale .tmp file
    obstacle.mkdir(parents=True)
    with pytest.raises(ShardError) as failed:
        run_engine("ray", str(src), out, OPTS, parts=PARTS, progress=False)
    message = str(failed.value)
    assert message.startswith(f"{out}: 1 of 3 parts failed") and "\n" not in message
    first, source = first_input(reference, 1)  # 25 shards of 5: part 1/3 writes shards 8-15, inputs 40-79
    assert (f"part 1/3 (inputs 40-79 of 125 in shuffled order; 0 shards complete, stopped at input {first}: "
            f"{source}) failed after 4 attempts: ") in message and "Is a directory" in message
    assert not (out / "index.json").exists()  # the commit marker waits for every part
    assert json.loads((out / "index.part-002-of-003.json").read_text())["complete"]  # the other parts finished
    obstacle.parent.joinpath("x").rmdir()
    obstacle.parent.rmdir()
    run_engine("ray", str(src), out, OPTS, parts=PARTS, progress=False)
    assert files(out) == files(reference)


def test_bad_engine_arguments_and_an_unreachable_cluster_are_one_line(tmp_path, capsys):
    src, out = str(write_folder(tmp_path / "src", {"a": 2})), str(tmp_path / "out")
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there once free_port's socket is closed
    # in a process of its own: this one may already hold the module's Ray instance, which the engine would use
    run = subprocess.run([sys.executable, "-m", "vitpipe", "shard", src, out, "--engine", "ray", "--ray-address", closed],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == (f"vitpipe shard: error: --ray-address {closed}: cannot reach a Ray "
                                                  "cluster there (Connection refused); start one with `ray start "
                                                  "--head`, or check the address\n")
    for args, expected in ((["--parts", "2"], "--parts is an option of --engine ray, not of --engine local"),
                           (["--engine", "ray", "--part", "1/2"], "--engine ray runs every part: use --parts N")):
        assert main(["shard", src, out, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitpipe shard: error: ") and err.count("\n") == 1 and expected in err, err
    with pytest.raises(SystemExit):
        main(["shard", src, out, "--engine", "spark"])
    assert "argument --engine: invalid choice: 'spark'" in capsys.readouterr().err
    with pytest.raises(EngineError, match=r"unknown engine 'spark'; known engines: local, ray"):
        run_engine("spark", src, out, OPTS)
    with pytest.raises(ShardError, match=r"--parts must be in \[1, 999\] \(part numbers have 3 digits\), got 1000"):
        run_engine("ray", src, out, OPTS, parts=1000)
    assert not (tmp_path / "out" / "index.json").exists()
