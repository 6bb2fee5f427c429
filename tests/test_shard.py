import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from data_tools.engines import ENGINES, EngineError, run_engine
from data_tools.images import EncodeOptions, decode_rgb
from data_tools.shard import ShardError, ShardOptions, parse_size, shard
from data_tools.tars import read_tar
from data_tools.verify import class_sorting, inspect, verify
from vitpipe.cli import main

from .corpus import awkward_images, bad_files, write_files, write_folder
from .helpers import vitpipe_cmd


def read_all(out):
    index = json.loads((out / "index.json").read_text())
    samples = {}
    for s in index["shards"]:
        for sample in read_tar(out / s["name"]):
            key = sample.pop("__key__")
            sample.pop("__url__")
            assert key not in samples
            samples[key] = sample
    return index, samples


def by_source(samples):
    return {json.loads(s["json"])["source"]: s for s in samples.values()}


@pytest.fixture
def messy(tmp_path):
    src = tmp_path / "src"
    write_files(src / "good", awkward_images())
    write_files(src / "bad", bad_files())
    write_files(src / "good", {"readme.txt": b"not an image"})
    write_files(src, {"stray.jpg": awkward_images()["UPPER.JPEG"]})
    return src


def test_awkward_images_kept_as_rgb_with_labels(messy, tmp_path):
    index = shard(str(messy), tmp_path / "out", ShardOptions(samples_per_shard=5), progress=False)
    _, samples = read_all(tmp_path / "out")
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", key) for key in samples)
    kept = by_source(samples)
    assert set(kept) == {f"good/{n}" for n in awkward_images()}
    assert index["classes"] == ["bad", "good"] and index["class_counts"] == {"1": len(awkward_images())}
    for source, sample in kept.items():
        assert int(sample["cls"]) == 1 and json.loads(sample["json"])["label"] == "good"
        img = decode_rgb(next(sample[e] for e in ("jpg", "png", "webp") if e in sample))
        assert img.mode == "RGB", source
    rotated = decode_rgb(kept["good/rotated.jpg"]["jpg"])
    assert rotated.size == (20, 40)  # orientation applied: portrait now
    top, bottom = np.asarray(rotated)[2, 10], np.asarray(rotated)[37, 10]
    assert top[0] > 200 and bottom[2] > 200  # left half (red) went to the top, blue to the bottom
    assert json.loads(kept["good/rotated.jpg"]["json"])[("width")] == 20
    grey = np.asarray(decode_rgb(kept["good/sixteen bit.png"]["png"]))
    assert 120 <= grey.mean() <= 136  # scaled from 16 bits, not clipped to white
    pal = np.asarray(decode_rgb(kept["good/palette.with.transparency.png"]["png"]))
    assert (pal[:, :8] == (255, 0, 0)).all() and (pal[:, 8:] == 255).all()  # transparent -> white background
    assert (np.asarray(decode_rgb(kept["good/rgba.png"]["png"])) == 255).all()
    gif = np.asarray(decode_rgb(kept["good/animated.gif"]["png"]))
    assert gif[..., 0].min() > 200 and gif[..., 1].max() < 60  # the first (red) frame
    assert kept["good/UPPER.JPEG"]["jpg"] == awkward_images()["UPPER.JPEG"]  # pass-through: original bytes


