import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from common.lock import FolderLock
from data_tools.loader import eval_loader, resolve_shards
from data_tools.shard import ShardOptions, shard
from data_tools.transforms import EvalTransform
from finetune.evaluate import evaluate, features_and_labels, fewshot_lsr, linear_probe, representation, sample_shots
from finetune.prepare import prepare_for_finetune
from finetune.run import main as finetune_main
from finetune.share import PushError, push
from pretrain.config import Config, OptimConfig
from pretrain.optim import build_optimizer, lr_factor, param_groups
from vit import ModelInfo, create_model, load_model, resample_abs_pos_embed, save_checkpoint
from vitpipe.cli import main as cli_main

from .corpus import write_folder
from .helpers import finetune_cmd, randomize, vitpipe_cmd

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("old,new,mode", [((8, 8), (12, 12), "bicubic"), ((8, 8), (12, 12), "bilinear"),
                                          ((6, 10), (9, 4), "bicubic"), ((14, 14), (7, 7), "bilinear")])
def test_resample_equals_timm(old, new, mode):
    pe = torch.randn(1, 1 + old[0] * old[1], 32)
    ours = resample_abs_pos_embed(pe, new, old, interpolation=mode)
    theirs = timm.layers.resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=1, interpolation=mode,
                                                antialias=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert torch.equal(ours[:, :1], pe[:, :1])  # the class-token embedding is kept
    assert torch.equal(resample_abs_pos_embed(pe, old, old), pe)


def test_prepare_swaps_the_head_and_resamples():
    model = randomize(create_model("vit_ti8", image_size=32, depth=2, num_classes=512, head="pretrain"))
    cls_pos = model.pos_embed[:, :1].clone()
    prepare_for_finetune(model, 7, (48, 64))
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.weight.shape == (7, 192)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.pos_embed.shape == (1, 1 + 6 * 8, 192) and torch.equal(model.pos_embed[:, :1], cls_pos)
    assert torch.count_nonzero(model(torch.randn(2, 3, 48, 64))) == 0  # zero logits at step 0
    with pytest.raises(ValueError, match="not divisible by the checkpoint's patch size 8"):
        prepare_for_finetune(model, 7, (50, 64))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    write_folder(root / "src", {"cat": 24, "dog": 24, "eel": 24}, size=(40, 56))
    shard(str(root / "src"), root / "train", ShardOptions(samples_per_shard=24), progress=False)
    write_folder(root / "vsrc", {"cat": 6, "dog": 6, "eel": 6}, size=(40, 56), seed=7)
    shard(str(root / "vsrc"), root / "val", ShardOptions(samples_per_shard=5), progress=False)
    torch.manual_seed(0)
    pre = randomize(create_model("vit_ti8", image_size=32, depth=2, embed_dim=48, num_heads=2, mlp_dim=96,
                                 num_classes=512, head="pretrain"))
    save_checkpoint(pre, root / "pretrained", ModelInfo(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                                        provenance={"objective": "mpp"}))
    return root


def test_zero_steps_writes_the_prepared_model(data, tmp_path, run_here):
    res = run_here(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}", "train.max_steps=0",
                                f"train.output_dir={tmp_path}", "model.image_size=[48, 40]"))
    assert res.returncode == 0, res.stderr[-2000:]
    model, info = load_model(tmp_path / "final")
    assert model.cfg.image_size == (48, 40) and model.cfg.num_classes == 3 and info.labels == ["cat", "dog", "eel"]
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)  # the checkpoint's
    assert info.resize_filter == "bilinear"  # the run's data.resize_filter
    assert torch.count_nonzero(model.head.weight) == 0


def test_zero_steps_takes_the_folder_lock(data, tmp_path, run_here):
    with FolderLock(tmp_path, "another run"):
        res = run_here(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}",
                                    "train.max_steps=0", f"train.output_dir={tmp_path}", "model.image_size=32"))
    assert res.returncode != 0 and "in use by another run" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "final").exists()


