import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path, env):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "vitpipe", "demo", "--reduced", "--dataset", "digits", "--out", "demo"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_quiet_console_of_vitpipe_commands(res, tmp_path)
    results = json.loads((out / "results.json").read_text())
    for key in ("pretrained_top1", "scratch_top1", "baseline_top1", "objective", "dataset", "seconds", "fewshot"):
        assert key in results
    assert results["dataset"] == "digits" and results["objective"] == "mae"
    for run_name, key in (("pretrained_finetune", "pretrained_top1"), ("scratch", "scratch_top1")):
        report = json.loads((out / "runs" / run_name / "final" / "eval.json").read_text())
        assert report["samples"] == results["test_images"] and report["top1"] == results[key]
    for run_name in ("pretrained", "scratch_init"):
        report = json.loads((out / "fewshot" / run_name / "eval.json").read_text())
        assert report["fewshot"] == results["fewshot"][f"{run_name}_fewshot"]
    assert results["baseline_top1"] > 0.75  # logistic regression on digits' pixels, 10% of the labels
    assert "MAE-pretrained" in res.stdout and "from scratch" in res.stdout and "logistic regression" in res.stdout
    for png in ("position_similarity", "attention_distance", "attention_rollout", "training_curves"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 2000
    model = transformers.ViTForImageClassification.from_pretrained(out / "export")
    assert model.config.num_labels == 10 and (out / "export" / "README.md").is_file()
    pretrain_index = json.loads((out / "shards" / "train" / "index.json").read_text())
    assert pretrain_index["total_samples"] == results["train_images"]


def _assert_quiet_console_of_vitpipe_commands(res, tmp_path):
    """Every step is shown as the vitpipe command a user in the cwd would type; progress while writing and
    sharding; no warning from DeepSpeed about the GPU it cannot find."""
    commands = [line[2:] for line in res.stdout.splitlines() if line.startswith("$ ")]
    verbs = [c.split()[1] for c in commands]
    assert all(c.startswith("vitpipe ") for c in commands), commands
    assert verbs == ["shard"] * 4 + ["pretrain", "finetune", "init", "finetune"] + ["eval"] * 4 + ["export", "plot"]
    assert "vitpipe eval demo/runs/scratch/final --data demo/shards/test" in commands[9]
    assert not any(str(tmp_path) in c for c in commands)
    assert "write train:" in res.stderr and "shard train:" in res.stderr and "100%" in res.stderr
    assert "unable to detect it" not in res.stdout + res.stderr
