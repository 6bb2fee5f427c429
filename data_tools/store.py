"""Shard folders on a local disk or on any fsspec filesystem (s3://, gs://, ...), one interface for both.

An object store has no rename: a shard is written to a local staging file and uploaded only once it
is complete (an S3 PUT, or a multipart upload, is visible whole or not at all), and ``index.json`` is
written after the shards it lists, so whatever the index lists is complete and whatever it does not
list is redone by a rerun. Credentials come from the filesystem's own configuration (for S3,
botocore's: ``AWS_ACCESS_KEY_ID`` ..., ``AWS_PROFILE``, ``~/.aws``, ``AWS_ENDPOINT_URL``); vitpipe
neither reads nor records them.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import re
import stat
from contextlib import contextmanager, nullcontext
from pathlib import Path

from common.errors import VitpipeError
from common.io import fsync_dir, open_new, write_json
from common.lock import FolderLock, holder_of

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_WITHOUT_SLASHES = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!//)")
# the client libraries behind fsspec's object stores: their errors (no credentials, endpoint unreachable) are
# the user's to fix, not bugs
_CLIENT_MODULES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "aiohttp", "fsspec"}


class StoreError(VitpipeError):
    """A remote filesystem that cannot be used: unknown scheme, missing client, credentials, endpoint, bucket."""


def scheme(path: str | os.PathLike) -> str | None:
    """``s3`` for ``s3://bucket/key``; None for a local path."""
    m = _URL.match(str(path))
    return m.group(1).lower() if m else None


def lower_scheme(url: str) -> str:
    """``S3://bucket/x`` as ``s3://bucket/x``: schemes are case-insensitive (RFC 3986), fsspec's names are lower case."""
    return _URL.sub(lambda m: m.group(0).lower(), url, count=1)


def is_url(path) -> bool:
    return isinstance(path, str) and scheme(path) is not None


def known_schemes() -> list[str]:
    import fsspec

    return sorted(set(fsspec.available_protocols()) - {"file", "local"})


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    return posixpath.dirname(url.rstrip("/"))


def _setting(name: str, default: float, cast=float, fallback: str | None = None) -> float:
    raw = os.environ.get(name) or (os.environ.get(fallback) if fallback else None)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise StoreError(f"{name if os.environ.get(name) else fallback}: expected a positive "
                         f"{'integer' if cast is int else 'number'}, got {raw!r}")
    return value


def store_timeout() -> float:
    """Seconds an object-store request may wait to connect, and then for each read of its reply."""
    return _setting("VITPIPE_STORE_TIMEOUT", 60.0)


def store_attempts() -> int:
    """Tries of one object-store request before its error is the run's (botocore's standard retry mode)."""
    return int(_setting("VITPIPE_STORE_ATTEMPTS", 3, int, fallback="AWS_MAX_ATTEMPTS"))