def _encode_by_hand(model, x):
    """The blocks' output tokens, before any final norm, computed without forward_tokens."""
    h = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(len(x), -1, -1),
                   model.patch_embed(x) + model.pos_embed[:, 1:]], dim=1)
    for blk in model.blocks:
        h = blk(h)
    return h


def test_token_checkpoint_finetuned_with_avg_pooling_carries_the_norm(data, tmp_path, run_here):
    res = run_here(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}", "train.max_steps=0",
                                f"train.output_dir={tmp_path / 'avg'}", "model.global_pool=avg", "model.image_size=32"))
    assert res.returncode == 0, res.stderr[-2000:]
    pre, _ = load_model(data / "pretrained")
    ft, _ = load_model(tmp_path / "avg" / "final")  # a strict load
    assert ft.cfg.global_pool == "avg" and isinstance(ft.norm, torch.nn.Identity)
    assert torch.equal(ft.fc_norm.weight, pre.norm.weight) and torch.equal(ft.fc_norm.bias, pre.norm.bias)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        by_hand = torch.nn.functional.layer_norm(_encode_by_hand(pre, x)[:, 1:].mean(1), (48,), pre.norm.weight,
                                                 pre.norm.bias, 1e-6)
        torch.testing.assert_close(ft.forward_head(ft.forward_features(x), pre_logits=True), by_hand,
                                   rtol=0, atol=1e-5)
    # fine-tuning the avg-pooled model again without model.global_pool keeps its pooling
    res = run_here(finetune_cmd(f"init={tmp_path / 'avg' / 'final'}", f"data.train={data / 'train'}",
                                "train.max_steps=0", f"train.output_dir={tmp_path / 'again'}", "model.image_size=null"))
    assert res.returncode == 0, res.stderr[-2000:]
    again, _ = load_model(tmp_path / "again" / "final")
    assert again.cfg.global_pool == "avg" and torch.equal(again.fc_norm.weight, pre.norm.weight)


def test_avg_pooled_model_switched_to_token_pooling_carries_the_norm(tmp_path):
    model = randomize(create_model("vit_ti8", image_size=16, depth=2, embed_dim=32, num_heads=2, mlp_dim=64,
                                   num_classes=0, head="none", global_pool="avg"))
    fc_norm = {k: v.clone() for k, v in model.fc_norm.state_dict().items()}
    prepare_for_finetune(model, 4, global_pool="token")
    assert isinstance(model.fc_norm, torch.nn.Identity) and model.cfg.global_pool == "token"
    assert all(torch.equal(model.norm.state_dict()[k], v) for k, v in fc_norm.items())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        by_hand = torch.nn.functional.layer_norm(_encode_by_hand(model, x)[:, 0], (32,), fc_norm["weight"],
                                                 fc_norm["bias"], 1e-6)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), by_hand,
                                   rtol=0, atol=1e-5)
    save_checkpoint(model, tmp_path / "token")
    loaded, _ = load_model(tmp_path / "token")
    assert loaded.cfg.global_pool == "token" and torch.equal(loaded.norm.weight, fc_norm["weight"])


def test_layer_decay_groups_follow_mae():
    vit = create_model("vit_ti8", image_size=16, depth=3, embed_dim=16, num_heads=2, mlp_dim=32, num_classes=4)
    task = torch.nn.Module()  # the loop's Task: the model beside an objective with its own parameters
    task.model, task.objective = vit, torch.nn.Linear(16, 8)
    groups = param_groups(task, 0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(scale) == len(list(task.parameters())) == sum(len(g["params"]) for g in groups)
    # layer 0 (embeddings) 0.5^4, block i 0.5^(3-i), the rest (norms, head, the objective's) 1
    for p, s in [(vit.patch_embed.proj.weight, 0.0625), (vit.patch_embed.proj.bias, 0.0625), (vit.cls_token, 0.0625),
                 (vit.pos_embed, 0.0625), (vit.blocks[0].attn.qkv.weight, 0.125), (vit.blocks[1].norm1.weight, 0.25),
                 (vit.blocks[2].mlp.fc2.bias, 0.5), (vit.norm.weight, 1.0), (vit.head.weight, 1.0),
                 (task.objective.weight, 1.0)]:
        assert scale[id(p)] == s
    for name, p in task.named_parameters():
        flat = p.ndim == 1 or name in ("model.pos_embed", "model.cls_token")
        assert decay[id(p)] == (0.0 if flat else 0.05), name
    assert groups[0]["lr_scale"] == 1.0 and len(groups) == 10  # 5 layers x (decay, no decay), top layer first
    opt = build_optimizer(Config(optim=OptimConfig(lr=0.1, layer_decay=0.5)), task)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.00625, 0.0125, 0.025, 0.05, 0.1])
    plain = param_groups(task, 0.05)
    assert [(g["lr_scale"], g["weight_decay"]) for g in plain] == [(1.0, 0.05), (1.0, 0.0)]


