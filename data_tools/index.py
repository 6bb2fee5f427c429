"""``index.json``, the one file that says what a shard folder holds: read and checked in one place.

Every reader (verify, inspect, the loader, eval, training) goes through :func:`parse_index`, so a
hand-edited or damaged index is one line naming the file and the field, never a ``KeyError`` or
``TypeError`` somewhere later. The check is linear in the number of shards and skipped inputs.
"""

from __future__ import annotations

import json
import re

from common.errors import VitpipeError

INDEX = "index.json"
INDEX_FORMAT = "vitpipe-shards"
INDEX_VERSION = 1

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()


class IndexFileError(VitpipeError, ValueError):
    """An index.json that is not what vitpipe shard writes; the message names the file and the field."""


def parse_index(text: str, path: str) -> dict:
    """The index in ``text`` (read from ``path``, named in every message), checked field by field."""
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise IndexFileError(f"{path}: expected a JSON object, got {_kind(index)}")
    if index.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{path}: not a vitpipe shard index (field 'format' is {index.get('format')!r}, "
                          f"not {INDEX_FORMAT!r})")
    check_index(index, path)
    return index


def check_index(index: dict, path: str) -> None:
    """Raise naming ``path`` and the first field that is missing, of the wrong type or inconsistent."""
    def bad(field: str, expected: str, value) -> IndexFileError:
        return IndexFileError(f"{path}: field {field!r}: expected {expected}, got {_show(value)}")

    shards = index.get("shards", _MISSING)
    if not isinstance(shards, list):
        raise bad("shards", "a list of shards", shards)
    for i, entry in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise bad(where, "an object", entry)
        if not isinstance(entry.get("name", _MISSING), str) or not entry["name"]:
            raise bad(f"{where}.name", "a file name", entry.get("name", _MISSING))
        for key in ("count", "bytes"):
            if not _count(entry.get(key, _MISSING)):
                raise bad(f"{where}.{key}", "an integer >= 0", entry.get(key, _MISSING))
        if not isinstance(entry.get("sha256", _MISSING), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"{where}.sha256", "64 hex digits", entry.get("sha256", _MISSING))
        _check_counts(entry.get("class_counts", {}), f"{where}.class_counts", bad)
    if not _count(index.get("total_samples", _MISSING)):
        raise bad("total_samples", "an integer >= 0", index.get("total_samples", _MISSING))
    listed = sum(entry["count"] for entry in shards)
    if index["total_samples"] != listed:
        raise IndexFileError(f"{path}: field 'total_samples' is {index['total_samples']} but the shards' counts add up "
                          f"to {listed}")
    _check_counts(index.get("class_counts", _MISSING), "class_counts", bad)
    classes = index.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise bad("classes", "null or a list of names", classes)
    skipped = index.get("skipped", _MISSING)
    if not isinstance(skipped, list):
        raise bad("skipped", "a list", skipped)
    for i, entry in enumerate(skipped):
        if not isinstance(entry, dict) or not isinstance(entry.get("reason"), str):
            raise bad(f"skipped[{i}]", "an object with a 'reason'", entry)
    if not isinstance(index.get("complete", False), bool):
        raise bad("complete", "true or false", index.get("complete"))


def _check_counts(counts, field: str, bad) -> None:
    if not isinstance(counts, dict):
        raise bad(field, "an object of class -> count", counts)
    for key, value in counts.items():
        if not key.lstrip("-").isdigit():
            raise bad(f"{field}.{key}", "a class number as the key", key)
        if not _count(value):
            raise bad(f"{field}.{key}", "an integer >= 0", value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value) -> str:
    return {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    """A value as the message shows it: short, on one line."""
    text = "nothing (the field is missing)" if value is _MISSING else "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
