"""Folders of class folders, on this machine or under an fsspec URL (``s3://bucket/prefix``)."""

from __future__ import annotations

import os
from pathlib import Path

from data_tools import store
from data_tools.sources.base import (
    Corpus,
    Input,
    ReadOptions,
    SourceError,
    file_problem,
    is_fsspec_url,
    printable,
    source,
)


@source("a URL of class folders (s3://bucket/prefix; any fsspec scheme)", is_fsspec_url, priority=-10)
def _remote_folder(src: str, opts: ReadOptions) -> Corpus:
    with store.remote_errors(src):
        return read_remote_folder(src)


@source("a folder of class folders", lambda src: not store.is_url(src) and Path(src).is_dir(), priority=-10)
def _folder(src: str, opts: ReadOptions) -> Corpus:
    return read_image_folder(Path(src))


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


def _input(path: Path, root: Path, label: int | None, skip: str | None) -> Input:
    return Input(printable(str(path.relative_to(root))), label, str(path), skip=skip)


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
            out.append((path, file_problem(path)))
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
