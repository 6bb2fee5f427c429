import json
import subprocess
import sys

import pytest
import torch

from finetune.plots import attention_rollout, mean_attention_distance, position_similarity

from .helpers import ROOT


def test_position_similarity():
    pe = torch.randn(1, 1 + 12, 8)
    sim = position_similarity(pe, (3, 4))
    assert sim.shape == (3, 4, 3, 4)
    assert torch.allclose(sim[1, 2, 1, 2], torch.tensor(1.0)) and torch.allclose(sim[0, 1, 2, 3], sim[2, 3, 0, 1])


def test_mean_attention_distance():
    n = 1 + 4  # a 2x2 grid of 16-pixel patches
    to_self = torch.eye(n).expand(1, 2, n, n)
    assert torch.allclose(mean_attention_distance(to_self, (2, 2), 16), torch.zeros(2))
    uniform = torch.full((1, 1, n, n), 1 / n)
    # from any patch: itself 0, two neighbours 16, the diagonal 16*sqrt(2); averaged uniformly
    expected = (0 + 16 + 16 + 16 * 2**0.5) / 4
    assert mean_attention_distance(uniform, (2, 2), 16).item() == pytest.approx(expected)


def test_attention_rollout():
    n = 5
    uniform = [torch.full((2, 3, n, n), 1 / n)] * 3
    r = attention_rollout(uniform)
    assert r.shape == (2, 4) and torch.allclose(r, r[:, :1].expand_as(r))
    cls_only = torch.zeros(1, 1, n, n)
    cls_only[..., 0] = 1.0  # every token attends to the class token only
    assert torch.allclose(attention_rollout([cls_only]), torch.zeros(1, 4))


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
