"""Evaluation on damaged shards: every lost sample is counted, the shortfall is reported and warned about."""

import json
import shutil
import tarfile

import pytest

from data_tools.shard import ShardOptions, shard
from finetune.evaluate import evaluate, summary
from vit import ModelInfo, create_model

from .corpus import write_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalskips")
    write_folder(root / "src", {"a": 12, "b": 12})
    shard(str(root / "src"), root / "out", ShardOptions(samples_per_shard=6), progress=False)
    return root / "out"


@pytest.fixture
def damaged(shards, tmp_path):
    """Two of the four shards damaged: one zero bytes (6 lost), one cut inside its fourth sample's
    first header (4 lost: samples 1 and 2 read, the third not known to be complete)."""
    out = tmp_path / "damaged"
    shutil.copytree(shards, out)
    (out / "shard-000000.tar").write_bytes(b"")
    path = out / "shard-000002.tar"
    with tarfile.open(path) as t:
        cut = t.getmembers()[9].offset + 200
    path.write_bytes(path.read_bytes()[:cut])
    return out


def tiny_model(head):
    return create_model("vit_ti8", image_size=16, depth=1, embed_dim=16, num_heads=1, mlp_dim=32, num_classes=2,
                        head=head)


@pytest.mark.parametrize("head", ["linear", "none"])
def test_eval_reports_lost_samples_and_warns(shards, damaged, tmp_path, head):
    kw = {} if head == "linear" else {"fewshot_train": shards, "shots": (1,), "seeds": 1}
    clean = evaluate(tiny_model(head), ModelInfo(labels=["a", "b"]), shards, tmp_path / "clean", **kw)
    assert (clean["samples"], clean["skipped_samples"], clean["expected_samples"]) == (24, 0, 24)
    assert "warning" not in clean and not summary(clean).startswith("warning")

    report = evaluate(tiny_model(head), ModelInfo(labels=["a", "b"]), damaged, tmp_path / "damaged", **kw)
    assert (report["samples"], report["skipped_samples"], report["expected_samples"]) == (14, 10, 24)
    saved = json.loads((tmp_path / "damaged" / "eval.json").read_text())
    assert (saved["skipped_samples"], saved["expected_samples"]) == (10, 24)
    first = summary(report).splitlines()[0]
    assert first.startswith("warning: ") and "saw 14 of the 24 samples" in first and "10 lost" in first
