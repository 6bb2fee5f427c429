"""What every corpus source shares: the ``Input`` and ``Corpus`` records, the ``SOURCES`` registry and
``read_source`` that picks a source for a spec, and reading one input's bytes (in the worker that encodes it)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import VitpipeError
from common.redact import redact
from common.registry import Registry
from data_tools import store

LABEL_COLUMNS = ("label", "labels", "class", "cls", "target")


class SourceError(VitpipeError, ValueError):
    """A corpus that cannot be read; the message names the file, column or key."""


class Unreadable(Exception):
    """One input whose bytes cannot be read; the message is the reason recorded in the index."""


@dataclass(frozen=True)
class Input:
    source: str  # a path, or "dataset[split][row]": what the index and the sample's json name
    label: int | None
    path: str | None = None  # read the bytes from here ...
    row: int | None = None  # ... or from this row of the Hugging Face dataset
    skip: str | None = None  # known to be unusable before reading it: the reason


@dataclass
class Corpus:
    inputs: list[Input]
    classes: list[str] | None
    hf_dataset: object | None = None
    image_column: str | None = None


def sample_key(source: str) -> str:
    """Unique, stable, dot-free key: the readable part of the source plus a hash of all of it."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", redact(source)).strip("_")[-60:]
    return f"{readable}-{hashlib.sha1(source.encode('utf-8')).hexdigest()[:10]}"


@dataclass(frozen=True)
class ReadOptions:
    path_column: str | None = None
    label_column: str | None = None
    split: str | None = None
    allow_local_paths: bool = False  # a manifest on an object store may name this machine's files


@dataclass(frozen=True)
class Source:
    name: str  # what the user is told when nothing matches
    matches: Callable[[str], bool]
    read: Callable[[str, ReadOptions], Corpus]


SOURCES: Registry[Source] = Registry("source", SourceError)


def source(name: str, matches: Callable[[str], bool], priority: int = 0):
    """Register a corpus reader ``read(spec, ReadOptions) -> Corpus`` for the specs ``matches`` accepts (``name``:
    what the user is told when nothing matches), under the reader's own name. Of the sources that match a spec, the
    highest ``priority`` reads it: the catch-alls (any URL, any folder, any file) are at -10, so a new source (0) is
    tried before them."""
    def register(read):
        SOURCES.add(read.__name__.lstrip("_"), Source(name, matches, read), priority)
        return read
    return register


def read_source(src: str, path_column: str | None = None, label_column: str | None = None,
                split: str | None = None, allow_local_paths: bool = False) -> Corpus:
    opts = ReadOptions(path_column, label_column, split, allow_local_paths)
    found = SOURCES.first(lambda s: s.matches(src))
    if found is None:
        kinds = "; ".join(s.name for _, s in SOURCES.items())
        if store.is_url(src):
            raise SourceError(f"{src}: unknown URL scheme {store.scheme(src)}:// (sources: {kinds}; "
                              f"known URL schemes: {', '.join(store.known_schemes())})")
        raise SourceError(f"{src}: no such folder or manifest file (sources: {kinds})")
    return found[1].read(src, opts)


def is_fsspec_url(src: str) -> bool:
    if not store.is_url(src):
        return False
    import fsspec

    return store.scheme(src) in fsspec.available_protocols()


def printable(name: str) -> str:
    """A file name as the index and the logs show it: a name that is not valid UTF-8 (Python holds its bad
    bytes as lone surrogates, which no JSON or tar writer takes) with those bytes escaped, ``bad\\xff.jpg``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as one image file, or None for a regular file (or a link to one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return "broken symbolic link"
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "link to a folder (not followed)"
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
    return f"not a regular file ({kind})"


def label_ids(values: list) -> tuple[list[int | None], list[str] | None]:
    """Integer labels stay as they are; names become ids in sorted order."""
    present = [v for v in values if v is not None and v != ""]
    if not present:
        return [None] * len(values), None
    if all(isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) for v in present):
        ids = [None if v is None or v == "" else int(v) for v in values]
        return ids, [str(i) for i in range(max(i for i in ids if i is not None) + 1)]
    names = sorted({str(v) for v in present})
    lookup = {n: i for i, n in enumerate(names)}
    return [None if v is None or v == "" else lookup[str(v)] for v in values], names


def read_bytes(inp: Input, corpus: Corpus) -> bytes:
    if inp.path is not None:
        return _read_file(inp.path)
    cell = corpus.hf_dataset[inp.row][corpus.image_column]
    if cell.get("bytes"):
        return cell["bytes"]
    return _read_file(cell["path"])


def _read_file(path: str) -> bytes:
    if store.is_url(path):
        return _read_object(path)
    # a manifest may name a FIFO, whose open() would wait for a writer forever
    if problem := file_problem(path):
        raise Unreadable(problem)
    with open(path, "rb") as f:
        return f.read()


def _read_object(url: str) -> bytes:
    """One object's bytes. A missing or forbidden object is that input's skip; an unusable store (its
    client not installed, no credentials, endpoint down) is a StoreError that ends the run: every input
    would fail alike. A scheme nothing knows is that row's skip."""
    if not is_fsspec_url(url):
        raise Unreadable(f"unreadable (unknown URL scheme {store.scheme(url)}://)")
    fs, path = store.filesystem(url)
    with store.remote_errors(url):
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise Unreadable(f"unreadable ({store.describe(e)})") from None
