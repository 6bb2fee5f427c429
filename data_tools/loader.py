"""The streaming loader: webdataset shards to batches, split by node then by worker.

Training streams are deterministic functions of (seed, epoch, rank, worker): shard order, the
shuffle buffer and every sample's augmentation. Every rank yields the same number of batches
per epoch (a worker that runs out of shards goes round them again; resampled mode goes round
all shards, in a fresh order each pass), so no rank waits on another at a collective. A resumed run skips the batches it has
done before decoding them. Eval streams read every sample exactly once across ranks and workers.

Do not hand these loaders to ``accelerator.prepare``: they split by rank themselves.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from collections import Counter, deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import Pipe

from common.errors import VitpipeError
from common.seeding import seed_for
from data_tools import store
from data_tools.stall import StalledRead, watched
from data_tools.tars import ForeignTar, image_bytes, read_tar

log = logging.getLogger(__name__)


class LoaderError(VitpipeError, ValueError):
    """The shards cannot feed this run; said before training starts."""


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    num_samples: int
    classes: list[str] | None = None
    counts: dict[str, int] | None = None  # url -> samples index.json lists: what a damaged shard lost


def _is_folder_url(spec) -> bool:
    """``s3://bucket/prefix``: a shard folder on an fsspec filesystem (not one tar, not a brace pattern)."""
    return store.is_url(spec) and store.scheme(spec) not in _WDS_SCHEMES and not spec.endswith(".tar") \
        and "{" not in spec


def _from_index(spec, num_samples: int | None) -> ShardSet:
    """The shards a folder's (or a URL's) index.json lists, with its epoch length and classes."""
    folder = store.shard_folder(spec)
    with store.errors_for(str(spec)):
        text = folder.read_json_text("index.json")
    index_path = folder.where("index.json")
    if text is None:
        raise LoaderError(f"{spec}: no index.json (shard it with vitpipe shard, or list the tars)")
    index = json.loads(text)
    if not index.get("complete", False):
        raise LoaderError(f"{index_path}: sharding did not finish")
    if not index["shards"]:
        raise LoaderError(f"{index_path}: no shards (every input was skipped?)")
    urls = [folder.where(s["name"]) for s in index["shards"]]
    return ShardSet(urls, index["total_samples"] if num_samples is None else num_samples, index.get("classes"),
                    {u: s["count"] for u, s in zip(urls, index["shards"])})


def resolve_shards(spec, num_samples: int | None = None) -> ShardSet:
    """A folder (or fsspec URL, ``s3://bucket/prefix``) with index.json, a list of shards, a brace pattern,
    ``pipe:`` commands or URLs.

    The epoch length comes from index.json (beside local shards, or under the URL) or from ``num_samples``.
    """
    if isinstance(spec, (str, Path)) and (Path(spec).is_dir() or _is_folder_url(spec)):
        return _from_index(spec, num_samples)
    urls = wds.shardlists.expand_urls(spec) if isinstance(spec, str) else [str(u) for u in spec]
    if not urls:
        raise LoaderError(f"{spec}: no shards")
    local = [Path(u) for u in urls if "://" not in u and not u.startswith("pipe:")]
    for p in local:
        if not p.is_file():
            raise LoaderError(f"{p}: shard does not exist")
    classes = shard_counts = None
    if len(local) == len(urls):
        parents = {p.parent for p in local}
        index_path = parents.pop() / "index.json" if len(parents) == 1 else None
        if index_path and index_path.is_file():
            index = json.loads(index_path.read_text())
            counts = {s["name"]: s["count"] for s in index["shards"]}
            if all(p.name in counts for p in local):
                shard_counts = {u: counts[p.name] for u, p in zip(urls, local)}
                num_samples = sum(shard_counts.values()) if num_samples is None else num_samples
                classes = index.get("classes")
    if num_samples is None:
        raise LoaderError(f"{spec}: epoch length unknown; give a folder with index.json or set num_samples")
    return ShardSet(urls, num_samples, classes, shard_counts)


_WDS_SCHEMES = ("http", "https")  # webdataset opens these (curl) and pipe: commands; fsspec the other URLs


def _open_stream(url: str):
    """A local file, or an fsspec URL streamed with ranged reads."""
    return store.open_url(url) if store.is_url(url) else open(url, "rb", buffering=1 << 20)


