"""Resume cost: bytes read and seconds to the first batch after resuming at 0 / 50 / 90% of an epoch, as ratios to a
fresh start in the same run, on local shards and on an S3-compatible server on localhost (moto's, in its own process).

Each resume goes on from the loader state a checkpoint saves (every worker's cursor and its shuffle buffer as
sample references, read back by ranged reads); beside it, the replay a checkpoint without that state needs (every
sample of the epoch before the position read again). The goal: at 90%, at most a fresh start plus the saved state,
the buffer and one shard per worker. Bytes: what the loader reads from local shards; from S3, what s3fs fetches
over the network (its read-ahead, and the gaps between buffered samples that share a GET, included).

    python bench/resume.py [--images 1000] [--buffer 100] [--no-s3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data import make_corpus, s3_server  # noqa: E402


class Counted:
    """Counts the bytes read from shards (in this process: the loaders here run without workers): what the loader
    reads from local files, and what s3fs fetches over the network (its read-ahead and merged ranges included)."""

    def __init__(self):
        import s3fs

        import data_tools.reading as loader  # where shards are opened and ranged reads made
        from data_tools import store

        self.bytes = 0
        counter = self
        real_open, real_spans = loader._open_stream, loader.read_spans
        real_fetch, real_cat = s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file

        class Reader:
            def __init__(self, f):
                self.f = f

            def read(self, n=-1):
                data = self.f.read(n)
                counter.bytes += len(data)
                return data

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def opened(url, start=0):
            f = real_open(url, start)
            return f if store.is_url(url) else Reader(f)

        def spans(url, pairs):
            blobs = real_spans(url, pairs)
            counter.bytes += 0 if store.is_url(url) else sum(map(len, blobs))
            return blobs

        def fetch(file, start, end):
            data = real_fetch(file, start, end)
            counter.bytes += len(data)
            return data

        async def cat(fs, path, *args, **kwargs):
            data = await real_cat(fs, path, *args, **kwargs)
            counter.bytes += len(data)
            return data

        loader._open_stream, loader.read_spans = opened, spans
        s3fs.core.S3File._fetch_range, s3fs.S3FileSystem._cat_file = fetch, cat


def first_batch(counted: Counted, make, repeats: int = 3) -> tuple[int, float]:
    """Bytes read and the best of ``repeats`` timings to the first batch (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        counted.bytes = 0
        t = time.perf_counter()
        next(iter(make()))
        best = min(best, time.perf_counter() - t)
    return counted.bytes, best


def measure(name: str, shards, states: dict, per_epoch: int, batch: int, buffer: int, size: int, counted: Counted,
            shard_bytes: int) -> None:
    from data_tools.loader import train_loader
    from data_tools.transforms import TrainTransform

    def loader(**kw):
        return lambda: train_loader(shards, TrainTransform(size), batch, seed=1, shuffle_buffer=buffer, **kw)

    fresh_bytes, fresh_s = first_batch(counted, loader())
    print(f"{name}: fresh start {fresh_bytes / 2**20:.1f} MiB, {fresh_s:.2f} s to the first batch")
    for fraction in (0.0, 0.5, 0.9):
        done = int(fraction * per_epoch)
        state = states[done]
        b, s = first_batch(counted, loader(skip_batches=done, resume=state))
        rb, rs = first_batch(counted, loader(skip_batches=done))
        saved = len(json.dumps(state))
        buffered = sum(end - start for st in state.values() if st for _, start, end in st["pool"])
        goal = fresh_bytes + saved + buffered + shard_bytes
        print(f"  resume at {fraction:.0%}: saved state {b / fresh_bytes:.2f}x the bytes, {s / fresh_s:.2f}x the "
              f"seconds ({b / 2**20:.1f} MiB, {s:.2f} s; goal <= {goal / 2**20:.1f} MiB: "
              f"{'met' if b <= goal else 'NOT met'}); replay {rb / fresh_bytes:.2f}x, {rs / fresh_s:.2f}x "
              f"({rb / 2**20:.1f} MiB, {rs:.2f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--buffer", type=int, default=100)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--no-s3", action="store_true", help="skip the S3 half (needs s3fs and 'moto[server]')")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # as in a loader worker

    from data_tools.loader import resolve_shards, train_loader
    from data_tools.shard import ShardOptions, shard
    from data_tools.transforms import EvalTransform

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "src", args.images)
        shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=args.per_shard), progress=False)
        local = resolve_shards(root / "shards")
        shard_bytes = max(p.stat().st_size for p in (root / "shards").glob("*.tar"))
        total = sum(p.stat().st_size for p in (root / "shards").glob("*.tar"))
        print(f"{args.images} photos in {len(local.urls)} shards ({total / 2**20:.1f} MiB), batch {args.batch}, "
              f"shuffle buffer {args.buffer}, one loader process")
        # the state a checkpoint would hold after each batch: what the training loop keeps
        states, kept = {0: {}}, {}
        whole = train_loader(local, EvalTransform(16), args.batch, seed=1, shuffle_buffer=args.buffer)
        for i, b in enumerate(whole, 1):
            kept[str(b["stream"]["worker"])] = b["stream"]["state"]
            states[i] = dict(kept)
        per_epoch = len(states) - 1
        counted = Counted()
        measure("local", local, states, per_epoch, args.batch, args.buffer, args.size, counted, shard_bytes)
        if not args.no_s3:
            with s3_server() as fs:
                fs.put(str(root / "shards") + "/", "bench/shards", recursive=True)
                measure("S3 (moto, localhost)", resolve_shards("s3://bench/shards"), states, per_epoch, args.batch,
                        args.buffer, args.size, counted, shard_bytes)


if __name__ == "__main__":
    main()
