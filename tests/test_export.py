"""Exports load the way each library documents, with exactly our logits; files are written like any other output."""

import json
import os
import stat
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.transforms import EvalTransform, normalize
from vit import (
    FORMATS,
    CheckpointError,
    ModelInfo,
    ViTConfig,
    create_model,
    export_checkpoint,
    load_model,
    save_checkpoint,
)
from vit.card import describe, public, public_text
from vit.formats.base import Export
from vit.formats.timm import mlp_ratio
from vitpipe.cli import main

from .helpers import randomize, vitpipe_cmd

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=0, atol=1e-4)
DEMO = dict(image_size=32, embed_dim=128, depth=6, num_heads=4, mlp_dim=512, num_classes=10)
# (name, create_model arguments, the timm entry point the config should name)
TIMM_CASES = {
    "demo-avg": ("vit_ti4", dict(DEMO, global_pool="avg"), "vit_base_patch16_224"),
    "demo-token": ("vit_ti4", dict(DEMO, global_pool="token"), "vit_base_patch16_224"),
    # 4x4 patches, non-square, a width whose mlp ratio 61/28 is not exact in floating point
    "p4-tiny-nonsquare": ("vit_ti4", dict(image_size=(16, 24), embed_dim=28, depth=2, num_heads=2, mlp_dim=61,
                                          num_classes=3, global_pool="avg"), "vit_base_patch16_224"),
    "p8-no-classifier": ("vit_s8", dict(image_size=32, depth=1, num_classes=0, head="none", global_pool="avg"),
                         "vit_base_patch16_224"),
    "p14": ("vit_l14", dict(image_size=28, embed_dim=64, depth=1, num_heads=4, mlp_dim=128, num_classes=5),
            "vit_base_patch16_224"),
    "p32-nonsquare": ("vit_b32", dict(image_size=(64, 96), depth=1, num_classes=7), "vit_base_patch16_224"),
    "vit_s16": ("vit_s16", dict(image_size=224, num_classes=10), "vit_small_patch16_224"),
    # the fixed sin-cos table travels as timm's (learned) pos_embed weights
    "demo-sincos": ("vit_ti4", dict(DEMO, pos_embed="sincos"), "vit_base_patch16_224"),
}


