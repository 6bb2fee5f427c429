import json
import os
import subprocess
import sys

import pytest
import torch

from data_tools.shard import ShardOptions, shard
from finetune.evaluate import evaluate, fewshot_lsr, sample_shots
from finetune.prepare import prepare_for_finetune
from finetune.share import PushError, push
from vit import ModelInfo, create_model, load_model, resample_abs_pos_embed, save_checkpoint

from .conftest import ROOT, randomize
from .corpus import write_folder

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


def finetune_cmd(*overrides):
    return [sys.executable, "-m", "finetune", "--config", str(ROOT / "configs" / "finetune" / "tiny.yaml"), *overrides]


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)


def test_zero_steps_writes_the_prepared_model(data, tmp_path):
    res = run(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}", "train.max_steps=0",
                           f"train.output_dir={tmp_path}", "model.image_size=[48, 40]"))
    assert res.returncode == 0, res.stderr[-2000:]
    model, info = load_model(tmp_path / "final")
    assert model.cfg.image_size == (48, 40) and model.cfg.num_classes == 3 and info.labels == ["cat", "dog", "eel"]
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)  # the checkpoint's
    assert torch.count_nonzero(model.head.weight) == 0


def test_finetuned_model_matches_timm_and_transformers_at_the_new_resolution(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    res = run(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}", "train.max_steps=6",
                           f"train.output_dir={tmp_path / 'ft'}", "schedule.warmup_steps=1"))
    assert res.returncode == 0, res.stderr[-2000:]
    model, info = load_model(tmp_path / "ft" / "final")
    assert model.cfg.image_size == (48, 48) and model.head.weight.abs().sum() > 0
    x = torch.randn(2, 3, 48, 48)
    for fmt in ("timm", "transformers"):
        out = subprocess.run([sys.executable, "-m", "vitpipe", "export", str(tmp_path / "ft" / "final"),
                              str(tmp_path / fmt), "--format", fmt], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
    theirs_timm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    theirs_hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "transformers").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs_timm(x), model(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(theirs_hf(pixel_values=x).logits, model(x), rtol=0, atol=1e-4)
    card = (tmp_path / "timm" / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "library_name: timm" in card and "local-dir:" in card


def test_eval_counts_every_sample_once_and_draws_the_confusion_matrix(data, tmp_path):
    model = randomize(create_model("vit_ti8", image_size=32, depth=1, embed_dim=48, num_heads=2, mlp_dim=96,
                                   num_classes=3))
    report = evaluate(model, ModelInfo(labels=["cat", "dog", "eel"]), data / "val", tmp_path,
                      fewshot_train=data / "train", shots=(1, 5), seeds=2, probe=True, workers=2)
    assert report["samples"] == 18 and sum(map(sum, report["confusion"])) == 18
    assert set(report["per_class"]) == {"cat", "dog", "eel"}
    assert set(report["fewshot"]) == {"1-shot", "5-shot"} and len(report["fewshot"]["5-shot"]["runs"]) == 2
    assert 0 <= report["linear_probe_top1"] <= 1
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == report["top1"]


def test_fewshot_lsr_matches_sklearn_ridge():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat_interleave(30)
    x = centers[y] + torch.randn(120, 16, generator=g)
    idx = sample_shots(y, 5, 4, seed=1)
    assert torch.bincount(y[idx]).tolist() == [5, 5, 5, 5]
    acc = fewshot_lsr(x[idx], y[idx], x, y, 4, l2=2.0)
    mean, std = x[idx].double().mean(0), x[idx].double().std(0, unbiased=False) + 1e-6
    ridge = sklearn.Ridge(alpha=2.0, fit_intercept=False).fit(((x[idx] - mean) / std).numpy(),
                                                                 (2.0 * torch.nn.functional.one_hot(y[idx], 4) - 1).numpy())
    ref = (torch.from_numpy(ridge.predict(((x.double() - mean) / std).numpy())).argmax(1) == y).double().mean().item()
    assert acc == pytest.approx(ref) and acc > 0.8


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
def test_bad_finetune_input(data, tmp_path, overrides, message):
    res = run(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={data / 'train'}",
                           f"train.output_dir={tmp_path}", *overrides))
    assert res.returncode == 2 and message in res.stderr, res.stderr[-1500:]
    assert len(res.stderr.strip().splitlines()) == 1


def test_unlabelled_shards_and_corrupt_checkpoint(data, tmp_path):
    (tmp_path / "src").mkdir()
    for i, img in enumerate(sorted((data / "src" / "cat").glob("*.jpg"))[:4]):
        (tmp_path / "src" / f"{i}.jpg").write_bytes(img.read_bytes())
    shard(str(tmp_path / "src"), tmp_path / "unlabelled", progress=False)
    res = run(finetune_cmd(f"init={data / 'pretrained'}", f"data.train={tmp_path / 'unlabelled'}",
                           f"train.output_dir={tmp_path / 'o'}"))
    assert res.returncode == 2 and "model.num_classes: not set" in res.stderr
    res = subprocess.run([sys.executable, "-m", "vitpipe", "eval", str(data / "pretrained"), "--data",
                          str(tmp_path / "unlabelled")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "eval shards without labels" in res.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((data / "pretrained" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes((data / "pretrained" / "model.safetensors").read_bytes()[:5000])
    res = run(finetune_cmd(f"init={bad}", f"data.train={data / 'train'}", f"train.output_dir={tmp_path / 'o2'}"))
    assert res.returncode == 2 and "truncated" in res.stderr
