import io
import json
import logging
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.loader import LoaderError, ShardSet, eval_loader, resolve_shards, train_loader
from data_tools.shard import ShardOptions, shard
from data_tools.transforms import EvalTransform, TrainTransform, random_resized_crop_box

from .corpus import write_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """7 shards of uneven size (10,10,...,7): 67 labelled real-photo crops."""
    root = tmp_path_factory.mktemp("loader")
    src = write_folder(root / "src", {"a": 30, "b": 37})
    shard(str(src), root / "out", ShardOptions(samples_per_shard=10), progress=False)
    return root / "out"


def labels_of(batches):
    return [x for b in batches for x in b["labels"].tolist()]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_same_number_of_batches(shards, workers):
    s = resolve_shards(shards)
    assert s.num_samples == 67 and len(s.urls) == 7 and s.classes == ["a", "b"]
    counts = []
    for rank in range(3):
        loader = train_loader(s, TrainTransform(16), 4, rank=rank, world_size=3, workers=workers)
        batches = list(loader)
        assert all(b["images"].shape == (4, 16, 16, 3) and b["images"].dtype == torch.uint8 for b in batches)
        counts.append(len(batches))
        assert len(loader) == len(batches)
    assert counts == [67 // 12] * 3


def test_too_few_shards_is_an_error_before_training_unless_resampled(shards):
    s = resolve_shards(shards)
    with pytest.raises(LoaderError, match="7 shards for 4 ranks x 2 workers"):
        train_loader(s, TrainTransform(16), 2, rank=0, world_size=4, workers=2)
    counts = {len(list(train_loader(s, TrainTransform(16), 2, rank=r, world_size=4, workers=2, resampled=True)))
              for r in range(4)}
    assert counts == {67 // 8}


@pytest.mark.parametrize("resampled", [False, True])
def test_train_stream_is_deterministic_per_epoch_and_resumable(shards, resampled):
    s = resolve_shards(shards)

    def run(**kw):
        return list(train_loader(s, TrainTransform(16), 4, world_size=2, rank=1, workers=2, seed=3,
                                 resampled=resampled, **kw))

    a, b, other_epoch = run(epoch=1), run(epoch=1), run(epoch=2)
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["images"], other_epoch[0]["images"])
    resumed = run(epoch=1, skip_batches=3)
    assert len(resumed) == len(a) - 3
    for x, y in zip(a[3:], resumed):
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])


@pytest.fixture(scope="module")
def one_class_per_shard(tmp_path_factory):
    """5 shards of 2 samples, shard i holding class i only (sharded in source order)."""
    root = tmp_path_factory.mktemp("perclass")
    src = write_folder(root / "src", {c: 2 for c in "abcde"})
    shard(str(src), root / "out", ShardOptions(samples_per_shard=2, shuffle=False), progress=False)
    return root / "out"


@pytest.mark.parametrize("rank,world,workers", [(0, 1, 0), (1, 2, 2)])
def test_resampled_reads_every_shard_once_per_pass(one_class_per_shard, rank, world, workers):
    urls = resolve_shards(one_class_per_shard).urls
    s = ShardSet(urls, num_samples=4 * 10 * world * max(1, workers))  # 4 passes per worker
    # a buffer of 1 keeps the read order, so a sample's label names the shard it came from
    batches = list(train_loader(s, TrainTransform(16), 2, rank=rank, world_size=world, workers=workers,
                                shuffle_buffer=1, resampled=True, seed=1))
    per_worker = [labels_of(batches[w::max(1, workers)]) for w in range(max(1, workers))]
    orders = []
    for labels in per_worker:
        assert len(labels) == 40
        for start in range(0, 40, 10):
            one_pass = labels[start:start + 10]
            assert sorted(one_pass) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], labels
            orders.append(one_pass[::2])
    assert len({tuple(o) for o in orders}) > 1  # each pass (and worker) has its own order


