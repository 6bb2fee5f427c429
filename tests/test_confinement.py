"""Writes stay inside OUT (or the checkpoint folder): a link planted where vitpipe writes is replaced or refused,
never written through; a shard name is a plain name. Reads stay inside too: index.json lists only the tars beside
it, only regular files are read as shards, and a manifest on an object store names only objects there."""

import json
import os
import shutil
from pathlib import Path

import pytest

from common.io import UnsafePath, atomic_path, check_inside, open_append, write_json
from common.lock import FolderLock, UnsafeLock
from data_tools.loader import resolve_shards
from data_tools.shard import ShardOptions, shard
from data_tools.store import StoreError
from vit import ModelInfo, create_model, save_checkpoint

from .corpus import write_folder
from .helpers import launch, pretrain_cmd, randomize, vitpipe_cmd

VICTIM_TEXT = "precious: must stay as it is\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside every folder vitpipe is told to write in: the target of the planted links."""
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


@pytest.fixture
def src(tmp_path):
    write_folder(tmp_path / "src", {"a": 6, "b": 6}, size=(24, 24))
    return tmp_path / "src"


def _one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    return lines[0]


def test_atomic_writes_replace_planted_links_and_never_follow_them(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").symlink_to(victim)  # the final name
    (out / "b.json.tmp").symlink_to(victim)  # the temporary name a writer uses
    write_json(out / "a.json", {"x": 1})
    write_json(out / "b.json", {"x": 2})
    assert victim.read_text() == VICTIM_TEXT
    for name, x in (("a.json", 1), ("b.json", 2)):
        assert not (out / name).is_symlink() and json.loads((out / name).read_text()) == {"x": x}
    assert not (out / "b.json.tmp").exists() and not (out / "b.json.tmp").is_symlink()
    with pytest.raises(UnsafePath, match="replaced by something else while being written"):
        with atomic_path(out / "c.json") as tmp:  # a racing hand swaps the temporary file for a link
            tmp.unlink()
            tmp.symlink_to(victim)
    assert victim.read_text() == VICTIM_TEXT and not (out / "c.json").exists()


def test_appending_to_a_planted_link_or_fifo_is_refused(tmp_path, victim):
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePath, match="metrics.jsonl: a symbolic link"):
        open_append(tmp_path / "metrics.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(UnsafePath, match="fifo.jsonl: not a regular file"):
        open_append(tmp_path / "fifo.jsonl")
    assert victim.read_text() == VICTIM_TEXT


def test_check_inside_follows_links_in_the_folders_on_the_way(tmp_path, victim):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").symlink_to(victim.parent, target_is_directory=True)
    assert check_inside(tmp_path / "out" / "sub", tmp_path / "out") == tmp_path / "out" / "sub"
    with pytest.raises(UnsafePath, match="outside"):
        check_inside(tmp_path / "out" / "checkpoints", tmp_path / "out")


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_a_planted_lock_file_is_refused_and_its_target_untouched(tmp_path, victim, src, run_here, plant):
    out = tmp_path / "out"
    out.mkdir()
    if plant == "symlink":
        (out / ".vitpipe.lock").symlink_to(victim)
    else:
        os.mkfifo(out / ".vitpipe.lock")
    line = _one_line(run_here(vitpipe_cmd("shard", str(src), str(out), "--samples-per-shard", "4")))
    assert ".vitpipe.lock: not vitpipe's lock file" in line and "remove it" in line
    assert victim.read_text() == VICTIM_TEXT and not list(out.glob("*.tar"))
    with pytest.raises(UnsafeLock):
        FolderLock(out, "test").acquire()


def test_shards_and_index_replace_planted_links(tmp_path, victim, src, run_here):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("index.json", "index.json.tmp", "shard-000000.tar", "shard-000001.tar.tmp"):
        (out / name).symlink_to(victim)
    res = run_here(vitpipe_cmd("shard", str(src), str(out), "--samples-per-shard", "4", "--overwrite"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert victim.read_text() == VICTIM_TEXT
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar"]
    assert not any(p.is_symlink() for p in out.iterdir())
    assert run_here(vitpipe_cmd("verify", str(out))).returncode == 0


@pytest.mark.parametrize("prefix", ["../../x", "/tmp/vitpipe-abs-prefix", "..", "sub/x", ""])
def test_prefix_must_be_a_plain_name(tmp_path, src, run_here, prefix):
    out = tmp_path / "deep" / "out"
    line = _one_line(run_here(vitpipe_cmd("shard", str(src), str(out), "--prefix", prefix)))
    assert "--prefix must be a plain file name" in line
    assert not list(tmp_path.rglob("*.tar")) and not list(Path("/tmp").glob("vitpipe-abs-prefix*"))


def test_eval_replaces_a_planted_confusion_png_and_eval_json(tmp_path, victim, shards, run_here):
    ckpt = tmp_path / "ckpt"
    model = randomize(create_model("vit_ti8", image_size=16, depth=1, embed_dim=24, num_heads=2, mlp_dim=48,
                                   num_classes=2))
    save_checkpoint(model, ckpt, ModelInfo(labels=["a", "b"]))
    (ckpt / "confusion.png").symlink_to(victim)
    (ckpt / "eval.json.tmp").symlink_to(victim)
    res = run_here(vitpipe_cmd("eval", str(ckpt), "--data", str(shards)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert victim.read_text() == VICTIM_TEXT
    assert not (ckpt / "confusion.png").is_symlink() and (ckpt / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((ckpt / "eval.json").read_text())["samples"] == 64


def test_training_refuses_a_checkpoints_folder_that_leads_outside(tmp_path, victim, shards, run_here):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(victim.parent, target_is_directory=True)
    (out / "final").symlink_to(victim.parent, target_is_directory=True)
    line = _one_line(run_here(pretrain_cmd(f"data.train={shards}", "train.max_steps=2", "train.checkpoint_every=2",
                                           f"train.output_dir={out}")))
    assert "checkpoints: leads to" in line and "outside" in line
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def _with_entry(shards: Path, dest: Path, name: str) -> Path:
    """A copy of ``shards`` whose index.json lists ``name`` as its first shard."""
    shutil.copytree(shards, dest)
    index = json.loads((dest / "index.json").read_text())
    index["shards"][0]["name"] = name
    (dest / "index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "s3://bucket/x.tar",
                                  "..", "sub/shard.tar"])
def test_an_index_naming_anything_but_a_tar_beside_it_is_one_line(shards, tmp_path, run_here, name):
    hostile = _with_entry(shards, tmp_path / "hostile", name)
    expected = f"{hostile / 'index.json'}: shard entry {name!r} is not a file name in this folder"
    assert expected in _one_line(run_here(vitpipe_cmd("verify", str(hostile))))
    with pytest.raises(StoreError, match="is not a file name in this folder"):
        resolve_shards(hostile)
    line = _one_line(run_here(pretrain_cmd(f"data.train={hostile}", f"train.output_dir={tmp_path / 'run'}")))
    assert expected in line


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/urandom"])
def test_a_fifo_or_device_as_a_shard_is_one_line_not_a_hang(shards, tmp_path, special):
    """Launched, with a timeout: a hang fails the test instead of stalling the suite."""
    folder = _with_entry(shards, tmp_path / "special", "special.tar")
    if special == "fifo":
        os.mkfifo(folder / "special.tar")
    else:
        (folder / "special.tar").symlink_to(special)
    expected = f"{folder / 'special.tar'}: a {'FIFO' if special == 'fifo' else 'device'}, not a regular file"
    for cmd in (vitpipe_cmd("verify", str(folder)),
                pretrain_cmd(f"data.train={folder}", f"train.output_dir={tmp_path / 'run'}")):
        assert expected in _one_line(launch(cmd, timeout=300))
    with pytest.raises(StoreError, match=expected):  # given as a shard, not through an index
        resolve_shards([str(folder / "special.tar")], num_samples=16)


def test_a_manifest_on_s3_may_name_only_objects_there(s3, tmp_path, run_here):
    from .test_object_store import bucket

    write_folder(tmp_path / "src", {"cat": 2, "dog": 2})
    name = bucket(s3, "manifests")
    s3.put(str(tmp_path / "src") + "/", f"{name}/photos", recursive=True)
    local = tmp_path / "src" / "dog" / "00000.jpg"
    for row in (str(local), f"file://{local}", "/etc/hostname"):
        s3.pipe_file(f"{name}/photos/list.csv", f"path,label\ncat/00000.jpg,cat\n{row},dog\n".encode())
        out = tmp_path / "out"
        line = _one_line(run_here(vitpipe_cmd("shard", f"s3://{name}/photos/list.csv", str(out))))
        assert f"s3://{name}/photos/list.csv: row 2 names {row!r}, not an object of s3://" in line
        assert "--allow-local-paths" in line and not list(out.glob("*.tar"))
    s3.pipe_file(f"{name}/photos/list.csv", f"path,label\ncat/00000.jpg,cat\n{local},dog\n".encode())
    index = shard(f"s3://{name}/photos/list.csv", tmp_path / "allowed",
                  ShardOptions(allow_local_paths=True), progress=False)
    assert index["total_samples"] == 2 and index["skipped"] == [] and "allow_local_paths" not in index["args"]
