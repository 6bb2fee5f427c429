"""The loop's steps in-process, without a launch: where the data stream resumes, what a log window averages."""

import json
import re
from functools import partial
from itertools import islice
from types import SimpleNamespace

import pytest
import torch

from common.errors import TrainingError
from common.io import UnsafePath
from data_tools.loader import resolve_shards, train_loader
from data_tools.transforms import EvalTransform
from pretrain.checkpoints import DataTrail, Position
from pretrain.loop import micro_batches
from pretrain.metrics import Window, rewind_metrics


def test_the_stream_resumed_at_a_saved_position_goes_on_with_the_same_batches(shards):
    # 64 samples, 8 a batch: 8 batches an epoch; 11 of them cross into epoch 1
    batches = partial(train_loader, resolve_shards(shards), EvalTransform(16), 8, seed=3, shuffle_buffer=16)
    whole = list(islice(micro_batches(SimpleNamespace(pos=Position(), batches=batches), {}), 11))
    assert [after for _, after in whole] == [(0, i) for i in range(1, 8)] + [(1, 0), (1, 1), (1, 2), (1, 3)]
    for done in (5, 8, 9):  # mid-epoch, at the epoch's end, just past it
        epoch, batch = whole[done - 1][1]
        run = SimpleNamespace(pos=Position(done, epoch, batch), batches=batches)
        resumed = islice(micro_batches(run, None), 11 - done)  # None: replay (a checkpoint without loader state)
        for (ours, after), (theirs, expected) in zip(resumed, whole[done:], strict=True):
            assert after == expected and torch.equal(ours["images"], theirs["images"])
            assert torch.equal(ours["labels"], theirs["labels"])


def test_a_window_averages_its_steps_and_starts_afresh():
    window = Window(("loss", "accuracy"))
    window.add([2.0, 0.5])
    window.add([4.0, 1.0])
    window.skipped += 3
    assert window.steps == 2 and window.sums == {"loss": 6.0, "accuracy": 1.5} and window.skipped == 3
    window.reset()
    assert window.steps == 0 and window.sums == {"loss": 0.0, "accuracy": 0.0} and window.skipped == 0


def _jsonl(path, records, tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_rewinding_drops_the_lines_past_the_checkpoint_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _jsonl(path, [{"step": s, "loss": 1.0 / s} for s in range(1, 9)], b'{"step": 9, "lo')
    rewind_metrics(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    rewind_metrics(path, 5)  # nothing past it: unchanged
    assert path.read_text().count("\n") == 5


def test_rewinding_reads_only_the_lines_past_the_checkpoint(tmp_path):
    """A sample record holds every key a run trained on: a resume must not read (or rewrite) all of it."""
    path = tmp_path / "rank0.jsonl"
    early = b"not json: a resume never reads this far back\n"
    path.write_bytes(early)
    records = [json.dumps({"step": s, "keys": [f"shard-000000.tar/{s:08d}"] * 5000}).encode() + b"\n"
               for s in range(1, 31)]  # lines of ~150 kB: longer than what is read at a time
    path.write_bytes(early + b"".join(records))
    rewind_metrics(path, 25)
    assert path.read_bytes() == early + b"".join(records[:25])


def test_a_damaged_line_past_the_checkpoint_is_one_line_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _jsonl(path, [{"step": 1}, {"step": 2}])
    with open(path, "ab") as f:
        f.write(b"garbage\n" + json.dumps({"step": 3}).encode() + b"\n")
    with pytest.raises(TrainingError, match=rf"^{re.escape(str(path))}:3: not a JSON line"):
        rewind_metrics(path, 1)


def test_a_last_record_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _jsonl(path, [{"step": 1}], b'{"step": 2}')
    rewind_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_rewinding_does_not_write_through_a_link(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    _jsonl(target, [{"step": 1}, {"step": 2}])
    (tmp_path / "metrics.jsonl").symlink_to(target)
    with pytest.raises(UnsafePath, match="a symbolic link"):
        rewind_metrics(tmp_path / "metrics.jsonl", 1)
    assert target.read_text().count("\n") == 2


def test_sample_records_are_not_appended_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "rank0.jsonl").symlink_to(target)
    trail = DataTrail({}, tmp_path / "rank0.jsonl")
    trail.took({"stream": {"worker": 0, "state": None}, "keys": ["shard-000000.tar/0"]}, epoch=0)
    with pytest.raises(UnsafePath, match="a symbolic link"):
        trail.step_done(1)
    assert target.read_text() == ""
