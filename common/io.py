"""Atomic writes shared by every stage: a killed process leaves the last good file (or folder), never half of one."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


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
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def tmp_beside(path: str | os.PathLike) -> Path:
    """``PATH.tmp``: where a write goes before its rename, never taken for ``path`` by a reader."""
    return Path(path).with_name(Path(path).name + ".tmp")


def fresh_tmp_dir(path: str | os.PathLike) -> Path:
    """An empty :func:`tmp_beside` folder (a killed writer's leftovers removed), to fill and then
    :func:`replace_dir`."""
    tmp = tmp_beside(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync every file and folder under ``tmp``, then rename it to ``path`` (replacing a folder there)."""
    for folder, _, files in os.walk(tmp):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)
    shutil.rmtree(path, ignore_errors=True)
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
