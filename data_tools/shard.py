"""``vitpipe shard``: a corpus to webdataset tars plus ``index.json``, resumable and deterministic.

The inputs are shuffled (a seeded permutation, unless ``shuffle=False``) so that every shard of
a class-folder corpus holds a mix of classes; ``--part K/N`` splits the shuffled order. Workers
only encode; the main process writes samples in that order, so the shards do not depend on the
number of workers. Each shard is written to ``.tmp`` and renamed when complete (on an object
store: staged locally and uploaded whole, ``data_tools.store``), then the index (which records
where in the input list the next shard starts) is rewritten atomically: after a kill, a rerun
continues from the last complete shard the index lists.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from common.errors import VitpipeError, user_message
from common.lock import LOCK
from common.redact import redact
from data_tools.images import BadImage, EncodeOptions, encode, short_error
from data_tools.index import INDEX, INDEX_FORMAT, INDEX_VERSION, parse_index
from data_tools.sources import Corpus, Input, Unreadable, read_bytes, read_source, sample_key
from data_tools.store import LocalFolder, RemoteFolder, StoreError, shard_folder
from data_tools.tars import TarWriter, member_bytes, tar_bytes


class ShardError(VitpipeError, ValueError):
    """Bad arguments or an output folder in a state we must not touch; one line for the user."""


@dataclass(frozen=True)
class ShardOptions:
    samples_per_shard: int = 1000
    max_shard_size: int | None = None
    prefix: str = "shard"
    part: tuple[int, int] = (0, 1)  # this machine's part K of N
    encode: EncodeOptions = EncodeOptions()
    path_column: str | None = None
    label_column: str | None = None
    split: str | None = None
    shuffle: bool = True
    shuffle_seed: int = 0
    allow_local_paths: bool = False  # a remote manifest may name local files (a permission: not recorded)


def parse_size(text: str) -> int:
    """``500M``, ``1G``, ``2.5GB``, ``1024`` -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise ShardError(f"--max-shard-size: cannot read {text!r} as a size (e.g. 500M, 1G)") from None
    if value <= 0:
        raise ShardError(f"--max-shard-size: must be positive, got {text!r}")
    return int(value)


def parse_part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ShardError(f"--part: expected K/N such as 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise ShardError(f"--part: need 0 <= K < N, got {text!r}")
    return k, n


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


def _shard_name(opts: ShardOptions, i: int | None) -> str:
    """The i-th shard's name; with ``i=None`` a glob for this part's shards (never another part's)."""
    k, n = opts.part
    number = "[0-9]" * 6 if i is None else f"{i:06d}"
    return f"{opts.prefix}-{number}.tar" if n == 1 else f"{opts.prefix}-{k:03d}-{number}.tar"


def _lock_name(opts: ShardOptions) -> str:
    """One writer per part: different parts of a ``--part K/N`` run share the folder, as documented."""
    k, n = opts.part
    return LOCK if n == 1 else f".vitpipe-part-{k:03d}.lock"


def _index_name(opts: ShardOptions) -> str:
    k, n = opts.part
    return INDEX if n == 1 else f"index.part-{k:03d}-of-{n:03d}.json"


def _identity(src: str, opts: ShardOptions) -> dict:
    d = asdict(opts)
    del d["allow_local_paths"]
    d["part"] = f"{opts.part[0]}/{opts.part[1]}"
    if not opts.shuffle:
        d["shuffle_seed"] = None  # unused: does not make a rerun different
    return {"source": redact(src), **d}


def _part_inputs(inputs: list[Input], opts: ShardOptions) -> list[Input]:
    """This part's inputs, in writing order: part K of N of the (shuffled) list."""
    k, n = opts.part
    lo, hi = k * len(inputs) // n, (k + 1) * len(inputs) // n
    if not opts.shuffle:
        return inputs[lo:hi]
    # RandomState's stream is frozen by NumPy's compatibility policy (NEP 19), so every machine of a
    # --part run and every rerun agree on the order; 8 bytes per input, no copies of the records
    order = np.random.RandomState(opts.shuffle_seed).permutation(len(inputs))[lo:hi]
    return [inputs[i] for i in order]


def _fingerprint(inputs: list[Input]) -> str:
    h = hashlib.sha256()
    for inp in inputs:
        h.update(f"{inp.source}\t{inp.label}\n".encode())
    return h.hexdigest()


def differing_keys(a: dict, b: dict) -> list[str]:
    """The keys whose values differ between two runs' recorded arguments (missing counts as different)."""
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))


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