def test_drop_path_rates_increase_linearly_and_apply(tmp_path):
    save_checkpoint(randomize(create_model("vit_ti8", image_size=16, depth=4, embed_dim=32, num_heads=2, mlp_dim=64,
                                           num_classes=3)), tmp_path / "ckpt")
    model, _ = load_model(tmp_path / "ckpt", drop_path_rate=0.3)
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(8, 3, 16, 16)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))  # residual branches dropped at random
    plain, _ = load_model(tmp_path / "ckpt")
    plain.train()
    torch.testing.assert_close(plain(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(model.eval()(x), plain(x), rtol=0, atol=1e-6)


def test_ssl_finetune_config_trains_with_avg_pooling_layer_decay_and_drop_path(data, tmp_path, run_here):
    out = tmp_path / "ssl"
    res = run_here(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}", "train.max_steps=4",
                                "train.checkpoint_every=4", "schedule.warmup_steps=1", f"train.output_dir={out}",
                                "model.global_pool=avg", config="ssl_tiny.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    model, _ = load_model(out / "final")
    assert model.cfg.global_pool == "avg" and model.head.weight.abs().sum() > 0
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.1])
    run_cfg = json.loads((out / "config.json").read_text())
    assert run_cfg["optim"]["layer_decay"] == 0.75 and run_cfg["model"]["global_pool"] == "avg"
    # the loop set every group's lr to the scheduled lr times its layer's scale (depth 2: 4 layers)
    state = torch.load(out / "checkpoints" / "step_00000004" / "state" / "optimizer.bin", weights_only=True)
    groups = state["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.75**3, 0.75**2, 0.75, 1.0])
    top = groups[0]["lr"]
    assert top == pytest.approx(1e-3 * lr_factor(3, 1, 4, "cosine")) and top > 0
    assert all(g["lr"] == pytest.approx(top * g["lr_scale"]) for g in groups)


def test_finetuned_model_matches_timm_and_transformers_at_the_new_resolution(data, tmp_path, run_here):
    transformers = pytest.importorskip("transformers")
    res = run_here(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}", "train.max_steps=6",
                                f"train.output_dir={tmp_path / 'ft'}", "schedule.warmup_steps=1"))
    assert res.returncode == 0, res.stderr[-2000:]
    model, info = load_model(tmp_path / "ft" / "final")
    assert model.cfg.image_size == (48, 48) and model.head.weight.abs().sum() > 0
    x = torch.randn(2, 3, 48, 48)
    for fmt in ("timm", "transformers"):
        out = run_here(vitpipe_cmd("export", str(tmp_path / "ft" / "final"), str(tmp_path / fmt), "--format", fmt))
        assert out.returncode == 0, out.stderr
    theirs_timm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    theirs_hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "transformers").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs_timm(x), model(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(theirs_hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-4)
    card = ModelCard.load(tmp_path / "timm" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "timm" and "local-dir:" in card.text


def test_scratch_model_card_is_truthful_and_no_export_names_a_local_path(data, tmp_path, run_here):
    """vitpipe init + fine-tuning + eval, then every export and a push: read what a hub visitor would read."""
    init = tmp_path / "init"
    assert cli_main(["init", "vit_ti8", str(init), "--img-size", "32", "--embed-dim", "48", "--depth", "2",
                     "--num-heads", "2", "--mlp-dim", "96", "--num-classes", "3", "--seed", "0"]) == 0
    res = run_here(finetune_cmd(f"init={init}", f"data.train={data / 'train'}", "train.max_steps=2",
                                f"train.output_dir={tmp_path / 'ft'}", "schedule.warmup_steps=1"))
    assert res.returncode == 0, res.stderr[-2000:]
    final = tmp_path / "ft" / "final"
    assert cli_main(["eval", str(final), "--data", str(data / "val")]) == 0
    top1 = json.loads((final / "eval.json").read_text())["top1"]
    for fmt in ("vitpipe", "timm", "transformers"):
        assert cli_main(["export", str(final), str(tmp_path / "export" / fmt), "--format", fmt]) == 0
    pushed = {}

    class RecordingApi:
        def create_repo(self, repo_id, **kw):
            pass

        def upload_folder(self, folder_path, repo_id, **kw):
            pushed.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})

    push(final, "team/vit-scratch", "transformers", api=RecordingApi())
    assert set(pushed) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"}
    local = os.path.commonpath([tmp_path, data])  # pytest's base temp folder: every local path in this test
    texts = {str(p): p.read_text() for p in (tmp_path / "export").rglob("*") if p.suffix in (".json", ".md")}
    texts.update({f"pushed {n}": b.decode() for n, b in pushed.items() if n.endswith((".json", ".md"))})
    assert len(texts) == 10
    for where, text in texts.items():
        assert local not in text, where
    assert local in (final / "config.json").read_text()  # the run folder keeps its provenance as it was

    card = ModelCard.load(tmp_path / "export" / "transformers" / "README.md")
    assert "supervised pretraining" not in card.text and "pretraining objective" not in card.text
    assert f"| training | fine-tuned (supervised) for 2 steps on {data.name}/train |" in card.text
    assert "| initialised from | random weights (vitpipe init: " in card.text and "no pretraining |" in card.text
    assert "name: ''" not in card.text and '"name": ""' not in card.text and "init: " in card.text
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results][0] == ("top-1", round(top1, 4))
    assert card.data.eval_results[0].dataset_name == f"{data.name}/val"
    assert "team/vit-scratch" in pushed["README.md"].decode()


