"""What a run says and keeps: the start banner, lengths in epochs, threads, best/, a config.json that repeats it."""

import json

import pytest

from data_tools.shard import ShardOptions, shard
from pretrain.banner import RunFacts, banner, epochs_of
from pretrain.checkpoints import best_so_far, improves
from pretrain.config import ConfigError, load_config, resolve_epochs, steps_for_epochs
from pretrain.launch import threads_per_process

from .corpus import write_patterns
from .helpers import TINY, TINY_MAE, finetune_cmd, pretrain_cmd, vitpipe_cmd


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """3 learnable classes x 40 images of 16 px, 4 mixed shards."""
    root = tmp_path_factory.mktemp("patterns")
    write_patterns(root / "src", per_class=40, size=16)
    shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=30), progress=False)
    return root / "shards"


def test_epochs_become_steps_from_the_sample_count_and_the_global_batch():
    assert steps_for_epochs(1, 120, 32) == 3  # the loader's epoch: 3 whole batches of 32 out of 120 samples
    assert steps_for_epochs(2.5, 100, 50) == 5 and steps_for_epochs(0, 100, 50) == 0
    assert steps_for_epochs(0.5, 120, 16) == 4  # 3.5 of the 7 steps an epoch holds: the nearest step
    cfg = load_config(TINY, ["data.train=x", "train.epochs=2", "schedule.warmup_epochs=0.5", "data.batch_size=16"])
    assert (cfg.train.max_steps, cfg.schedule.warmup_steps) == (None, 0)  # the file's steps give way to the epochs
    resolve_epochs(cfg, 120)
    assert (cfg.train.max_steps, cfg.train.epochs, cfg.schedule.warmup_steps, cfg.schedule.warmup_epochs) == \
        (14, None, 4, None)
    assert epochs_of(14, 16, 120) == 2.0
    with pytest.raises(ConfigError, match="train.max_steps, train.epochs: give exactly one"):
        load_config(TINY, ["data.train=x", "train.epochs=2", "train.max_steps=3"])
    with pytest.raises(ConfigError, match="train.max_steps, train.epochs: give exactly one"):
        load_config(TINY, ["data.train=x", "train.max_steps=null"])
    with pytest.raises(ConfigError, match="train.epochs: the training shards' sample count is unknown"):
        resolve_epochs(load_config(TINY, ["data.train=x", "train.epochs=1"]), None)


def test_key_typos_get_did_you_mean():
    with pytest.raises(ConfigError, match=r"train.max_step: unknown config key for this section; "
                                          r"did you mean train.max_steps\?"):
        load_config(None, ["data.train=x", "train.max_step=3"])
    with pytest.raises(ConfigError, match=r"max_steps: .*did you mean train.max_steps\?"):
        load_config(None, ["data.train=x", "max_steps=3"])


def test_threads_default_to_the_cores_shared_by_the_local_processes():
    assert threads_per_process(None, {}, 16) == (16, "16 cores / 1 process on this machine")
    assert threads_per_process(None, {"LOCAL_WORLD_SIZE": "4"}, 16)[0] == 4
    assert threads_per_process(None, {"LOCAL_WORLD_SIZE": "4"}, 2)[0] == 1
    assert threads_per_process(None, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 16) == (3, "OMP_NUM_THREADS")
    assert threads_per_process(2, {"OMP_NUM_THREADS": "3"}, 16) == (2, "train.threads")


def test_best_is_the_first_of_the_best_values_in_its_direction():
    records = [{"step": 1, "knn_top1": 0.4, "val_loss": 2.0}, {"step": 2, "knn_top1": 0.6, "val_loss": 2.5},
               {"step": 3, "knn_top1": 0.6, "val_loss": 1.5}, {"step": 4}]
    assert best_so_far(records, "knn_top1", "max") == (2, 0.6)
    assert best_so_far(records, "val_loss", "min") == (3, 1.5)
    assert best_so_far([], "val_loss", "min") is None
    assert improves(0.1, None, "max") and not improves(0.5, 0.5, "max") and improves(0.4, 0.5, "min")


