"""Reading samples out of shards: a whole shard or from a byte offset (a resumed stream), samples alone by their
references (a resumed shuffle buffer), damage accounted for and logged without flooding."""

from __future__ import annotations

import bisect
import io
import itertools
import logging
import tarfile
from collections import defaultdict
from functools import partial

import webdataset as wds
from PIL import Image
from webdataset.gopen import Pipe

from common.redact import redact
from data_tools import store
from data_tools.shardset import _WDS_SCHEMES, LoaderError
from data_tools.stall import StalledRead, watched
from data_tools.tars import ForeignTar, HashingReader, image_bytes, read_tar

log = logging.getLogger(__name__)


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
