"""Every registered evaluator keeps the contract the loop relies on: off unless its config key names shards, and
once switched on, listed in the run banner and recording at a checkpoint exactly the metrics it declares."""

import json

import pytest
import torch

from pretrain.config import Config
from pretrain.evaluation import EVALUATORS

from .helpers import pretrain_cmd

SUPERVISED_METRICS = ("accuracy",)  # the metrics the supervised objective logs beside its loss


@pytest.mark.parametrize("name", EVALUATORS.names())
def test_an_evaluator_is_off_by_default(name):
    assert EVALUATORS.get(name).prepare(Config()) is None


@pytest.mark.parametrize("name", EVALUATORS.names())
def test_an_evaluator_switched_on_records_what_it_declares(name, shards, tmp_path, run_here):
    evaluator = EVALUATORS.get(name)
    out = tmp_path / "run"
    key = evaluator.keys[0]
    res = run_here(pretrain_cmd(f"data.train={shards}", f"{key}={shards}", "model.image_size=16", "objective.name=supervised",
                                "train.max_steps=1", "data.workers=0", f"train.output_dir={out}"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{evaluator.title} at every checkpoint" in res.stdout
    declared = evaluator.metrics(SUPERVISED_METRICS)
    [record] = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1
    assert set(declared) <= set(record) and all(isinstance(record[m], float) for m in declared)
    others = {m for n, e in EVALUATORS.items() if n != name for m in e.metrics(SUPERVISED_METRICS)}
    assert not others & set(record)


@pytest.mark.parametrize("head", ["pretrain", "linear"])
def test_the_feature_extractor_reads_what_the_model_computes(shards, head):
    """Pooled features, pre-logits and logits of every sample, in the loader's order, as the model's own forward
    pass computes them: what the kNN monitor, few-shot and top-1 read."""
    from data_tools.loader import eval_loader, resolve_shards
    from data_tools.transforms import EvalTransform
    from pretrain.features import KINDS, extract
    from vit import create_model

    from .helpers import randomize

    model = randomize(create_model("vit_ti8", image_size=16, depth=1, embed_dim=16, num_heads=1, mlp_dim=32,
                                   num_classes=2, head=head)).eval()
    data = resolve_shards(shards)
    transform = EvalTransform(16, (0.5,) * 3, (0.5,) * 3)
    pixels = torch.cat([transform.to_device(b, "cpu")["pixel_values"]
                        for b in eval_loader(data, transform, 16, rank=0, world_size=1)])
    with torch.no_grad():
        pooled = model.pool(model.forward_features(pixels))
        expected = {"pooled": pooled, "pre_logits": model.pre_logits(pooled), "logits": model(pixels)}
    for kind in KINDS:
        feats, labels, skipped = extract(model, data, transform, 16, 0, 1, 0, "cpu", kind)
        assert (len(labels), skipped) == (data.num_samples, 0)
        torch.testing.assert_close(feats, expected[kind])
    if head == "linear":  # no tanh layer: the pre-logits are the pooled features
        torch.testing.assert_close(expected["pre_logits"], expected["pooled"])
    else:
        assert not torch.allclose(expected["pre_logits"], expected["pooled"])
