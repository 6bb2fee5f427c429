"""Hostile and careless input (issue 22, items 5 and 6): each case is one line naming the file, shard, key or
flag and a non-zero exit, or a counted, listed skip."""

import json
import shutil

import pytest

from data_tools.index import IndexFileError
from data_tools.loader import resolve_shards
from data_tools.shard import ShardError, ShardOptions, shard
from data_tools.verify import verify
from pretrain.config import ConfigError, load_config
from vitpipe.cli import main as cli

from .corpus import write_folder
from .helpers import TINY


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """12 photo crops in 2 classes, 3 shards of 4."""
    root = tmp_path_factory.mktemp("hostile")
    write_folder(root / "src", {"a": 6, "b": 6}, size=(24, 32))
    shard(str(root / "src"), root / "shards", ShardOptions(samples_per_shard=4), progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "init"
    assert cli(["init", "vit_ti4", str(out), "--img-size", "16", "--embed-dim", "16", "--depth", "1",
                "--num-heads", "2", "--mlp-dim", "32", "--num-classes", "2", "--seed", "0"]) == 0
    return out


def one_line_error(capsys, argv: list[str], status: int = 2) -> str:
    """Run ``vitpipe ARGV``; assert it failed with exactly one line on stderr and no traceback; return it."""
    capsys.readouterr()
    try:
        code = cli(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == status, err
    lines = [line for line in err if not line.startswith("usage:") and not line.startswith("  ")]
    assert len(lines) == 1 and "Traceback" not in lines[0], err
    return lines[0]


# ---- index.json: one validation, every reader ------------------------------------------------------------

def _tamper(folder, edit):
    index = json.loads((folder / "index.json").read_text())
    index = edit(index)
    (folder / "index.json").write_text(json.dumps(index))


MALFORMED = [
    (lambda i: [i], "expected a JSON object, got a list"),
    (lambda i: {k: v for k, v in i.items() if k != "shards"}, "field 'shards': expected a list of shards, got "
                                                             "nothing (the field is missing)"),
    (lambda i: dict(i, shards=None), "field 'shards': expected a list of shards, got null"),
    (lambda i: dict(i, shards=[{k: v for k, v in s.items() if k != "name"} for s in i["shards"]]),
     "field 'shards[0].name': expected a file name, got nothing (the field is missing)"),
    (lambda i: dict(i, shards=[dict(s, count="fifty") for s in i["shards"]]),
     "field 'shards[0].count': expected an integer >= 0, got 'fifty'"),
    (lambda i: dict(i, total_samples=i["total_samples"] + 1),
     "field 'total_samples' is 13 but the shards' counts add up to 12"),
    (lambda i: dict(i, skipped=None), "field 'skipped': expected a list, got null"),
]


@pytest.mark.parametrize("edit,message", MALFORMED)
def test_a_malformed_index_is_one_line_naming_the_file_and_field_in_every_reader(
        small_shards, tiny_ckpt, tmp_path, capsys, edit, message):
    folder = tmp_path / "shards"
    shutil.copytree(small_shards, folder)
    _tamper(folder, edit)
    index = folder / "index.json"
    for argv in (["verify", str(folder)], ["inspect", str(folder)],
                 ["eval", str(tiny_ckpt), "--data", str(folder), "--out", str(tmp_path / "eval")]):
        assert one_line_error(capsys, argv) == f"vitpipe {argv[0]}: error: {index}: {message}"
    with pytest.raises(IndexFileError) as e:
        resolve_shards(str(folder))  # the training loader
    assert str(e.value) == f"{index}: {message}"
    tars = sorted(str(p) for p in folder.glob("*.tar"))
    with pytest.raises(IndexFileError):  # a list of tars beside an index is read with that index
        resolve_shards(tars)


def test_a_sound_index_still_verifies(small_shards):
    assert verify(small_shards) == ([], [])


# ---- numbers on the command line and in configs ------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--resize-shorter", "-5", "argument --resize-shorter: must be >= 1, got -5"),
    ("--quality", "500", "argument --quality: must be in [1, 100], got 500"),
    ("--workers", "-2", "argument --workers: must be >= 1, got -2"),
    ("--max-pixels", "0", "argument --max-pixels: must be >= 1, got 0"),
    ("--max-side", "0", "argument --max-side: must be >= 1, got 0"),
    ("--samples-per-shard", "0", "argument --samples-per-shard: must be >= 1, got 0"),
    ("--shuffle-seed", "-1", "argument --shuffle-seed: must be in [0, 4294967295], got -1"),
])
def test_shard_flags_are_range_checked(tmp_path, capsys, flag, value, message):
    line = one_line_error(capsys, ["shard", str(tmp_path), str(tmp_path / "out"), flag, value])
    assert line == f"vitpipe shard: error: {message}"
    assert not (tmp_path / "out").exists()


