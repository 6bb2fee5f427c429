import json
import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "vitpipe", "demo", "--reduced", "--dataset", "digits", "--out",
                          str(out)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in ("pretrained_top1", "scratch_top1", "baseline_top1", "objective", "dataset", "seconds", "fewshot"):
        assert key in results
    assert results["dataset"] == "digits" and results["objective"] == "mae"
    for run_name, key in (("pretrained_finetune", "pretrained_top1"), ("scratch", "scratch_top1")):
        report = json.loads((out / "runs" / run_name / "final" / "eval.json").read_text())
        assert report["samples"] == results["test_images"] and report["top1"] == results[key]
    assert results["baseline_top1"] > 0.75  # logistic regression on digits' pixels, 10% of the labels
    assert "MAE-pretrained" in res.stdout and "from scratch" in res.stdout and "logistic regression" in res.stdout
    for png in ("position_similarity", "attention_distance", "attention_rollout", "training_curves"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 2000
    model = transformers.ViTForImageClassification.from_pretrained(out / "export")
    assert model.config.num_labels == 10 and (out / "export" / "README.md").is_file()
    pretrain_index = json.loads((out / "shards" / "train" / "index.json").read_text())
    assert pretrain_index["total_samples"] == results["train_images"]
