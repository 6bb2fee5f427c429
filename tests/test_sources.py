"""The corpus-source registry: a new source is one registered function; what nothing reads is one line."""

import re
from pathlib import Path

import pytest

from data_tools import sources
from data_tools.shard import shard
from data_tools.sources import Corpus, Input, SourceError, read_source
from vitpipe.cli import main

from .corpus import write_folder


def test_a_new_source_is_one_registered_function(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.SOURCES, "_entries", dict(sources.SOURCES._entries))  # registered for this test
    images = sorted(write_folder(tmp_path / "src", {"a": 3}).glob("a/*.jpg"))
    (tmp_path / "list.txt").write_text("\n".join(map(str, images)))

    @sources.source("list:FILE (one image path a line)", lambda spec: spec.startswith("list:"))
    def read_list(spec, opts):
        return Corpus([Input(Path(p).name, None, p) for p in Path(spec[5:]).read_text().split()], None)

    index = shard(f"list:{tmp_path / 'list.txt'}", tmp_path / "out", progress=False)
    assert index["total_samples"] == 3 and index["skipped"] == []
    with pytest.raises(SourceError, match=r"no such folder or manifest file \(sources: .*list:FILE"):
        read_source(str(tmp_path / "nothing"))


@pytest.mark.parametrize("argv,message", [
    (["shard", "SRC", "foo://bucket/x"], "foo://bucket/x: unknown URL scheme foo:// (known: "),
    (["shard", "foo://bucket/x", "OUT"], "foo://bucket/x: unknown URL scheme foo:// (sources: "),
    (["shard", "SRC", "s3:bucket/x"], "s3:bucket/x: not a URL (write s3://...)"),
    (["verify", "foo://bucket/x"], "foo://bucket/x: unknown URL scheme foo://"),
])
def test_an_unknown_scheme_is_one_line_never_a_local_folder(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    src = write_folder(tmp_path / "src", {"a": 2})
    assert main([{"SRC": str(src), "OUT": str(tmp_path / "out")}.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no folder named "foo:" or "s3:"


def test_a_manifest_row_with_an_unknown_scheme_is_a_listed_skip(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 2})
    (tmp_path / "m.csv").write_text(f"path\n{src}/a/00000.jpg\nfoo://bucket/x.jpg\n")
    index = shard(str(tmp_path / "m.csv"), tmp_path / "out", progress=False)
    assert index["total_samples"] == 1
    assert [(s["source"], s["reason"]) for s in index["skipped"]] == [
        ("foo://bucket/x.jpg", "unreadable (unknown URL scheme foo://)")]


@pytest.mark.parametrize("name", sources.SOURCES.names())
def test_every_source_is_named_when_nothing_reads_a_spec(name, tmp_path):
    entry = sources.SOURCES.get(name)
    assert entry.name and callable(entry.read)
    for spec in (str(tmp_path / "nothing"), "foo://bucket/x"):
        assert not entry.matches(spec)
        with pytest.raises(SourceError, match=re.escape(entry.name)):
            read_source(spec)