def _foreign_samples(url: str, on_error):
    """webdataset's reader, for tars in a format other than ours (and for pipe: and http URLs)."""
    if not store.is_url(url) or store.scheme(url) in _WDS_SCHEMES:
        return wds.tariterators.tarfile_samples(iter([{"url": url}]), handler=on_error)
    try:
        files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": _open_stream(url)}]),
                                                   handler=on_error)
    except Exception as exn:
        if not store.is_client_error(exn):
            raise
        on_error(exn)
        return iter(())
    return wds.tariterators.group_by_keys(files, handler=on_error)


def _native_samples(url: str):
    with _open_stream(url) as f:
        yield from read_tar(url, f)


def _keep_error(errors: list, exn: Exception) -> bool:
    """webdataset's handler: note the error and read on. A stalled read ends the stream with its one line
    (webdataset has appended the stream and url to its args) and ends a ``pipe:`` command or ``curl`` that
    stalled: closing the pipe would otherwise wait for it (up to webdataset's two hours)."""
    if isinstance(exn, StalledRead):
        for held in exn.args[1:]:
            if isinstance(held, Pipe):
                held.proc.kill()
        raise StalledRead(exn.args[0]) from None
    errors.append(exn)
    return True


def read_samples(urls, handler: _SkipCounter, counts: dict[str, int] | None = None, stall_timeout: float = 0,
                 where: str = "rank 0, worker 0"):
    """Samples from a stream of shard urls. A damaged shard is read as far as it goes, and what it
    lost goes to ``handler``: the samples ``counts`` (index.json) lists beyond those read, else one
    per error. A shard that yields no sample for ``stall_timeout`` seconds (0: no limit) raises
    ``StalledRead`` naming it and ``where`` (rank, worker)."""
    for url in urls:
        errors: list[Exception] = []
        yielded = 0
        foreign = url.startswith("pipe:") or store.scheme(url) in _WDS_SCHEMES or not url.endswith(".tar")
        if not foreign:
            try:
                for sample in watched(_native_samples(url), stall_timeout, f"{url} ({where})"):
                    yielded += 1
                    yield sample
            except ForeignTar:
                foreign = True
            except Exception as exn:  # a damaged tar, a missing file, a store that stopped answering
                if not (isinstance(exn, tarfile.TarError) or store.is_client_error(exn)):
                    raise
                errors.append(exn)
        if foreign:
            samples = watched(_foreign_samples(url, partial(_keep_error, errors)), stall_timeout, f"{url} ({where})")
            for sample in itertools.islice(samples, yielded, None):
                yielded += 1
                yield sample
        expected = counts.get(url) if counts else None
        lost = len(errors) if expected is None else max(0, expected - yielded)
        if lost or errors:
            handler.shard(url, lost, f"{errors[0]}" if errors else f"index.json lists {expected}")


class _SkipCounter:
    """Counts what a stream loses and logs it without flooding: a damaged shard once, by name;
    undecodable samples as a few examples, then a running count every ``every`` of them."""

    examples, every = 5, 1000

    def __init__(self, shards: bool = True):
        self.count = 0
        self.undecodable = 0
        self.shards = shards  # False: another stream reading the same shards accounts for their damage
        self.named: set[str] = set()

    def shard(self, url: str, lost: int, why: str) -> None:
        if not self.shards:
            return
        self.count += lost
        if url not in self.named:
            self.named.add(url)
            log.warning("%s: damaged shard, %d sample(s) lost (%s)", url, lost, why)

    def sample(self, what: str) -> None:
        self.count += 1
        self.undecodable += 1
        if self.undecodable <= self.examples:
            log.warning("skipping a sample that does not decode: %s", what)
        elif self.undecodable % self.every == 0:
            log.warning("%d samples that do not decode skipped so far (latest: %s)", self.undecodable, what)


def _open(sample: dict) -> tuple:
    """The image, opened but not decoded (the transform decodes only what it needs), and the label."""
    data = image_bytes(sample)
    if data is None:
        raise ValueError("no image member")
    label = int(sample["cls"]) if "cls" in sample else -1
    return Image.open(io.BytesIO(data)), label