def test_eval_counts_every_sample_once_and_draws_the_confusion_matrix(data, tmp_path):
    model = randomize(create_model("vit_ti8", image_size=32, depth=1, embed_dim=48, num_heads=2, mlp_dim=96,
                                   num_classes=3))
    report = evaluate(model, ModelInfo(labels=["cat", "dog", "eel"]), data / "val", tmp_path,
                      fewshot_train=data / "train", shots=(1, 5), seeds=2, probe=True, workers=2)
    assert report["samples"] == 18 and sum(map(sum, report["confusion"])) == 18
    assert set(report["per_class"]) == {"cat", "dog", "eel"}
    assert set(report["fewshot"]) == {"1-shot", "5-shot"} and len(report["fewshot"]["5-shot"]["runs"]) == 2
    assert "linear_probe_top1" in report  # its arithmetic: test_linear_probe_matches_scikit_learn
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == report["top1"]


def test_evaluation_resizes_with_the_filter_the_model_was_trained_with(data):
    model = randomize(create_model("vit_ti8", image_size=32, depth=1, embed_dim=48, num_heads=2, mlp_dim=96,
                                   num_classes=3)).eval()
    shards = resolve_shards(data / "val")  # 40x56 images, resized to 32x32
    logits = {}
    for resize_filter in ("bilinear", "bicubic"):
        logits[resize_filter], _ = features_and_labels(model, shards, ModelInfo(resize_filter=resize_filter),
                                                       logits=True)
        transform = EvalTransform(32, interpolation=resize_filter)
        x = torch.cat([transform.to_device(b, "cpu")["pixel_values"] for b in eval_loader(shards, transform, 64)])
        with torch.no_grad():
            torch.testing.assert_close(logits[resize_filter], model(x))
    assert not torch.allclose(logits["bilinear"], logits["bicubic"])


