"""``vitpipe shard``: a corpus to webdataset tars plus ``index.json``, resumable and deterministic.

The layout (``index.json``: ``"format_version": 2, "layout": "fixed-ranges"``): the source lists its
inputs in a stable order, a seeded permutation shuffles them (unless ``shuffle=False``) so that every
shard of a class-folder corpus holds a mix of classes, and shard k holds the usable inputs at positions
[k*S, (k+1)*S) of that order (S = ``samples_per_shard``). A shard that loses skipped inputs comes out
short, one whose inputs are all skipped is not written, and ``max_shard_size`` cuts a shard into pieces
(``PREFIX-k.tar``, ``PREFIX-k-001.tar``, ...). A shard therefore depends on the source and the sharding
options only: ``--part K/N`` writes the whole shards of ranges [K*R/N, (K+1)*R/N) of R, a Ray task is one
part, and one run, N parts or a Ray job give the same bytes, ``index.json`` included. Workers only
encode; the main process writes samples in that order, so the shards do not depend on the workers.

Each shard is written to ``.tmp`` and renamed when complete (on an object store: staged locally and
uploaded whole, ``data_tools.store``); when a range's shards are in place the progress record
(``index.json`` for one run, ``index.part-K-of-N.json`` for a part), which records where in the
order the next range starts, is rewritten atomically: after a kill, a rerun continues from the last
complete range. The last part to complete merges the part records into ``index.json``.

Costs, for I inputs: listing the source holds its I records in memory (unavoidable: the order is a
permutation of all of them); the permutation is 4 bytes per input and is computed by every part (O(I)
time); the fingerprint of the listing is one O(I) pass with O(1) memory; nothing else is kept per input
beyond one range's skips (the index lists every skip). Each range rewrites its progress record, which
grows with the shards and skips written so far.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from itertools import islice

from tqdm import tqdm

from common.args import differing_keys
from common.errors import user_message
from common.lock import LOCK, FolderBusy
from common.redact import redact
from data_tools.images import BadImage, EncodeOptions, encode, short_error
from data_tools.index import INDEX, INDEX_FORMAT, INDEX_VERSION, LAYOUT
from data_tools.layout import (  # noqa: F401  (parse_*, parts_progress, read_index: callers import them from here)
    PART_LOCKS,
    ShardError,
    ShardOptions,
    input_order,
    lock_name,
    merge_parts,
    owned_by,
    parse_part,
    parse_size,
    part_positions,
    part_ranges,
    parts_progress,
    read_index,
    read_record,
    record_name,
    run_identity,
    shard_name,
    shard_set_index,
)
from data_tools.remote import RemoteFolder
from data_tools.sources import Corpus, Input, Unreadable, read_bytes, read_source, sample_key
from data_tools.store import LocalFolder, StoreError, shard_folder
from data_tools.tars import TarWriter, member_bytes, tar_bytes

_WORKER_CORPUS: Corpus | None = None
_WORKER_OPTS: EncodeOptions | None = None


def _init_worker(corpus: Corpus, opts: EncodeOptions) -> None:
    global _WORKER_CORPUS, _WORKER_OPTS
    _WORKER_CORPUS, _WORKER_OPTS = corpus, opts


def _encode_one(inp: Input):
    """Returns the Encoded image or the reason it is skipped."""
    if inp.skip:
        return inp.skip
    try:
        return encode(read_bytes(inp, _WORKER_CORPUS), _WORKER_OPTS)
    except (BadImage, Unreadable) as e:
        return str(e)
    except StoreError:  # the store itself is unusable (credentials, endpoint): every input would fail alike
        raise
    except OSError as e:
        return f"unreadable ({e.strerror or short_error(e)})"
    except Exception as e:  # what one input's bytes make a reader or PIL plugin raise skips that input, not the run
        return f"unreadable ({type(e).__name__}: {short_error(e)})"


def _fingerprint(inputs: list[Input]) -> str:
    """A hash of the listing, in the source's order: O(inputs) time, O(1) memory."""
    h = hashlib.sha256()
    for inp in inputs:
        h.update(f"{inp.source}\t{inp.label}\n".encode())
    return h.hexdigest()