def _image(model, batch=2, seed=1):
    h, w = model.cfg.image_size
    return torch.randn(batch, model.cfg.in_chans, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_export_loads_with_timms_local_dir(case, tmp_path):
    name, kwargs, architecture = TIMM_CASES[case]
    ours = randomize(create_model(name, **kwargs))
    export_checkpoint(ours, ModelInfo(), tmp_path, "timm")
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == architecture
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert theirs.num_classes == ours.cfg.num_classes
    x = _image(ours)
    with torch.no_grad():
        logits = ours(x)
        torch.testing.assert_close(theirs(x), logits, **TOL)
    assert logits.abs().max() > 0.1  # a head (or the features) that is not timm's fresh initialisation
    back, info = load_model(tmp_path)
    assert info.source_format == "timm" and back.cfg.mlp_dim == ours.cfg.mlp_dim
    with torch.no_grad():
        torch.testing.assert_close(back(x), logits, rtol=0, atol=0)


def test_a_sincos_model_exports_to_transformers_with_the_table_as_its_position_weights(tmp_path):
    ours = randomize(create_model("vit_ti4", **dict(DEMO, pos_embed="sincos")))
    export_checkpoint(ours, ModelInfo(), tmp_path, "transformers")
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(theirs.vit.embeddings.position_embeddings.detach(), ours.pos_embed, rtol=0, atol=0)
    x = _image(ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, ours(x), **TOL)


def test_mlp_ratio_gives_timm_the_exact_hidden_width():
    for dim, hidden in [(28, 61), (44, 15), (192, 768), (128, 512), (100, 333)]:
        assert int(dim * mlp_ratio(dim, hidden)) == hidden


def test_timm_export_through_the_hub_path(tmp_path, monkeypatch):
    """``hf-hub:`` reads the same config.json through load_model_config_from_hf: served from disk here."""
    from timm.models import _hub

    ours = randomize(create_model("vit_ti4", **dict(DEMO, global_pool="avg")), seed=4)
    export_checkpoint(ours, ModelInfo(labels=[f"c{i}" for i in range(10)]), tmp_path, "timm")
    asked = []

    def from_disk(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        asked.append((repo_id, filename))
        if not (tmp_path / filename).is_file():
            raise FileNotFoundError(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(_hub, "hf_hub_download", from_disk)
    pretrained_cfg, architecture, model_args = timm.models.load_model_config_from_hf("team/vit-demo")
    local_cfg, local_arch, local_args = _hub.load_model_config_from_path(tmp_path)
    assert (architecture, model_args) == (local_arch, local_args)
    assert model_args["patch_size"] == 4 and model_args["img_size"] == [32, 32] and model_args["global_pool"] == "avg"
    assert pretrained_cfg["num_classes"] == 10 and pretrained_cfg["label_names"][3] == "c3"
    theirs = timm.create_model("hf-hub:team/vit-demo", pretrained=True).eval()
    assert ("team/vit-demo", "model.safetensors") in asked
    x = _image(ours)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), **TOL)


def test_timm_refuses_a_layer_norm_eps_it_cannot_express(tmp_path, run_here):
    model = randomize(create_model("vit_ti16", image_size=32, depth=1, num_classes=3, layer_norm_eps=1e-12))
    with pytest.raises(CheckpointError, match="cannot export to timm: the model's LayerNorm eps is 1e-12"):
        export_checkpoint(model, ModelInfo(), tmp_path / "timm", "timm")
    save_checkpoint(model, tmp_path / "ckpt")
    res = run_here(vitpipe_cmd("export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "timm"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "LayerNorm eps" in res.stderr and not (tmp_path / "out").exists()


def _pil(mode: str, size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8), mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_transformers_processor_reads_grayscale_rgb_and_rgba(mode, tmp_path):
    ours = randomize(create_model("vit_ti4", **DEMO), seed=6)
    info = ModelInfo(labels=[f"c{i}" for i in range(10)], mean=(0.286,) * 3, std=(0.353,) * 3)
    export_checkpoint(ours, info, tmp_path, "transformers")
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["do_convert_rgb"] is True
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path)
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    img = _pil(mode)
    x = processor(images=img, return_tensors="pt").pixel_values
    assert x.shape == (1, 3, 32, 32)
    # the processor does what our evaluation transform does (RGB, alpha composited on white, normalised)
    ours_x = normalize(torch.from_numpy(EvalTransform((32, 32))(img).copy())[None], info.mean, info.std)
    torch.testing.assert_close(x, ours_x, rtol=0, atol=1e-5)
    with torch.no_grad():
        logits = ours(x)
        torch.testing.assert_close(theirs(pixel_values=x).logits, logits, **TOL)
    assert logits.abs().max() > 0.1


@pytest.mark.parametrize("resize_filter", ["bilinear", "bicubic"])
def test_exports_resize_with_the_filter_the_model_was_trained_with(resize_filter, tmp_path):
    """timm's data config and the transformers image processor name the model's filter, and timm's eval
    transform then gives our evaluation's pixels; each reads back as that filter."""
    ours = randomize(create_model("vit_ti4", **DEMO), seed=6)
    info = ModelInfo(resize_filter=resize_filter)
    for fmt in ("timm", "transformers"):
        export_checkpoint(ours, info, tmp_path / fmt, fmt)
        assert load_model(tmp_path / fmt)[1].resize_filter == resize_filter
    data_cfg = timm.data.resolve_data_config(model=timm.create_model(f"local-dir:{tmp_path / 'timm'}"))
    assert data_cfg["interpolation"] == resize_filter
    img = _pil("RGB", size=(48, 48))
    theirs_x = timm.data.create_transform(**data_cfg)(img)[None]
    ours_x = normalize(torch.from_numpy(EvalTransform((32, 32), interpolation=resize_filter)(img).copy())[None],
                       info.mean, info.std)
    torch.testing.assert_close(theirs_x, ours_x, rtol=0, atol=1e-5)
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "transformers")
    assert processor.resample == {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[
        resize_filter]


def test_foreign_folders_that_name_no_filter_resize_as_their_library_would(tmp_path):
    """timm's data config falls back to bicubic, ViTImageProcessor to bilinear; a filter we do not resize with
    (here transformers' nearest) reads as bicubic."""
    ours = randomize(create_model("vit_ti4", **DEMO), seed=6)
    for fmt in ("timm", "transformers"):
        export_checkpoint(ours, ModelInfo(), tmp_path / fmt, fmt)
    meta = json.loads((tmp_path / "timm" / "config.json").read_text())
    del meta["pretrained_cfg"]["interpolation"]
    (tmp_path / "timm" / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "timm")[1].resize_filter == "bicubic"
    processor_path = tmp_path / "transformers" / "preprocessor_config.json"
    processor = json.loads(processor_path.read_text())
    processor_path.write_text(json.dumps({**processor, "resample": 0}))
    assert load_model(tmp_path / "transformers")[1].resize_filter == "bicubic"
    processor_path.unlink()
    assert load_model(tmp_path / "transformers")[1].resize_filter == "bilinear"


def test_written_files_respect_the_umask(tmp_path):
    model = randomize(create_model("vit_ti16", image_size=32, depth=1, num_classes=3))
    old = os.umask(0o022)
    try:
        save_checkpoint(model, tmp_path / "ckpt")
        for fmt in ("vitpipe", "timm", "transformers"):
            export_checkpoint(model, ModelInfo(), tmp_path / fmt, fmt)
        os.umask(0o007)
        save_checkpoint(model, tmp_path / "group")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "README.md", "preprocessor_config.json"}
    for p in files:
        want = 0o660 if p.parent.name == "group" else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_public_paths_keep_their_last_two_parts_and_leave_urls_alone():
    cases = {
        "/home/me/runs/demo/shards/train": "shards/train",
        "shards/train": "shards/train",
        "s3://bucket/corpus/shard-{000..099}.tar": "s3://bucket/corpus/shard-{000..099}.tar",
        "https://example.org/a/b.tar": "https://example.org/a/b.tar",
        "/data/corpus/shard-{000..099}.tar": "corpus/shard-{000..099}.tar",
        "pipe:cat /mnt/nfs/x/y.tar": "pipe:cat x/y.tar",
        "hf:imagefolder:/data/pets": "hf:imagefolder:data/pets",
        "file:///srv/shards/test": "shards/test",
        "~/datasets/pets": "datasets/pets",
        "1/2 of /tmp": "1/2 of tmp",
    }
    for text, shown in cases.items():
        assert public_text(text) == shown, text
    assert public({"data": ["/a/b/c", 3], "train": {"output_dir": "/x/runs/ft"}}) == \
        {"data": ["b/c", 3], "train": {"output_dir": "runs/ft"}}


@pytest.mark.parametrize("provenance,trained,start", [
    ({"stage": "init", "init": "vit_ti4", "seed": 0}, "not trained", "random (vitpipe init, seed 0)"),
    ({"stage": "pretrain", "objective": "mpp", "step": 400, "data": "shards/train"},
     "pretrained with the mpp objective for 400 steps on shards/train", "random"),
    ({"stage": "finetune", "objective": "supervised", "step": 200, "data": "shards/labelled",
      "init": "runs/scratch_init", "init_stage": "init", "pretraining": None},
     "fine-tuned (supervised) for 200 steps on shards/labelled",
     "random weights (vitpipe init: runs/scratch_init), no pretraining"),
    ({"stage": "finetune", "objective": "supervised", "step": 200, "init": "pretrain/final",
      "init_stage": "pretrain", "pretraining": "mae"},
     "fine-tuned (supervised) for 200 steps", "pretrain/final, pretrained with the mae objective"),
    ({"init": "pretrain/final", "init_stage": "pretrain", "pretraining": "mpp"},
     "not trained: prepared for fine-tuning (new head, new resolution)", "pretrain/final, pretrained with the mpp objective"),
    ({}, "not recorded", "not recorded"),
])
def test_the_card_says_how_the_weights_were_trained(provenance, trained, start):
    assert describe(provenance) == (trained, start)


def _plain_format() -> types.ModuleType:
    """A format as a new module would write it: our tensors and model config under its own config.json key."""
    plain = types.ModuleType("plain")
    plain.NAME = "plain"
    plain.HOW_TO_LOAD = "plain.load({repo!r})"

    def write(cfg, state, info):
        if cfg.head == "pretrain":
            raise ValueError("plain has no slot for the pretraining head: export to vitpipe")
        # "format": a layout may carry vitpipe's own keys too; priority, not import order, says it is plain's
        return Export(dict(state), {"config.json": {"plain_vit": cfg.to_dict(), "format": "vitpipe"}})

    plain.write = write
    plain.recognises = lambda meta: "plain_vit" in meta
    plain.read = lambda folder, meta, state: (ViTConfig.from_dict(meta["plain_vit"]), state,
                                              ModelInfo(source_format="plain"))
    return plain


def test_a_format_is_one_module_in_the_registry_and_the_cli_offers_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FORMATS, "_entries", dict(FORMATS._entries))  # the registration below ends with the test
    FORMATS.add("plain", _plain_format())
    names = FORMATS.names()
    assert "plain" in names and names[-1] == "vitpipe"  # vitpipe's own layout is tried last
    model = randomize(create_model("vit_ti16", image_size=32, depth=1, num_classes=3))
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "plain"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: plain" in card and "plain.load('REPO_ID')" in card
    back, info = load_model(tmp_path / "out")
    x = _image(model)
    assert info.source_format == "plain" and torch.equal(back(x), model(x))

    with pytest.raises(CheckpointError, match="^cannot export to plain: plain has no slot for the pretraining head"):
        export_checkpoint(create_model("vit_ti16", image_size=32, depth=1, num_classes=3, head="pretrain"),
                          ModelInfo(), tmp_path / "refused", "plain")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(CheckpointError, match=f"^unknown export format 'onnx': choose one of {', '.join(names)}$"):
        export_checkpoint(model, ModelInfo(), tmp_path / "onnx", "onnx")

    capsys.readouterr()
    for argv in (["export", "a", "b", "--format", "onnx"], ["push", "a", "--repo-id", "t/x", "--format", "onnx"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert f"invalid choice: 'onnx' (choose from {', '.join(map(repr, names))})" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert f"layout to upload: {', '.join(names)} (default: vitpipe)" in \
        " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", FORMATS.names())
def test_every_format_implements_the_interface_and_reads_back_what_it_writes(name, tmp_path):
    from vit.formats import format_of
    from vit.formats.base import Format

    fmt = FORMATS.get(name)
    assert isinstance(fmt, Format) and fmt.NAME == name
    model = randomize(create_model("vit_ti16", image_size=32, depth=1, num_classes=3))
    assert fmt.refuses(model.cfg) is None
    export_checkpoint(model, ModelInfo(), tmp_path / "out", name)
    assert format_of(json.loads((tmp_path / "out" / "config.json").read_text())) is fmt
    back, _ = load_model(tmp_path / "out")
    x = _image(model)
    assert torch.equal(back(x), model(x))