def test_banner_says_what_where_how_long_and_from_where():
    facts = RunFacts(stage="finetune", objective="supervised", model="ViT (4px patches)", parameters=120_000,
                     objective_parameters=0, processes=2, device="cpu", engine="", threads=(1, "OMP_NUM_THREADS"),
                     mixed_precision="no", steps=10, samples=120, global_batch=32, per_process_batch=16, grad_accum=1,
                     data="shards/x", shards=4, classes=3, output_dir="runs/ft", resumed_from="runs/ft/ck/step_4",
                     resumed_step=4, changes=["pooling token -> avg"], exports={"transformers": "why"})
    text = banner(facts)
    assert text.splitlines()[0] == "vitpipe finetune: supervised objective, ViT (4px patches), 0.12M parameters"
    for part in ("2 processes on cpu, 1 torch thread each (OMP_NUM_THREADS), mixed precision no",
                 "10 steps = 3.33 epochs of 120 samples; global batch 32 (16 per process)",
                 "shards/x (4 shards, 3 classes)", "output    runs/ft",
                 "resumed from runs/ft/ck/step_4 at step 4 (6 steps to go)", "model     pooling token -> avg",
                 "note      export --format transformers will refuse this model: why"):
        assert part in text, part


def test_stage_help_and_usage_errors_point_at_key_value(run_here):
    res = run_here(vitpipe_cmd("pretrain", "--max_steps", "20"))
    assert res.returncode == 2 and "config keys are given as key=value, e.g. train.max_steps=20" in res.stderr
    res = run_here(pretrain_cmd("--help"))
    assert res.returncode == 0 and "train.epochs" in res.stdout and "\n  init = " not in res.stdout
    res = run_here(finetune_cmd("--help"))
    assert "\n  init = " in res.stdout
    res = run_here(vitpipe_cmd("finetune", "--config", "configs/finetune/ssl_tiny.yaml", "--print-config"))
    assert res.returncode == 0 and "stage: finetune\n" in res.stdout  # a recipe's, before data.train is given
    assert "  train: null\n" in res.stdout and "  global_pool: avg\n" in res.stdout


