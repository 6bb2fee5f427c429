"""Corpus readers: an image folder, a manifest (CSV / JSONL / Parquet) or a Hugging Face dataset, on a
local disk or behind any fsspec URL (``s3://bucket/prefix`` of class folders, ``s3://.../list.csv``).

Each reader lists its inputs in a stable order (so every machine and every rerun agrees) as
``Input`` records; the bytes are read later, in the worker that encodes them. Readers are found
through ``SOURCES`` (``base``), one module per kind: a new kind of source is one module whose reader is
registered with ``@source``, plus its name in the import line below.
"""

from data_tools.sources import folders, hf, manifests  # noqa: F401  (each registers its sources)
from data_tools.sources.base import (
    SOURCES,
    Corpus,
    Input,
    ReadOptions,
    Source,
    SourceError,
    Unreadable,
    read_bytes,
    read_source,
    sample_key,
    source,
)
from data_tools.sources.folders import read_image_folder, read_remote_folder
from data_tools.sources.hf import read_hf_dataset
from data_tools.sources.manifests import read_manifest

__all__ = ["SOURCES", "Corpus", "Input", "ReadOptions", "Source", "SourceError", "Unreadable", "read_bytes",
           "read_hf_dataset", "read_image_folder", "read_manifest", "read_remote_folder", "read_source", "sample_key",
           "source"]
