"""Manifests: CSV, JSONL or Parquet files of (path, label) rows, on this machine or behind an fsspec URL."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from pathlib import Path

from common.redact import redact
from data_tools import store
from data_tools.sources.base import (
    LABEL_COLUMNS,
    Corpus,
    Input,
    ReadOptions,
    SourceError,
    is_fsspec_url,
    label_ids,
    source,
)

PATH_COLUMNS = ("path", "file", "filename", "file_name", "image_path", "image")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


@source("a manifest URL (s3://bucket/list.csv, .jsonl or .parquet; any fsspec scheme)",
        lambda src: is_fsspec_url(src) and src.lower().endswith(MANIFEST_SUFFIXES), priority=10)
def _remote_manifest(src: str, opts: ReadOptions) -> Corpus:
    with store.remote_errors(src):
        return read_manifest(src, opts.path_column, opts.label_column, opts.allow_local_paths)


@source("a manifest file (.csv, .jsonl or .parquet)", lambda src: not store.is_url(src) and Path(src).is_file(),
        priority=-10)
def _manifest(src: str, opts: ReadOptions) -> Corpus:
    return read_manifest(src, opts.path_column, opts.label_column)


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
