"""Atomic writes shared by every stage: a killed process leaves the last good file (or folder), never half of one.

No write goes through a symbolic link at its last component: a file is created new (``O_EXCL | O_NOFOLLOW``)
under a temporary name and renamed over its final name, which replaces a link there instead of following it.
A link planted where vitpipe writes (``OUT/.vitpipe.lock``, ``confusion.png``) can then not make it overwrite
the link's target, whoever runs it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from common.errors import VitpipeError


class UnsafePath(VitpipeError, ValueError):
    """A write that would leave its folder (through a link, or a name with a folder in it); the message names it."""


def create_new(path: str | os.PathLike, mode: int = 0o666) -> int:
    """A write descriptor on ``path`` created new: whatever was there (a killed writer's file, a planted link) is
    removed first, never opened."""
    remove(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def open_new(path: str | os.PathLike, mode: int = 0o666):
    """``create_new`` as a binary file object."""
    return os.fdopen(create_new(path, mode), "wb")


def open_append(path: str | os.PathLike):
    """``path`` opened for appending text (created if missing), refused if it is a link or not a regular file."""
    return os.fdopen(_own_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")


def open_update(path: str | os.PathLike):
    """``path`` opened to read and change in place (binary: seek, truncate), refused if it is a link or not a
    regular file."""
    return os.fdopen(_own_file(path, os.O_RDWR), "r+b")


def _own_file(path: str | os.PathLike, flags: int) -> int:
    """A descriptor on the regular file ``path`` opened with ``flags``, never through a link at its name."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{path}: a symbolic link; vitpipe does not write through one (remove it)") from None
        if e.errno != errno.ENXIO:  # a FIFO nobody reads
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise UnsafePath(f"{path}: not a regular file; vitpipe writes only to its own files (remove it)")
    return fd


def remove(path: str | os.PathLike) -> None:
    """Remove a file, a link (not its target) or a folder at ``path``, if any."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``path`` (as given), once its real location (links followed) is checked to be ``root``'s or under it."""
    real, top = Path(path).resolve(), Path(root).resolve()
    if real != top and top not in real.parents:
        raise UnsafePath(f"{path}: leads to {real}, outside {root}; vitpipe writes only inside its output folder "
                         "(remove the link)")
    return Path(path)


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (another thread may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no way to read it without setting it: put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    The file gets the permissions any new file gets (0666 less the umask), whatever the writer
    used: safetensors, for one, creates its files 0600, which teammates on a shared disk cannot read.
    """
    path = Path(path)
    tmp = tmp_beside(path)
    os.close(create_new(tmp))
    try:
        yield tmp
        # a regular file still (the writer may have made it anew: safetensors does), not a link swapped in
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            raise UnsafePath(f"{tmp}: replaced by something else while being written; not moving it to {path}")
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces a link at ``path``, never follows it
        fsync_dir(path.parent)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def tmp_beside(path: str | os.PathLike) -> Path:
    """``PATH.tmp``: where a write goes before its rename, never taken for ``path`` by a reader."""
    return Path(path).with_name(Path(path).name + ".tmp")


def fresh_tmp_dir(path: str | os.PathLike) -> Path:
    """An empty :func:`tmp_beside` folder (a killed writer's leftovers removed), to fill and then
    :func:`replace_dir`."""
    tmp = tmp_beside(path)
    remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync every file and folder under ``tmp``, then rename it to ``path`` (replacing a folder there)."""
    for folder, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)
    remove(path)  # a link there goes, its target stays
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_text(obj) -> str:
    """How every JSON file we write is laid out (so a file's bytes do not depend on where it is stored)."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))