def test_bad_inputs_are_skipped_counted_and_listed(messy, tmp_path):
    index = shard(str(messy), tmp_path / "out", progress=False)
    reasons = {s["source"]: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {f"bad/{n}" for n in bad_files()} | {"good/readme.txt", "stray.jpg"}
    assert reasons["bad/empty.jpg"] == "empty file"
    assert reasons["bad/bomb.png"].startswith("decompression bomb")
    assert reasons["bad/truncated.jpg"].startswith("corrupt or truncated")
    assert reasons["bad/not_an_image.jpg"] == "not an image (unknown format)"
    assert reasons["stray.jpg"] == "outside any class folder"
    assert index["total_samples"] + len(index["skipped"]) == index["inputs"]


def truncated_png() -> bytes:
    """A 200x200 random-pixel PNG cut at half its bytes: PIL opens it, then fails reading it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[:len(buf.getvalue()) // 2]


@pytest.mark.parametrize("validate", ["full", "header"])
def test_a_truncated_png_is_a_listed_skip_not_the_end_of_the_run(tmp_path, validate):
    src = write_folder(tmp_path / "src", {"a": 3})
    write_files(src / "a", {"cut.png": truncated_png()})
    index = shard(str(src), tmp_path / "out", ShardOptions(encode=EncodeOptions(validate=validate)), progress=False)
    assert index["total_samples"] == 3
    assert [(s["source"], s["reason"]) for s in index["skipped"]] == [
        ("a/cut.png", "corrupt or truncated image (image file is truncated)")]


def test_any_error_reading_one_input_skips_that_input(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_files(src / "a", {"plain.jpg": awkward_images()["UPPER.JPEG"], "rotated.jpg": awkward_images()["rotated.jpg"]})

    def broken_exif(img):  # as a PIL plugin meeting bad EXIF bytes might
        raise IndexError("tuple index out of range")

    monkeypatch.setattr("data_tools.images.ImageOps.exif_transpose", broken_exif)
    index = shard(str(src), tmp_path / "out", progress=False)
    assert index["total_samples"] == 1  # the pass-through JPEG never reaches the EXIF code
    assert [(s["source"], s["reason"]) for s in index["skipped"]] == [
        ("a/rotated.jpg", "unreadable (IndexError: tuple index out of range)")]


def test_special_and_hidden_entries_are_listed_as_skipped(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 2, "b": 2})
    os.mkfifo(src / "a" / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "b" / "sock.jpg"))
    os.symlink(src / "nowhere.jpg", src / "a" / "broken.jpg")
    os.symlink("loop.jpg", src / "b" / "loop.jpg")
    os.symlink(src / "b", src / "a" / "folder-link")
    os.symlink(src / "a" / "00000.jpg", src / "b" / "file-link.jpg")  # a link to a file is read
    write_files(src, {".DS_Store": b"x", "a/.hidden.jpg": awkward_images()["UPPER.JPEG"],
                      "b/.thumbnails/t.jpg": awkward_images()["UPPER.JPEG"]})
    try:
        index = shard(str(src), tmp_path / "out", progress=False)
    finally:
        sock.close()
    assert {s["source"]: s["reason"] for s in index["skipped"]} == {
        "a/pipe.jpg": "not a regular file (FIFO)",
        "b/sock.jpg": "not a regular file (socket)",
        "a/broken.jpg": "broken symbolic link",
        "b/loop.jpg": "symbolic link loop",
        "a/folder-link": "link to a folder (not followed)",
        ".DS_Store": "hidden file",
        "a/.hidden.jpg": "hidden file",
        "b/.thumbnails": "hidden folder (not read)",
    }
    assert index["total_samples"] == 5 and index["total_samples"] + len(index["skipped"]) == index["inputs"]


def test_a_manifest_naming_a_fifo_skips_it_instead_of_waiting(tmp_path):
    write_folder(tmp_path / "imgs", {"x": 2})
    os.mkfifo(tmp_path / "imgs" / "pipe.jpg")
    (tmp_path / "m.csv").write_text("path,label\nimgs/x/00000.jpg,x\nimgs/pipe.jpg,x\nimgs/gone.jpg,x\n")
    index = shard(str(tmp_path / "m.csv"), tmp_path / "out", progress=False)
    assert index["total_samples"] == 1
    assert {s["source"]: s["reason"] for s in index["skipped"]} == {
        "imgs/pipe.jpg": "not a regular file (FIFO)", "imgs/gone.jpg": "unreadable (No such file or directory)"}


def test_header_validation_passes_truncated_jpeg_through(tmp_path):
    write_files(tmp_path / "src" / "a", {"t.jpg": bad_files()["truncated.jpg"]})
    opts = ShardOptions(encode=EncodeOptions(validate="header"))
    assert shard(str(tmp_path / "src"), tmp_path / "out", opts, progress=False)["total_samples"] == 1


def test_output_is_the_same_whatever_the_workers(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 30, "b": 25})
    write_files(src / "a", bad_files())
    opts = ShardOptions(samples_per_shard=7, encode=EncodeOptions(resize_shorter=24))
    shard(str(src), tmp_path / "one", opts, workers=1, progress=False)
    shard(str(src), tmp_path / "two", opts, workers=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n


def shard_classes(out):
    """Per shard, in order: the labels of its samples, read from the tars."""
    index = json.loads((out / "index.json").read_text())
    return [[int(x["cls"]) for x in read_tar(out / s["name"])] for s in index["shards"]]


def test_class_folders_shard_into_mixed_shards(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 20, "b": 20, "c": 20})
    index = shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=10), progress=False)
    labels = shard_classes(tmp_path / "out")
    assert len(labels) == 6 and all(len(set(x)) >= 2 for x in labels), labels
    assert [len(s["class_counts"]) for s in index["shards"]] == [len(set(x)) for x in labels]
    assert sorted(x for shard_labels in labels for x in shard_labels) == [0] * 20 + [1] * 20 + [2] * 20
    assert index["args"]["shuffle"] is True and index["args"]["shuffle_seed"] == 0
    other = shard(str(src), tmp_path / "seed1", ShardOptions(samples_per_shard=10, shuffle_seed=1), progress=False)
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in index["shards"]]


def test_no_shuffle_keeps_source_order(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 8, "b": 7})
    index = shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=5, shuffle=False), progress=False)
    sources = [json.loads(x["json"])["source"] for s in index["shards"] for x in read_tar(tmp_path / "out" / s["name"])]
    assert sources == [f"a/{i:05d}.jpg" for i in range(8)] + [f"b/{i:05d}.jpg" for i in range(7)]
    assert shard_classes(tmp_path / "out") == [[0] * 5, [0] * 3 + [1] * 2, [1] * 5]


def test_resize_options(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 3}, size=(60, 90))
    shard(str(src), tmp_path / "out", ShardOptions(encode=EncodeOptions(resize_shorter=30, max_side=40)), progress=False)
    for sample in read_all(tmp_path / "out")[1].values():
        img = decode_rgb(sample["jpg"])
        assert max(img.size) <= 40 and min(img.size) <= 30


def test_max_shard_size(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 40})
    index = shard(str(src), tmp_path / "out", ShardOptions(max_shard_size=parse_size("40K")), progress=False)
    assert len(index["shards"]) > 1
    for s in index["shards"]:
        assert s["bytes"] == (tmp_path / "out" / s["name"]).stat().st_size
        assert s["bytes"] <= 40 * 1024 or s["count"] == 1
    assert parse_size("1G") == 2**30 and parse_size("2.5M") == int(2.5 * 2**20) and parse_size("1KiB") == 1024
    with pytest.raises(ShardError, match="--max-shard-size"):
        parse_size("lots")


def test_different_arguments_on_existing_output_is_an_error(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 5})
    shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=2), progress=False)
    with pytest.raises(ShardError, match=r"different arguments \(samples_per_shard\).*--overwrite"):
        shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=3), progress=False)
    index = shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=3), overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [s["name"] for s in index["shards"]]
    for changed, key in (({"shuffle_seed": 1}, "shuffle_seed"), ({"shuffle": False}, "shuffle, shuffle_seed")):
        with pytest.raises(ShardError, match=rf"different arguments \({key}\)"):
            shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=3, **changed), progress=False)
    with pytest.raises(ShardError, match=r"--shuffle-seed"):
        shard(str(src), tmp_path / "bad", ShardOptions(shuffle_seed=-1), progress=False)


def _shard_cmd(src, out, env):
    return subprocess.Popen(["vitpipe", "shard", str(src), str(out), "--samples-per-shard", "10",
                             "--resize-shorter", "40"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("kill_after_shards", [1, 3])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, env, kill_after_shards):
    src = write_folder(tmp_path / "src", {"a": 60, "b": 60}, size=(120, 200))
    write_files(src / "b", bad_files())
    assert _shard_cmd(src, tmp_path / "whole", env).wait() == 0
    proc = _shard_cmd(src, tmp_path / "killed", env)
    index_path = tmp_path / "killed" / "index.json"
    while proc.poll() is None:
        if index_path.is_file() and len(json.loads(index_path.read_text())["shards"]) >= kill_after_shards:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    first = tmp_path / "killed" / "shard-000000.tar"
    stamp = first.stat().st_mtime_ns
    assert _shard_cmd(src, tmp_path / "killed", env).wait() == 0
    assert first.stat().st_mtime_ns == stamp  # a completed shard is not redone
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())  # no .tmp left behind
    for n in names:
        assert (tmp_path / "whole" / n).read_bytes() == (tmp_path / "killed" / n).read_bytes(), n


def test_manifests(tmp_path):
    src = write_folder(tmp_path / "imgs", {"x": 3, "y": 2})
    files = sorted(src.rglob("*.jpg"))
    rows = [{"path": str(f.relative_to(tmp_path)), "label": f.parent.name} for f in files]
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(dict(r, path=str(tmp_path / r["path"]))) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"file": r["path"], "target": 7 if r["label"] == "y" else 0} for r in rows]),
                   tmp_path / "m.parquet")
    for name in ("m.csv", "m.jsonl"):
        index = shard(str(tmp_path / name), tmp_path / f"out-{name}", progress=False)
        assert index["classes"] == ["x", "y"] and index["class_counts"] == {"0": 3, "1": 2}
    index = shard(str(tmp_path / "m.parquet"), tmp_path / "out-pq", progress=False)
    assert index["class_counts"] == {"0": 3, "7": 2} and len(index["classes"]) == 8
    (tmp_path / "bad.csv").write_text("filename_typo,label\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv: no path column"):
        shard(str(tmp_path / "bad.csv"), tmp_path / "o", progress=False)


def test_hf_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = write_folder(tmp_path / "imgs", {"cat": 3, "dog": 4})
    ds = datasets.load_dataset("imagefolder", data_dir=str(src), split="train")
    ds.save_to_disk(str(tmp_path / "saved"))
    index = shard(str(tmp_path / "saved"), tmp_path / "out1", progress=False)
    assert index["classes"] == ["cat", "dog"] and index["class_counts"] == {"0": 3, "1": 4}
    index = shard(f"hf:imagefolder:{src}", tmp_path / "out2", progress=False)
    assert index["total_samples"] == 7 and index["classes"] == ["cat", "dog"]


def shard_set(out):
    """What a shard set is: its tars and index.json, by name (a part run's own records are not part of it)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".tar" or p.name == "index.json"}


@pytest.mark.parametrize("opts", [
    ShardOptions(samples_per_shard=4, encode=EncodeOptions(resize_shorter=24)),
    ShardOptions(samples_per_shard=6, max_shard_size=parse_size("6K"), prefix="cut"),  # shards cut into pieces
], ids=["ranges", "pieces"])
def test_workers_and_parts_write_the_same_shard_set_byte_for_byte(tmp_path, opts):
    src = write_folder(tmp_path / "src", {"a": 11, "b": 10})
    write_files(src / "b", bad_files())  # skipped inputs: their shards come out short
    one = shard(str(src), tmp_path / "one", opts, progress=False)
    shard(str(src), tmp_path / "workers", opts, workers=2, progress=False)
    for k in range(2):
        shard(str(src), tmp_path / "halves", replace(opts, part=(k, 2)), progress=False)
    for k in (2, 0, 1):  # any order: the last part to complete writes index.json
        shard(str(src), tmp_path / "thirds", replace(opts, part=(k, 3)), progress=False)
    expected = shard_set(tmp_path / "one")
    for out in ("workers", "halves", "thirds"):
        assert shard_set(tmp_path / out) == expected, out
    assert sorted(p.name for p in (tmp_path / "thirds").glob("index.part-*")) == [
        f"index.part-00{k}-of-003.json" for k in range(3)]
    assert one["total_samples"] == 21 and len(one["skipped"]) == 5 and one["format_version"] == 2
    assert "part" not in one and "part" not in one["args"]
    if opts.max_shard_size:
        assert any(s["name"].startswith("cut-") and s["name"].count("-") == 2 for s in one["shards"])  # a piece
        assert all(s["bytes"] <= opts.max_shard_size or s["count"] == 1 for s in one["shards"])
    # a --part run over a complete set (here one run's) finds it there and writes nothing
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()}
    assert shard(str(src), tmp_path / "one", replace(opts, part=(1, 2)), progress=False) == one
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()} == stamp


