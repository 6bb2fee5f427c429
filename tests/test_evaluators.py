"""Every registered evaluator keeps the contract the loop relies on: off unless its config key names shards, and
once switched on, listed in the run banner and recording at a checkpoint exactly the metrics it declares."""

import json

import pytest

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
