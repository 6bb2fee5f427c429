"""``vitpipe shard --engine ray``: the parts of a ``--part K/N`` job run as Ray tasks, then one merge.

Part K is exactly ``vitpipe shard --part K/N`` run on a worker (same shards, same part record): whole
shards of the fixed-range layout, so the shards and ``index.json`` are byte-identical to one local run or N
``--part`` runs, whatever N; a rerun after a kill keeps every complete shard. Ray retries a part whose worker
died or that raised (``max_retries`` with ``retry_exceptions``); a part that still fails is reported with its
inputs, the other parts are finished, and ``index.json`` (the commit marker) is only written when every part
is complete. Workers read SRC as given and write OUT at its absolute path (or URL), so both must be where
every node sees them alike: a shared filesystem, or an object store (credentials from each node's own
configuration, as for any client of the store).
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from common.args import differing_keys
from common.errors import USER_ERRORS, VitpipeError, user_message
from common.lock import LOCK, FolderBusy, FolderLock
from data_tools.index import INDEX, INDEX_VERSION
from data_tools.layout import (
    ShardError,
    ShardOptions,
    input_at,
    is_shard_file,
    lock_name,
    merge_parts,
    part_positions,
    read_record,
    record_name,
    run_identity,
)
from data_tools.remote import RemoteFolder
from data_tools.shard import check_options, complete_set, shard
from data_tools.sources import read_source
from data_tools.store import LocalFolder, shard_folder

RETRIES = 3  # a failed part runs up to 1 + RETRIES times
LOCK_WAIT_S = 30.0  # a killed run's task may still hold a part's lock until Ray has stopped it
CONNECT_TIMEOUT_S = 10.0
MAX_PARTS = 999


def shard_on_ray(src: str, out, opts: ShardOptions, workers: int | None = None,
                 overwrite: bool = False, progress: bool = True, ray_address: str | None = None,
                 parts: int | None = None) -> dict:
    """Shard ``src`` into ``out`` as ``parts`` Ray tasks, at most ``workers`` at a time; returns ``index.json``.

    ``ray_address``: None follows Ray's rule (``RAY_ADDRESS``, else a cluster started on this machine with
    ``ray start``, else a new local instance for this call); "auto" insists on an existing cluster. When
    Ray is already initialised in this process, that instance is used. ``parts`` defaults to ``workers``,
    else to the cluster's CPUs.
    """
    check_options(opts)
    if opts.part != (0, 1):
        raise ShardError("--part K/N is one machine's part (--engine local); --engine ray runs every part: "
                         "use --parts N")
    if workers is not None and workers < 1:
        raise ShardError(f"--workers must be >= 1, got {workers}")
    if parts is not None and not 1 <= parts <= MAX_PARTS:
        raise ShardError(f"--parts must be in [1, {MAX_PARTS}] (part numbers have 3 digits), got {parts}")
    folder = shard_folder(out if isinstance(out, str) else Path(out).absolute())
    folder.prepare()
    corpus = read_source(src, opts.path_column, opts.label_column, opts.split,  # a bad SRC fails before Ray starts
                         opts.allow_local_paths)
    if not overwrite and (done := complete_set(folder, src, opts, corpus.inputs)) is not None:
        return done  # written before, by any engine and any number of parts
    ray = _import_ray()
    started = _connect(ray, ray_address)
    try:
        n = parts or min(workers or max(1, int(ray.cluster_resources().get("CPU", 1))), MAX_PARTS)
        if isinstance(folder, LocalFolder):
            folder.path.mkdir(parents=True, exist_ok=True)
        _clear_or_refuse_other_runs(folder, src, opts, n, overwrite)
        failures = _run_parts(ray, src, folder, opts, n, workers or n, progress)
    finally:
        if started:
            ray.shutdown()
    if failures:
        raise ShardError(_report(failures, corpus.inputs, folder, opts, n))
    merged = merge_parts(folder)
    if merged is None:
        raise ShardError(f"{folder}: every part reported success but the part records are not all complete; "
                         "is another run writing there?")
    return merged


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ShardError("--engine ray needs Ray: pip install 'ray>=2.10' (make install includes it)") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join (or start) a Ray instance; True when this call started the connection and must shut it down."""
    if ray.is_initialized():
        return False
    where = f"--ray-address {address}" if address else "Ray (no --ray-address)"
    if address and address not in ("auto", "local"):
        _probe(address, where)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")  # no dashboard when starting one
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        raise ShardError(f"{where}: cannot connect to a Ray cluster ({_first_line(e)})") from None
    return True


