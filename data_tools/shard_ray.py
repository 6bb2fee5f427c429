"""``vitpipe shard --engine ray``: the parts of a ``--part K/N`` job run as Ray tasks, then one merge.

Part K is exactly ``vitpipe shard --part K/N`` run on a worker (same shards, same part index), so the
output is byte-identical to N local runs, and a rerun after a kill keeps every complete shard. Ray retries
a part whose worker died or that raised (``max_retries`` with ``retry_exceptions``); a part that still fails
is reported with its inputs, the other parts are finished, and ``index.json`` (the commit marker) is only
written when every part is complete. Workers read SRC as given and write OUT at its absolute path, so both
must be where every node sees them at the same path (a shared filesystem).
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from common.errors import USER_ERRORS, user_message
from common.lock import LOCK, FolderBusy, FolderLock
from data_tools.shard import (  # the private names: one package's part layout (names, locks, order)
    INDEX,
    ShardError,
    ShardOptions,
    _identity,
    _index_name,
    _lock_name,
    _part_inputs,
    _shard_name,
    check_options,
    differing_keys,
    merge_parts,
    shard,
)
from data_tools.sources import read_source
from data_tools.store import is_url

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
    if is_url(out):
        raise ShardError(f"{out}: --engine ray writes to a shared filesystem; to an object store, run "
                         "--engine local --part K/N on each machine (the last part to finish writes index.json)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a folder")
    corpus = read_source(src, opts.path_column, opts.label_column, opts.split, opts.allow_local_paths)  # a bad SRC fails before Ray starts
    ray = _import_ray()
    started = _connect(ray, ray_address)
    try:
        n = parts or min(workers or max(1, int(ray.cluster_resources().get("CPU", 1))), MAX_PARTS)
        out.mkdir(parents=True, exist_ok=True)
        _clear_or_refuse_other_runs(out, src, opts, n, overwrite)
        failures = _run_parts(ray, src, out, opts, n, workers or n, progress)
    finally:
        if started:
            ray.shutdown()
    if failures:
        raise ShardError(_report(failures, corpus.inputs, out, opts, n))
    merged = merge_parts(out)
    if merged is None:
        raise ShardError(f"{out}: every part reported success but the part indices are not all complete; "
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


def _clear_or_refuse_other_runs(out: Path, src: str, opts: ShardOptions, n: int, overwrite: bool) -> None:
    """What a different run left in ``out``: an error, or with ``overwrite`` removed, while holding every
    lock such a run could hold (a run still writing there is named, not deleted from under)."""
    if not overwrite:
        if others := _other_runs(out, src, opts, n):
            raise ShardError(f"{out}: holds shards of another run: {'; '.join(others)}; rerun with that run's "
                             "arguments, use --overwrite to start over, or another OUT")
        return
    with ExitStack() as locks:
        for name in [LOCK] + [_lock_name(replace(opts, part=(k, n))) for k in range(n)]:
            locks.enter_context(FolderLock(out, "vitpipe shard --engine ray --overwrite", name))
        single, part = _shard_name(opts, None), opts.prefix + "-[0-9][0-9][0-9]-" + "[0-9]" * 6 + ".tar"
        for pattern in (INDEX, "index.part-*-of-*.json", single, single + ".tmp", part, part + ".tmp"):
            for f in out.glob(pattern):
                f.unlink()


def _other_runs(out: Path, src: str, opts: ShardOptions, n: int) -> list[str]:
    """Index files in ``out`` written by a different run (another --parts, one machine, other arguments)."""
    expected = {_index_name(replace(opts, part=(k, n))): _identity(src, replace(opts, part=(k, n))) for k in range(n)}
    expected[INDEX] = dict(_identity(src, replace(opts, part=(0, n))), part=f"all {n}")  # as merge_parts writes it
    found = []
    for path in sorted(out.glob("index.part-*-of-*.json")) + [out / INDEX]:
        if not path.is_file():
            continue
        want, got = expected.get(path.name), _recorded_args(path)
        if want is None:
            found.append(f"{path.name} (another --parts)")
        elif got != want:
            found.append(f"{path.name} (different {', '.join(differing_keys(want, got))})")
    return found


def _recorded_args(index_path: Path) -> dict:
    try:
        args = json.loads(index_path.read_text()).get("args")
    except (OSError, ValueError, AttributeError):
        return {}
    return args if isinstance(args, dict) else {}


def _run_parts(ray, src: str, out: Path, opts: ShardOptions, n: int, window: int, progress: bool) -> dict[int, str]:
    """Run parts 0..n-1, at most ``window`` at a time; returns {part: why it failed} for those that failed."""
    task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=True)(_shard_part)
    todo, running, failures = list(range(n)), {}, {}
    with tqdm(total=n, unit="part", desc=f"shard {out.name} on ray", disable=not progress) as bar:
        while todo or running:
            while todo and len(running) < window:
                k = todo.pop(0)
                part = replace(opts, part=(k, n))
                ref = task.options(name=f"vitpipe shard part {k}/{n}").remote(src, str(out.absolute()), part)
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


def _report(failures: dict[int, str], inputs: list, out: Path, opts: ShardOptions, n: int) -> str:
    order = "shuffled order" if opts.shuffle else "source order"
    lines = []
    for k, why in sorted(failures.items()):
        part = replace(opts, part=(k, n))
        lo, hi = k * len(inputs) // n, (k + 1) * len(inputs) // n
        done, shards = _progress(out / _index_name(part))
        where = "after its last input"
        if done < hi - lo:
            where = f"at input {lo + done}: {_part_inputs(inputs, part)[done].source}"
        lines.append(f"part {k}/{n} (inputs {lo}-{hi - 1} of {len(inputs)} in {order}; {shards} shards complete, "
                     f"stopped {where}) failed after {1 + RETRIES} attempts: {why}")
    return (f"{out}: {len(failures)} of {n} parts failed; the complete shards are kept, rerun the same command to "
            "finish: " + "; ".join(lines))


def _progress(index_path: Path) -> tuple[int, int]:
    """(inputs done, shards complete) as a part's index records them; (0, 0) before its first shard."""
    try:
        index = json.loads(index_path.read_text())
        return index["next_input"], len(index["shards"])
    except (OSError, ValueError, KeyError):
        return 0, 0
