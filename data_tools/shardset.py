"""Which shards a run reads: a folder's (or a URL's) index.json, a list of tars, a brace pattern, pipe: commands or
URLs, with the epoch length, the classes and each shard's count and sha256 that index.json lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from common.errors import VitpipeError
from data_tools import store
from data_tools.index import parse_index
from data_tools.positions import shard_names
from data_tools.shard import parts_progress


class LoaderError(VitpipeError, ValueError):
    """The shards cannot feed this run; said before training starts."""


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    num_samples: int
    classes: list[str] | None = None
    counts: dict[str, int] | None = None  # url -> samples index.json lists: what a damaged shard lost
    digests: dict[str, str] | None = None  # url -> sha256 index.json lists: a replaced shard is caught, a
    # resumed position is checked against them

    def describe(self) -> dict:
        """What a saved stream position refers to (see ``positions.shard_set_changes``)."""
        return {"names": shard_names(self.urls),
                "counts": [self.counts.get(u) for u in self.urls] if self.counts else None,
                "digests": [self.digests.get(u) for u in self.urls] if self.digests else None}


def _is_folder_url(spec) -> bool:
    """``s3://bucket/prefix``: a shard folder on an fsspec filesystem (not one tar, not a brace pattern)."""
    return store.is_url(spec) and store.scheme(spec) not in _WDS_SCHEMES and not spec.endswith(".tar") \
        and "{" not in spec


def _from_index(spec, num_samples: int | None) -> ShardSet:
    """The shards a folder's (or a URL's) index.json lists, with its epoch length and classes."""
    folder = store.shard_folder(spec)
    with store.errors_for(str(spec)):
        text = folder.read_json_text("index.json")
    index_path = folder.where("index.json")
    if text is None:
        with store.errors_for(str(spec)):
            parts = parts_progress(folder)
        raise LoaderError(f"{spec}: no index.json " + (f"yet: a --part K/N run is there ({parts[0]})" if parts else
                                                       "(shard it with vitpipe shard, or list the tars)"))
    index = parse_index(text, index_path)
    if not index.get("complete", False):
        raise LoaderError(f"{index_path}: sharding did not finish")
    if not index["shards"]:
        raise LoaderError(f"{index_path}: no shards (every input was skipped?)")
    urls = [folder.where(store.listed_shard(s["name"], index_path)) for s in index["shards"]]
    if isinstance(folder, store.LocalFolder):
        for url in urls:
            store.check_regular(url)
    return ShardSet(urls, index["total_samples"] if num_samples is None else num_samples, index.get("classes"),
                    {u: s["count"] for u, s in zip(urls, index["shards"])},
                    {u: s["sha256"] for u, s in zip(urls, index["shards"])})


def resolve_shards(spec, num_samples: int | None = None) -> ShardSet:
    """A folder (or fsspec URL, ``s3://bucket/prefix``) with index.json, a list of shards, a brace pattern,
    ``pipe:`` commands or URLs.

    The epoch length comes from index.json (beside local shards, or under the URL) or from ``num_samples``.
    """
    if isinstance(spec, (str, Path)) and (Path(spec).is_dir() or _is_folder_url(spec)):
        return _from_index(spec, num_samples)
    urls = wds.shardlists.expand_urls(spec) if isinstance(spec, str) else [str(u) for u in spec]
    if not urls:
        raise LoaderError(f"{spec}: no shards")
    local = [Path(u) for u in urls if "://" not in u and not u.startswith("pipe:")]
    for p in local:
        if not p.exists():
            raise LoaderError(f"{p}: shard does not exist")
        store.check_regular(p)
    classes = shard_counts = digests = None
    if len(local) == len(urls):
        parents = {p.parent for p in local}
        index_path = parents.pop() / "index.json" if len(parents) == 1 else None
        if index_path and index_path.is_file():
            index = parse_index(index_path.read_text(), str(index_path))
            counts = {s["name"]: s["count"] for s in index["shards"]}
            if all(p.name in counts for p in local):
                shard_counts = {u: counts[p.name] for u, p in zip(urls, local)}
                sha = {s["name"]: s["sha256"] for s in index["shards"]}
                digests = {u: sha[p.name] for u, p in zip(urls, local)}
                num_samples = sum(shard_counts.values()) if num_samples is None else num_samples
                classes = index.get("classes")
    if num_samples is None:
        raise LoaderError(f"{spec}: epoch length unknown; give a folder with index.json or set num_samples")
    return ShardSet(urls, num_samples, classes, shard_counts, digests)


_WDS_SCHEMES = ("http", "https")  # webdataset opens these (curl) and pipe: commands; fsspec the other URLs