def shuffled(items, buffer: int, rng: random.Random):
    """A shuffle buffer: memory bounded by ``buffer`` samples, order fixed by ``rng``."""
    pool = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        j = rng.randrange(buffer)
        pool[j], item = item, pool[j]
        yield item
    rng.shuffle(pool)
    yield from pool


class ShardStream(IterableDataset):
    """One epoch of batches for one rank. Use ``train_loader`` / ``eval_loader`` to build it."""

    def __init__(self, shards: ShardSet, transform, batch_size: int, *, train: bool, rank: int = 0,
                 world_size: int = 1, workers: int = 0, seed: int = 0, epoch: int = 0, resampled: bool = False,
                 shuffle_buffer: int = 1000, skip_batches: int = 0, stall_timeout: float = 0):
        super().__init__()
        self.stall_timeout = stall_timeout
        self.shards, self.transform, self.batch_size, self.train = shards, transform, batch_size, train
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.workers = workers, max(1, workers)  # 0: load in the main process
        self.seed, self.epoch, self.resampled, self.shuffle_buffer = seed, epoch, resampled, shuffle_buffer
        self.skip_batches = skip_batches
        # a run of undecodable samples this long means the shards cannot feed training: say so, do not loop
        self.give_up_after = max(1000, 10 * batch_size)
        global_batch = batch_size * world_size
        if train and shards.num_samples < global_batch:
            raise LoaderError(f"{shards.num_samples} samples cannot fill one global batch of {global_batch}")
        self.batches_per_epoch = shards.num_samples // global_batch
        if train and not resampled and len(shards.urls) < world_size * self.workers:
            raise LoaderError(
                f"{len(shards.urls)} shards for {world_size} ranks x {self.workers} workers: every worker needs a "
                "shard; use resampled mode, fewer workers, or more (smaller) shards")

    def __len__(self) -> int:
        if self.train:
            return self.batches_per_epoch - self.skip_batches
        per_rank = len(range(self.rank, self.shards.num_samples, self.world_size))  # approximate for shard splits
        return -(-per_rank // self.batch_size)

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def __iter__(self):
        return self._train_batches() if self.train else self._eval_batches()

    def _train_batches(self):
        # the DataLoader takes batches round-robin from workers starting at worker 0; after a resume at
        # batch B the local worker w plays the part of worker (w + B) % W so the order is unchanged
        logical = (self._worker() + self.skip_batches) % self.workers
        total = len(range(logical, self.batches_per_epoch, self.workers))
        done = len(range(logical, self.skip_batches, self.workers))
        handler = _SkipCounter()
        samples = enumerate(self._train_samples(logical, handler))
        if done:  # what was lost before the resume point was reported with the batches before it
            deque(itertools.islice(samples, done * self.batch_size), maxlen=0)
        batch, reported = [], handler.count
        failing: Counter = Counter()  # shard -> samples that did not decode since the last one that did
        for i, sample in samples:
            rng = random.Random(seed_for("augment", self.seed, self.epoch, self.rank, logical, i))
            try:
                img, label = _open(sample)
                batch.append((self.transform(img, rng), label))
            except Exception as exn:  # a corrupt sample inside a sound tar
                handler.sample(f"{sample.get('__key__')} in {sample.get('__url__')}: {exn}")
                failing[sample.get("__url__")] += 1
                if failing.total() >= self.give_up_after:
                    raise LoaderError(self._give_up(failing, exn, logical)) from None
                continue
            failing.clear()
            if len(batch) == self.batch_size:
                yield self._collate(batch, handler.count - reported)
                reported, batch, done = handler.count, [], done + 1
                if done >= total:
                    return

    def _give_up(self, failing: Counter, exn: Exception, logical: int) -> str:
        names = [url for url, _ in failing.most_common(5)]
        more = f" and {len(failing) - len(names)} more" if len(failing) > len(names) else ""
        return (f"{failing.total()} samples in a row do not decode (rank {self.rank}, worker {logical}; last: {exn}) "
                f"in {', '.join(names)}{more}: check them with vitpipe verify")

    def _train_samples(self, logical: int, handler: _SkipCounter):
        """Shuffled samples for this (rank, worker), forever.

        Resampled: passes over *all* shards, each pass a fresh permutation (seeded by rank, worker and
        pass), so every shard is read once before any shard repeats; one shuffle buffer runs across
        the passes. Otherwise: passes over this worker's share of the (epoch-shuffled) shards, each
        pass shuffled and flushed on its own, so a whole pass comes out before any repeat (repeats
        only fill up a short worker's quota).
        """
        urls = self.shards.urls

        if self.resampled:
            def passes():
                for n in itertools.count():
                    order = list(urls)
                    random.Random(seed_for("resample", self.seed, self.epoch, self.rank, logical, n)).shuffle(order)
                    count = 0
                    for sample in self._read(order, handler, logical):
                        count += 1
                        yield sample
                    if not count:  # going round again would never end
                        raise LoaderError(f"no readable sample in any of the {len(urls)} shards "
                                          f"({', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''})")

            yield from shuffled(passes(), self.shuffle_buffer,
                                random.Random(seed_for("shuffle", self.seed, self.epoch, self.rank, logical)))
            return
        order = list(urls)
        random.Random(seed_for("shards", self.seed, self.epoch)).shuffle(order)  # the same on every rank
        mine = order[self.rank::self.world_size][logical::self.workers]
        for n in itertools.count():
            rng = random.Random(seed_for("shuffle", self.seed, self.epoch, self.rank, logical, n))
            count = 0
            for sample in shuffled(self._read(mine, handler, logical), self.shuffle_buffer, rng):
                count += 1
                yield sample
            if not count:  # going round again would never end
                raise LoaderError(f"no readable sample in {', '.join(mine)} (rank {self.rank}, worker {logical})")

    def _read(self, urls, handler: _SkipCounter, worker: int):
        return read_samples(urls, handler, self.shards.counts, self.stall_timeout,
                            f"rank {self.rank}, worker {worker}")

    def _eval_batches(self):
        w, workers = self._worker(), self.workers
        urls = self.shards.urls
        slot, slots = self.rank * workers + w, self.world_size * workers
        by_shard = len(urls) >= slots
        handler = _SkipCounter(shards=by_shard or slot == 0)  # every slot reads every shard when not by_shard
        mine = urls[self.rank::self.world_size][w::workers] if by_shard else urls
        samples = self._read(mine, handler, w)
        batch, reported = [], 0
        for i, sample in enumerate(samples):
            if not by_shard and i % slots != slot:
                continue
            try:
                img, label = _open(sample)
                batch.append((self.transform(img), label))
            except Exception as exn:
                handler.sample(f"{sample.get('__key__')} in {sample.get('__url__')}: {exn}")
                continue
            if len(batch) == self.batch_size:
                yield self._collate(batch, handler.count - reported)
                reported, batch = handler.count, []
        if batch or handler.count > reported:
            yield self._collate(batch, handler.count - reported)

    def _collate(self, batch, skipped: int) -> dict:
        if not batch:
            return {"pixel_values": torch.empty(0), "labels": torch.empty(0, dtype=torch.long),
                    "skipped": torch.tensor(skipped)}
        images, labels = zip(*batch)
        # default_collate stacks straight into shared memory inside a worker: no extra copy on the way out
        return {"pixel_values": default_collate(list(images)), "labels": torch.tensor(labels, dtype=torch.long),
                "skipped": torch.tensor(skipped)}


def make_loader(stream: ShardStream) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def train_loader(shards: ShardSet, transform, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0, seed: int = 0, epoch: int = 0, resampled: bool = False,
                 shuffle_buffer: int = 1000, skip_batches: int = 0, stall_timeout: float = 0) -> DataLoader:
    """``batch_size`` is per rank; every rank yields ``num_samples // (batch_size * world_size)`` batches."""
    stream = ShardStream(shards, transform, batch_size, train=True, rank=rank, world_size=world_size,
                         workers=workers, seed=seed, epoch=epoch, resampled=resampled,
                         shuffle_buffer=shuffle_buffer, skip_batches=skip_batches, stall_timeout=stall_timeout)
    return make_loader(stream)


def eval_loader(shards: ShardSet, transform, batch_size: int, *, rank: int = 0, world_size: int = 1,
                workers: int = 0, stall_timeout: float = 0) -> DataLoader:
    """Every sample exactly once across ranks and workers; ranks may get different batch counts."""
    return make_loader(ShardStream(shards, transform, batch_size, train=False, rank=rank,
                                   world_size=world_size, workers=workers, stall_timeout=stall_timeout))
