"""``vitpipe verify`` (every shard against index.json) and ``vitpipe inspect`` (what is in them)."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from common.io import atomic_path
from common.text import plural
from data_tools.images import decode_rgb
from data_tools.remote import RemoteFolder
from data_tools.shard import INDEX, read_index
from data_tools.store import LocalFolder, errors_for, listed_shard, shard_folder
from data_tools.tars import IMAGE_EXTS, HashingReader, image_bytes, read_tar


def check_shard(folder: LocalFolder | RemoteFolder, entry: dict, decode: bool = True) -> str | None:
    """One line describing what is wrong with a shard, or None if it is sound; the shard is read once."""
    try:
        f = folder.open_read(entry["name"])
    except FileNotFoundError:
        return f"{entry['name']}: missing"
    with f:
        stream = HashingReader(f)
        count, bad, error = _read_samples(folder.where(entry["name"]), stream, decode)
        stream.drain()
    problems = []
    if stream.size != entry["bytes"]:
        problems.append(f"size {stream.size} != {entry['bytes']} in index")
    if stream.sha.hexdigest() != entry["sha256"]:
        problems.append("sha256 differs from index")
    if error:
        problems.append(f"unreadable tar after {count} samples ({error})")
    elif count != entry["count"]:
        problems.append(f"{count} samples, index says {entry['count']}")
    if bad:
        problems.append(f"{len(bad)} sample(s) do not decode: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    return f"{entry['name']}: {'; '.join(problems)}" if problems else None


def _read_samples(name: str, stream, decode: bool) -> tuple[int, list[str], Exception | None]:
    """(samples read, the keys of those that do not decode, the error that ended the tar early or None)."""
    count, bad = 0, []
    try:
        for sample in read_tar(name, stream):
            count += 1
            key = sample["__key__"]
            data = image_bytes(sample)
            if data is None:
                bad.append(f"{key} (no image)")
            elif decode:
                try:
                    decode_rgb(data)
                except Exception as e:  # any decoder failure means a damaged sample
                    bad.append(f"{key} ({type(e).__name__})")
    except (tarfile.TarError, OSError, EOFError) as e:
        return count, bad, e
    return count, bad, None


def _shard_samples(folder: LocalFolder | RemoteFolder, name: str, problems: list[str]):
    """A shard's samples as far as they can be read; what stops the read is a line in ``problems``."""
    read = 0
    try:
        with folder.open_read(name) as f:
            for sample in read_tar(folder.where(name), f):
                read += 1
                yield sample
    except FileNotFoundError:
        problems.append(f"{name}: missing")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable after {read} samples ({e})")


def _meta(sample: dict) -> dict:
    """A sample's json member; a damaged one reads as empty (its image is what inspect shows)."""
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def verify(folder: str | Path, decode: bool = True, progress: bool = False) -> tuple[list[str], list[str]]:
    """Returns (problems, notes): a line per damaged or missing shard, and a line per stray file. ``progress``:
    a bar counting the samples checked, with rate and ETA, on a terminal (the problems go to stderr too: a log
    of them gets no bar lines)."""
    index = read_index(folder)
    where = shard_folder(folder)
    for entry in index["shards"]:
        listed_shard(entry["name"], where.where(INDEX))
    with errors_for(str(folder)), tqdm(total=index.get("total_samples"), unit="img", desc="verify", leave=False,
                                       disable=None if progress else True) as bar:
        problems = []
        for entry in index["shards"]:
            if problem := check_shard(where, entry, decode):
                problems.append(problem)
            bar.update(entry.get("count", 0))
        known = {e["name"] for e in index["shards"]}
        notes = [f"{name}: a tar not listed in index.json" for name in sorted(where.sizes("*.tar")) if name not in known]
    if not index.get("complete", False):
        problems.append(f"{where.where(INDEX)}: sharding did not finish (rerun the same vitpipe shard command)")
    return problems, notes


SORTED_MIN_SHARD = 10  # a smaller shard's class mix says little
SORTED_PURITY = 0.9