def check_prefix(prefix: str) -> None:
    """Shards are written inside OUT: the prefix of their names is a name, not a path."""
    if not prefix or prefix in (".", "..") or "/" in prefix or "\\" in prefix or "\0" in prefix:
        raise ShardError(f"--prefix must be a plain file name (no '/', not '..', not absolute), got {prefix!r}")


def check_options(opts: ShardOptions, workers: int = 1) -> None:
    """Every number the CLI range-checks, checked again here for callers of the Python API; the prefix too."""
    check_prefix(opts.prefix)
    e = opts.encode
    at_least_one = {"--samples-per-shard": opts.samples_per_shard, "--workers": workers,
                    "--resize-shorter": e.resize_shorter, "--max-side": e.max_side, "--max-pixels": e.max_pixels}
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise ShardError(f"{flag} must be >= 1, got {value}")
    if not 1 <= e.quality <= 100:
        raise ShardError(f"--quality must be in [1, 100], got {e.quality}")
    if not 0 <= opts.shuffle_seed < 2**32:
        raise ShardError(f"--shuffle-seed must be in [0, 2**32), got {opts.shuffle_seed}")


def shard(src: str, out: str | os.PathLike, opts: ShardOptions = ShardOptions(), workers: int = 1,  # noqa: B008 (frozen)
          overwrite: bool = False, progress: bool = True, merge: bool = True) -> dict:
    """Shard ``src`` into ``out`` (a folder or an fsspec URL); returns ``index.json``, or a part's record.

    ``merge=False``: a part does not write ``index.json`` when it completes the set (a driver that runs
    every part merges once, itself).
    """
    check_options(opts, workers)
    folder = shard_folder(out)
    folder.prepare()
    corpus = read_source(src, opts.path_column, opts.label_column, opts.split, opts.allow_local_paths)
    k, n = opts.part
    with folder.writing("vitpipe shard" + (f" --part {k}/{n}" if n > 1 else ""), lock_name(opts)):
        _refuse_the_other_kind(folder, n > 1)
        return _shard_locked(src, corpus, folder, opts, workers, overwrite, progress, merge)


def _refuse_the_other_kind(folder, part: bool) -> None:
    """A whole run and ``--part`` runs never write one folder at once. Each takes its own lock first, then looks
    for the other kind's: of two starting together, at least one sees the other."""
    others = folder.holders(LOCK if part else PART_LOCKS)
    if others:
        this, that = ("a --part run", "a whole run") if part else ("a whole run", "--part runs")
        raise FolderBusy(f"{folder}: in use by {others[0]}; {this} and {that} cannot share a folder: wait for it to "
                         "finish or use another folder")


def _shard_locked(src, corpus, folder, opts, workers, overwrite, progress, merge) -> dict:
    identity, fingerprint = run_identity(src, opts), _fingerprint(corpus.inputs)
    whole = None if overwrite else read_record(folder, INDEX)
    if _is_the_set(whole, identity, fingerprint):
        _check_listed_shards(folder, whole, INDEX)  # the set is there (one run's, or merged parts'): nothing to do
        return whole
    index_name = record_name(opts)
    index = whole if index_name == INDEX else None if overwrite else read_record(folder, index_name)
    if index is not None:
        _check_progress(folder.where(index_name), index, identity, fingerprint)
        _check_listed_shards(folder, index, index_name)
    owned = owned_by(opts, len(corpus.inputs))
    if index is None:
        if overwrite:
            for name in folder.sizes(f"{opts.prefix}-*.tar"):
                if owned(name):
                    folder.remove(name)
            folder.remove(index_name)
        index = _new_progress(corpus, identity, fingerprint, opts)
    folder.clean_partial(f"{opts.prefix}-*.tar", owned)  # left by a killed run of this part
    if not index["complete"]:
        index = _write_shards(corpus, folder, index, index_name, opts, workers, progress)
    if opts.part[1] > 1 and merge:
        merge_parts(folder)
    return index


def complete_set(folder, src: str, opts: ShardOptions, inputs: list[Input]) -> dict | None:
    """``index.json`` when the folder holds the complete shard set these arguments and inputs make (written by
    any engine, with any number of parts), its listed shards all there; else None."""
    whole = read_record(folder, INDEX)
    if not _is_the_set(whole, run_identity(src, opts), _fingerprint(inputs)):
        return None
    _check_listed_shards(folder, whole, INDEX)
    return whole