def test_a_shard_is_a_fixed_range_of_the_input_order(tmp_path):
    src = tmp_path / "src"
    write_files(src / "a_bad", bad_files())
    write_folder(src, {"b_good": 7})
    index = shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=5, shuffle=False), progress=False)
    # inputs 0-4 (all bad): no shard 0; 5-9: shard 1, full; 10-11: shard 2, the last range, short
    assert [(s["name"], s["range"], s["inputs"], s["count"]) for s in index["shards"]] == [
        ("shard-000001.tar", 1, [5, 10], 5), ("shard-000002.tar", 2, [10, 12], 2)]
    assert [s["input"] for s in index["skipped"]] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000001.tar", "shard-000002.tar"]
    shuffled = shard(str(src), tmp_path / "shuffled", ShardOptions(samples_per_shard=4), progress=False)
    for s in shuffled["shards"]:  # each shard: the usable inputs of its range, so short by its skips
        lo, hi = s["inputs"]
        assert lo == 4 * s["range"] and hi == min(lo + 4, 12) and s["name"] == f"shard-{s['range']:06d}.tar"
        assert s["count"] == hi - lo - sum(lo <= x["input"] < hi for x in shuffled["skipped"])


def test_parts_share_the_folder_and_clean_only_their_own_shards(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 11, "b": 10})
    opts = ShardOptions(samples_per_shard=4)  # 6 shards: part 0/3 writes 0-1, part 1/3 2-3, part 2/3 4-5
    for k in range(3):
        shard(str(src), tmp_path / "parts", replace(opts, part=(k, 3)), progress=False)
    strays = [tmp_path / "parts" / f"shard-00000{k}.tar.tmp" for k in (0, 3)]  # as if parts 0 and 1 were writing
    for stray in strays:
        stray.write_bytes(b"")
    shard(str(src), tmp_path / "parts", replace(opts, part=(1, 3)), overwrite=True, progress=False)
    assert strays[0].exists() and not strays[1].exists()
    strays[0].unlink()
    merged = json.loads((tmp_path / "parts" / "index.json").read_text())
    assert [s["name"] for s in merged["shards"]] == [f"shard-{k:06d}.tar" for k in range(6)]
    sources = [json.loads(s["json"])["source"] for s in read_all(tmp_path / "parts")[1].values()]
    assert sorted(sources) == sorted(set(sources)) and len(sources) == 21 and sources != sorted(sources)


