"""Corpus readers: an image folder, a manifest (CSV / JSONL / Parquet) or a Hugging Face dataset.

Each reader lists its inputs in a stable order (so every machine and every rerun agrees) as
``Input`` records; the bytes are read later, in the worker that encodes them.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from common.errors import VitpipeError

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
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", source).strip("_")[-60:]
    return f"{readable}-{hashlib.sha1(source.encode('utf-8')).hexdigest()[:10]}"


def read_source(src: str, path_column: str | None = None, label_column: str | None = None,
                split: str | None = None) -> Corpus:
    if src.startswith("hf:"):
        return read_hf_dataset(src[3:], split, label_column)
    p = Path(src)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return read_hf_dataset(src, split, label_column)
        return read_image_folder(p)
    if p.is_file():
        return read_manifest(p, path_column, label_column)
    raise SourceError(f"{src}: no such folder or manifest file")


def read_image_folder(root: Path) -> Corpus:
    """Class subfolders (labels from their sorted names); images below a class folder belong to it.

    Whatever cannot be an input is listed too, with its reason, for the shard writer to record as
    skipped: files outside a class folder, hidden files and folders, links that lead nowhere, FIFOs,
    sockets. Non-image files are listed as inputs and skipped when they do not decode.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
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
    return Input(str(path.relative_to(root)), label, str(path), skip=skip)


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
        if e.name.startswith("."):
            out.append((path, "hidden folder (not read)" if is_dir else "hidden file"))
        elif is_dir:
            if descend:
                out += _listing(path)
            else:
                out.append((path, None))
        else:
            out.append((path, _file_problem(path)))
    return out


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


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return rows
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read manifest ({e})") from None
    raise SourceError(f"{path}: unknown manifest type {suffix!r} (expected .csv, .jsonl or .parquet)")


def _pick(columns, wanted: str | None, candidates, what: str, path: Path, required: bool) -> str | None:
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


def read_manifest(path: Path, path_column: str | None, label_column: str | None) -> Corpus:
    rows = _rows(path)
    if not rows:
        raise SourceError(f"{path}: manifest has no rows")
    columns = list(rows[0].keys())
    pcol = _pick(columns, path_column, PATH_COLUMNS, "path", path, required=True)
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", path, required=False)
    ids, classes = label_ids([r.get(lcol) for r in rows] if lcol else [None] * len(rows))
    inputs = []
    for n, (row, label) in enumerate(zip(rows, ids), 1):
        rel = row.get(pcol)
        if not rel:
            raise SourceError(f"{path}: row {n} has an empty {pcol!r}")
        full = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        inputs.append(Input(str(rel), label, str(full)))
    return Corpus(inputs, classes)


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
    # a manifest may name a FIFO, whose open() would wait for a writer forever
    if problem := _file_problem(path):
        raise Unreadable(problem)
    with open(path, "rb") as f:
        return f.read()