def _is_the_set(index: dict | None, identity: dict, fingerprint: str) -> bool:
    """A complete ``index.json`` of this layout, these arguments and this listing."""
    return (index is not None and index.get("complete") is True and index.get("format_version") == INDEX_VERSION
            and index.get("args") == identity and index.get("input_fingerprint") == fingerprint)


def _check_progress(path: str, index: dict, identity: dict, fingerprint: str) -> None:
    """A progress record a rerun may continue: this layout, these arguments, this listing."""
    if index.get("format_version") != INDEX_VERSION:
        raise ShardError(f"{path}: shards of an earlier layout (format_version {index.get('format_version')}), "
                         "whose boundaries followed the parts; they still read, but cannot be continued: "
                         "use --overwrite to reshard, or another OUT")
    if index.get("args") != identity:
        diff = differing_keys(identity, index.get("args", {}))
        raise ShardError(f"{path}: shards there were made with different arguments ({', '.join(diff)}); "
                         "use --overwrite to start over or another OUT")
    if index.get("input_fingerprint") != fingerprint:
        raise ShardError(f"{path}: the source's list of inputs changed since these shards were made; "
                         "use --overwrite to start over")


def _new_progress(corpus: Corpus, identity: dict, fingerprint: str, opts: ShardOptions) -> dict:
    first, end = part_ranges(len(corpus.inputs), opts)
    return {
        "format": INDEX_FORMAT, "format_version": INDEX_VERSION, "layout": LAYOUT, "complete": False,
        "args": identity, "input_fingerprint": fingerprint, "inputs": len(corpus.inputs),
        "part": f"{opts.part[0]}/{opts.part[1]}", "ranges": [first, end],
        "next_input": part_positions(len(corpus.inputs), opts)[0],
        "classes": corpus.classes, "total_samples": 0, "class_counts": {}, "shards": [], "skipped": [],
    }


def _check_listed_shards(folder, index: dict, index_name: str) -> None:
    """Every shard the index lists is there, whole; shards it does not list are redone (and replaced)."""
    present = folder.sizes(f"{index['args']['prefix']}-*.tar")
    for s in index["shards"]:
        if present.get(s["name"]) != s["bytes"]:
            found = "missing" if s["name"] not in present else f"{present[s['name']]} bytes, not {s['bytes']}"
            raise ShardError(f"{folder.where(s['name'])}: listed in {index_name} but {found}; "
                             "use --overwrite to start over")


def _write_shards(corpus, folder, index, index_name, opts, workers, progress) -> dict:
    """Write the ranges from ``index["next_input"]`` to the part's end; returns the completed index."""
    lo, hi = part_positions(len(corpus.inputs), opts)
    start, size = index["next_input"], opts.samples_per_shard
    order = input_order(len(corpus.inputs), opts)
    todo = (corpus.inputs[order[p]] for p in range(start, hi))  # lazily: no copy of the part's records
    bar = tqdm(total=hi - lo, initial=start - lo, unit="img", desc=f"shard {folder.name}", disable=not progress)
    pool = None
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(corpus, opts.encode))
        results = _in_order(pool, todo, window=64 * workers)
    else:
        _init_worker(corpus, opts.encode)
        results = ((inp, _encode_one(inp)) for inp in todo)
    writer = _ShardWriter(folder, opts, index, index_name)
    try:
        for pos, (inp, result) in zip(range(start, hi), results):
            if pos > start and pos % size == 0:
                writer.end_range(pos)
            if isinstance(result, str):
                writer.skip(pos, inp, result)
            else:
                writer.add(pos, inp, result, corpus.classes)
            bar.update(1)
        if hi > start:
            writer.end_range(hi)
        return writer.finish()
    except (OSError, StoreError) as e:  # disk full, permission denied, endpoint gone: complete shards stay
        what = "cannot write shards" if isinstance(e, OSError) else "stopped"
        raise ShardError(f"{folder}: {what} ({user_message(e)}); the complete shards and the index are kept: "
                         "rerun the same command to continue") from None
    finally:
        writer.abort()
        bar.close()
        if pool is not None:
            pool.terminate()


