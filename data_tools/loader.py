"""The streaming loader: webdataset shards to batches, split by node then by worker.

Training streams are deterministic functions of (seed, epoch, rank, worker): shard order, the
shuffle buffer and every sample's augmentation. Every rank yields the same number of batches
per epoch (a worker that runs out of shards goes round them again; resampled mode goes round
all shards, in a fresh order each pass), so no rank waits on another at a collective. A resumed run
goes on from each worker's saved state (``WorkerStream``): it reads the buffered samples back by
position and its shards from where it was, nothing before. Eval streams read every sample exactly
once across ranks and workers.

Do not hand these loaders to ``accelerator.prepare``: they split by rank themselves.
"""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import os
import random
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import Pipe

from common.errors import VitpipeError
from common.redact import redact
from common.seeding import seed_for
from data_tools import store
from data_tools.index import parse_index
from data_tools.positions import epoch_pieces, resampled_pieces, shard_names
from data_tools.shard import parts_progress
from data_tools.stall import StalledRead, watched
from data_tools.tars import ForeignTar, HashingReader, image_bytes, read_tar
from data_tools.transforms import BatchBuilder

log = logging.getLogger(__name__)


class LoaderError(VitpipeError, ValueError):
    """The shards cannot feed this run; said before training starts."""


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    num_samples: int
    classes: list[str] | None = None
    counts: dict[str, int] | None = None  # url -> samples index.json lists: what a damaged shard lost
    digests: dict[str, str] | None = None  # url -> sha256 index.json lists: a replaced shard is caught, a
    # resumed position is checked against them

    def describe(self) -> dict:
        """What a saved stream position refers to (see ``positions.shard_set_changes``)."""
        return {"names": shard_names(self.urls),
                "counts": [self.counts.get(u) for u in self.urls] if self.counts else None,
                "digests": [self.digests.get(u) for u in self.urls] if self.digests else None}


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
        with store.errors_for(str(spec)):
            parts = parts_progress(folder)
        raise LoaderError(f"{spec}: no index.json " + (f"yet: a --part K/N run is there ({parts[0]})" if parts else
                                                       "(shard it with vitpipe shard, or list the tars)"))
    index = parse_index(text, index_path)
    if not index.get("complete", False):
        raise LoaderError(f"{index_path}: sharding did not finish")
    if not index["shards"]:
        raise LoaderError(f"{index_path}: no shards (every input was skipped?)")
    urls = [folder.where(store.listed_shard(s["name"], index_path)) for s in index["shards"]]
    if isinstance(folder, store.LocalFolder):
        for url in urls:
            store.check_regular(url)
    return ShardSet(urls, index["total_samples"] if num_samples is None else num_samples, index.get("classes"),
                    {u: s["count"] for u, s in zip(urls, index["shards"])},
                    {u: s["sha256"] for u, s in zip(urls, index["shards"])})


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
        if not p.exists():
            raise LoaderError(f"{p}: shard does not exist")
        store.check_regular(p)
    classes = shard_counts = digests = None
    if len(local) == len(urls):
        parents = {p.parent for p in local}
        index_path = parents.pop() / "index.json" if len(parents) == 1 else None
        if index_path and index_path.is_file():
            index = parse_index(index_path.read_text(), str(index_path))
            counts = {s["name"]: s["count"] for s in index["shards"]}
            if all(p.name in counts for p in local):
                shard_counts = {u: counts[p.name] for u, p in zip(urls, local)}
                sha = {s["name"]: s["sha256"] for s in index["shards"]}
                digests = {u: sha[p.name] for u, p in zip(urls, local)}
                num_samples = sum(shard_counts.values()) if num_samples is None else num_samples
                classes = index.get("classes")
    if num_samples is None:
        raise LoaderError(f"{spec}: epoch length unknown; give a folder with index.json or set num_samples")
    return ShardSet(urls, num_samples, classes, shard_counts, digests)