def shard(src: str, out: str | os.PathLike, opts: ShardOptions = ShardOptions(), workers: int = 1,
          overwrite: bool = False, progress: bool = True, merge: bool = True) -> dict:
    """Shard ``src`` into ``out`` (a folder or an fsspec URL); returns the (part's) index.

    ``merge=False``: a part does not write ``index.json`` when it completes the set (a driver that runs
    every part merges once, itself).
    """
    check_options(opts, workers)
    folder = shard_folder(out)
    folder.prepare()
    corpus = read_source(src, opts.path_column, opts.label_column, opts.split, opts.allow_local_paths)
    inputs = _part_inputs(corpus.inputs, opts)
    k, n = opts.part
    with folder.writing("vitpipe shard" + (f" --part {k}/{n}" if n > 1 else ""), _lock_name(opts)):
        return _shard_locked(src, corpus, inputs, folder, opts, workers, overwrite, progress, merge)


def _shard_locked(src, corpus, inputs, folder, opts, workers, overwrite, progress, merge) -> dict:
    identity = _identity(src, opts)
    fingerprint = _fingerprint(inputs)
    index_name = _index_name(opts)
    index_path = folder.where(index_name)
    text = None if overwrite else folder.read_json_text(index_name)
    index = parse_index(text, index_path) if text is not None else None
    if index is not None:
        if index.get("args") != identity:
            diff = differing_keys(identity, index.get("args", {}))
            raise ShardError(f"{index_path}: shards there were made with different arguments ({', '.join(diff)}); "
                             "use --overwrite to start over or another OUT")
        if index.get("input_fingerprint") != fingerprint:
            raise ShardError(f"{index_path}: the source's list of inputs changed since these shards were made; "
                             "use --overwrite to start over")
        _check_listed_shards(folder, index, opts)
    if index is None:
        if overwrite:
            for name in folder.sizes(_shard_name(opts, None)):
                folder.remove(name)
            folder.remove(index_name)
        index = {
            "format": INDEX_FORMAT, "format_version": INDEX_VERSION, "complete": False,
            "args": identity, "input_fingerprint": fingerprint, "inputs": len(inputs),
            "classes": corpus.classes, "total_samples": 0, "class_counts": {},
            "shards": [], "skipped": [], "next_input": 0,
        }
    folder.clean_partial(_shard_name(opts, None))  # left by a killed run of this part
    if not index["complete"]:
        _write_shards(corpus, inputs, folder, index, index_name, opts, workers, progress)
    if opts.part[1] > 1 and merge:
        merge_parts(folder)
    return index


def _check_listed_shards(folder, index: dict, opts: ShardOptions) -> None:
    """Every shard the index lists is there, whole; shards it does not list are redone (and replaced)."""
    present = folder.sizes(_shard_name(opts, None))
    for s in index["shards"]:
        if present.get(s["name"]) != s["bytes"]:
            found = "missing" if s["name"] not in present else f"{present[s['name']]} bytes, not {s['bytes']}"
            raise ShardError(f"{folder.where(s['name'])}: listed in {_index_name(opts)} but {found}; "
                             "use --overwrite to start over")


def _write_shards(corpus, inputs, folder, index, index_name, opts, workers, progress) -> None:
    start = index["next_input"]
    todo = inputs[start:]
    bar = tqdm(total=len(inputs), initial=start, unit="img", desc=f"shard {folder.name}", disable=not progress)
    pool = None
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(corpus, opts.encode))
        results = _in_order(pool, todo, window=64 * workers)
    else:
        _init_worker(corpus, opts.encode)
        results = map(_encode_one, todo)
    writer = _ShardWriter(folder, opts, index, index_name)
    try:
        for pos, (inp, result) in enumerate(zip(todo, results), start):
            if isinstance(result, str):
                writer.skip(pos, inp, result)
            else:
                writer.add(pos, inp, result, corpus.classes)
            bar.update(1)
        writer.finish(len(inputs))
    except (OSError, StoreError) as e:  # disk full, permission denied, endpoint gone: complete shards stay
        what = "cannot write shards" if isinstance(e, OSError) else "stopped"
        raise ShardError(f"{folder}: {what} ({user_message(e)}); the complete shards and the index are kept: "
                         "rerun the same command to continue") from None
    finally:
        writer.abort()
        bar.close()
        if pool is not None:
            pool.terminate()


