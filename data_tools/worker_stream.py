"""One (rank, logical worker)'s shuffled training samples, forever, and where it stands in a few integers."""

from __future__ import annotations

import random

from common.seeding import seed_for
from data_tools import reading
from data_tools.reading import _SkipCounter
from data_tools.shardset import LoaderError, ShardSet


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
        self.pool = reading.load_refs(self.urls, self.pool_refs)
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
        for sample, ref in zip(reading.load_refs(self.urls, refs), refs):
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
        for n, sample in enumerate(reading.read_shard(url, self.handler, expected, digest, start, index, self.stall_timeout,
                                              self.who), 1):
            if n <= skip:
                continue
            self.start, self.index = sample.get("__end__"), index + n
            sample["__ref__"] = [k, sample["__start__"], sample["__end__"]] if "__start__" in sample else None
            self.taken += 1
            yield sample
            if take is not None and n - skip >= take:
                return