def test_shard_options_are_range_checked_for_python_callers_too(tmp_path):
    from data_tools.images import EncodeOptions

    with pytest.raises(ShardError, match=r"^--resize-shorter must be >= 1, got -5$"):
        shard(str(tmp_path), tmp_path / "out", ShardOptions(encode=EncodeOptions(resize_shorter=-5)), progress=False)
    with pytest.raises(ShardError, match=r"^--quality must be in \[1, 100\], got 500$"):
        shard(str(tmp_path), tmp_path / "out", ShardOptions(encode=EncodeOptions(quality=500)), progress=False)
    with pytest.raises(ShardError, match=r"^--workers must be >= 1, got -2$"):
        shard(str(tmp_path), tmp_path / "out", workers=-2, progress=False)


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["--shots", "-1"], "argument --shots: must be >= 1, got -1"),
    (["--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
])
def test_eval_flags_are_range_checked(small_shards, tiny_ckpt, capsys, argv, message):
    line = one_line_error(capsys, ["eval", str(tiny_ckpt), "--data", str(small_shards), *argv])
    assert line == f"vitpipe eval: error: {message}"


@pytest.mark.parametrize("override,message", [
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
    ("optim.weight_decay=.nan", "optim.weight_decay: must be a finite number, got nan"),
    ("optim.betas=[0.9, nan]", "optim.betas[1]: must be a finite number, got nan"),
    ("data.mean=[0.5, 0.5, nan]", "data.mean: expected list or null, got [0.5, 0.5, 'nan']"),
    ("objective.mask_prob=nan", "objective.mask_prob: must be a finite number, got nan"),
])
def test_nan_and_inf_are_refused_for_every_number_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.train=x", override])
    assert str(e.value) == message


def test_a_key_given_twice_on_the_command_line_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.train=x", "optim.lr=0.1", "train.max_steps=3", "optim.lr=0.2"])
    assert str(e.value) == "optim.lr: given twice on the command line (optim.lr=0.1 and optim.lr=0.2); give it once"
    with pytest.raises(ConfigError, match=r"^optim.lr: given twice on the command line \(optim={lr: 0.1} and "):
        load_config(TINY, ["data.train=x", "optim={lr: 0.1}", "optim.lr=0.2"])


@pytest.mark.parametrize("stage", ["pretrain.run", "finetune.run"])
def test_two_config_files_are_refused(capsys, stage):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(stage).main(["--config", "a.yaml", "--config", "b.yaml", "data.train=x"])
    assert e.value.code == 2
    assert "error: --config given twice (a.yaml and b.yaml); give it once" in capsys.readouterr().err
    line = one_line_error(capsys, ["pretrain", "--config", "a.yaml", "--config", "b.yaml"])
    assert line == "vitpipe pretrain: error: --config given twice (a.yaml and b.yaml); give it once"


def test_yaml_alias_bombs_are_refused_in_one_short_line(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        prev = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join(['*' + prev] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["data.train=x"])
    assert str(e.value).startswith(f"{path}:1: not valid YAML: aliases expand this document past 10000 values")
    assert len(str(e.value)) < 200
    bomb = "{" + ", ".join(lines) + "}"  # on the command line: kept as the text it is, never expanded
    assert load_config(TINY, [f"data.train={bomb}"]).data.train == bomb


def test_yaml_aliases_within_the_limit_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("data:\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\n  train: x\n")
    cfg = load_config(path)
    assert cfg.data.std == [0.5, 0.5, 0.5]


# ---- damaged shards: inspect and eval -----------------------------------------------------------------------

def zero_images(folder):
    """Overwrite every stored image with zeros in place: the tars stay valid and the same size, nothing decodes."""
    import tarfile

    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))]
        with open(path, "r+b") as f:
            for offset, size in spans:
                f.seek(offset)
                f.write(bytes(size))


