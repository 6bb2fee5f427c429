"""Where a training stream is, as plain data: the pieces a (rank, worker) reads, and what is left of an epoch
when a run comes back on another number of ranks or workers.

A *piece* is a run of samples of one shard, ``{"shard": k, "start": byte, "index": n, "skip": s, "take": t}``
(from byte ``start``, where the shard's sample ``n`` begins, pass over ``s`` samples, then give ``t`` of them,
or the rest of the shard when ``t`` is None), or samples read back alone by reference,
``{"refs": [[k, start, end], ...]}``. ``k`` indexes the shard set's urls. A worker's *state* (see
``loader.WorkerStream``) says which piece of which pass it is in, and holds its shuffle buffer as refs.

Pure functions: no I/O. Costs grow with the number of shards and of buffered samples, never with the position.
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import PurePosixPath

from common.redact import redact
from common.seeding import seed_for


def shard_piece(k: int) -> dict:
    return {"shard": k, "start": 0, "index": 0, "skip": 0, "take": None}


def epoch_pieces(num_shards: int, seed: int, epoch: int, rank: int, world: int, logical: int,
                 workers: int) -> list[dict]:
    """Epoch mode: this worker's share of the epoch's shard order (the same order on every rank)."""
    order = list(range(num_shards))
    random.Random(seed_for("shards", seed, epoch)).shuffle(order)
    return [shard_piece(k) for k in order[rank::world][logical::workers]]


def resampled_pieces(num_shards: int, seed: int, epoch: int, rank: int, logical: int, n: int) -> list[dict]:
    """Resampled mode: pass ``n`` over all shards, a fresh permutation per (rank, worker, pass)."""
    order = list(range(num_shards))
    random.Random(seed_for("resample", seed, epoch, rank, logical, n)).shuffle(order)
    return [shard_piece(k) for k in order]


def piece_size(piece: dict, counts: list[int | None]) -> int | None:
    """Samples a piece gives (None: a shard whose count is unknown)."""
    if "refs" in piece:
        return len(piece["refs"])
    if piece["take"] is not None:
        return piece["take"]
    count = counts[piece["shard"]]
    return None if count is None else max(0, count - piece["index"] - piece["skip"])


def unread(state: dict | None, pieces: list[dict]) -> list[dict]:
    """What an epoch-mode worker has not given to a batch yet in this epoch: its buffer, then the rest of its
    first pass. ``state`` None: it has given nothing. Later passes only repeat the first (to fill a short
    worker's quota), so a worker past its first pass has nothing left."""
    if state is None:
        return list(pieces)
    if state["pass"] > 0:
        return []
    left = [{"refs": state["pool"]}] if state["pool"] else []
    if state["flushing"]:
        return left
    k, taken = state["piece"], state["taken"]
    if k < len(pieces):
        current = pieces[k]
        if "refs" in current:
            left.append({"refs": current["refs"][taken:]})
        elif taken:
            take = None if current["take"] is None else current["take"] - taken
            left.append({"shard": current["shard"], "start": state["start"], "index": state["index"], "skip": 0,
                         "take": take})
        else:
            left.append(current)
    return left + pieces[k + 1:]


def split(pieces: list[dict], sizes: list[int], counts: list[int | None]) -> list[list[dict]]:
    """Cut the samples of ``pieces`` (in order) into consecutive parts of ``sizes`` samples (what is left over
    belongs to no part). A shard cut in two: the second part passes over the first's samples."""
    parts: list[list[dict]] = [[] for _ in sizes]
    queue = deque(p for p in pieces if piece_size(p, counts) != 0)
    part, have = 0, 0  # the part being filled, and the samples it holds
    while queue and part < len(sizes):
        if have == sizes[part]:
            part, have = part + 1, 0
            continue
        piece = queue.popleft()
        size, room = piece_size(piece, counts), sizes[part] - have
        if size > room:
            if "refs" in piece:
                piece, rest = {"refs": piece["refs"][:room]}, {"refs": piece["refs"][room:]}
            else:
                piece, rest = {**piece, "take": room}, {**piece, "skip": piece["skip"] + room,
                                                        "take": None if piece["take"] is None else piece["take"] - room}
            queue.appendleft(rest)
            size = room
        parts[part].append(piece)
        have += size
    return parts


def shares(total: int, needs: list[int]) -> list[int]:
    """Each slot's part of ``total`` samples: its need when there are enough, else in proportion to it
    (the first slots take the remainder)."""
    wanted = sum(needs)
    if total >= wanted:
        return list(needs)
    got = [total * n // wanted for n in needs]
    for i in range(total - sum(got)):
        got[i % len(got)] += 1
    return got


def shard_names(urls: list[str]) -> list[str]:
    """Each url's last part, as checkpoints and sample records keep it: masked (a ``pipe:`` command's last part
    may be a header with a token), the same way on both sides of a comparison."""
    return [redact(PurePosixPath(u.rstrip("/")).name) for u in urls]


def shard_set_changes(recorded: dict, current: dict) -> str | None:
    """What differs between two ``describe_shards`` records, in words (None: the same shard set)."""
    old, new = recorded["names"], current["names"]
    if old != new:
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        what = [f"{len(old)} shards then, {len(new)} now"]
        if gone:
            what.append("missing " + ", ".join(gone[:3]) + (" ..." if len(gone) > 3 else ""))
        if added:
            what.append("new " + ", ".join(added[:3]) + (" ..." if len(added) > 3 else ""))
        if not gone and not added:
            what.append("in another order")
        return "; ".join(what)
    for key, word in (("digests", "contents (sha256 in index.json)"), ("counts", "sample count")):
        changed = [n for n, a, b in zip(old, recorded.get(key) or [], current.get(key) or []) if a != b]
        if changed and recorded.get(key) and current.get(key):
            return f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}: {word} changed"
    return None


def redeal(saved: dict, counts: list[int | None], seed: int, world: int, workers: int, batches_per_epoch: int,
           micro: int) -> tuple[list[dict[str, dict]], int, int]:
    """The rest of an epoch-mode epoch, saved on one layout (``saved``: a checkpoint's loader state), dealt over
    ``world`` ranks x ``workers`` logical workers: each new worker gets a consecutive share of what no old worker
    gave to a batch yet, as big as the batches it still owes (``micro`` samples each), in a fresh shuffle.

    Returns (per new rank: logical worker -> the state its stream starts from, samples left in the epoch,
    samples the epoch's remaining batches take). More left: the rest is not trained on in this epoch, as in any
    epoch where a worker's shards hold more than its quota; fewer: shares in proportion, a short one goes round
    again.
    """
    epoch, done = saved["epoch"], saved["batch"]
    old_world, old_workers = saved["processes"], saved["workers"]
    left: list[dict] = []
    for r in range(old_world):
        for w in range(old_workers):
            state = saved["ranks"][r].get(str(w))
            pieces = state["pieces"] if state and "pieces" in state else \
                epoch_pieces(len(counts), seed, epoch, r, old_world, w, old_workers)
            left += unread(state, pieces)
    sizes = [piece_size(p, counts) for p in left]
    if None in sizes:
        raise ValueError("the shard set lists no sample counts (no index.json)")
    needs = [micro * (len(range(w, batches_per_epoch, workers)) - len(range(w, done, workers)))
             for _ in range(world) for w in range(workers)]
    parts = split(left, shares(sum(sizes), needs), counts)
    layout = [old_world, old_workers, world, workers]
    plan = [{str(w): {"pieces": parts[r * workers + w], "key": ["elastic", seed, epoch, *layout, r, w]}
             for w in range(workers)} for r in range(world)]
    return plan, sum(sizes), sum(needs)
