"""Corpus readers: an image folder, a manifest (CSV / JSONL / Parquet) or a Hugging Face dataset, on a
local disk or behind any fsspec URL (``s3://bucket/prefix`` of class folders, ``s3://.../list.csv``).

Each reader lists its inputs in a stable order (so every machine and every rerun agrees) as
``Input`` records; the bytes are read later, in the worker that encodes them. Readers are found
through ``SOURCES``: a new kind of source is one function registered with ``@source``.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import VitpipeError
from common.redact import redact
from data_tools import store

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".tga"}
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image_path", "image")
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


SOURCES: list[Source] = []  # tried in order; the first whose ``matches`` accepts the spec reads it


def source(name: str, matches: Callable[[str], bool]):
    """Register a corpus reader ``read(spec, ReadOptions) -> Corpus`` for the specs ``matches`` accepts."""
    def register(read):
        SOURCES.append(Source(name, matches, read))
        return read
    return register


def read_source(src: str, path_column: str | None = None, label_column: str | None = None,
                split: str | None = None, allow_local_paths: bool = False) -> Corpus:
    opts = ReadOptions(path_column, label_column, split, allow_local_paths)
    found = next((s for s in SOURCES if s.matches(src)), None)
    if found is None:
        kinds = "; ".join(s.name for s in SOURCES)
        if store.is_url(src):
            raise SourceError(f"{src}: unknown URL scheme {store.scheme(src)}:// (sources: {kinds}; "
                              f"known URL schemes: {', '.join(store.known_schemes())})")
        raise SourceError(f"{src}: no such folder or manifest file (sources: {kinds})")
    return found.read(src, opts)


MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def _is_fsspec_url(src: str) -> bool:
    if not store.is_url(src):
        return False
    import fsspec

    return store.scheme(src) in fsspec.available_protocols()


@source("hf:NAME or hf:imagefolder:DIR (Hugging Face datasets)",
        lambda src: src.startswith("hf:") and not src.startswith("hf://"))
def _hf_spec(src: str, opts: ReadOptions) -> Corpus:
    return read_hf_dataset(src[3:], opts.split, opts.label_column)


@source("a manifest URL (s3://bucket/list.csv, .jsonl or .parquet; any fsspec scheme)",
        lambda src: _is_fsspec_url(src) and src.lower().endswith(MANIFEST_SUFFIXES))
def _remote_manifest(src: str, opts: ReadOptions) -> Corpus:
    with store.remote_errors(src):
        return read_manifest(src, opts.path_column, opts.label_column, opts.allow_local_paths)


@source("a URL of class folders (s3://bucket/prefix; any fsspec scheme)", _is_fsspec_url)
def _remote_folder(src: str, opts: ReadOptions) -> Corpus:
    with store.remote_errors(src):
        return read_remote_folder(src)


@source("a save_to_disk folder", lambda src: not store.is_url(src) and any(
    (Path(src) / marker).is_file() for marker in HF_MARKERS))
def _hf_folder(src: str, opts: ReadOptions) -> Corpus:
    return read_hf_dataset(src, opts.split, opts.label_column)


@source("a folder of class folders", lambda src: not store.is_url(src) and Path(src).is_dir())
def _folder(src: str, opts: ReadOptions) -> Corpus:
    return read_image_folder(Path(src))


@source("a manifest file (.csv, .jsonl or .parquet)", lambda src: not store.is_url(src) and Path(src).is_file())
def _manifest(src: str, opts: ReadOptions) -> Corpus:
    return read_manifest(src, opts.path_column, opts.label_column)


def read_image_folder(root: Path) -> Corpus:
    """Class subfolders (labels from their sorted names); images below a class folder belong to it.

    Whatever cannot be an input is listed too, with its reason, for the shard writer to record as
    skipped: files outside a class folder, hidden files and folders, links that lead nowhere, FIFOs,
    sockets. Non-image files are listed as inputs and skipped when they do not decode.
    """
    classes = sorted(d.name for d in root.iterdir()
                     if d.is_dir() and not d.name.startswith(".") and _utf8_problem(d.name) is None)
    if not classes:
        return Corpus([_input(p, root, None, reason) for p, reason in _listing(root)], None)
    inputs = []
    for label, name in enumerate(classes):
        inputs += [_input(p, root, label, reason) for p, reason in _listing(root / name)]
    for p, reason in _listing(root, descend=False):
        if p.name not in classes:
            inputs.append(_input(p, root, None, reason or "outside any class folder"))
    return Corpus(inputs, classes)


def _input(path: Path, root: Path, label: int | None, skip: str | None) -> Input:
    return Input(printable(str(path.relative_to(root))), label, str(path), skip=skip)


def printable(name: str) -> str:
    """A file name as the index and the logs show it: a name that is not valid UTF-8 (Python holds its bad
    bytes as lone surrogates, which no JSON or tar writer takes) with those bytes escaped, ``bad\\xff.jpg``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _utf8_problem(name: str) -> str | None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8 (skipped; rename it)"
    return None


