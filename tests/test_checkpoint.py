import json

import pytest
import torch
from safetensors.torch import save_file

from vit import CheckpointError, ModelInfo, create_model, load_model, save_checkpoint

from .helpers import randomize, vitpipe_cmd


@pytest.fixture
def ckpt(tmp_path):
    model = randomize(create_model("vit_ti16", image_size=(32, 48), depth=2, num_classes=3))
    save_checkpoint(model, tmp_path / "ck", ModelInfo(labels=["cat", "dog", "eel"], mean=(0.1, 0.2, 0.3),
                                                      resize_filter="bilinear"))
    return model, tmp_path / "ck"


def test_round_trip_is_exact(ckpt):
    model, folder = ckpt
    back, info = load_model(folder)
    assert info.labels == ["cat", "dog", "eel"] and info.mean == (0.1, 0.2, 0.3) and info.resize_filter == "bilinear"
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "vitpipe" and meta["format_version"] == 1
    assert meta["model"]["image_size"] == [32, 48] and "created" in meta["provenance"]
    assert not list(folder.glob("*.tmp"))


def test_a_folder_from_before_the_resize_filter_was_recorded_resizes_bicubic(ckpt):
    """Every checkpoint written before ``resize_filter`` was kept trained and evaluated bicubic."""
    _, folder = ckpt
    meta = json.loads((folder / "config.json").read_text())
    del meta["resize_filter"]
    (folder / "config.json").write_text(json.dumps(meta))
    assert load_model(folder)[1].resize_filter == "bicubic"


def test_missing_folder_and_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    _, folder = ckpt
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(folder)


def test_not_safetensors(ckpt):
    _, folder = ckpt
    torch.save({"x": torch.zeros(2)}, folder / "model.safetensors")  # a pickle where safetensors belongs
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(folder)


def test_truncated(ckpt):
    _, folder = ckpt
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)


def test_shape_mismatch_names_tensor_and_shapes(ckpt):
    model, folder = ckpt
    state = model.state_dict()
    state["head.weight"] = torch.zeros(4, 192)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor head\.weight has shape \(4, 192\), the model expects \(3, 192\)"):
        load_model(folder)


def test_unknown_architecture_and_version(ckpt):
    _, folder = ckpt
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="unsupported format_version 99"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet50", "model_args": {}}))
    with pytest.raises(CheckpointError, match="'resnet50' is not a plain ViT"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(dict(meta, model=dict(meta["model"], blocks=3))))
    with pytest.raises(CheckpointError, match="unknown model config key.*blocks"):
        load_model(folder)


def test_cli_init_and_export(tmp_path, run_here):
    out = tmp_path / "init"
    run = run_here(vitpipe_cmd("init", "vit_ti16", str(out), "--img-size", "32", "64", "--num-classes", "2",
                               "--labels", "a", "b", "--seed", "1"))
    assert run.returncode == 0, run.stderr
    model, info = load_model(out)
    assert model.cfg.image_size == (32, 64) and info.labels == ["a", "b"]
    assert torch.count_nonzero(model.head.weight) == 0
    for fmt in ("vitpipe", "timm", "transformers"):
        run = run_here(vitpipe_cmd("export", str(out), str(tmp_path / fmt), "--format", fmt))
        assert run.returncode == 0, run.stderr
        again, _ = load_model(tmp_path / fmt)
        assert torch.equal(again.pos_embed, model.pos_embed)


def test_cli_bad_input_is_one_line(tmp_path, run_here):
    run = run_here(vitpipe_cmd("init", "vit_ti16", str(tmp_path / "x"), "--img-size", "30"))
    assert run.returncode == 2
    assert run.stderr.strip() == "vitpipe init: error: image size 30x30 is not divisible by the patch size 16"
    run = run_here(vitpipe_cmd("export", str(tmp_path / "missing"), str(tmp_path / "y")))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "does not exist" in run.stderr
