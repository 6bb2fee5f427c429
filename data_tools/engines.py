"""Sharding engines, the choices of ``vitpipe shard --engine``: where the work of a shard job runs.

Each engine is one function ``(src, out, opts, workers=, overwrite=, progress=, **options)`` that returns
the index, registered below with its summary and its own command-line options (``vitpipe shard`` adds them from
here); those options are the only extra keywords it takes. Its module is imported when the engine runs, so
listing the engines (as the CLI's parser does) imports nothing. Adding an engine = one module + one
``ENGINES.add`` line.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field

from common.args import int_in
from common.errors import VitpipeError
from common.registry import Registry


class EngineError(VitpipeError, ValueError):
    """An unknown engine, or an option the chosen engine does not take."""


@dataclass(frozen=True)
class Option:
    """One of an engine's own ``vitpipe shard`` options: its flag and argparse's keywords (``help`` without the
    engine's name, which the parser puts in front)."""

    flag: str
    argparse: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class Engine:
    summary: str
    function: str  # "module:name"
    options: tuple[Option, ...] = ()

    def run(self, *args, **kwargs) -> dict:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    def takes(self, option: str) -> bool:
        return any(o.dest == option for o in self.options)


ENGINES: Registry[Engine] = Registry("engine", EngineError)
ENGINES.add("local", Engine("this machine (--workers encoding processes), or part K of N with --part K/N",
                            "data_tools.shard:shard"))
ENGINES.add("ray", Engine(
    "a Ray cluster: the job split into --parts N, each part a Ray task", "data_tools.shard_ray:shard_on_ray", (
        Option("--ray-address", dict(metavar="ADDRESS", help="the cluster, HOST:PORT of its head or auto (default: "
                                     "RAY_ADDRESS, else a cluster started on this machine, else a new local one); "
                                     "SRC and OUT must be reachable from every node at the same paths")),
        Option("--parts", dict(type=int_in(1), metavar="N", help="parts the job is split into, each what --part K/N "
                               "writes; the shards are the same for any N (default: --workers, else the cluster's "
                               "CPUs)")),
    )))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and every engine's own options, each option's help starting with its engine's name."""
    parser.add_argument("--engine", choices=ENGINES.names(), default="local",
                        help="where the work runs: " + "; ".join(f"{k}: {e.summary}" for k, e in ENGINES.items()))
    for name, engine in ENGINES.items():
        for option in engine.options:
            parser.add_argument(option.flag, **{**option.argparse, "help": f"{name}: {option.argparse['help']}"})


def engine_options(args: argparse.Namespace) -> dict:
    """Every engine's own options as parsed (None where not given), by keyword."""
    return {o.dest: getattr(args, o.dest) for _, engine in ENGINES.items() for o in engine.options}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise EngineError(f"--engine: unknown engine {name!r}; known engines: {', '.join(ENGINES.names())}")
    return ENGINES.get(name)


def run_engine(name: str, src: str, out, opts, *, workers: int | None = None, overwrite: bool = False,
               progress: bool = True, **options) -> dict:
    """Shard ``src`` into ``out`` with the named engine; ``workers`` and ``options`` left as None are not given."""
    engine = get_engine(name)
    given = {k: v for k, v in options.items() if v is not None}
    for option in given:
        if not engine.takes(option):
            owners = [n for n, e in ENGINES.items() if e.takes(option)]
            raise EngineError(f"--{option.replace('_', '-')} is an option of --engine {' / '.join(owners) or '(none)'}, "
                              f"not of --engine {name}")
    if workers is not None:
        given["workers"] = workers
    return engine.run(src, out, opts, overwrite=overwrite, progress=progress, **given)