def _in_order(pool, todo: list[Input], window: int):
    """Encode in parallel, yield in input order; at most two windows of images are in memory."""
    pending = None
    for start in range(0, len(todo), window):
        upcoming = pool.map_async(_encode_one, todo[start:start + window], chunksize=4)
        if pending is not None:
            yield from pending.get()
        pending = upcoming
    if pending is not None:
        yield from pending.get()


class _ShardWriter:
    def __init__(self, folder: LocalFolder | RemoteFolder, opts: ShardOptions, index: dict, index_name: str):
        self.folder, self.opts, self.index, self.index_name = folder, opts, index, index_name
        self.tar = self.file = self.name = None
        self.count = self.payload = 0
        self.first_input = index["next_input"]
        self.pending_skips: list[dict] = []
        self.classes: Counter = Counter()

    def _open(self) -> None:
        self.name = _shard_name(self.opts, len(self.index["shards"]))
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
            self._open()
        self.tar.write(sample_key(inp.source), sample)
        self.count += 1
        self.payload += size
        if inp.label is not None:
            self.classes[str(inp.label)] += 1
        if self.count >= self.opts.samples_per_shard:
            self._close(pos + 1)

    def skip(self, pos: int, inp: Input, reason: str) -> None:
        self.pending_skips.append({"input": pos, "source": redact(inp.source), "reason": redact(reason)})

    def _close(self, next_input: int) -> None:
        """Complete the open shard: move (upload) it into place, then record it (and the skips before it)."""
        self.tar.close()
        self.folder.commit_shard(self.name, self.file)
        self.index["shards"].append({
            "name": self.name, "count": self.count, "bytes": self.tar.size,
            "sha256": self.tar.sha.hexdigest(), "inputs": [self.first_input, next_input],
            "class_counts": {k: v for k, v in sorted(self.classes.items(), key=lambda kv: int(kv[0])) if v},
        })
        self.tar = None
        self._commit(next_input)
        self.first_input = next_input

    def _commit(self, next_input: int) -> None:
        idx = self.index
        idx["skipped"] += [s for s in self.pending_skips if s["input"] < next_input]
        self.pending_skips = [s for s in self.pending_skips if s["input"] >= next_input]
        idx["next_input"] = next_input
        idx["total_samples"] = sum(s["count"] for s in idx["shards"])
        totals: Counter = Counter()
        for s in idx["shards"]:
            totals.update(s["class_counts"])
        idx["class_counts"] = {k: totals[k] for k in sorted(totals, key=int)}
        self.folder.write_json(self.index_name, idx)

    def finish(self, end: int) -> None:
        if self.tar is not None:
            self._close(end)
        self.index["complete"] = True
        self._commit(end)
        self.folder.flush()  # an object store's last uploads: their errors belong to this run

    def abort(self) -> None:
        if self.tar is not None:
            self.folder.discard_shard(self.name, self.file)
            self.tar = None


def merge_parts(out: str | os.PathLike | LocalFolder | RemoteFolder) -> dict | None:
    """When every ``--part K/N`` index in ``out`` (a folder or URL) is complete, write the combined ``index.json``."""
    folder = out if isinstance(out, (LocalFolder, RemoteFolder)) else shard_folder(out)
    parts = sorted(folder.sizes("index.part-*-of-*.json"))
    if not parts:
        return None
    loaded = [json.loads(folder.read_json_text(p)) for p in parts]
    n = int(parts[0].removesuffix(".json").rsplit("-", 1)[-1])
    if len(loaded) != n or not all(p["complete"] for p in loaded):
        return None
    totals: Counter = Counter()
    for p in loaded:
        totals.update(p["class_counts"])
    args = dict(loaded[0]["args"], part=f"all {n}")
    merged = {
        "format": INDEX_FORMAT, "format_version": INDEX_VERSION, "complete": True, "args": args,
        "inputs": sum(p["inputs"] for p in loaded), "classes": loaded[0]["classes"],
        "total_samples": sum(p["total_samples"] for p in loaded),
        "class_counts": {k: totals[k] for k in sorted(totals, key=int)},
        "shards": [s for p in loaded for s in p["shards"]],
        "skipped": [s for p in loaded for s in p["skipped"]],
        "parts": parts,
    }
    folder.write_json(INDEX, merged)
    return merged


def read_index(folder: str | os.PathLike) -> dict:
    """The index of a shard folder or URL."""
    where = shard_folder(folder)
    path = where.where(INDEX)
    text = where.read_json_text(INDEX)
    if text is None:
        raise ShardError(f"{path}: missing (not a vitpipe shard folder, or sharding has not finished)")
    return parse_index(text, path)