def test_a_run_prints_its_banner_keeps_best_and_repeats_from_its_config_json(patterns, tmp_path, run_here):
    """The banner's fields, a length in epochs, best/ chosen by the kNN monitor, config.json that --config takes,
    a resume, and a fine-tune's banner naming what it changed and the export it cannot reach."""
    out = tmp_path / "mae"
    args = [f"data.train={patterns}", f"data.monitor={patterns}", "model.image_size=16", "train.checkpoint_every=1",
            "train.keep_last=10", "train.keep_best=true", "objective.decoder_dim=32", "optim.lr=0.003",
            "data.workers=0", f"train.output_dir={out}"]
    printed = run_here(vitpipe_cmd("pretrain", "--config", TINY_MAE, *args, "--print-config", "train.epochs=1"))
    assert printed.returncode == 0 and printed.stdout.startswith("stage: pretrain\n")
    (tmp_path / "printed.yaml").write_text(printed.stdout)
    assert load_config(tmp_path / "printed.yaml", stage="pretrain").to_dict() == \
        load_config(TINY_MAE, [*args, "train.epochs=1"]).to_dict()

    res = run_here(pretrain_cmd(*args, "train.epochs=1", config=TINY_MAE))
    assert res.returncode == 0, res.stderr[-2000:]
    for part in ("vitpipe pretrain: mae objective, vit_ti4 (4px patches, 16x16, width 64, depth 2, token pooling), ",
                 "1 process on cpu, 1 torch thread each (OMP_NUM_THREADS), mixed precision no",
                 "3 steps = 1 epoch of 120 samples; global batch 32 (32 per process)",
                 f"data      {patterns} (4 shards, 3 classes)", f"output    {out}", "start     fresh",
                 "kNN monitor (data.monitor) at every checkpoint", "best/     the checkpoint with the best knn_top1 (max)"):
        assert part in res.stdout, part
    records = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    step, value = best_so_far(records, "knn_top1", "max")
    assert (records[-1]["best_step"], records[-1]["best_knn_top1"]) == (step, value)
    best = (out / "best" / "model.safetensors").read_bytes()
    assert best == (out / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors").read_bytes()
    assert [s for s in range(1, 4) if (out / "checkpoints" / f"step_{s:08d}" / "model" / "model.safetensors")
            .read_bytes() == best] == [step]

    recorded = json.loads((out / "config.json").read_text())
    again = load_config(out / "config.json", stage="pretrain")
    assert recorded["stage"] == "pretrain" and again.to_dict() == {k: v for k, v in recorded.items() if k != "stage"}
    assert (again.train.max_steps, again.train.epochs) == (3, None)
    with pytest.raises(ConfigError, match="stage: .* is the config of a pretrain run; run it with vitpipe pretrain"):
        load_config(out / "config.json", stage="finetune")

    res = run_here(pretrain_cmd("train.epochs=2", config=str(out / "config.json")))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"start     resumed from {out / 'checkpoints' / 'step_00000003'} at step 3 (3 steps to go)" in res.stdout
    records = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    step, _ = best_so_far(records, "knn_top1", "max")
    assert (out / "best" / "model.safetensors").read_bytes() == \
        (out / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors").read_bytes()

    ft = tmp_path / "ft"
    res = run_here(finetune_cmd(f"init={out / 'final'}", f"data.train={patterns}", "model.image_size=24",
                                "train.max_steps=2", "data.workers=0", f"train.output_dir={ft}",
                                config="ssl_tiny.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    for part in ("resolution 16x16 -> 24x24, position embeddings 4x4 -> 6x6 (bicubic)", "pooling token -> avg",
                 "a linear head for 3 classes, zero-initialised (added)",
                 "note      export --format transformers will refuse this model: transformers' "):
        assert part in res.stdout, part
    assert load_config(ft / "config.json", stage="finetune").model.global_pool == "avg"


def test_eval_orders_classes_as_the_shards_and_skips_what_means_nothing(patterns, tmp_path, run_here):
    import torch

    from finetune.evaluate import evaluate, in_shard_order, summary
    from vit import ModelInfo, create_model

    from .helpers import randomize

    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert in_shard_order(logits, ["c", "b", "a"], ["a", "b", "c"]).tolist() == [[2.0, 1.0, 0.0]]
    assert in_shard_order(logits, ["x", "y", "z"], ["a", "b", "c"]) is logits  # other names: as they are

    classes = json.loads((patterns / "index.json").read_text())["classes"]
    model = randomize(create_model("vit_ti4", image_size=16, depth=1, embed_dim=32, num_heads=2, mlp_dim=64,
                                   num_classes=3))
    trained = ModelInfo(labels=classes[::-1], provenance={"stage": "finetune", "step": 5})
    report = evaluate(model, trained, patterns, tmp_path / "trained")
    assert report["classes"] == classes and "top5" not in report and "top-5" not in summary(report)
    reordered = evaluate(model, ModelInfo(labels=classes, provenance={"stage": "finetune", "step": 5}), patterns)
    # true class 0 predicted as the model's column 2, which the reversed labels name class 0
    assert report["per_class"][classes[0]] == pytest.approx(reordered["confusion"][0][2] / sum(reordered["confusion"][0]))
    assert (tmp_path / "trained" / "confusion.png").is_file()

    untrained = ModelInfo(labels=classes, provenance={"stage": "init"})
    report = evaluate(model, untrained, patterns, tmp_path / "init", fewshot_train=patterns, shots=(1,), seeds=1)
    assert "top1" not in report and "fewshot" in report and not (tmp_path / "init" / "confusion.png").exists()
    assert "note: no top-1: the model's head is untrained (vitpipe init)" in summary(report)