def _listing(folder: Path, descend: bool = True) -> list[tuple[Path, str | None]]:
    """Every entry below ``folder``, sorted as paths sort: (path, None) for a file to read, or
    (path, why it is not an input). Hidden folders and links to folders are listed, not entered."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        return [(folder, f"unreadable folder ({e.strerror or e})")]
    out = []
    for e in entries:
        path = Path(e.path)
        is_dir = e.is_dir(follow_symlinks=False)
        if problem := _utf8_problem(e.name):
            out.append((path, f"folder {problem}" if is_dir else f"file {problem}"))
        elif e.name.startswith("."):
            out.append((path, "hidden folder (not read)" if is_dir else "hidden file"))
        elif is_dir:
            if descend:
                out += _listing(path)
            else:
                out.append((path, None))
        else:
            out.append((path, _file_problem(path)))
    return out


def read_remote_folder(url: str) -> Corpus:
    """An fsspec prefix laid out as ``read_image_folder`` expects, listed in one recursive listing and in the
    same order (and with the same sources) as the same tree on a local disk."""
    fs, root = store.filesystem(url)
    root = root.rstrip("/")
    names = sorted(p[len(root) + 1:].split("/") for p in fs.find(root, detail=False)
                    if p.startswith(root + "/") and not p.endswith("/"))
    if not names:
        raise SourceError(f"{url}: no objects under this prefix (a wrong bucket or prefix?)")
    classes = sorted({parts[0] for parts in names if len(parts) > 1 and not parts[0].startswith(".")})
    label = {name: i for i, name in enumerate(classes)}
    inputs, seen_hidden, base = [], set(), url.rstrip("/")
    for parts in names:
        hidden = next((i for i, p in enumerate(parts) if p.startswith(".")), None)
        if hidden is None:
            skip = "outside any class folder" if classes and len(parts) == 1 else None
        elif hidden == len(parts) - 1:
            skip = "hidden file"
        else:  # a hidden folder: listed once, as the folder, and not entered (as a local one)
            parts = parts[:hidden + 1]
            if tuple(parts) in seen_hidden:
                continue
            seen_hidden.add(tuple(parts))
            skip = "hidden folder (not read)"
        rel = "/".join(parts)
        in_class = len(parts) > 1 and parts[0] in label
        inputs.append(Input(rel, label[parts[0]] if in_class else None, store.join(base, rel), skip=skip))
    # local order: a class folder's files, class by class, then what lies outside the class folders
    inputs.sort(key=lambda inp: inp.label is None)
    return Corpus(inputs, classes or None)


def _file_problem(path: str | os.PathLike) -> str | None:
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


def _rows(path: str) -> list[dict]:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise SourceError(f"{path}: unknown manifest type {suffix!r} (expected .csv, .jsonl or .parquet)")
    try:
        data = store.read_bytes(path) if store.is_url(path) else Path(path).read_bytes()
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
        if suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return rows
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(io.BytesIO(data)).to_pylist()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read manifest ({e})") from None


def _pick(columns, wanted: str | None, candidates, what: str, path: str, required: bool) -> str | None:
    if wanted:
        if wanted not in columns:
            raise SourceError(f"{path}: no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise SourceError(f"{path}: no {what} column (looked for {', '.join(candidates)}; name it with --{what}-column)")
    return found


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


def read_manifest(path: str | Path, path_column: str | None, label_column: str | None,
                  allow_local_paths: bool = False) -> Corpus:
    """Rows of (path, label); a row's path is absolute, a URL, or relative to the manifest's folder (or URL).

    A manifest on an object store names objects of that store only (its scheme): whoever can write the
    manifest could otherwise pull this machine's files (``/etc/...``, ``file://``) into the shards.
    ``allow_local_paths`` lifts that."""
    path = str(path)
    rows = _rows(path)
    if not rows:
        raise SourceError(f"{path}: manifest has no rows")
    columns = list(rows[0].keys())
    pcol = _pick(columns, path_column, PATH_COLUMNS, "path", path, required=True)
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", path, required=False)
    ids, classes = label_ids([r.get(lcol) for r in rows] if lcol else [None] * len(rows))
    if classes is not None and None in ids:
        n = ids.index(None) + 1
        raise SourceError(f"{path}: row {n} has no {lcol!r} but {len(ids) - ids.count(None)} of {len(ids)} rows do; "
                          "label every row (or none, for an unlabelled corpus)")
    inputs, first_row = [], {}
    for n, (row, label) in enumerate(zip(rows, ids), 1):
        rel = row.get(pcol)
        if not rel:
            raise SourceError(f"{path}: row {n} has an empty {pcol!r}")
        where = _resolve(path, str(rel))
        if store.is_url(path) and not allow_local_paths and store.scheme(where) != store.scheme(path):
            raise SourceError(f"{redact(path)}: row {n} names {redact(str(rel))!r}, not an object of "
                              f"{store.scheme(path)}://; a manifest on an object store names only objects there "
                              "(--allow-local-paths lets it name this machine's files)")
        skip = None
        if where in first_row:  # the same image listed twice: one sample, or two labels that contradict
            m = first_row[where]
            if ids[m - 1] != label:
                raise SourceError(f"{path}: {rel} is listed with different labels ({_label_name(ids[m - 1], classes)} "
                                  f"in row {m}, {_label_name(label, classes)} in row {n})")
            skip = f"listed again (row {m} has it)"
        else:
            first_row[where] = n
        inputs.append(Input(str(rel), label, where, skip=skip))
    return Corpus(inputs, classes)


def _label_name(label: int | None, classes: list[str] | None) -> str:
    return repr(classes[label]) if classes and label is not None and label < len(classes) else repr(label)


def _resolve(manifest: str, rel: str) -> str:
    if store.is_url(rel) or os.path.isabs(rel):
        return rel
    if store.is_url(manifest):
        return store.join(store.parent(manifest), rel)
    return str(Path(manifest).parent / rel)


def read_hf_dataset(spec: str, split: str | None, label_column: str | None) -> Corpus:
    """A ``save_to_disk`` folder, or an offline ``load_dataset`` spec: ``hf:imagefolder:DIR``, ``hf:NAME``."""
    import datasets

    try:
        if Path(spec).is_dir() and not spec.startswith("imagefolder:"):
            ds = datasets.load_from_disk(spec)
        elif spec.startswith("imagefolder:"):
            ds = datasets.load_dataset("imagefolder", data_dir=spec.split(":", 1)[1])
        else:
            ds = datasets.load_dataset(spec)
    except Exception as e:  # datasets raises many types; the user needs one line
        raise SourceError(f"{spec}: cannot load Hugging Face dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise SourceError(f"{spec}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    split = split or "train"
    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise SourceError(f"{spec}: no Image column (columns: {', '.join(ds.column_names)})")
    ds = ds.cast_column(image_col, datasets.Image(decode=False))
    lcol = label_column or next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
    if lcol and lcol not in ds.column_names:
        raise SourceError(f"{spec}: no column {lcol!r} (columns: {', '.join(ds.column_names)})")
    classes = None
    if lcol and isinstance(ds.features[lcol], datasets.ClassLabel):
        classes, labels = list(ds.features[lcol].names), list(ds[lcol])
    elif lcol:
        labels, classes = label_ids(list(ds[lcol]))
    else:
        labels = [None] * len(ds)
    name = Path(spec.split(":", 1)[-1]).name or spec
    inputs = [Input(f"{name}[{split}][{i}]", labels[i], None, i) for i in range(len(ds))]
    return Corpus(inputs, classes, hf_dataset=ds, image_column=image_col)


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
    if problem := _file_problem(path):
        raise Unreadable(problem)
    with open(path, "rb") as f:
        return f.read()


def _read_object(url: str) -> bytes:
    """One object's bytes. A missing or forbidden object is that input's skip; an unusable store (its
    client not installed, no credentials, endpoint down) is a StoreError that ends the run: every input
    would fail alike. A scheme nothing knows is that row's skip."""
    if not _is_fsspec_url(url):
        raise Unreadable(f"unreadable (unknown URL scheme {store.scheme(url)}://)")
    fs, path = store.filesystem(url)
    with store.remote_errors(url):
        try:
            return fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise Unreadable(f"unreadable ({store.describe(e)})") from None