def test_resampled_over_unreadable_or_empty_shards_fails_instead_of_hanging(tmp_path):
    broken, empty = tmp_path / "broken.tar", tmp_path / "empty.tar"
    broken.write_bytes(b"x" * 5000)
    empty.write_bytes(bytes(10240))
    s = resolve_shards([str(broken), str(empty)], num_samples=10)
    with pytest.raises(LoaderError, match="no readable sample in any of the 2 shards"):
        list(train_loader(s, TrainTransform(16), 2, resampled=True))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 3)])
def test_eval_sees_every_sample_exactly_once(shards, world, workers):
    s = resolve_shards(shards)
    seen = []
    for rank in range(world):
        seen += labels_of(eval_loader(s, EvalTransform(16), 5, rank=rank, world_size=world, workers=workers))
    assert sorted(seen) == [0] * 30 + [1] * 37


def test_corrupt_sample_inside_a_shard_is_skipped_and_counted(shards, tmp_path):
    first = shards / "shard-000000.tar"
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(first) as src, tarfile.open(damaged, "w") as dst:
        for i, m in enumerate(src.getmembers()):
            data = src.extractfile(m).read()
            if m.name.endswith(".jpg") and i < 9:
                data = b"garbage" * 10
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    s = resolve_shards([str(damaged)], num_samples=10)
    batches = list(eval_loader(s, EvalTransform(16), 4))
    assert sum(len(b["labels"]) for b in batches) == 7
    assert sum(int(b["skipped"]) for b in batches) == 3


def test_shard_specs(shards):
    names = sorted(str(p) for p in shards.glob("*.tar"))
    assert resolve_shards(names[:2]).num_samples == 20  # counts from the index beside them
    pattern = str(shards / "shard-{000000..000006}.tar")
    assert resolve_shards(pattern).num_samples == 67
    with pytest.raises(LoaderError, match="epoch length unknown"):
        resolve_shards(f"pipe:cat {names[0]}")
    piped = resolve_shards(f"pipe:cat {names[0]}", num_samples=10)
    assert len(labels_of(eval_loader(piped, EvalTransform(16), 4))) == 10
    with pytest.raises(LoaderError, match="does not exist"):
        resolve_shards([str(shards / "nope.tar")])
    with pytest.raises(LoaderError, match="no index.json"):
        resolve_shards(shards.parent)
    with pytest.raises(LoaderError, match="cannot fill one global batch"):
        train_loader(resolve_shards(shards), TrainTransform(16), 64, world_size=2)


def test_random_resized_crop_box_stays_inside_and_varies():
    rng = random.Random(0)
    boxes = [random_resized_crop_box(120, 100, rng) for _ in range(300)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 100
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    areas = [w * h / 12000 for _, _, w, h in boxes]
    assert min(areas) < 0.2 and max(areas) > 0.8


def test_eval_transform_centre_crops():
    from PIL import Image

    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (90, 0, 210, 100))  # white around the centre square
    x = EvalTransform(32)(img)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8 and x.min() > 242


def test_a_worker_whose_shards_are_all_unreadable_fails_instead_of_hanging(tmp_path):
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"x" * 5000)
    s = resolve_shards([str(broken)], num_samples=10)
    with pytest.raises(LoaderError, match="no readable sample"):
        list(train_loader(s, TrainTransform(16), 2))


def garbage_shard(path, n):
    """A sound tar of ``n`` labelled samples whose images do not decode."""
    with tarfile.open(path, "w") as t:
        for i in range(n):
            for ext, data in (("cls", b"0"), ("jpg", b"garbage" * 10)):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("resampled", [False, True])
def test_shards_that_never_decode_fail_with_one_line_instead_of_looping(tmp_path, caplog, resampled):
    urls = [garbage_shard(tmp_path / f"bad{i}.tar", 10) for i in range(2)]
    s = resolve_shards(urls, num_samples=20)
    with caplog.at_level(logging.WARNING), pytest.raises(LoaderError) as err:
        list(train_loader(s, TrainTransform(16), 2, resampled=resampled))
    message = str(err.value)
    assert "\n" not in message and message.startswith("1000 samples in a row do not decode")
    assert urls[0] in message and urls[1] in message and "vitpipe verify" in message
    assert 5 <= len(caplog.records) <= 7  # a few examples and a count, not a line per sample


def member_offset(path, n):
    with tarfile.open(path) as t:
        return t.getmembers()[n].offset