_WDS_SCHEMES = ("http", "https")  # webdataset opens these (curl) and pipe: commands; fsspec the other URLs


def seekable(url: str) -> bool:
    """Whether a shard can be read from a byte offset (a local file, an fsspec URL), not only from its start."""
    return not url.startswith("pipe:") and store.scheme(url) not in _WDS_SCHEMES


def _open_stream(url: str, start: int = 0):
    """A local file, or an fsspec URL streamed with ranged reads, standing at byte ``start``."""
    f = store.open_url(url) if store.is_url(url) else store.open_regular(url)
    if start:
        f.seek(start)
    return f


RANGE_GAP = 1 << 18  # an object store's request costs about this many bytes of transfer: nearer spans share one GET


def read_spans(url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes ``start:end`` of one shard for each span: seeks in a local file; on an object store ranged GETs,
    concurrent, spans less than ``RANGE_GAP`` apart sharing one."""
    if not store.is_url(url):
        blobs = []
        with store.open_regular(url) as f:
            for start, end in spans:
                f.seek(start)
                blobs.append(f.read(end - start))
        return blobs
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] <= RANGE_GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    fs, path = store.filesystem(url)
    with store.remote_errors(url):
        got = fs.cat_ranges([path] * len(merged), [s for s, _ in merged], [e for _, e in merged])
    for blob in got:
        if isinstance(blob, Exception):
            with store.remote_errors(url):
                raise blob
    starts = [s for s, _ in merged]
    blobs = []
    for start, end in spans:
        i = bisect.bisect_right(starts, start) - 1
        blobs.append(got[i][start - starts[i]:end - starts[i]])
    return blobs


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


def read_samples(urls, handler: _SkipCounter, counts: dict[str, int] | None = None,
                 digests: dict[str, str] | None = None, stall_timeout: float = 0, where: str = "rank 0, worker 0"):
    """Samples from a stream of shard urls (see ``read_shard``)."""
    for url in urls:
        yield from read_shard(url, handler, counts.get(url) if counts else None,
                              digests.get(url) if digests else None, stall_timeout=stall_timeout, where=where)


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


def read_shard(url: str, handler: _SkipCounter, expected: int | None = None, digest: str | None = None,
               start: int = 0, first: int = 0, stall_timeout: float = 0, where: str = "rank 0, worker 0"):
    """The samples of one shard from byte ``start`` (where its sample number ``first`` begins) on. A damaged
    shard is read as far as it goes, and what it lost goes to ``handler``: the samples ``expected`` (index.json's
    count) beyond those read, else one per error. A shard read from its start to its end whose sha256 is not
    ``digest`` (index.json's) was replaced by another tar: a LoaderError. The hash is taken of the bytes as they are
    read (nothing is read twice): its cost grows with the bytes read, about 3% of decoding the same JPEGs (README,
    Reliability); a shard resumed from an offset is not hashed (its start is not read). A shard that yields no
    sample for ``stall_timeout`` seconds (0: no limit) raises ``StalledRead`` naming it and ``where``."""
    errors: list[Exception] = []
    yielded = first
    foreign = not seekable(url) or not url.endswith(".tar")
    if foreign and seekable(url) and not store.is_url(url):
        store.check_regular(url)  # webdataset would open a FIFO and wait
    def native():
        with _open_stream(url, start) as f:
            stream = HashingReader(f)
            yield from read_tar(url, stream, start)
            if start == 0:
                stream.drain()
                _check_digest(url, stream, digest)

    if not foreign:
        try:
            for sample in watched(native(), stall_timeout, f"{url} ({where})"):
                yielded += 1
                yield sample
        except ForeignTar:
            foreign = True
        except Exception as exn:  # a damaged tar, a missing file, a store that stopped answering
            if not (isinstance(exn, tarfile.TarError) or store.is_client_error(exn)):
                raise
            if store.is_timeout(exn):  # not damage: the next shard would wait as long, and the next
                raise LoaderError(f"{url}: {store.describe(exn)}{store.stall_hint(exn)}") from None
            errors.append(exn)
    if foreign:
        samples = watched(_foreign_samples(url, partial(_keep_error, errors)), stall_timeout, f"{url} ({where})")
        for sample in itertools.islice(samples, yielded, None):
            yielded += 1
            yield sample
    lost = len(errors) if expected is None else max(0, expected - yielded)
    if lost or errors:
        handler.shard(url, lost, f"{errors[0]}" if errors else f"index.json lists {expected}")


def _check_digest(url: str, stream: HashingReader, digest: str | None) -> None:
    if digest and stream.sha.hexdigest() != digest:
        raise LoaderError(f"{url}: reads as a whole tar but its sha256 is not the one index.json lists: another "
                          "file replaced it (vitpipe verify checks every shard); stopping rather than using it")


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
            log.warning("%s: damaged shard, %d sample(s) lost (%s)", redact(url), lost, redact(why))

    def sample(self, what: str) -> None:
        self.count += 1
        self.undecodable += 1
        if self.undecodable <= self.examples:
            log.warning("skipping a sample that does not decode: %s", redact(what))
        elif self.undecodable % self.every == 0:
            log.warning("%d samples that do not decode skipped so far (latest: %s)", self.undecodable, redact(what))


def _open(sample: dict) -> tuple:
    """The image, opened but not decoded (the transform decodes only what it needs), and the label."""
    data = image_bytes(sample)
    if data is None:
        raise ValueError("no image member")
    label = int(sample["cls"]) if "cls" in sample else -1
    return Image.open(io.BytesIO(data)), label


def load_refs(urls: list[str], refs: list[list[int]]) -> list[dict]:
    """Samples read back alone from their references ``[shard, start, end]``, in the order given: one ranged
    read each (grouped by shard), nothing else of the shard."""
    by_shard = defaultdict(list)
    for n, ref in enumerate(refs):
        by_shard[ref[0]].append((n, ref))
    samples: list = [None] * len(refs)
    for k, items in by_shard.items():
        url = urls[k]
        for (n, (_, start, end)), blob in zip(items, read_spans(url, [(r[1], r[2]) for _, r in items])):
            # two zero blocks end the archive: the sample is complete, not cut
            sample = next(read_tar(url, io.BytesIO(blob + bytes(2 * tarfile.BLOCKSIZE)), start), None)
            if sample is None or sample["__end__"] != end:
                raise LoaderError(f"{url}: no sample at bytes {start}-{end}; the shard changed since the checkpoint")
            samples[n] = sample
    return samples


class WorkerStream:
    """The shuffled training samples of one (rank, logical worker), forever. After any sample it gave, ``state()``
    says where it is in a few integers plus its shuffle buffer as sample references, and a stream made from that
    state goes on with the same samples in the same order, reading only the buffered samples (ranged reads)
    and its shards from the position on.

    It reads ``pieces`` (``positions``), pass after pass. Epoch mode: each pass is shuffled and flushed on
    its own, so a whole pass comes out before any repeat. Resampled: one buffer across the passes. The
    buffer swaps the ``t``-th incoming sample into slot ``seed_for(*key, t) % buffer``: a counter, not a
    generator's state, so the state stays small.
    """

    def __init__(self, shards: ShardSet, pieces_of, buffer: int, key: tuple, resampled: bool, handler: _SkipCounter,
                 state: dict | None = None, who: str = "", stall_timeout: float = 0):
        self.urls, self.pieces_of, self.buffer, self.key = shards.urls, pieces_of, buffer, tuple(key)
        self.counts, self.digests = shards.counts, shards.digests
        self.resampled, self.handler, self.who, self.stall_timeout = resampled, handler, who, stall_timeout
        s = state or {}
        self.explicit = s.get("pieces")  # a re-dealt share of an epoch (elastic resume), the same every pass
        if self.explicit is not None:
            self.key = tuple(s["key"])
        self.pass_, self.piece, self.taken = s.get("pass", 0), s.get("piece", 0), s.get("taken", 0)
        self.start, self.index = s.get("start", 0), s.get("index", 0)  # inside the piece, once something is taken
        self.drawn, self.given, self.read = s.get("drawn", 0), s.get("given", 0), s.get("read", 0)
        self.flushing = s.get("flushing", False)
        self.pool_refs, self.pool = s.get("pool", []), []

    def pieces(self) -> list[dict]:
        return self.explicit if self.explicit is not None else self.pieces_of(self.pass_)

    def state(self) -> dict | None:
        """Where the stream is (JSON); None when a buffered sample or the shard in flight cannot be read back by
        position (a pipe:, an http URL, a tar only webdataset reads)."""
        refs = [sample.get("__ref__") for sample in self.pool]
        if None in refs or (self.taken and self.start is None):
            return None
        state = {"pass": self.pass_, "piece": self.piece, "taken": self.taken, "start": self.start,
                 "index": self.index, "drawn": self.drawn, "given": self.given, "read": self.read,
                 "flushing": self.flushing, "pool": refs}
        if self.explicit is not None:
            state.update(pieces=self.explicit, key=list(self.key))
        return state

    def __iter__(self):
        self.pool = load_refs(self.urls, self.pool_refs)
        for sample, ref in zip(self.pool, self.pool_refs):
            sample["__ref__"] = ref
        while True:
            if self.flushing:
                while self.pool:
                    self.given += 1
                    yield self.pool.pop()
                self.flushing = False
                self._next_pass()
            for sample in self._read_pass():
                self.read += 1
                if len(self.pool) < self.buffer:
                    self.pool.append(sample)
                    continue
                j = seed_for(*self.key, self.pass_ if not self.resampled else 0, self.drawn) % self.buffer
                self.drawn += 1
                self.pool[j], sample = sample, self.pool[j]
                self.given += 1
                yield sample
            if not self.read:  # going round again would never end
                raise LoaderError(self._nothing_readable())
            if self.resampled:
                self._next_pass()
                continue
            random.Random(seed_for(*self.key, self.pass_, "flush")).shuffle(self.pool)
            self.flushing = True

    def _next_pass(self) -> None:
        self.pass_, self.piece, self.taken, self.read = self.pass_ + 1, 0, 0, 0
        if not self.resampled:
            self.drawn = 0

    def _nothing_readable(self) -> str:
        urls = [self.urls[k] for k in sorted({p["shard"] for p in self.pieces() if "shard" in p})]
        if self.resampled:
            return f"no readable sample in any of the {len(urls)} shards ({', '.join(urls[:3])}" \
                   f"{', ...' if len(urls) > 3 else ''})"
        return f"no readable sample in {', '.join(urls)} ({self.who})"

    def _read_pass(self):
        pieces = self.pieces()
        while self.piece < len(pieces):
            piece = pieces[self.piece]
            yield from self._read_refs(piece) if "refs" in piece else self._read_piece(piece)
            self.piece, self.taken = self.piece + 1, 0

    def _read_refs(self, piece: dict):
        refs = piece["refs"][self.taken:]
        for sample, ref in zip(load_refs(self.urls, refs), refs):
            sample["__ref__"] = ref
            self.taken += 1
            yield sample

    def _read_piece(self, piece: dict):
        k, take = piece["shard"], piece["take"]
        url = self.urls[k]
        if self.taken:  # resumed inside this piece
            start, index, skip = self.start, self.index, 0
            take = None if take is None else take - self.taken
        else:
            start, index, skip = piece["start"], piece["index"], piece["skip"]
        if take == 0:
            return
        expected = self.counts.get(url) if self.counts and take is None else None
        digest = self.digests.get(url) if self.digests else None
        for n, sample in enumerate(read_shard(url, self.handler, expected, digest, start, index, self.stall_timeout,
                                              self.who), 1):
            if n <= skip:
                continue
            self.start, self.index = sample.get("__end__"), index + n
            sample["__ref__"] = [k, sample["__start__"], sample["__end__"]] if "__start__" in sample else None
            self.taken += 1
            yield sample
            if take is not None and n - skip >= take:
                return


class ShardStream(IterableDataset):
    """One epoch of batches for one rank. Use ``train_loader`` / ``eval_loader`` to build it."""

    def __init__(self, shards: ShardSet, transform, batch_size: int, *, train: bool, rank: int = 0,
                 world_size: int = 1, workers: int = 0, seed: int = 0, epoch: int = 0, resampled: bool = False,
                 shuffle_buffer: int = 1000, skip_batches: int = 0, resume: dict | None = None,
                 stall_timeout: float = 0):
        super().__init__()
        self.stall_timeout = stall_timeout
        self.shards, self.transform, self.batch_size, self.train = shards, transform, batch_size, train
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.workers = workers, max(1, workers)  # 0: load in the main process
        self.seed, self.epoch, self.resampled, self.shuffle_buffer = seed, epoch, resampled, shuffle_buffer
        # resuming at batch ``skip_batches``: ``resume`` maps a logical worker ("0", ...) to its stream's state after
        # its last batch (WorkerStream.state; absent: it starts afresh, None: it replays its batches); None: all replay
        self.skip_batches, self.resume = skip_batches, resume
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
        if done >= total:  # resumed after this worker's last batch of the epoch
            return
        handler = _SkipCounter()
        replay = self.resume is None or self.resume.get(str(logical), {}) is None
        stream = self._worker_stream(logical, handler, None if replay else self.resume.get(str(logical)))
        # a replay forms the batches before the resume point again and drops them: a sample that did not decode
        # was in none of them, so counting raw samples would shift every batch after it
        replayed, done = (done, 0) if replay else (0, done)
        batch, keys, reported = BatchBuilder(self.batch_size), [], handler.count
        failing: Counter = Counter()  # shard -> samples that did not decode since the last one that did
        for sample in stream:
            rng = random.Random(seed_for("augment", self.seed, self.epoch, self.rank, logical, stream.given - 1))
            try:
                img, label = _open(sample)
                batch.add(self.transform(img, rng), label)
            except Exception as exn:  # a corrupt sample inside a sound tar
                handler.sample(f"{sample.get('__key__')} in {sample.get('__url__')}: {exn}")
                failing[sample.get("__url__")] += 1
                if failing.total() >= self.give_up_after:
                    raise LoaderError(self._give_up(failing, exn, logical)) from None
                continue
            failing.clear()
            keys.append(f"{shard_names([sample['__url__']])[0]}/{sample['__key__']}")
            if len(batch) == self.batch_size:
                out = batch.take(handler.count - reported)
                out["keys"], out["stream"] = keys, {"worker": logical, "state": stream.state()}
                reported, keys, done = handler.count, [], done + 1
                if done > replayed:  # what was lost before the resume point was reported with the batches before it
                    yield out
                if done >= total:
                    return

    def _give_up(self, failing: Counter, exn: Exception, logical: int) -> str:
        names = [url for url, _ in failing.most_common(5)]
        more = f" and {len(failing) - len(names)} more" if len(failing) > len(names) else ""
        return (f"{failing.total()} samples in a row do not decode (rank {self.rank}, worker {logical}; last: {exn}) "
                f"in {', '.join(names)}{more}: check them with vitpipe verify")

    def _worker_stream(self, logical: int, handler: _SkipCounter, state: dict | None) -> WorkerStream:
        """Shuffled samples for this (rank, worker), forever, from ``state`` (None: the epoch's start).

        Resampled: passes over *all* shards, each pass a fresh permutation (seeded by rank, worker and
        pass), so every shard is read once before any shard repeats; one shuffle buffer runs across
        the passes. Otherwise: passes over this worker's share of the (epoch-shuffled) shards, each
        pass shuffled and flushed on its own, so a whole pass comes out before any repeat (repeats
        only fill up a short worker's quota).
        """
        n = len(self.shards.urls)
        if self.resampled:
            def pieces_of(p):
                return resampled_pieces(n, self.seed, self.epoch, self.rank, logical, p)
        else:
            mine = epoch_pieces(n, self.seed, self.epoch, self.rank, self.world_size, logical, self.workers)

            def pieces_of(p):
                return mine
        return WorkerStream(self.shards, pieces_of, self.shuffle_buffer,
                            ("shuffle", self.seed, self.epoch, self.rank, logical), self.resampled, handler, state,
                            f"rank {self.rank}, worker {logical}", self.stall_timeout)

    def _eval_batches(self):
        w, workers = self._worker(), self.workers
        urls = self.shards.urls
        slot, slots = self.rank * workers + w, self.world_size * workers
        by_shard = len(urls) >= slots
        handler = _SkipCounter(shards=by_shard or slot == 0)  # every slot reads every shard when not by_shard
        mine = urls[self.rank::self.world_size][w::workers] if by_shard else urls
        samples = read_samples(mine, handler, self.shards.counts, self.shards.digests, self.stall_timeout,
                               f"rank {self.rank}, worker {w}")
        batch, reported = BatchBuilder(self.batch_size), 0
        for i, sample in enumerate(samples):
            if not by_shard and i % slots != slot:
                continue
            try:
                img, label = _open(sample)
                batch.add(self.transform(img), label)
            except Exception as exn:
                handler.sample(f"{sample.get('__key__')} in {sample.get('__url__')}: {exn}")
                continue
            if len(batch) == self.batch_size:
                yield batch.take(handler.count - reported)
                reported = handler.count
        if len(batch) or handler.count > reported:
            yield batch.take(handler.count - reported)


def make_loader(stream: ShardStream, worker_init_fn=None) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers, worker_init_fn=worker_init_fn,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A training worker leaves its rank's process group: the training process stops at the end of its step on
    SIGTERM or SIGINT (a preemption notice) and needs its workers until then, but ``accelerate launch``
    (torchrun) and a terminal's Ctrl-C signal the whole group, and torch's worker dies on it. The rank can
    still end its workers (torch's shutdown), and they end with it."""
    os.setpgrp()


def train_loader(shards: ShardSet, transform, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 workers: int = 0, seed: int = 0, epoch: int = 0, resampled: bool = False,
                 shuffle_buffer: int = 1000, skip_batches: int = 0, resume: dict | None = None,
                 stall_timeout: float = 0) -> DataLoader:
    """``batch_size`` is per rank; every rank yields ``num_samples // (batch_size * world_size)`` batches.

    Each batch carries, beside the tensors, ``keys`` (``shard name/sample key`` of its samples) and ``stream``
    (its logical worker and that worker's state after it: what ``resume`` takes to go on from there)."""
    stream = ShardStream(shards, transform, batch_size, train=True, rank=rank, world_size=world_size,
                         workers=workers, seed=seed, epoch=epoch, resampled=resampled,
                         shuffle_buffer=shuffle_buffer, skip_batches=skip_batches, resume=resume,
                         stall_timeout=stall_timeout)
    return make_loader(stream, leave_stop_signals_to_the_trainer)


def eval_loader(shards: ShardSet, transform, batch_size: int, *, rank: int = 0, world_size: int = 1,
                workers: int = 0, stall_timeout: float = 0) -> DataLoader:
    """Every sample exactly once across ranks and workers; ranks may get different batch counts. A shard that
    yields no sample for ``stall_timeout`` seconds (0: no limit) raises ``StalledRead`` naming it."""
    return make_loader(ShardStream(shards, transform, batch_size, train=False, rank=rank,
                                   world_size=world_size, workers=workers, stall_timeout=stall_timeout))
