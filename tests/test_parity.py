"""Our ViT against references we did not write: timm's VisionTransformer and transformers' ViT."""

import json

import pytest
import torch

from vit import ModelInfo, create_model, export_checkpoint, load_model, save_checkpoint

from .helpers import randomize

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

CASES = [
    ("vit_ti16", 224, "token"),
    ("vit_s16", 224, "token"),
    ("vit_ti16", (96, 160), "token"),
    ("vit_s32", 96, "avg"),
]
TOL = dict(rtol=0, atol=1e-4)


def _ours(name, size, pool, seed=0, num_classes=10):
    return randomize(create_model(name, image_size=size, num_classes=num_classes, global_pool=pool), seed)


def _image(model, batch=2):
    h, w = model.cfg.image_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def _timm_twin(model):
    c = model.cfg
    size = {192: "tiny", 384: "small"}[c.embed_dim]
    return timm.create_model(
        f"vit_{size}_patch{c.patch_size}_224", pretrained=False, img_size=c.image_size,
        num_classes=c.num_classes, global_pool=c.global_pool,
    ).eval()


@pytest.mark.parametrize("name,size,pool", CASES)
def test_ours_to_timm_and_back(name, size, pool, tmp_path):
    ours = _ours(name, size, pool)
    x = _image(ours)
    export_checkpoint(ours, ModelInfo(), tmp_path / "timm", "timm")
    meta = json.loads((tmp_path / "timm" / "config.json").read_text())
    n = meta["num_classes"]
    # the load recipe a timm user would type, with timm's own loader and checkpoint filter
    theirs = timm.create_model(
        meta["architecture"], pretrained=True, num_classes=n,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors"), num_classes=n),
        **meta["model_args"],
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(x), ours.forward_features(x), **TOL)
        torch.testing.assert_close(theirs(x), ours(x), **TOL)
        assert ours(x).abs().max() > 0.1  # the head is not the zero it was initialised to
    local = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(local(x), ours(x), **TOL)
    back, info = load_model(tmp_path / "timm")
    assert info.source_format == "timm" and back.cfg.global_pool == pool
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,size,pool", CASES[:3])
def test_timm_folder_written_by_timm_loads_here(name, size, pool, tmp_path):
    theirs = randomize(_timm_twin(create_model(name, image_size=size, num_classes=7)), seed=3)
    timm.models.save_for_hf(theirs, str(tmp_path), safe_serialization=True, model_args=dict(
        img_size=list(theirs.patch_embed.img_size), patch_size=theirs.patch_embed.patch_size[0],
        embed_dim=theirs.embed_dim, depth=len(theirs.blocks), num_heads=theirs.blocks[0].attn.num_heads))
    ours, _ = load_model(tmp_path)
    x = _image(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("name,size,pool", CASES[:3])
def test_ours_to_transformers_and_back(name, size, pool, tmp_path):
    ours = _ours(name, size, pool, seed=5)
    labels = [f"class_{i}" for i in range(10)]
    save_checkpoint(ours, tmp_path / "ours", ModelInfo(labels=labels))
    ours, info = load_model(tmp_path / "ours")
    export_checkpoint(ours, info, tmp_path / "hf", "transformers")
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = _image(ours)
    with torch.no_grad():
        out = theirs(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(theirs.vit(pixel_values=x).last_hidden_state, ours.forward_features(x), **TOL)
        torch.testing.assert_close(out.logits, ours(x), **TOL)
    assert theirs.config.id2label[3] == "class_3"
    back, info = load_model(tmp_path / "hf")
    assert info.labels == labels and info.source_format == "transformers"
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


@pytest.mark.parametrize("size", [224, (64, 96)])
def test_transformers_folder_written_by_transformers_loads_here(size, tmp_path):
    cfg = transformers.ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                                 image_size=size, patch_size=16, num_labels=4, layer_norm_eps=1e-12)
    theirs = randomize(transformers.ViTForImageClassification(cfg), seed=9)
    theirs.save_pretrained(tmp_path)
    ours, info = load_model(tmp_path)
    assert ours.cfg.layer_norm_eps == 1e-12 and ours.cfg.num_classes == 4
    x = _image(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).logits, **TOL)


def test_pretrain_head_export_drops_the_head_and_says_so(tmp_path):
    ours = randomize(create_model("vit_ti16", image_size=32, depth=2, num_classes=5, head="pretrain"))
    notes = export_checkpoint(ours, ModelInfo(), tmp_path / "timm", "timm")
    assert "tanh" in notes[0]
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = _image(ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.forward_head(ours.forward_features(x), pre_logits=True), **TOL)


def test_gap_model_refuses_transformers_export(tmp_path):
    from vit import CheckpointError

    with pytest.raises(CheckpointError, match="class token"):
        export_checkpoint(_ours("vit_ti16", 32, "avg"), ModelInfo(), tmp_path, "transformers")


def test_timm_hub_config_with_only_the_architecture_name(tmp_path):
    theirs = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4), seed=2)
    timm.models.save_for_hf(theirs, str(tmp_path), safe_serialization=True)  # no model_args, as on the hub
    ours, _ = load_model(tmp_path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(meta, model_args={"reg_tokens": 4})))
    from vit import CheckpointError

    with pytest.raises(CheckpointError, match="variant vitpipe does not build"):
        load_model(tmp_path)