def _ridge_accuracy(x_train, y_train, x_test, y_test, k, l2, intercept):
    """scikit-learn's ridge regression on the training-standardised features: the reference."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    mean, std = x_train.double().mean(0), x_train.double().std(0, unbiased=False) + 1e-6
    targets = (2.0 * torch.nn.functional.one_hot(y_train, k) - 1).numpy()
    ridge = sklearn.Ridge(alpha=l2, fit_intercept=intercept).fit(((x_train.double() - mean) / std).numpy(), targets)
    scores = torch.from_numpy(ridge.predict(((x_test.double() - mean) / std).numpy()))
    return (scores.argmax(1) == y_test).double().mean().item()


def test_fewshot_lsr_matches_sklearn_ridge():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat_interleave(30)
    x = centers[y] + torch.randn(120, 16, generator=g)
    idx = sample_shots(y, 5, 4, seed=1)
    assert torch.bincount(y[idx]).tolist() == [5, 5, 5, 5]
    acc = fewshot_lsr(x[idx], y[idx], x, y, 4, l2=2.0)
    assert acc == pytest.approx(_ridge_accuracy(x[idx], y[idx], x, y, 4, 2.0, intercept=True)) and acc > 0.8


def test_fewshot_lsr_has_an_almost_unregularised_bias():
    """big_vision appends a constant feature (100) after standardisation: with classes of unequal
    size the bias moves the decision, and the result is ridge regression with a free intercept."""
    l2 = 4.0
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(3, 8, generator=g)
        y_train = torch.tensor([0] * 20 + [1] * 3 + [2] * 3)
        x_train = centers[y_train] + torch.randn(len(y_train), 8, generator=g)
        y_test = torch.arange(3).repeat_interleave(200)
        x_test = centers[y_test] + torch.randn(600, 8, generator=g)
        acc = fewshot_lsr(x_train, y_train, x_test, y_test, 3, l2)
        assert acc == pytest.approx(_ridge_accuracy(x_train, y_train, x_test, y_test, 3, l2, intercept=True))
        assert acc != pytest.approx(_ridge_accuracy(x_train, y_train, x_test, y_test, 3, l2, intercept=False))


def test_fewshot_features_are_the_pre_logits_after_tanh_or_the_pooled_features(data):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sup = randomize(create_model("vit_ti8", image_size=32, depth=1, embed_dim=48, num_heads=2, mlp_dim=96,
                                     num_classes=5, head="pretrain", representation_size=24))
        tokens = sup.forward_features(x)
        torch.testing.assert_close(representation(sup, tokens),
                                   torch.tanh(sup.pre_logits.fc(tokens[:, 0])), rtol=0, atol=1e-6)
        ssl = randomize(create_model("vit_ti8", image_size=32, depth=1, embed_dim=48, num_heads=2, mlp_dim=96,
                                     num_classes=0, head="none", global_pool="avg"))
        tokens = ssl.forward_features(x)
        by_hand = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (48,), ssl.fc_norm.weight, ssl.fc_norm.bias,
                                                 1e-6)
        torch.testing.assert_close(representation(ssl, tokens), by_hand, rtol=0, atol=1e-5)
    feats, labels = features_and_labels(sup, resolve_shards(data / "val"), ModelInfo())
    assert feats.shape == (18, 24) and len(labels) == 18 and feats.abs().max() < 1  # after the tanh


def test_push_uploads_through_the_hub_api(data, tmp_path):
    """The hub is out of reach here: a stand-in records the HfApi calls vitpipe makes."""

    class StandInApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))

        def create_branch(self, repo_id, **kw):
            self.calls.append(("create_branch", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, **kw):
            self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), kw))

    api = StandInApi()
    files = push(data / "pretrained", "team/vit-tiny", "transformers", private=True, revision="v1", api=api)
    assert [name for name, _ in files] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert api.calls[0] == ("create_repo", "team/vit-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[2][2] == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert api.calls[2][3]["revision"] == "v1"
    dry = push(data / "pretrained", "team/vit-tiny", dry_run=True, api=None)
    assert [n for n, _ in dry] == ["README.md", "config.json", "model.safetensors"]

    class Offline(StandInApi):
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("Name or service not known")

    with pytest.raises(PushError, match="upload to team/vit-tiny failed: ConnectionError"):
        push(data / "pretrained", "team/vit-tiny", api=Offline())


@pytest.mark.parametrize("overrides,message", [
    (["model.name=vit_ti16"], "asks for patch size 16 but"),
    (["model.image_size=50"], "not divisible by the checkpoint's patch size 8"),
    (["init=/no/such/ckpt"], "checkpoint folder does not exist"),
])
def test_bad_finetune_input(data, tmp_path, overrides, message, run_here):
    init = [] if any(o.startswith("init=") for o in overrides) else [f"init={data / 'pretrained'}"]  # a key once
    res = run_here(finetune_cmd(*init, f"data.train={data / 'train'}", f"train.output_dir={tmp_path}", *overrides))
    assert res.returncode == 2 and message in res.stderr, res.stderr[-1500:]
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("override,message", [
    ("optim.layer_decay=1.5", "optim.layer_decay: must be in (0, 1], got 1.5"),
    ("model.global_pool=max", "model.global_pool: expected one of token, avg or null, got 'max'"),
    ("model.head=none", "model.head: fine-tuning needs a classifier head (linear or pretrain), got 'none'"),
])
def test_bad_finetune_recipe(data, tmp_path, capsys, override, message):
    argv = finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}",
                        f"train.output_dir={tmp_path}", override, config="ssl_tiny.yaml")[3:]
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_unlabelled_shards_and_corrupt_checkpoint(data, tmp_path, run_here):
    (tmp_path / "src").mkdir()
    for i, img in enumerate(sorted((data / "src" / "cat").glob("*.jpg"))[:4]):
        (tmp_path / "src" / f"{i}.jpg").write_bytes(img.read_bytes())
    shard(str(tmp_path / "src"), tmp_path / "unlabelled", progress=False)
    res = run_here(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={tmp_path / 'unlabelled'}",
                                f"train.output_dir={tmp_path / 'o'}"))
    assert res.returncode == 2 and "model.num_classes: not set" in res.stderr
    res = run_here(vitpipe_cmd("eval", str(data / "pretrained"), "--data", str(tmp_path / "unlabelled")))
    assert res.returncode == 2 and "eval shards without labels" in res.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((data / "pretrained" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((data / "pretrained" / "model.safetensors").read_bytes()[:5000])
    res = run_here(finetune_cmd(f"init={bad}", f"data.train={data / 'train'}", f"train.output_dir={tmp_path / 'o2'}"))
    assert res.returncode == 2 and "truncated" in res.stderr


def test_linear_probe_matches_scikit_learn():
    """Our L-BFGS probe minimises mean cross-entropy + wd * |W|^2: scikit-learn's C = 1 / (2 * wd * n)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 1.5
    y = torch.arange(4).repeat_interleave(60)
    x = centres[y] + torch.randn(240, 16, generator=g) * 2.0
    train, test = (x[::2], y[::2]), (x[1::2], y[1::2])
    ours = linear_probe(train, test, 4, weight_decay=1e-2)
    mean, std = train[0].mean(0, keepdim=True), train[0].std(0, keepdim=True) + 1e-6
    reference = linear_model.LogisticRegression(C=1 / (2 * 1e-2 * 120), max_iter=5000)
    reference.fit(((train[0] - mean) / std).numpy(), train[1].numpy())
    expected = reference.score(((test[0] - mean) / std).numpy(), test[1].numpy())
    assert 0.4 < expected < 0.95  # neither trivial nor hopeless, so agreement means something
    assert ours == pytest.approx(expected, abs=1 / 120 + 1e-9)