def v1_set(out):
    """Turn a --part 0/2 + 1/2 shard set into what format_version 1 wrote for it: shards named by part
    (PREFIX-KKK-NNNNNN.tar, boundaries following the parts), part records and a merged index.json with
    "part": "all 2" and a "parts" list. The tars are real; only names and index fields change."""
    index = json.loads((out / "index.json").read_text())
    for p in out.glob("index.part-*"):
        p.unlink()
    half = len(index["shards"]) // 2
    for i, s in enumerate(index["shards"]):
        k, j = (0, i) if i < half else (1, i - half)
        old = f"shard-{k:03d}-{j:06d}.tar"
        (out / s["name"]).rename(out / old)
        s["name"] = old
        del s["range"]
    del index["layout"]
    index.update(format_version=1, args=dict(index["args"], part="all 2"),
                 parts=["index.part-000-of-002.json", "index.part-001-of-002.json"])
    (out / "index.json").write_text(json.dumps(index, indent=2))
    return index


def test_old_format_shard_sets_still_read(tmp_path, capsys):
    src = write_folder(tmp_path / "src", {"a": 9, "b": 8})
    out = tmp_path / "v1"
    opts = ShardOptions(samples_per_shard=4)
    for k in range(2):
        shard(str(src), out, replace(opts, part=(k, 2)), progress=False)
    old = v1_set(out)
    assert verify(out) == ([], [])
    assert "17 samples in 5 shards" in inspect(out)[0]
    from data_tools.loader import eval_loader, resolve_shards
    from data_tools.transforms import EvalTransform

    shards = resolve_shards(out)
    assert shards.num_samples == 17 and [u.rsplit("/", 1)[-1] for u in shards.urls] == [s["name"] for s in old["shards"]]
    labels = [int(x) for batch in eval_loader(shards, EvalTransform(16), 4) for x in batch["labels"]]
    assert sorted(labels) == [0] * 9 + [1] * 8
    assert main(["shard", str(src), str(out), "--samples-per-shard", "4"]) == 2  # cannot be continued: one line
    assert "index.json: shards of an earlier layout (format_version 1)" in capsys.readouterr().err
    assert main(["shard", str(src), str(out), "--samples-per-shard", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{k:06d}.tar" for k in range(5)]  # old names gone


def test_the_console_counts_in_words_and_names_the_first_skips(tmp_path, capsys):
    src, one, many = tmp_path / "src", tmp_path / "one", tmp_path / "many"
    write_folder(src, {"a": 1})
    assert main(["shard", str(src), str(one)]) == 0
    assert capsys.readouterr().out == f"{one}: 1 sample in 1 shard, 0 inputs skipped\n"
    assert inspect(one)[0].startswith(f"{one}: 1 sample in 1 shard (")
    write_files(src / "a", {**bad_files(), "more.jpg": b"", "most.jpg": b""})
    assert main(["shard", str(src), str(many), "--samples-per-shard", "4"]) == 0
    skipped = json.loads((many / "index.json").read_text())["skipped"]
    assert capsys.readouterr().out.splitlines() == [
        f"{many}: 1 sample in 1 shard, 7 inputs skipped, the first:",
        *[f"  {s['source']}: {s['reason']}" for s in skipped[:5]],
        "  ... and 2 more",
        "every skipped input is listed with its reason in index.json ('skipped')",
    ]
    assert {s["source"] for s in skipped[:5]} < {f"a/{n}" for n in [*bad_files(), "more.jpg", "most.jpg"]}


def test_after_some_parts_verify_and_the_loader_say_which_parts_are_missing(tmp_path, capsys):
    from data_tools.loader import LoaderError, resolve_shards

    src, out = write_folder(tmp_path / "src", {"a": 6, "b": 6}), tmp_path / "out"
    args = ["shard", str(src), str(out), "--samples-per-shard", "3", "--part"]
    assert main([*args, "0/3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{out}: part 0/3: 3 samples in 1 shard, 0 inputs skipped",
        f"{out}: 1 of 3 parts complete, parts 1/3, 2/3 not started; the last part to complete writes index.json"]
    assert main(["verify", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"vitpipe verify: error: {out / 'index.json'}: missing: this folder holds a --part K/N run (1 of 3 parts "
        "complete, parts 1/3, 2/3 not started); the last part to complete writes it\n")
    assert main([*args, "1/3"]) == 0
    record = out / "index.part-001-of-003.json"
    record.write_text(json.dumps(dict(json.loads(record.read_text()), complete=False)))  # as a killed run leaves it
    with pytest.raises(LoaderError, match=r"no index.json yet: a --part K/N run is there \(1 of 3 parts complete, "
                                          r"part 1/3 unfinished \(rerun its command to continue\), part 2/3 not started"):
        resolve_shards(out)
    assert main([*args, "1/3"]) == 0 and main([*args, "2/3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{out}: 3 of 3 parts complete; index.json lists the whole set"
    assert main(["verify", str(out)]) == 0


def test_verify_and_inspect(tmp_path, run_here):
    src = write_folder(tmp_path / "src", {"a": 12, "b": 9})
    out = tmp_path / "out"
    shard(str(src), out, ShardOptions(samples_per_shard=5), progress=False)
    assert verify(out) == ([], [])
    text, problems = inspect(out, grid=tmp_path / "grid.png", grid_size=9)
    assert problems == []
    assert "21 samples in 5 shards" in text and "a" in text and "median" in text
    assert Image.open(tmp_path / "grid.png").size[0] >= 3 * 128
    damaged = out / "shard-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[2000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "shard-000003.tar").unlink()
    run = run_here(vitpipe_cmd("verify", str(out)))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("shard-000001.tar: ") and "sha256" in lines[0]
    assert lines[1] == "shard-000003.tar: missing"


def test_verify_and_inspect_warn_on_class_sorted_shards(tmp_path, capsys):
    src = write_folder(tmp_path / "src", {"a": 20, "b": 20, "c": 20})
    sorted_out, mixed_out = tmp_path / "sorted", tmp_path / "mixed"
    assert main(["shard", str(src), str(sorted_out), "--samples-per-shard", "10", "--no-shuffle"]) == 0
    assert main(["shard", str(src), str(mixed_out), "--samples-per-shard", "10", "--shuffle-seed", "7"]) == 0
    assert json.loads((mixed_out / "index.json").read_text())["args"]["shuffle_seed"] == 7
    capsys.readouterr()
    assert main(["verify", str(sorted_out)]) == 0
    err = capsys.readouterr().err
    assert "look sorted by class (6 of 6 shards are >= 90% one class" in err and "without --no-shuffle" in err
    assert main(["inspect", str(sorted_out)]) == 0
    assert "warning: the shards look sorted by class" in capsys.readouterr().out
    assert main(["verify", str(mixed_out)]) == 0
    assert main(["inspect", str(mixed_out)]) == 0
    assert "sorted by class" not in str(capsys.readouterr())


@pytest.mark.parametrize("shards,warned", [
    ([{"0": 10}, {"0": 5, "1": 5}, {"1": 10}], True),  # 2 of 3 pure
    ([{"0": 6, "1": 4}, {"0": 4, "1": 6}], False),  # mixed
    ([{"0": 90}, {"0": 85, "1": 5}, {"0": 5, "1": 10}], False),  # one class is 90% of the corpus: shards mirror it
    ([{"0": 4}, {"1": 4}, {"0": 4}], False),  # too small to tell
    ([{"0": 30, "1": 10}], False),  # one shard
    ([{}, {}], False),  # unlabelled
])
def test_class_sorting_criterion(shards, warned):
    totals = {}
    for counts in shards:
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    index = {"class_counts": totals, "shards": [{"class_counts": c} for c in shards]}
    assert (class_sorting(index) is not None) == warned


def test_interop_with_hf_datasets_and_tar(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = write_folder(tmp_path / "src", {"a": 6, "b": 5})
    out = tmp_path / "out"
    index = shard(str(src), out, ShardOptions(samples_per_shard=4), progress=False)
    files = [str(out / s["name"]) for s in index["shards"]]
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    assert len(ds) == 11 and sorted(ds["cls"]) == [0] * 6 + [1] * 5
    assert ds[0]["jpg"].mode == "RGB"
    listing = subprocess.run(["tar", "tf", files[0]], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 12 and all(name.count(".") == 1 for name in listing)
    with tarfile.open(files[0]) as t:
        assert all(m.mtime == 0 for m in t.getmembers())


def test_cli_shard_bad_arguments(tmp_path, run_here):
    run = run_here(vitpipe_cmd("shard", str(tmp_path / "nope"), str(tmp_path / "out")))
    assert run.returncode == 2 and "no such folder or manifest" in run.stderr
    run = run_here(vitpipe_cmd("shard", str(tmp_path), str(tmp_path / "out"), "--part", "3/2"))
    assert run.returncode == 2 and "--part" in run.stderr


def test_shard_verify_and_inspect_do_not_import_torch(tmp_path):
    src, out = write_folder(tmp_path / "src", {"a": 3, "b": 3}), tmp_path / "out"
    code = f"""import sys
from vitpipe.cli import main
assert main(["shard", {str(src)!r}, {str(out)!r}]) == 0
assert main(["verify", {str(out)!r}]) == 0
assert main(["inspect", {str(out)!r}]) == 0
assert main(["shard", {str(tmp_path / "nope")!r}, {str(out)!r}]) == 2
print(sorted(m for m in ("torch", "vit", "webdataset") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[-1] == "[]"


_MERGER = """import sys
from pathlib import Path
from data_tools.shard import merge_parts
go = Path(sys.argv[2])
while not go.exists():
    pass
for _ in range(30):
    assert merge_parts(sys.argv[1]) is not None
"""


def test_parts_merging_at_once_take_turns_on_index_json(tmp_path, env):
    src = write_folder(tmp_path / "src", {"a": 9, "b": 8})
    opts = ShardOptions(samples_per_shard=4)
    shard(str(src), tmp_path / "whole", opts, progress=False)
    for k in range(3):
        shard(str(src), tmp_path / "parts", replace(opts, part=(k, 3)), progress=False, merge=False)
    go = tmp_path / "go"
    mergers = [subprocess.Popen([sys.executable, "-c", _MERGER, str(tmp_path / "parts"), str(go)], env=env,
                                stderr=subprocess.PIPE, text=True) for _ in range(6)]
    go.touch()  # every merger spins until this exists, so their merges overlap
    for m in mergers:
        assert m.wait() == 0, m.stderr.read()[-2000:]
    assert (tmp_path / "parts" / "index.json").read_bytes() == (tmp_path / "whole" / "index.json").read_bytes()
    assert not list((tmp_path / "parts").glob("*.tmp"))


@pytest.mark.parametrize("held, run", [(".vitpipe.lock", ["--part", "1/2"]), (".vitpipe-part-001.lock", [])])
def test_a_whole_run_and_a_part_run_refuse_to_share_a_folder(tmp_path, env, held, run):
    from common.lock import FolderLock

    src, out = write_folder(tmp_path / "src", {"a": 3, "b": 3}), tmp_path / "out"
    out.mkdir()
    with FolderLock(out, "vitpipe shard (the other run)", held):
        res = subprocess.run(vitpipe_cmd("shard", str(src), str(out), *run), env=env, capture_output=True, text=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr[-2000:]
    assert "vitpipe shard (the other run)" in lines[0] and "cannot share a folder" in lines[0]
    assert not list(out.glob("*.tar")) and not (out / "index.json").exists()
    assert subprocess.run(vitpipe_cmd("shard", str(src), str(out), *run), env=env).returncode == 0


@pytest.mark.parametrize("name", ENGINES.names())
def test_every_engine_runs_a_function_and_adds_its_own_options_to_vitpipe_shard(name, tmp_path, capsys):
    import importlib

    engine = ENGINES.get(name)
    module, function = engine.function.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    shown = capsys.readouterr().out
    assert f"{name}: {engine.summary.split()[0]}" in shown
    for option in engine.options:
        assert option.flag in shown
        for other in ENGINES.names():
            if not ENGINES.get(other).takes(option.dest):
                with pytest.raises(EngineError, match=f"{option.flag} is an option of --engine .*{name}"):
                    run_engine(other, str(tmp_path), tmp_path / "out", ShardOptions(), **{option.dest: 1})
