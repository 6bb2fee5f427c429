"""Writes stay inside OUT (or the checkpoint folder): a link planted where vitpipe writes is replaced or refused,
never written through; a shard name is a plain name."""

import json
import os
from pathlib import Path

import pytest

from common.io import UnsafePath, atomic_path, check_inside, open_append, write_json
from common.lock import FolderLock, UnsafeLock
from vit import ModelInfo, create_model, save_checkpoint

from .corpus import write_folder
from .helpers import pretrain_cmd, randomize, vitpipe_cmd

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