def class_sorting(index: dict) -> str | None:
    """A warning when a labelled shard set looks sorted by class, else None.

    Purity is the share of a shard's labelled samples in its largest class, averaged over shards of
    at least ``SORTED_MIN_SHARD`` (weighted by size). Shuffled shards mirror the corpus, so their
    purity is near the corpus's largest class share L; class-sorted shards have purity near 1. The
    set looks sorted when (purity - L) / (1 - L) >= 0.5, with at least two classes and two such shards.
    """
    totals = index.get("class_counts") or {}
    if len(totals) < 2:
        return None
    counts = [s["class_counts"] for s in index["shards"]
              if sum(s.get("class_counts", {}).values()) >= SORTED_MIN_SHARD]
    if len(counts) < 2:
        return None
    largest = max(totals.values()) / sum(totals.values())
    purity = sum(max(c.values()) for c in counts) / sum(sum(c.values()) for c in counts)
    if (purity - largest) / (1 - largest) < 0.5:
        return None
    one_class = sum(max(c.values()) >= SORTED_PURITY * sum(c.values()) for c in counts)
    return (f"the shards look sorted by class ({one_class} of {len(counts)} shards are >= {SORTED_PURITY:.0%} one "
            f"class; on average {purity:.0%} of a shard is its largest class, against {largest:.0%} of the corpus "
            "for its largest): training batches will be class-correlated; reshard without --no-shuffle "
            "(vitpipe shard SRC OUT --overwrite)")


def _quantiles(values: list[int]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    pick = [v[min(len(v) - 1, int(q * len(v)))] for q in (0.0, 0.1, 0.5, 0.9)] + [v[-1]]
    return "min {} / p10 {} / median {} / p90 {} / max {}".format(*pick)


def inspect(folder: str | Path, show: int = 5, grid: str | Path | None = None, grid_size: int = 25,
            seed: int = 0) -> tuple[str, list[str]]:
    """A human summary of a shard folder (with ``grid``, also a contact sheet PNG of random samples), and a
    line per shard that cannot be read to its end (empty, cut, missing) or image that does not decode."""
    index = read_index(folder)
    problems: list[str] = []
    with errors_for(str(folder)):
        return _inspect(shard_folder(folder), index, show, grid, grid_size, seed, problems), problems


def _inspect(folder: LocalFolder | RemoteFolder, index: dict, show: int, grid, grid_size: int, seed: int,
             problems: list[str]) -> str:
    classes = index.get("classes")
    lines = [
        f"{folder}: {plural(index['total_samples'], 'sample')} in {plural(len(index['shards']), 'shard')} "
        f"({sum(s['bytes'] for s in index['shards']) / 2**20:.1f} MiB), {plural(len(index['skipped']), 'input')} "
        "skipped",
    ]
    if warning := class_sorting(index):
        lines.append(f"warning: {warning}")
    if index["class_counts"]:
        lines.append(f"classes ({len(classes or index['class_counts'])}):")
        for k, c in index["class_counts"].items():
            name = classes[int(k)] if classes and int(k) < len(classes) else k
            lines.append(f"  {int(k):4d} {name:30s} {c}")
    reasons = Counter(s["reason"].split(" (")[0] for s in index["skipped"])
    for reason, c in reasons.most_common():
        lines.append(f"skipped: {c} x {reason}")
    widths, heights, shown, formats = [], [], [], Counter()
    rng = random.Random(seed)
    picked: list[tuple[bytes, str]] = []
    seen = 0
    for entry in index["shards"]:
        for sample in _shard_samples(folder, entry["name"], problems):
            key = sample["__key__"]
            meta = _meta(sample)
            widths.append(meta.get("width", 0))
            heights.append(meta.get("height", 0))
            formats.update(e for e in IMAGE_EXTS if e in sample)
            label = meta.get("label", "")
            if len(shown) < show:
                shown.append(f"  {key}  label={label!r}  {meta.get('width')}x{meta.get('height')}  {meta.get('source')}")
            if grid:
                seen += 1  # reservoir sampling: a uniform pick in one pass
                if len(picked) < grid_size:
                    picked.append((key, image_bytes(sample), label))
                elif (j := rng.randrange(seen)) < grid_size:
                    picked[j] = (key, image_bytes(sample), label)
    lines.append(f"original width:  {_quantiles(widths)}")
    lines.append(f"original height: {_quantiles(heights)}")
    lines.append("stored formats: " + ", ".join(f"{e} {c}" for e, c in formats.most_common()))
    lines.append("first samples:")
    lines += shown
    if grid:
        items = []
        for key, data, label in picked:
            try:
                items.append((decode_rgb(data), label))
            except Exception as e:  # any decoder failure means a damaged sample; it stays off the sheet
                problems.append(f"{key}: does not decode ({type(e).__name__}); left off the contact sheet")
        contact_sheet(items, grid)
        lines.append(f"wrote {grid} ({len(items)} images)")
    return "\n".join(lines)


def contact_sheet(items: list[tuple[Image.Image, str]], path: str | Path, cell: int = 128) -> None:
    cols = max(1, int(len(items) ** 0.5 + 0.999))
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(items):
        if (factor := cell // max(img.size)) > 1:  # small images (28 px) scaled up whole pixels, not left as stamps
            img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
        img.thumbnail((cell, cell))
        x, y = (i % cols) * cell, (i // cols) * (cell + 14)
        sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        draw.text((x + 2, y + cell), str(label)[:20], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
