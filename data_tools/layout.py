"""The layout of a shard set, shared by every engine: the arguments (``ShardOptions``), which shards and inputs part
K of N owns, the names of shard files, locks and progress records, and merging the parts' records into
``index.json`` (the same bytes one run of all parts writes).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from common.errors import VitpipeError
from common.lock import LOCK
from common.redact import redact
from data_tools.images import EncodeOptions
from data_tools.index import INDEX, INDEX_FORMAT, INDEX_VERSION, LAYOUT, parse_index
from data_tools.remote import RemoteFolder
from data_tools.sources import Input
from data_tools.store import LocalFolder, shard_folder


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


def shard_name(prefix: str, k: int, piece: int = 0) -> str:
    """Shard k's file name (piece ``piece`` of it, when ``max_shard_size`` cuts it): it depends on k only."""
    return f"{prefix}-{k:06d}.tar" if piece == 0 else f"{prefix}-{k:06d}-{piece:03d}.tar"


def _shard_file_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"-(\d{6,})(?:-\d{3,})?\.tar(?:\.tmp)?")


_OLD_PART_FILE = r"-\d{3}-\d{6,}\.tar(?:\.tmp)?"  # format_version 1's --part K/N shards: PREFIX-KKK-NNNNNN.tar


def range_of(name: str, prefix: str) -> int | None:
    """The k of a shard file (or its ``.tmp``) of this layout; None for any other file."""
    m = _shard_file_pattern(prefix).fullmatch(name)
    return int(m.group(1)) if m else None


def is_shard_file(name: str, prefix: str) -> bool:
    """A shard (or ``.tmp``) this prefix's runs write, in this layout or format_version 1's."""
    return range_of(name, prefix) is not None or re.fullmatch(re.escape(prefix) + _OLD_PART_FILE, name) is not None