@pytest.fixture
def undecodable(small_shards, tmp_path):
    """Shards whose index matches them (sha256 included) and in which no image decodes."""
    import hashlib

    folder = tmp_path / "undecodable"
    shutil.copytree(small_shards, folder)
    zero_images(folder)
    _tamper(folder, lambda i: dict(i, shards=[dict(s, sha256=hashlib.sha256((folder / s["name"]).read_bytes())
                                                   .hexdigest()) for s in i["shards"]]))
    return folder


def test_inspect_lists_empty_cut_and_undecodable_shards(small_shards, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(small_shards, folder)
    zero_images(folder)  # whole tars in which no image decodes
    (folder / "shard-000000.tar").write_bytes(b"")
    cut = folder / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:1500])
    capsys.readouterr()
    assert cli(["inspect", str(folder), "--grid", str(tmp_path / "grid.png")]) == 1
    out, err = capsys.readouterr()
    assert "12 samples in 3 shards" in out and f"wrote {tmp_path / 'grid.png'} (0 images)" in out
    lines = err.strip().splitlines()
    assert lines[0] == "shard-000000.tar: unreadable after 0 samples (truncated: empty file)"
    assert lines[1] == "shard-000001.tar: unreadable after 0 samples (truncated: cut inside a tar header)"
    assert sum("does not decode" in line for line in lines) == 4 and "Traceback" not in err
    assert lines[-1].endswith("problem(s) above; vitpipe verify " + str(folder) + " checks every shard")


