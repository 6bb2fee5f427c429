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

import os
import random
import signal
from collections import Counter

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.seeding import seed_for
from data_tools.positions import epoch_pieces, resampled_pieces, shard_names
from data_tools.reading import _open, _SkipCounter, read_samples
from data_tools.shardset import LoaderError, ShardSet, resolve_shards
from data_tools.transforms import BatchBuilder
from data_tools.worker_stream import WorkerStream

__all__ = ["LoaderError", "ShardSet", "ShardStream", "WorkerStream", "eval_loader", "make_loader", "resolve_shards",
           "train_loader"]


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


def make_loader(stream: ShardStream) -> DataLoader:
    return WorkersOwnGroup(stream, batch_size=None, num_workers=stream.num_workers, persistent_workers=False,
                           worker_init_fn=leave_stop_signals_to_the_trainer, pin_memory=torch.cuda.is_available())


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class WorkersOwnGroup(DataLoader):
    """Starts its workers with the stop signals blocked, so that none reaches a worker before it has left the
    rank's process group (``leave_stop_signals_to_the_trainer``); the rank gets a signal sent meanwhile when
    they are started."""

    def __iter__(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker leaves its rank's process group: the training process stops at the end of its step on
    SIGTERM or SIGINT (a preemption notice) and needs its workers until then, but ``accelerate launch``
    (torchrun) and a terminal's Ctrl-C signal the whole group, and torch's worker dies on it. The rank can
    still end its workers (torch's shutdown), and they end with it. The worker starts with the signals blocked
    (``WorkersOwnGroup``); one the group got before it left is dropped (ignoring a pending signal discards it)."""
    os.setpgrp()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)


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
    return make_loader(stream)


def eval_loader(shards: ShardSet, transform, batch_size: int, *, rank: int = 0, world_size: int = 1,
                workers: int = 0, stall_timeout: float = 0) -> DataLoader:
    """Every sample exactly once across ranks and workers; ranks may get different batch counts. A shard that
    yields no sample for ``stall_timeout`` seconds (0: no limit) raises ``StalledRead`` naming it."""
    return make_loader(ShardStream(shards, transform, batch_size, train=False, rank=rank,
                                   world_size=world_size, workers=workers, stall_timeout=stall_timeout))