def range_count(inputs: int, opts: ShardOptions) -> int:
    return -(-inputs // opts.samples_per_shard)


def part_ranges(inputs: int, opts: ShardOptions) -> tuple[int, int]:
    """The shards [first, end) that part K of N writes: whole shards, so a part changes no boundary."""
    k, n = opts.part
    ranges = range_count(inputs, opts)
    return k * ranges // n, (k + 1) * ranges // n


def part_positions(inputs: int, opts: ShardOptions) -> tuple[int, int]:
    """The positions [lo, hi) of the (shuffled) input order that part K of N covers."""
    first, end = part_ranges(inputs, opts)
    return min(first * opts.samples_per_shard, inputs), min(end * opts.samples_per_shard, inputs)


def input_order(inputs: int, opts: ShardOptions):
    """Position -> index in the source's listing: the seeded permutation (or the listing's own order)."""
    if not opts.shuffle:
        return range(inputs)
    # RandomState's stream is frozen by NumPy's compatibility policy (NEP 19), so every machine of a
    # --part run and every rerun agree on the order; shuffling 4-byte positions in place gives
    # permutation(inputs)'s order in half its memory
    order = np.arange(inputs, dtype=np.uint32 if inputs < 2**32 else np.uint64)
    np.random.RandomState(opts.shuffle_seed).shuffle(order)
    return order


def input_at(inputs: list[Input], opts: ShardOptions, position: int) -> Input:
    return inputs[input_order(len(inputs), opts)[position]]


def owned_by(opts: ShardOptions, inputs: int):
    """Which shard files a run of this part may remove or clean: its own ranges' (and for the last part,
    or a run of all parts, any beyond the set's end, left by an earlier run with other inputs)."""
    first, end = part_ranges(inputs, opts)
    k, n = opts.part
    last = k == n - 1

    def owned(name: str) -> bool:
        r = range_of(name, opts.prefix)
        if r is None:
            return n == 1 and is_shard_file(name, opts.prefix)  # format_version 1 part shards: a whole run's
        return first <= r and (r < end or last)
    return owned


PART_LOCKS = ".vitpipe-part-*.lock"  # every part's lock_name


def lock_name(opts: ShardOptions) -> str:
    """One writer per part: different parts of a ``--part K/N`` run share the folder, as documented."""
    k, n = opts.part
    return LOCK if n == 1 else f".vitpipe-part-{k:03d}.lock"


def record_name(opts: ShardOptions) -> str:
    """Where a run records its progress: ``index.json`` for one run, a part's own record for a part."""
    k, n = opts.part
    return INDEX if n == 1 else f"index.part-{k:03d}-of-{n:03d}.json"


def run_identity(src: str, opts: ShardOptions) -> dict:
    """The arguments that decide the shard set (the part is not one of them)."""
    d = asdict(opts)
    del d["part"], d["allow_local_paths"]  # a remote manifest's permission to name local files: not recorded
    if not opts.shuffle:
        d["shuffle_seed"] = None  # unused: does not make a rerun different
    return {"source": redact(src), **d}


def read_record(folder, name: str) -> dict | None:
    """An index or part record, checked field by field (``data_tools.index``); None when there is none."""
    text = folder.read_json_text(name)
    return None if text is None else parse_index(text, folder.where(name))


def shard_set_index(records: list[dict]) -> dict:
    """``index.json`` from the complete progress records of every part, in part order (one for a run of all
    parts): nothing in it says how the work was split, so one run, N parts and a Ray job write the same bytes."""
    shards = [s for r in records for s in r["shards"]]
    totals: Counter = Counter()
    for s in shards:
        totals.update(s["class_counts"])
    first = records[0]
    return {
        "format": INDEX_FORMAT, "format_version": INDEX_VERSION, "layout": LAYOUT, "complete": True,
        "args": first["args"], "input_fingerprint": first["input_fingerprint"], "inputs": first["inputs"],
        "classes": first["classes"],
        "total_samples": sum(s["count"] for s in shards),
        "class_counts": {k: totals[k] for k in sorted(totals, key=int)},
        "shards": shards, "skipped": [s for r in records for s in r["skipped"]],
    }


_PART_INDEX = re.compile(r"index\.part-(\d{3})-of-(\d{3})\.json")


def part_records(folder: LocalFolder | RemoteFolder) -> dict[int, dict[int, dict]]:
    """The part progress records in a folder: {N: {K: record}} (one N unless runs were mixed)."""
    found: dict[int, dict[int, dict]] = {}
    for name in sorted(folder.sizes("index.part-*-of-*.json")):
        if m := _PART_INDEX.fullmatch(name):
            record = read_record(folder, name)
            if record is not None:
                found.setdefault(int(m.group(2)), {})[int(m.group(1))] = record
    return found


def parts_progress(folder: LocalFolder | RemoteFolder) -> tuple[str, bool] | None:
    """(how far a ``--part K/N`` run in ``folder`` is, in words; whether every part is complete), or None when no
    part run is there."""
    found = part_records(folder)
    if not found:
        return None
    lines, done = [], True
    for n, records in sorted(found.items()):
        missing = [f"{k}/{n}" for k in range(n) if k not in records]
        running = [f"{k}/{n}" for k, r in sorted(records.items()) if not r.get("complete")]
        what = [f"{n - len(missing) - len(running)} of {n} parts complete"]
        if running:
            what.append(f"{_list(running)} unfinished (rerun {'its' if len(running) == 1 else 'their'} command to "
                        "continue)")
        if missing:
            what.append(f"{_list(missing)} not started")
        lines.append(", ".join(what))
        done = done and not missing and not running
    return "; ".join(lines), done and len(found) == 1


def _list(parts: list[str], shown: int = 8) -> str:
    word = "part" if len(parts) == 1 else "parts"
    return f"{word} {', '.join(parts[:shown])}" + (f" and {len(parts) - shown} more" if len(parts) > shown else "")


def merge_parts(out: str | os.PathLike | LocalFolder | RemoteFolder) -> dict | None:
    """When every ``--part K/N`` record in ``out`` (a folder or URL) is complete, write ``index.json`` (the same
    bytes one run of all parts writes); None while a part is missing or unfinished."""
    folder = out if isinstance(out, (LocalFolder, RemoteFolder)) else shard_folder(out)
    with folder.merging():
        return _merge_complete_parts(folder)


def _merge_complete_parts(folder: LocalFolder | RemoteFolder) -> dict | None:
    found = part_records(folder)
    if len(found) != 1:
        return None
    [(n, records)] = found.items()
    if len(records) != n or not all(r.get("complete") for r in records.values()):
        return None
    first = records[0]
    for k, r in sorted(records.items()):
        if r.get("format_version") != INDEX_VERSION or r.get("args") != first.get("args") \
                or r.get("input_fingerprint") != first.get("input_fingerprint"):
            name = record_name(ShardOptions(part=(k, n)))
            raise ShardError(f"{folder.where(name)}: made by another run than {record_name(ShardOptions(part=(0, n)))} "
                             f"(different layout, arguments or inputs); rerun part {k}/{n} with --overwrite")
    merged = shard_set_index([records[k] for k in range(n)])
    folder.write_json(INDEX, merged)
    return merged


def read_index(folder: str | os.PathLike) -> dict:
    """The index of a shard folder or URL."""
    where = shard_folder(folder)
    path = where.where(INDEX)
    text = where.read_json_text(INDEX)
    if text is None:
        if parts := parts_progress(where):
            raise ShardError(f"{path}: missing: this folder holds a --part K/N run ({parts[0]}); the last part to "
                             "complete writes it" + ("" if not parts[1] else ", and a rerun of any part does"))
        raise ShardError(f"{path}: missing (not a vitpipe shard folder, or sharding has not finished)")
    return parse_index(text, path)