@pytest.fixture
def damaged(shards, tmp_path):
    """The 7 shards with three damaged: one zero bytes (10 samples lost), one cut inside the header
    of its third sample (9 lost: the second was not complete yet), one cut inside the image of its
    fifth (6 lost)."""
    out = tmp_path / "damaged"
    shutil.copytree(shards, out)
    (out / "shard-000001.tar").write_bytes(b"")
    for name, cut in (("shard-000002.tar", member_offset(out / "shard-000002.tar", 6) + 100),
                      ("shard-000003.tar", member_offset(out / "shard-000003.tar", 13) + 512 + 10)):
        (out / name).write_bytes((out / name).read_bytes()[:cut])
    return out


DAMAGED = ("shard-000001.tar", "shard-000002.tar", "shard-000003.tar")


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 3)])
def test_eval_counts_every_sample_lost_in_a_damaged_shard(damaged, caplog, world, workers):
    s = resolve_shards(damaged)
    seen, skipped = 0, 0
    with caplog.at_level(logging.WARNING):
        for rank in range(world):
            for b in eval_loader(s, EvalTransform(16), 5, rank=rank, world_size=world, workers=workers):
                seen, skipped = seen + len(b["labels"]), skipped + int(b["skipped"])
    assert (seen, skipped) == (67 - 25, 25)
    if workers == 0:  # worker processes log to their own stderr
        named = sorted(name for r in caplog.records for name in DAMAGED if name in r.getMessage())
        assert named == list(DAMAGED)  # each damaged shard once, by name


def test_training_counts_samples_lost_in_damaged_shards(damaged, caplog):
    with caplog.at_level(logging.WARNING):
        batches = list(train_loader(resolve_shards(damaged), TrainTransform(16), 4))
    assert len(batches) == 67 // 4 and sum(int(b["skipped"]) for b in batches) >= 25
    named = sorted(name for r in caplog.records for name in DAMAGED if name in r.getMessage())
    assert named == list(DAMAGED)


def states_before(batches, done: int) -> dict:
    """What the training loop keeps: each logical worker's stream state after its last batch before ``done``."""
    return {str(b["stream"]["worker"]): b["stream"]["state"] for b in batches[:done]}


@pytest.mark.parametrize("resampled,workers", [(False, 0), (False, 2), (True, 2)])
def test_a_stream_resumed_from_its_saved_state_goes_on_bit_identically(shards, resampled, workers):
    s = resolve_shards(shards)

    def run(**kw):
        return list(train_loader(s, TrainTransform(16), 3, world_size=2, rank=1, workers=workers, seed=3,
                                 resampled=resampled, shuffle_buffer=5, **kw))

    whole = run(epoch=1)
    assert all(b["stream"]["state"] is not None for b in whole)
    for done in (1, 4, len(whole) - 1):  # before every worker gave a batch, mid-epoch, in the last flush
        resumed = run(epoch=1, skip_batches=done, resume=json.loads(json.dumps(states_before(whole, done))))
        assert len(resumed) == len(whole) - done
        for x, y in zip(whole[done:], resumed, strict=True):
            assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], y["labels"])
            assert x["keys"] == y["keys"] and x["stream"] == y["stream"]


