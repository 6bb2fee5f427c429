"""Hugging Face datasets: ``hf:NAME``, ``hf:imagefolder:DIR`` (offline ``load_dataset``) or a ``save_to_disk``
folder."""

from __future__ import annotations

from pathlib import Path

from data_tools import store
from data_tools.sources.base import LABEL_COLUMNS, Corpus, Input, ReadOptions, SourceError, label_ids, source

HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@source("hf:NAME or hf:imagefolder:DIR (Hugging Face datasets)",
        lambda src: src.startswith("hf:") and not src.startswith("hf://"), priority=10)
def _hf_spec(src: str, opts: ReadOptions) -> Corpus:
    return read_hf_dataset(src[3:], opts.split, opts.label_column)


@source("a save_to_disk folder", lambda src: not store.is_url(src) and any(
    (Path(src) / marker).is_file() for marker in HF_MARKERS), priority=10)
def _hf_folder(src: str, opts: ReadOptions) -> Corpus:
    return read_hf_dataset(src, opts.split, opts.label_column)


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
