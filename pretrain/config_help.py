"""A stage's command line, and its help: the config keys, their types and defaults, read from the typed config.

``--help`` of ``vitpipe pretrain`` / ``finetune`` (and ``python -m pretrain`` / ``-m finetune``) ends
with this list, so it never goes stale: a new key, objective or default shows up by itself. The
words after a key's type are the field's ``help`` (``pretrain.fields.field``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Literal

from common.args import Once
from pretrain.config import Config
from pretrain.fields import help_text
from pretrain.objective_options import OBJECTIVE_OPTIONS


def type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is list:
        return f"list of {type_name(args[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _value(v) -> str:
    return v if isinstance(v, str) and v else json.dumps(v)


def _lines(obj, prefix: str, indent: str, skip: tuple[str, ...] = ()) -> list[str]:
    hints = typing.get_type_hints(type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        if f.name in skip or dataclasses.is_dataclass(getattr(obj, f.name)):
            continue
        what = type_name(hints[f.name]) + (f": {help_text(f)}" if help_text(f) else "")
        rows.append((f"{indent}{prefix}{f.name} = {_value(getattr(obj, f.name))}", what))
    width = max((len(key) for key, _ in rows), default=0) + 2
    return [f"{key.ljust(width)}{what}" for key, what in rows]


def config_help(defaults: Config, skip: tuple[str, ...] = ()) -> str:
    """Every section and key with its type and its default in ``defaults`` (a stage's starting config); top-level
    keys in ``skip`` (another stage's) left out."""
    out = ["config keys (YAML sections, or key=value on the command line), with this stage's defaults:"]
    out += ["", *_lines(defaults, "", "  ", skip)]
    for f in dataclasses.fields(defaults):
        section = getattr(defaults, f.name)
        if not dataclasses.is_dataclass(section) or f.name == "objective":
            continue
        out += ["", f"{f.name}:", *_lines(section, f"{f.name}.", "  ")]
    out += ["", f"objective: objective.name = {defaults.objective.name} picks one of {', '.join(OBJECTIVE_OPTIONS)}; "
                "each has its own keys"]
    for name, options_class in OBJECTIVE_OPTIONS.items():
        options = defaults.objective if defaults.objective.name == name else options_class()
        out += [f"  {name}:", *(_lines(options, "objective.", "    ", skip=("name",)) or ["    (no other keys)"])]
    return "\n".join(out)


KEY_VALUE_HINT = "config keys are given as key=value, e.g. train.max_steps=20 (the keys are listed by --help)"


class StageArgumentParser(argparse.ArgumentParser):
    """argparse, with a hint on usage errors (``--max_steps 20`` is a config key written as an option), and
    ``key=value`` accepted after options too (``--print-config train.seed=1``)."""

    def error(self, message: str):
        if "unrecognized arguments" in message:
            message += f"\n{KEY_VALUE_HINT}"
        super().error(message)

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if any(a.startswith("-") for a in extra):
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        parsed.overrides += extra
        return parsed


def add_stage_arguments(p: argparse.ArgumentParser, prog: str) -> None:
    """``--config``, ``--print-config`` and the ``key=value`` overrides of ``vitpipe pretrain`` / ``finetune``."""
    p.add_argument("--config", action=Once, help=f"YAML recipe, e.g. configs/{prog.split()[-1]}/tiny.yaml, or a run folder's "
                                    "config.json (repeats that run)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, file and overrides merged) as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config keys listed below, e.g. train.max_steps=100 data.batch_size=64")


def stage_parser(prog: str, doc: str, defaults: Config, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A stage's command line; its help shows ``doc`` (with examples) and every config key with its default
    (top-level keys in ``skip`` left out)."""
    p = StageArgumentParser(prog=prog, description=doc, epilog=config_help(defaults, skip),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_arguments(p, prog)
    return p


def config_text(cfg: Config, stage: str) -> str:
    """The resolved config as YAML that ``--config`` accepts as it is (``stage`` first)."""
    import yaml

    return yaml.safe_dump({"stage": stage, **cfg.to_dict()}, sort_keys=False)