@pytest.fixture
def trained_ckpt(tiny_ckpt, tmp_path):
    """``tiny_ckpt`` as a fine-tune would have left it: eval reads top-1 only from a head that was trained."""
    folder = tmp_path / "trained"
    shutil.copytree(tiny_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["provenance"]["stage"] = "finetune"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_eval_where_nothing_decodes_is_one_line(undecodable, trained_ckpt, tmp_path, capsys):
    line = one_line_error(capsys, ["eval", str(trained_ckpt), "--data", str(undecodable), "--out", str(tmp_path / "e")])
    assert line == (f"vitpipe eval: error: {undecodable}: no sample decodes (12 lost to damaged shards or images; "
                    f"vitpipe verify {undecodable} names them)")
    assert not (tmp_path / "e" / "eval.json").exists()


def test_eval_refuses_more_shots_than_a_class_has(small_shards, tiny_ckpt, tmp_path, capsys):
    argv = ["eval", str(tiny_ckpt), "--data", str(small_shards), "--fewshot-train", str(small_shards),
            "--out", str(tmp_path / "e"), "--seeds", "1", "--shots"]
    assert one_line_error(capsys, argv + ["1", "1000"]) == (
        f"vitpipe eval: error: --shots 1000: {small_shards} has only 6 decodable images of class 'a' (the fewest of "
        "any class); use --shots up to 6")
    capsys.readouterr()
    assert cli(argv + ["6"]) == 0
    assert "6-shot linear" in capsys.readouterr().out


def test_eval_refuses_few_shot_shards_whose_classes_are_numbered_otherwise(small_shards, tiny_ckpt, tmp_path, capsys):
    write_folder(tmp_path / "src", {"a": 3, "c": 3}, size=(24, 32))
    shard(str(tmp_path / "src"), tmp_path / "other", ShardOptions(samples_per_shard=6), progress=False)
    argv = ["eval", str(tiny_ckpt), "--data", str(small_shards), "--fewshot-train", str(tmp_path / "other"),
            "--out", str(tmp_path / "e"), "--seeds", "1", "--shots", "1"]
    assert one_line_error(capsys, argv) == (
        f"vitpipe eval: error: --fewshot-train {tmp_path / 'other'}: its classes are not those of {small_shards} "
        "(lacks b; adds c); both must list the same classes in the same order")
    assert not (tmp_path / "e" / "eval.json").exists()


# ---- a diverged (NaN) model ---------------------------------------------------------------------------------

@pytest.fixture
def nan_ckpt(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny_ckpt, folder)
    state = load_file(folder / "model.safetensors")
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors")
    return folder


def test_a_nan_model_is_named_by_eval_and_refused_by_export_and_push_unless_forced(
        nan_ckpt, small_shards, tmp_path, capsys):
    line = one_line_error(capsys, ["eval", str(nan_ckpt), "--data", str(small_shards), "--out", str(tmp_path / "e")])
    assert line == (f"vitpipe eval: error: {nan_ckpt}: the model's weights hold NaN or inf "
                    "(blocks.0.attn.qkv.weight): the training run diverged")
    refusal = (f"{nan_ckpt}: the model's weights hold NaN or inf (blocks.0.attn.qkv.weight); refusing to share it "
               "(--force to export it anyway)")
    assert one_line_error(capsys, ["export", str(nan_ckpt), str(tmp_path / "x")]) == f"vitpipe export: error: {refusal}"
    assert not (tmp_path / "x").exists()
    assert one_line_error(capsys, ["push", str(nan_ckpt), "--repo-id", "team/m", "--dry-run"]) == \
        f"vitpipe push: error: {refusal}"
    assert cli(["export", str(nan_ckpt), str(tmp_path / "x"), "--force"]) == 0
    assert (tmp_path / "x" / "model.safetensors").is_file()
    assert cli(["push", str(nan_ckpt), "--repo-id", "team/m", "--dry-run", "--force"]) == 0


@pytest.mark.parametrize("repo_id", ["../../etc", "team/../x", "a/b/c", "x-", "team/m.git", "team--m", ""])
def test_push_dry_run_refuses_a_repo_id_the_hub_would_not_take(tiny_ckpt, capsys, repo_id):
    line = one_line_error(capsys, ["push", str(tiny_ckpt), "--repo-id", repo_id, "--dry-run"])
    assert line.startswith(f"vitpipe push: error: --repo-id: {repo_id!r} is not a hub repository id (")


# ---- checkpoints that ask for more than they hold ----------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"depth": 1_000_000}, "asks for depth 1000000 but {weights} holds 1 blocks"),
    ({"embed_dim": 65536, "num_heads": 2}, "{weights} (against {config}): tensor cls_token has shape (1, 1, 16), "
                                           "the model expects (1, 1, 65536)"),
    ({"mlp_dim": 10**9}, "{weights} (against {config}): tensor blocks.0.mlp.fc1.weight has shape (32, 16), "
                         "the model expects (1000000000, 16)"),
])
def test_a_checkpoint_config_asking_for_a_huge_model_is_refused_before_allocating(
        tiny_ckpt, tmp_path, capsys, change, message):
    import resource

    folder = tmp_path / "huge"
    shutil.copytree(tiny_ckpt, folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"].update(change)
    (folder / "config.json").write_text(json.dumps(meta))
    weights, config = folder / "model.safetensors", folder / "config.json"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = one_line_error(capsys, ["export", str(folder), str(tmp_path / "x")])
    assert line.endswith(message.format(weights=weights, config=config))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing near the model's size


# ---- images: exotic pixel modes, tiny files that decode or resize huge --------------------------------------

def _encoded_pixels(img, fmt: str = "TIFF", **kw):
    import io

    import numpy as np
    from PIL import Image

    from data_tools.images import EncodeOptions, encode

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    enc = encode(buf.getvalue(), EncodeOptions())
    return np.asarray(Image.open(io.BytesIO(enc.data)).convert("RGB"))


def test_exotic_pixel_modes_become_the_right_rgb():
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    got = _encoded_pixels(Image.fromarray(ramp, "F"))  # a scientific float TIFF, values 0..1
    np.testing.assert_allclose(got[..., 0], np.round(ramp * 255), atol=1)
    assert got.max() == 255 and (got[..., 0] == got[..., 2]).all()
    wide = Image.fromarray((ramp * 200).astype(np.float32), "F")  # a float TIFF already in 0..255 stays as it is
    np.testing.assert_allclose(_encoded_pixels(wide)[..., 1], np.round(ramp * 200), atol=1)
    sixteen = Image.fromarray((ramp * 65535).astype(np.uint16))  # mode I;16
    np.testing.assert_allclose(_encoded_pixels(sixteen, "PNG")[..., 0], np.round(ramp * 255), atol=1)
    la = Image.fromarray(np.dstack([np.full((8, 8), 40, np.uint8), np.where(ramp > 0.5, 255, 0).astype(np.uint8)]),
                         "LA")
    got = _encoded_pixels(la, "PNG")
    assert (got[ramp > 0.5] == 40).all() and (got[ramp <= 0.5] == 255).all()  # transparent -> white
    p = Image.fromarray(np.where(ramp > 0.5, 1, 0).astype(np.uint8), "P")
    p.putpalette([200, 10, 10, 0, 0, 0] + [0] * 762)
    p.info["transparency"] = 1
    got = _encoded_pixels(p, "PNG", transparency=1)
    assert (got[ramp <= 0.5] == [200, 10, 10]).all() and (got[ramp > 0.5] == 255).all()
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in ink
    got = _encoded_pixels(cmyk, "JPEG", quality=100)
    assert got[..., 0].min() > 230 and got[..., 1:].max() < 25


def test_a_pixel_mode_with_no_rgb_conversion_is_a_skip_naming_it():
    from PIL import Image

    from data_tools.images import BadImage, to_rgb

    with pytest.raises(BadImage, match="^unsupported pixel mode La "):
        to_rgb(Image.new("La", (4, 4)))  # PIL has no conversion from premultiplied gray + alpha
    assert to_rgb(Image.new("LAB", (4, 4))).mode == "RGB"


def test_a_tiny_image_that_would_resize_huge_is_a_listed_skip_decided_before_decoding(tmp_path):
    import resource

    from PIL import Image

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("L", (100_000, 1)).save(src / "line.png")
    assert (src / "line.png").stat().st_size < 1000
    write_folder(tmp_path / "src", {"a": 2}, size=(24, 32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index = shard(str(tmp_path / "src"), tmp_path / "out",
                  ShardOptions(encode=__import__("data_tools.images").images.EncodeOptions(resize_shorter=64)),
                  progress=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # KiB; 1.2 GB unchecked
    assert index["total_samples"] == 2
    assert [(s["source"], s["reason"]) for s in index["skipped"]] == [
        ("a/line.png", "resized image too large (100000x1 resized to 6400000x64 = 409600000 pixels > 89478485; "
                       "--max-side caps it)")]


# ---- corpus listings: names, labels -------------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_a_listed_skip_with_its_bytes_escaped(tmp_path):
    import os

    src = write_folder(tmp_path / "src", {"a": 3, "b": 3}, size=(24, 32))
    os.rename(src / "a" / "00000.jpg", os.fsencode(src / "a") + b"/bad\xff\xfe.jpg")
    os.mkdir(os.fsencode(src) + b"/c\xff")
    (src / "b" / "00000.jpg").rename(os.fsdecode(os.fsencode(src) + b"/c\xff/x.jpg"))
    index = shard(str(src), tmp_path / "out", ShardOptions(samples_per_shard=4), progress=False)
    assert index["complete"] and index["total_samples"] == 4 and index["classes"] == ["a", "b"]
    assert sorted((s["source"], s["reason"]) for s in index["skipped"]) == [
        ("a/bad\\xff\\xfe.jpg", "file name is not valid UTF-8 (skipped; rename it)"),
        ("c\\xff", "folder name is not valid UTF-8 (skipped; rename it)")]
    assert verify(tmp_path / "out") == ([], [])


def test_manifest_rows_without_a_label_are_refused_when_others_have_one(tmp_path):
    from data_tools.sources import SourceError, read_manifest

    write_folder(tmp_path, {"a": 3}, size=(24, 32))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na/00000.jpg,cat\na/00001.jpg,\na/00002.jpg,dog\n")
    with pytest.raises(SourceError) as e:
        read_manifest(manifest, None, None)
    assert str(e.value) == (f"{manifest}: row 2 has no 'label' but 2 of 3 rows do; label every row (or none, for an "
                            "unlabelled corpus)")
    manifest.write_text("path,label\na/00000.jpg,\na/00001.jpg,\n")  # no labels at all: an unlabelled corpus
    assert [i.label for i in read_manifest(manifest, None, None).inputs] == [None, None]


def test_one_path_listed_with_two_labels_is_refused_and_listed_twice_is_one_sample(tmp_path):
    from data_tools.sources import SourceError, read_manifest

    write_folder(tmp_path, {"a": 2}, size=(24, 32))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na/00000.jpg,cat\na/00001.jpg,dog\na/00000.jpg,dog\n")
    with pytest.raises(SourceError) as e:
        read_manifest(manifest, None, None)
    assert str(e.value) == f"{manifest}: a/00000.jpg is listed with different labels ('cat' in row 1, 'dog' in row 3)"
    manifest.write_text("path,label\na/00000.jpg,cat\na/00001.jpg,dog\na/00000.jpg,cat\n")
    index = shard(str(manifest), tmp_path / "out", progress=False)
    assert index["total_samples"] == 2
    assert [(s["source"], s["reason"]) for s in index["skipped"]] == [("a/00000.jpg", "listed again (row 1 has it)")]


# ---- training: evaluation sets where nothing decodes, resuming another shape, file modes, final/ on a full disk

def _pretrain(run_here, *overrides):
    from .helpers import pretrain_cmd

    return run_here(pretrain_cmd("data.workers=0", "data.batch_size=4", "train.checkpoint_every=1", *overrides))


@pytest.mark.parametrize("key", ["data.val", "data.monitor"])
def test_validation_and_monitor_where_nothing_decodes_stop_in_one_line(small_shards, undecodable, tmp_path, run_here,
                                                                      key):
    res = _pretrain(run_here, f"data.train={small_shards}", f"{key}={undecodable}", "train.max_steps=1",
                    f"train.output_dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: {key}: no sample of {undecodable} decodes; the "
        f"{'validation loss' if key == 'data.val' else 'kNN monitor'} would be NaN (vitpipe verify names the damage)")
    assert not (tmp_path / "run" / "final").exists()


def test_a_knn_monitor_bank_with_other_classes_than_the_queries_is_one_line(small_shards, tmp_path, run_here):
    write_folder(tmp_path / "src", {"a": 3, "c": 3}, size=(24, 32))
    shard(str(tmp_path / "src"), tmp_path / "bank", ShardOptions(samples_per_shard=6), progress=False)
    res = _pretrain(run_here, f"data.train={small_shards}", f"data.monitor={small_shards}",
                    f"data.monitor_bank={tmp_path / 'bank'}", "train.max_steps=1", f"train.output_dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: data.monitor_bank {tmp_path / 'bank'}: its classes are not those of data.monitor "
        f"{small_shards} (lacks b; adds c); both must list the same classes in the same order")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_class_list_difference_in_words():
    from data_tools.index import class_list_difference

    assert class_list_difference(["a", "b"], ["a", "b"]) is None
    assert class_list_difference(["a", "b"], ["b", "a"]) == "the same classes in another order"
    assert class_list_difference(["a", "b"], None) == "its index.json lists no classes"
    assert class_list_difference(list("abcde"), ["a", "z"]) == "lacks b, c, d ...; adds z"


def test_resuming_a_model_of_another_depth_is_one_line_whatever_resume_mismatch_says(small_shards, tmp_path, run_here):
    out = tmp_path / "run"
    first = _pretrain(run_here, f"data.train={small_shards}", "train.max_steps=1", f"train.output_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    res = _pretrain(run_here, f"data.train={small_shards}", "train.max_steps=2", f"train.output_dir={out}",
                    "model.depth=3", "train.resume_mismatch=allow")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line == (f"pretrain: error: train.resume: {out / 'checkpoints' / 'step_00000001'} holds a model of another "
                    "shape than this run's (12 tensors differ, e.g. blocks.2.attn.proj.bias missing vs (64,): "
                    "checkpoint vs run); it cannot be resumed whatever train.resume_mismatch says: "
                    "train.resume=none with another train.output_dir to start over")


def test_a_fresh_start_into_a_folder_holding_checkpoints_is_refused_before_any_step(small_shards, tmp_path, run_here):
    out = tmp_path / "run"
    first = _pretrain(run_here, f"data.train={small_shards}", "train.max_steps=2", f"train.output_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    res = _pretrain(run_here, f"data.train={small_shards}", "train.max_steps=1", f"train.output_dir={out}",
                    "train.resume=none")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: train.resume=none: {out / 'checkpoints'} holds checkpoints up to step 2; choose another "
        "train.output_dir or train.resume=auto")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_resuming_an_older_step_into_a_folder_holding_later_ones_is_refused(small_shards, tmp_path, run_here):
    out = tmp_path / "run"
    args = [f"data.train={small_shards}", f"train.output_dir={out}", "train.keep_last=3"]
    first = _pretrain(run_here, *args, "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    older = out / "checkpoints" / "step_00000001"
    res = _pretrain(run_here, *args, "train.max_steps=2", f"train.resume={older}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: train.resume={older}: it is step 1, but {out / 'checkpoints'} holds checkpoints up to "
        "step 3 from another history; choose another train.output_dir (or move the later checkpoints away)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    elsewhere = _pretrain(run_here, f"data.train={small_shards}", f"train.output_dir={tmp_path / 'branch'}",
                          "train.max_steps=2", f"train.resume={older}")
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    assert (tmp_path / "branch" / "final" / "model.safetensors").is_file()


def test_checkpoint_state_files_follow_the_umask(small_shards, tmp_path, run_here):
    import os

    old = os.umask(0o022)
    try:
        res = _pretrain(run_here, f"data.train={small_shards}", "train.max_steps=1",
                        f"train.output_dir={tmp_path / 'run'}")
    finally:
        os.umask(old)
    assert res.returncode == 0, res.stderr[-2000:]
    files = [p for p in (tmp_path / "run" / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" and p.parent.name == "state" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs), for writes that run out of room; needs the right to mount."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_writing_final_on_a_full_disk_is_one_line_with_the_folder_and_free_space(small_disk):
    from types import SimpleNamespace

    from common.errors import TrainingError
    from pretrain.checkpoints import finish

    model = small_disk / "checkpoints" / "step_00000005" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(bytes(150_000))  # the checkpoint fits, a second copy does not
    (model / "config.json").write_text("{}")
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(TrainingError) as e:
        finish(SimpleNamespace(accelerator=accelerator, out=small_disk, pos=SimpleNamespace(step=5)))
    assert str(e.value).startswith(f"{small_disk / 'final'}: writing the final model failed (No space left on "
                                   f"device; 0.")
    assert str(e.value).endswith(f"GiB free on {small_disk}); the checkpoint it copies is complete: {model}")
    assert not (small_disk / "final").exists()


def test_keeping_best_on_a_full_disk_is_one_line_and_leaves_no_partial_copy(small_disk):
    from types import SimpleNamespace

    from common.errors import TrainingError
    from pretrain.checkpoints import keep_best

    model = small_disk / "checkpoints" / "step_00000005" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(bytes(150_000))  # the checkpoint fits, a second copy does not
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    with pytest.raises(TrainingError) as e:
        keep_best(SimpleNamespace(accelerator=accelerator, out=small_disk, pos=SimpleNamespace(step=5)))
    assert str(e.value).startswith(f"{small_disk / 'best'}: writing the best checkpoint's model failed (No space "
                                   "left on device; 0.")
    assert str(e.value).endswith(f"; the checkpoint it copies is complete: {model}")
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoints"]  # no best/, no half-written tmp


def test_export_on_a_full_disk_is_one_line_with_the_folder_and_free_space(small_disk, tmp_path, capsys):
    ckpt = tmp_path / "wide"
    assert cli(["init", "vit_ti4", str(ckpt), "--img-size", "16", "--embed-dim", "64", "--depth", "2",
                "--num-heads", "2", "--mlp-dim", "256", "--num-classes", "2", "--seed", "0"]) == 0
    assert (ckpt / "model.safetensors").stat().st_size > 300_000
    line = one_line_error(capsys, ["export", str(ckpt), str(small_disk / "out")])
    assert line.startswith(f"vitpipe export: error: {small_disk / 'out'}: cannot write the export (")
    assert line.endswith(f"GiB free on {small_disk / 'out'})")


def test_a_relative_deepspeed_config_is_found_from_any_folder_or_named_in_one_line(tmp_path, monkeypatch):
    from pretrain.launch import CHECKOUT, DEEPSPEED_CONFIG, resolve_deepspeed_config

    monkeypatch.chdir(tmp_path)  # a launch from outside the checkout
    env = {DEEPSPEED_CONFIG: "configs/deepspeed/zero2.json"}
    resolve_deepspeed_config(env)
    assert env[DEEPSPEED_CONFIG] == str(CHECKOUT / "configs" / "deepspeed" / "zero2.json")
    (tmp_path / "mine.json").write_text("{}")
    env = {DEEPSPEED_CONFIG: "mine.json"}  # the user's own, beside them: kept as it is
    resolve_deepspeed_config(env)
    assert env[DEEPSPEED_CONFIG] == "mine.json"
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed_config({DEEPSPEED_CONFIG: "configs/deepspeed/zero9.json"})
    assert str(e.value) == (f"configs/deepspeed/zero9.json: the DeepSpeed config that the accelerate config's "
                            f"deepspeed_config_file names does not exist (a relative path is looked for in {tmp_path} "
                            f"and in {CHECKOUT})")


def test_an_uppercase_url_scheme_is_the_same_store(s3, tmp_path):
    s3.mkdir("upper")
    write_folder(tmp_path / "src", {"a": 2, "b": 2}, size=(24, 32))
    index = shard(str(tmp_path / "src"), "S3://upper/shards", ShardOptions(samples_per_shard=2), progress=False)
    assert index["total_samples"] == 4 and s3.exists("upper/shards/index.json")
    assert verify("S3://upper/shards") == ([], [])
    assert resolve_shards("S3://upper/shards").num_samples == 4


def test_a_shard_replaced_by_another_whole_tar_of_the_same_size_stops_training(small_shards, tmp_path, run_here):
    from data_tools.tars import TarWriter, read_tar

    folder = tmp_path / "shards"
    shutil.copytree(small_shards, folder)
    victim = folder / "shard-000001.tar"
    samples = list(read_tar(victim))
    size = victim.stat().st_size
    with open(victim, "wb") as f:  # the same samples in another order: a sound tar, every image decodes
        writer = TarWriter(f)
        for sample in reversed(samples):
            writer.write(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
        writer.close()
    assert victim.stat().st_size == size
    problems, _ = verify(folder)
    assert problems == ["shard-000001.tar: sha256 differs from index"]
    res = _pretrain(run_here, f"data.train={folder}", "train.max_steps=4", f"train.output_dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"pretrain: error: {victim}: reads as a whole tar but its sha256 is not the one index.json lists: another "
        "file replaced it (vitpipe verify checks every shard); stopping rather than using it")


@pytest.mark.parametrize("override,message", [
    ("train.seed=-1", "train.seed: must be >= 0, got -1"),
    ("train.seed=9223372036854775808", "train.seed: must be < 2**63, got 9223372036854775808"),
])
def test_the_seed_is_range_checked(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["data.train=x", override])
    assert str(e.value) == message


def test_rerunning_shard_into_a_folder_with_a_malformed_index_is_one_line(small_shards, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(small_shards, folder)
    _tamper(folder, lambda i: dict(i, shards=None))
    src = small_shards.parent / "src"
    line = one_line_error(capsys, ["shard", str(src), str(folder), "--samples-per-shard", "4"])
    assert line == f"vitpipe shard: error: {folder / 'index.json'}: field 'shards': expected a list of shards, got null"
    assert cli(["shard", str(src), str(folder), "--samples-per-shard", "4", "--overwrite"]) == 0
    assert verify(folder) == ([], [])