def client_options(name: str | None) -> dict:
    """The filesystem options that bound every request: an endpoint that stops answering is an error after at most
    ``store_attempts() x 2 x store_timeout()`` seconds (plus backoff), never a hang. Listings are not cached:
    other processes (``--part`` runs on other machines) write the same prefix, and a stale listing would name
    an object as it was."""
    if name not in ("s3", "s3a"):
        return {}
    timeout = store_timeout()
    return {"use_listings_cache": False, "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"max_attempts": store_attempts(), "mode": "standard"}}}


UPLOAD_MIN_RATE = 2**20  # bytes/s: an upload slower than this on average is taken for a stalled endpoint


def upload_deadline(fs, nbytes: int) -> dict:
    """The ``timeout=`` that bounds one upload as a whole, for filesystems that take one (fsspec's async ones):
    a PUT to an endpoint that stopped answering waits past the read timeout (aiobotocore, 2026-12), so the
    upload gets ``store_attempts() x store_timeout()`` plus its size at ``UPLOAD_MIN_RATE``."""
    from fsspec.asyn import AsyncFileSystem

    if not isinstance(fs, AsyncFileSystem):
        return {}
    return {"timeout": store_attempts() * store_timeout() + nbytes / UPLOAD_MIN_RATE}


def filesystem(url: str):
    """(fsspec filesystem, path without the scheme) for ``url``; one line naming the scheme if it cannot be used."""
    import fsspec
    from fsspec.core import url_to_fs

    name = scheme(url)
    if name not in fsspec.available_protocols():
        raise StoreError(f"{url}: unknown URL scheme {name}:// (known: {', '.join(known_schemes())})")
    try:
        fs, path = url_to_fs(lower_scheme(url), **client_options(name))
        if hasattr(fs, "retries"):  # s3fs retries a timed-out request itself too: one pass, so the two do not multiply
            fs.retries = 1
        return fs, path
    except ImportError as e:  # fsspec knows the scheme, its client is not installed ("Install s3fs to access S3")
        raise StoreError(f"{url}: {e}" + (" (pip install s3fs; make install includes it)" if name in ("s3", "s3a") else "")) from None


def is_client_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in _CLIENT_MODULES


@contextmanager
def remote_errors(url: str, keep: tuple[type[Exception], ...] = ()):
    """A client library's error (no credentials, unreachable endpoint, missing bucket) as one StoreError line;
    the types in ``keep`` pass as they are."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        if isinstance(e, keep) or not is_client_error(e):
            raise
        raise StoreError(f"{url}: {describe(e)}{stall_hint(e)}") from None


def errors_for(path: str):
    """``remote_errors`` for a URL; a local path's errors stay as they are."""
    return remote_errors(path) if is_url(path) else nullcontext()


def is_timeout(e: BaseException) -> bool:
    """A request that got no answer in time (botocore's ReadTimeoutError, fsspec's FSTimeoutError, ...)."""
    return any("Timeout" in cls.__name__ for cls in type(e).__mro__)


def stall_hint(e: BaseException) -> str:
    """For a timeout: what the limits were and how to change them; else nothing."""
    if not is_timeout(e):
        return ""
    return (f" (no answer in {store_attempts()} tries of {store_timeout():g} s; VITPIPE_STORE_TIMEOUT and "
            "VITPIPE_STORE_ATTEMPTS set them)")


def describe(e: BaseException) -> str:
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    return f"{type(e).__name__}: {text}" if not isinstance(e, OSError) else text


def plain_name(name) -> bool:
    """A file name with no folder in it (``--prefix``, a shard that index.json lists): never ``..``, ``/x``, ``a/b``
    or a URL."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def listed_shard(name, index_path: str) -> str:
    """``name`` from index.json's shard list, refused unless a plain name: an index lists only the tars beside
    it, so a hostile one cannot make verify or training read ``/etc/passwd`` or ``../../x``."""
    if not plain_name(name):
        raise StoreError(f"{index_path}: shard entry {name!r} is not a file name in this folder (an index lists "
                         "only the tars beside it)")
    return name


def open_regular(path: str | os.PathLike, buffering: int = 1 << 20):
    """A local shard opened for reading, if it is a regular file: a FIFO would wait forever for a writer, and
    ``/dev/zero`` or ``/dev/urandom`` never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO does not wait
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a folder" if stat.S_ISDIR(mode) else "not a file"
        raise StoreError(f"{path}: {kind}, not a regular file; a shard is a tar file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb", buffering=buffering)


def check_regular(path: str | os.PathLike) -> None:
    """``open_regular``'s check alone (a missing file passes: its reader reports it)."""
    try:
        open_regular(path, buffering=0).close()
    except FileNotFoundError:
        pass


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with remote_errors(url):
        return fs.cat_file(path)


def open_url(url: str):
    """A streaming binary reader (ranged reads; the object is not downloaded first); FileNotFoundError if
    there is no such object."""
    fs, path = filesystem(url)
    with remote_errors(url, keep=(FileNotFoundError,)):
        return fs.open(path, "rb")


class LocalFolder:
    """A shard folder on this machine: shards are written as ``NAME.tmp``, fsynced and renamed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = self.path.name

    def __str__(self) -> str:
        return str(self.path)

    def prepare(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path}: exists and is not a folder")

    def writing(self, holder: str, lock_name: str):
        """The context a writer holds the folder in: its lock (one writer per folder, or per part)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return FolderLock(self.path, holder, lock_name)

    def where(self, name: str) -> str:
        return str(self.path / name)

    def read_json_text(self, name: str) -> str | None:
        p = self.path / name
        return p.read_text() if p.is_file() else None

    def write_json(self, name: str, obj) -> None:
        write_json(self.path / name, obj)

    def sizes(self, pattern: str) -> dict[str, int]:
        """Name -> size of the files matching a glob pattern."""
        return {p.name: p.stat().st_size for p in self.path.glob(pattern)}

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def open_shard(self, name: str):
        return open_new(self.path / (name + ".tmp"))

    def commit_shard(self, name: str, f) -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.path / (name + ".tmp"), self.path / name)
        fsync_dir(self.path)

    def discard_shard(self, name: str, f) -> None:
        try:
            f.close()
        except OSError:  # the buffer cannot be flushed (disk full); the file goes anyway
            pass
        (self.path / (name + ".tmp")).unlink(missing_ok=True)

    def clean_partial(self, pattern: str, owned=lambda name: True) -> None:
        """Remove what a killed writer left half-written: the ``.tmp`` files of the ``owned`` names."""
        for p in self.path.glob(pattern + ".tmp"):
            if owned(p.name.removesuffix(".tmp")):
                p.unlink()

    def open_read(self, name: str):
        return open_regular(self.path / name)

    def flush(self) -> None:
        """Nothing to wait for: local writes are done when they return."""

    def holders(self, pattern: str) -> list[str]:
        """Who holds the lock files matching ``pattern`` now, in words."""
        return [who for p in sorted(self.path.glob(pattern)) if (who := holder_of(p))]

    @contextmanager
    def merging(self):
        """One merger at a time: parts completing together take turns writing ``index.json`` (the folder itself is
        locked, so no file is left behind)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def shard_folder(out: str | os.PathLike):
    """The folder ``out`` names: a local path, or an fsspec URL (an unknown scheme is a StoreError)."""
    if is_url(out):
        from data_tools.remote import RemoteFolder  # imported here: remote builds on this module

        return RemoteFolder(out)
    m = _SCHEME_WITHOUT_SLASHES.match(str(out))
    if m and m.group(1).lower() in known_schemes():  # "s3:bucket/x" is a typo, not a local folder named "s3:"
        raise StoreError(f"{out}: not a URL (write {m.group(1)}://...), and a local folder is not named {m.group(1)}:")
    return LocalFolder(out)
