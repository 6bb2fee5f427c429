"""The command line teaches: a version, verbs in pipeline order, an example and a default for every option,
and the stages' config keys read from the typed config."""

import argparse
import dataclasses
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from pretrain.config import Config
from pretrain.objective_options import OBJECTIVE_OPTIONS
from vitpipe.cli import build_parser, main

from .helpers import ROOT

PIPELINE = ["shard", "verify", "inspect", "pretrain", "finetune", "init", "eval", "plot", "export", "push", "demo"]


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _exit_output(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    assert _exit_output(["--version"], capsys) == f"vitpipe {importlib.metadata.version('vitpipe')}\n"


def test_top_level_help_lists_the_verbs_in_pipeline_order_in_plain_words(capsys):
    text = _exit_output(["--help"], capsys)
    assert list(_verbs(build_parser())) == PIPELINE
    listed = [line.split()[0] for line in text.splitlines() if re.match(r" {4}\w", line)]
    assert listed == PIPELINE
    assert "``" not in text and "lazily" not in text and "--version" in text


@pytest.mark.parametrize("verb", [v for v in PIPELINE if v not in ("pretrain", "finetune")])
def test_verb_help_shows_an_example_and_every_default(verb):
    parser = _verbs(build_parser())[verb]
    text = parser.format_help()
    assert f"examples:\n  vitpipe {verb}" in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # positionals, flags (--overwrite), required options have no default to show
        assert "default" in formatter._get_help_string(action), f"vitpipe {verb} {action.option_strings[0]}"


def test_verify_and_inspect_call_their_input_shards():
    verbs = _verbs(build_parser())
    for verb in ("verify", "inspect"):
        assert verbs[verb].format_usage().rstrip().endswith(" shards"), verbs[verb].format_usage()


def _config_keys(defaults: Config) -> list[str]:
    keys = []
    for f in dataclasses.fields(defaults):
        section = getattr(defaults, f.name)
        if f.name != "objective" and dataclasses.is_dataclass(section):
            keys += [f"{f.name}.{g.name} = " for g in dataclasses.fields(section)]
    for _, options in OBJECTIVE_OPTIONS.items():
        keys += [f"objective.{g.name} = " for g in dataclasses.fields(options) if g.name != "name"]
    return keys


def test_stage_help_lists_every_config_key_with_its_default(capsys):
    pretrain = _exit_output(["pretrain", "--help"], capsys)
    assert pretrain.startswith("usage: vitpipe pretrain") and "examples:\n  vitpipe pretrain --config" in pretrain
    for key in _config_keys(Config()):
        assert key in pretrain, key
    assert "objective.mask_ratio = 0.75" in pretrain and "optim.layer_decay = null" in pretrain
    assert "optim.name = adamw" in pretrain and "train.output_dir = runs/pretrain" in pretrain
    finetune = _exit_output(["finetune", "--help"], capsys)
    assert "optim.name = sgd" in finetune and "train.output_dir = runs/finetune" in finetune
    assert "init=runs/tiny-pretrain/final" in finetune
    module = subprocess.run([sys.executable, "-m", "pretrain", "--help"], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, COLUMNS="80"))
    assert module.returncode == 0 and "objective.mask_ratio = 0.75" in module.stdout
    assert module.stdout.split("config keys")[1] == pretrain.split("config keys")[1]