@pytest.fixture
def counted_reads(monkeypatch):
    """Bytes the loader reads from shards (a stream from an offset, ranged reads of buffered samples)."""
    import data_tools.reading as loader  # where shards are opened and ranged reads made

    read = {"bytes": 0}
    real_open, real_spans = loader._open_stream, loader.read_spans

    class Counting(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read["bytes"] += len(data)
            return data

        def close(self):
            self.f.close()

    def spans(url, pairs):
        blobs = real_spans(url, pairs)
        read["bytes"] += sum(map(len, blobs))
        return blobs

    monkeypatch.setattr(loader, "_open_stream", lambda url, start=0: Counting(real_open(url, start)))
    monkeypatch.setattr(loader, "read_spans", spans)
    return read


def test_resuming_late_in_an_epoch_reads_the_buffer_and_the_shard_in_flight_not_what_came_before(
        shards, counted_reads):
    s = resolve_shards(shards)
    sizes = {u: Path(u).stat().st_size for u in s.urls}

    def first_batch(**kw):
        counted_reads["bytes"] = 0
        loader = train_loader(s, TrainTransform(16), 2, seed=1, shuffle_buffer=4, **kw)
        batch = next(iter(loader))
        return counted_reads["bytes"], batch

    fresh, _ = first_batch()
    whole = list(train_loader(s, TrainTransform(16), 2, seed=1, shuffle_buffer=4))
    done = int(0.9 * len(whole))
    state = states_before(whole, done)["0"]
    buffered = sum(end - start for _, start, end in state["pool"])
    resumed, batch = first_batch(skip_batches=done, resume={"0": state})
    assert torch.equal(batch["images"], whole[done]["images"])
    assert resumed <= fresh + buffered + max(sizes.values())
    replayed, _ = first_batch(skip_batches=done)  # what a checkpoint without loader state costs
    assert replayed > 3 * resumed


def test_a_replayed_resume_past_samples_that_do_not_decode_goes_on_bit_identically(shards, tmp_path):
    """Replay forms the batches before the resume point again: skipping raw samples would shift every batch
    after an undecodable one."""
    urls = []
    for path in sorted(shards.glob("*.tar")):
        damaged = tmp_path / path.name
        with tarfile.open(path) as src, tarfile.open(damaged, "w") as dst:
            for i, member in enumerate(src.getmembers()):  # .cls, .jpg, .json of each sample
                data = src.extractfile(member).read()
                if i // 3 == 1 and member.name.endswith(".jpg"):  # the second image of every shard
                    data, member.size = b"garbage" * 10, 70
                dst.addfile(member, io.BytesIO(data))
        urls.append(f"pipe:cat {damaged}")
    s = resolve_shards(urls, num_samples=60)
    whole = list(train_loader(s, EvalTransform(16), 4, seed=1, shuffle_buffer=5))
    assert sum(int(b["skipped"]) for b in whole) == 7
    for done in (1, 5):
        resumed = list(train_loader(s, EvalTransform(16), 4, seed=1, shuffle_buffer=5, skip_batches=done,
                                    resume=states_before(whole, done)))
        for x, y in zip(whole[done:], resumed, strict=True):
            assert torch.equal(x["images"], y["images"]) and x["keys"] == y["keys"]


def test_shards_that_cannot_be_read_from_an_offset_resume_by_replay(shards):
    s = resolve_shards([f"pipe:cat {p}" for p in sorted(shards.glob("*.tar"))], num_samples=67)
    whole = list(train_loader(s, EvalTransform(16), 4, seed=1, shuffle_buffer=5))
    saved = states_before(whole, 5)
    assert saved == {"0": None}  # no position to read back from: the loop's checkpoint says so
    resumed = list(train_loader(s, EvalTransform(16), 4, seed=1, shuffle_buffer=5, skip_batches=5, resume=saved))
    for x, y in zip(whole[5:], resumed, strict=True):
        assert torch.equal(x["images"], y["images"]) and x["keys"] == y["keys"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_that_never_produces_stops_the_stream_naming_it(shards, workers):
    """A ``pipe:`` command that never writes a byte (a hung mount, a stuck read): one line naming the shard,
    rank and worker once data.stall_timeout passes, in the loader's process and in a worker."""
    from common.errors import user_message
    from data_tools.stall import StalledRead

    good = sorted(str(p) for p in shards.glob("*.tar"))[0]
    hung = "pipe:exec sleep 3600"  # exec: the killed process is the command itself
    s = resolve_shards([f"pipe:cat {good}", hung], num_samples=20)
    loader = train_loader(s, EvalTransform(16), 2, workers=workers, seed=0, stall_timeout=1)
    with pytest.raises(StalledRead) as e:
        list(loader)
    message = user_message(e.value)
    worker = next(w for w in range(max(1, workers)) if f"worker {w}" in message)
    assert message == (f"{hung} (rank 0, worker {worker}): no sample for 1 s (data.stall_timeout); stopping. "
                       "Check the storage or the command, then rerun to resume")
