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
