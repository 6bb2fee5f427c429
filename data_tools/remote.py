"""A shard folder on an object store (any fsspec URL): shards staged locally and uploaded whole, in order, on a
background thread. ``data_tools.store.shard_folder`` picks this or ``LocalFolder``."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

from common.io import json_text
from data_tools import store
from data_tools.store import StoreError, filesystem, join, remote_errors, upload_deadline


class RemoteFolder:
    """A shard folder on an fsspec filesystem: each shard is staged in a local temporary file and uploaded
    whole once complete; nothing half-written is ever visible under its final name.

    While writing, uploads and index writes run in order on one background thread, so the next shard is
    encoded while the last one uploads (at most two shards on the local disk); every read waits for
    them, an upload's error comes back at the next call, and nothing queued after it is written.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.name = posixpath.basename(self.root)
        self.staging: str | None = None
        self.uploads: ThreadPoolExecutor | None = None
        self.pending: list[Future] = []
        self.failed = False

    def __str__(self) -> str:
        return self.url

    def _path(self, name: str) -> str:
        return join(self.root, name)

    def prepare(self) -> None:
        """Fail before any work when the endpoint, the credentials or the bucket are wrong."""
        if self.fs.root_marker:  # a hierarchical filesystem: folders are made as needed
            return
        bucket = self.root.split("/")[0]
        with remote_errors(self.url):
            try:
                self.fs.info(self.root)  # the prefix itself first: all that a policy scoped to prefixes may allow
                return
            except FileNotFoundError:  # an empty prefix, or no bucket
                pass
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise StoreError(f"{self.url}: bucket {bucket!r} does not exist (or these credentials cannot see "
                                 "it)") from None
            except PermissionError:  # listing the bucket's top is not allowed: it exists
                pass

    @contextmanager
    def writing(self, holder: str, lock_name: str):
        """A staging folder for the shard being written; an object store has no lock: one writer per prefix
        (or per ``--part``) is the user's to ensure."""
        self.staging = tempfile.mkdtemp(prefix="vitpipe-upload-")
        self.uploads = ThreadPoolExecutor(1, thread_name_prefix="vitpipe-upload")
        self.failed = False
        try:
            yield self
            self.flush()
        finally:
            self.uploads.shutdown(wait=True, cancel_futures=True)
            self.uploads, self.pending = None, []
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _in_order(self, fn, *args) -> None:
        """Run ``fn`` after what was queued before it: in the background while writing, else now."""
        if self.uploads is None:
            return fn(*args)
        for f in [f for f in self.pending if f.done()]:
            f.result()  # an earlier upload's error, raised here
        self.pending = [f for f in self.pending if not f.done()] + [self.uploads.submit(self._unless_failed, fn, *args)]

    def _unless_failed(self, fn, *args) -> None:
        if self.failed:  # after a failed upload nothing more is written: an index would list the missing shard
            return
        try:
            fn(*args)
        except BaseException:
            self.failed = True
            raise

    def flush(self) -> None:
        """Wait for the queued uploads and index writes; raise the first error among them."""
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()

    def where(self, name: str) -> str:
        return join(self.url, name)

    def read_json_text(self, name: str) -> str | None:
        self.flush()
        with remote_errors(self.where(name)):
            try:
                return self.fs.cat_file(self._path(name)).decode()
            except FileNotFoundError:
                return None

    def write_json(self, name: str, obj) -> None:
        self._in_order(self._put_bytes, name, json_text(obj).encode())  # the text as it is now

    def _put_bytes(self, name: str, data: bytes) -> None:
        with remote_errors(self.where(name)):
            self.fs.pipe_file(self._path(name), data, **upload_deadline(self.fs, len(data)))

    def sizes(self, pattern: str) -> dict[str, int]:
        self.flush()
        with remote_errors(self.url):
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return {}
        names = {posixpath.basename(e["name"].rstrip("/")): e.get("size") or 0 for e in entries
                 if e.get("type") == "file"}
        return {n: s for n, s in names.items() if fnmatch.fnmatchcase(n, pattern)}

    def remove(self, name: str) -> None:
        self.flush()
        with remote_errors(self.where(name)):
            try:
                self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass

    def open_shard(self, name: str):
        return open(os.path.join(self.staging, name), "wb")

    def commit_shard(self, name: str, f) -> None:
        f.close()
        self.flush()  # the previous shard is up: one shard at a time waits on the local disk
        self._in_order(self._upload, name)

    def _upload(self, name: str) -> None:
        local = os.path.join(self.staging, name)
        with remote_errors(self.where(name)):
            self.fs.put_file(local, self._path(name), **upload_deadline(self.fs, os.path.getsize(local)))
        os.unlink(local)

    def discard_shard(self, name: str, f) -> None:
        try:
            f.close()
        except OSError:  # the staging disk is full; the file goes anyway
            pass
        Path(self.staging, name).unlink(missing_ok=True)

    def clean_partial(self, pattern: str, owned=lambda name: True) -> None:
        """Nothing to do: a partial shard only ever existed in a staging folder on the writer's disk."""

    def open_read(self, name: str):
        self.flush()
        return store.open_url(self.where(name))

    def holders(self, pattern: str) -> list[str]:
        """An object store has no locks: nobody is known to hold one."""
        return []

    def merging(self):
        """An object store has no locks: one writer per prefix (or per ``--part``) is the user's to ensure."""
        return nullcontext()