def _in_order(pool, todo, window: int):
    """(input, encoded) pairs in input order, encoded in parallel; at most two windows of images in memory."""
    todo, pending = iter(todo), None
    while chunk := list(islice(todo, window)):
        upcoming = (chunk, pool.map_async(_encode_one, chunk, chunksize=4))
        if pending is not None:
            yield from zip(pending[0], pending[1].get())
        pending = upcoming
    if pending is not None:
        yield from zip(pending[0], pending[1].get())


class _ShardWriter:
    """Writes one range at a time: its pieces as they fill, then its entries and skips into the progress record."""

    def __init__(self, folder: LocalFolder | RemoteFolder, opts: ShardOptions, index: dict, index_name: str):
        self.folder, self.opts, self.index, self.index_name = folder, opts, index, index_name
        self.tar = self.file = self.name = None
        self.count = self.payload = self.first_input = 0
        self.entries: list[dict] = []  # the open range's complete pieces
        self.skips: list[dict] = []  # the open range's skipped inputs
        self.classes: Counter = Counter()

    def _open(self, pos: int) -> None:
        k, piece = pos // self.opts.samples_per_shard, len(self.entries)
        self.name = shard_name(self.opts.prefix, k, piece)
        self.first_input = k * self.opts.samples_per_shard if piece == 0 else pos
        self.file = self.folder.open_shard(self.name)
        self.tar = TarWriter(self.file)
        self.count = self.payload = 0
        self.classes = Counter()

    def add(self, pos: int, inp: Input, enc, classes) -> None:
        meta = {"source": redact(inp.source), "width": enc.width, "height": enc.height}
        sample = {enc.ext: enc.data}
        if inp.label is not None:
            sample["cls"] = str(inp.label).encode()
            meta["label"] = classes[inp.label] if classes and inp.label < len(classes) else str(inp.label)
        sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()
        size = member_bytes(len(v) for v in sample.values())
        limit = self.opts.max_shard_size
        if self.tar is not None and limit and tar_bytes(self.payload + size) > limit:
            self._close(pos)
        if self.tar is None:
            self._open(pos)
        self.tar.write(sample_key(inp.source), sample)
        self.count += 1
        self.payload += size
        if inp.label is not None:
            self.classes[str(inp.label)] += 1

    def skip(self, pos: int, inp: Input, reason: str) -> None:
        self.skips.append({"input": pos, "source": redact(inp.source), "reason": redact(reason)})

    def _close(self, next_input: int) -> None:
        """Complete the open piece: move (upload) it into place; the range's end records it."""
        self.tar.close()
        self.folder.commit_shard(self.name, self.file)
        self.entries.append({
            "name": self.name, "range": self.first_input // self.opts.samples_per_shard,
            "inputs": [self.first_input, next_input], "count": self.count, "bytes": self.tar.size,
            "sha256": self.tar.sha.hexdigest(),
            "class_counts": {k: v for k, v in sorted(self.classes.items(), key=lambda kv: int(kv[0])) if v},
        })
        self.tar = None

    def end_range(self, end: int) -> None:
        """The range before ``end`` is done: record its shards and skips (an all-skipped range has no shard)."""
        if self.tar is not None:
            self._close(end)
        idx = self.index
        idx["shards"] += self.entries
        idx["skipped"] += self.skips
        self.entries, self.skips = [], []
        idx["next_input"] = end
        idx["total_samples"] = sum(s["count"] for s in idx["shards"])
        totals: Counter = Counter()
        for s in idx["shards"]:
            totals.update(s["class_counts"])
        idx["class_counts"] = {k: totals[k] for k in sorted(totals, key=int)}
        self.folder.write_json(self.index_name, idx)

    def finish(self) -> dict:
        """Mark the run complete; one run of all parts writes ``index.json`` in its final form."""
        self.index["complete"] = True
        done = self.index if self.index_name != INDEX else shard_set_index([self.index])
        self.folder.write_json(self.index_name, done)
        self.folder.flush()  # an object store's last uploads: their errors belong to this run
        return done

    def abort(self) -> None:
        if self.tar is not None:
            self.folder.discard_shard(self.name, self.file)
            self.tar = None
