"""One writer per folder: an advisory lock (``flock``) on a file in the folder that records its holder.

The kernel drops a flock when the process holding it dies (SIGKILL included), so a lock left by a dead
process is simply taken and its stale record overwritten. Forked children (DataLoader and pool workers)
close their copy of the lock at fork, so a holder's orphaned worker never keeps a folder locked after a
kill. The file is removed on release.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
from datetime import datetime, timezone
from pathlib import Path

from common.errors import VitpipeError

LOCK = ".vitpipe.lock"

_held: set[int] = set()  # file descriptors of the locks this process holds


def _forget_in_child() -> None:
    for fd in _held:
        os.close(fd)  # the parent's lock stays: a flock lives until its last descriptor closes
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class FolderBusy(VitpipeError):
    """Another run holds the folder's lock; the message names it."""


class UnsafeLock(VitpipeError):
    """Something other than a plain file sits where the lock file goes; the message names it."""


class FolderLock:
    """``with FolderLock(folder, "vitpipe shard"):`` or ``acquire()`` / ``release()``.

    ``record`` adds fields to the holder's record (e.g. the launch a training run belongs to).
    """

    def __init__(self, folder: str | os.PathLike, what: str, name: str = LOCK, **record):
        self.path = Path(folder) / name
        self.record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), **record}
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096)
                os.close(fd)
                raise FolderBusy(f"{self.path.parent}: in use by {_describe(holder)}; wait for it to finish or "
                                 "use another folder") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder we waited on removed this file on release: lock the one there now
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({**self.record, "started": started}).encode())
        self.fd = fd
        _held.add(fd)
        return self

    def _open(self) -> int:
        """The lock file, opened (created if missing) only if it is a regular file: writing its record through a
        planted link would overwrite the link's target."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            raise UnsafeLock(f"{self.path}: not vitpipe's lock file (a symbolic link, or not a regular file); "
                             "remove it, then run again")
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: a waiting opener then sees a new file
        _held.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_of(path: str | os.PathLike) -> str | None:
    """Who holds the lock file ``path`` now, in words; None when nobody does. Probes with a shared lock, so two
    probers never see each other, only a holder's exclusive lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # missing (nobody holds it) or not a regular file (whose acquire refuses anyway)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(os.read(fd, 4096))
    finally:
        os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        r = json.loads(raw)
        return f"{r['what']} (pid {r['pid']} on {r['host']}, started {r['started']})"
    except (ValueError, KeyError, TypeError):
        return "another run (it has not recorded itself yet)"