def _probe(address: str, where: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at HOST:PORT (Ray's own client keeps retrying)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # not HOST:PORT: let Ray say what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ShardError(f"{where}: cannot reach a Ray cluster there ({user_message(e) or type(e).__name__}); "
                         "start one with `ray start --head`, or check the address") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _clear_or_refuse_other_runs(folder: LocalFolder | RemoteFolder, src: str, opts: ShardOptions, n: int,
                                overwrite: bool) -> None:
    """What a different run left in the folder: an error, or with ``overwrite`` removed (in a local folder while
    holding every lock such a run could hold, so a run still writing there is named, not deleted from under)."""
    if not overwrite:
        if others := _other_runs(folder, src, opts, n):
            raise ShardError(f"{folder}: holds shards of another run: {'; '.join(others)}; rerun with that run's "
                             "arguments, use --overwrite to start over, or another OUT")
        return
    with ExitStack() as locks:
        if isinstance(folder, LocalFolder):
            for name in [LOCK] + [lock_name(replace(opts, part=(k, n))) for k in range(n)]:
                locks.enter_context(FolderLock(folder.path, "vitpipe shard --engine ray --overwrite", name))
        shards, ours = f"{opts.prefix}-*.tar", lambda name: is_shard_file(name, opts.prefix)
        folder.clean_partial(shards, ours)
        for name in [*folder.sizes(INDEX), *folder.sizes("index.part-*-of-*.json"), *filter(ours, folder.sizes(shards))]:
            folder.remove(name)


def _other_runs(folder: LocalFolder | RemoteFolder, src: str, opts: ShardOptions, n: int) -> list[str]:
    """Records in the folder written by a different run (another --parts, other arguments, an earlier layout);
    a complete ``index.json`` of this run is not one: every part finds the set there and is done."""
    want = run_identity(src, opts)
    parts = {record_name(replace(opts, part=(k, n))) for k in range(n)}
    found = []
    for name in sorted(folder.sizes("index.part-*-of-*.json")) + [INDEX]:
        record = read_record(folder, name)
        if record is None:
            continue
        got = record.get("args") if isinstance(record.get("args"), dict) else {}
        if name != INDEX and name not in parts:
            found.append(f"{name} (another --parts)")
        elif record.get("format_version") != INDEX_VERSION:
            found.append(f"{name} (an earlier layout, format_version {record.get('format_version')})")
        elif got != want:
            found.append(f"{name} (different {', '.join(differing_keys(want, got))})")
    return found


def _run_parts(ray, src: str, folder: LocalFolder | RemoteFolder, opts: ShardOptions, n: int, window: int,
               progress: bool) -> dict[int, str]:
    """Run parts 0..n-1, at most ``window`` at a time; returns {part: why it failed} for those that failed."""
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=True)(_shard_part)
    todo, running, failures = list(range(n)), {}, {}
    with tqdm(total=n, unit="part", desc=f"shard {folder.name} on ray", disable=not progress) as bar:
        while todo or running:
            while todo and len(running) < window:
                k = todo.pop(0)
                part = replace(opts, part=(k, n))
                ref = task.options(name=f"vitpipe shard part {k}/{n}").remote(src, str(folder), part)
                running[ref] = k
            [done], _ = ray.wait(list(running), num_returns=1)
            k = running.pop(done)
            try:
                ray.get(done)
            except ray.exceptions.RayError as e:
                failures[k] = _reason(e)
            bar.update(1)
    return failures


def _shard_part(src: str, out: str, opts: ShardOptions) -> None:
    """One Ray task: one part, resumed from its complete shards (a retry continues where the last try stopped)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            shard(src, out, opts, workers=1, progress=False, merge=False)
            return
        except FolderBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _reason(e) -> str:
    """One line: the part's own error (a RayTaskError's cause), else what Ray says (a worker died, ...)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, USER_ERRORS):
        return user_message(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(e).__name__}: {_first_line(e)}"


def _report(failures: dict[int, str], inputs: list, folder: LocalFolder | RemoteFolder, opts: ShardOptions,
            n: int) -> str:
    order = "shuffled order" if opts.shuffle else "source order"
    lines = []
    for k, why in sorted(failures.items()):
        part = replace(opts, part=(k, n))
        lo, hi = part_positions(len(inputs), part)
        done, shards = _progress(folder, record_name(part), lo)
        where = f"at input {done}: {input_at(inputs, opts, done).source}" if done < hi else "after its last input"
        lines.append(f"part {k}/{n} (inputs {lo}-{hi - 1} of {len(inputs)} in {order}; {shards} shards complete, "
                     f"stopped {where}) failed after {1 + RETRIES} attempts: {why}")
    return (f"{folder}: {len(failures)} of {n} parts failed; the complete shards are kept, rerun the same command to "
            "finish: " + "; ".join(lines))


def _progress(folder: LocalFolder | RemoteFolder, record: str, lo: int) -> tuple[int, int]:
    """(the position the part continues from, its shards complete) as its record says; (lo, 0) before its first."""
    try:
        index = read_record(folder, record) or {}
        return index.get("next_input", lo), len(index.get("shards", []))
    except VitpipeError:  # a record that cannot be read (IndexFileError): the report says what it can
        return lo, 0
