"""Sharding engines, the choices of ``vitpipe shard --engine``: where the work of a shard job runs.

Each engine is one function ``(src, out, opts, workers=, overwrite=, progress=, **options)`` that returns
the index; its own ``options`` are the only extra keywords it takes. Its module is imported when the
engine runs, so listing the engines (as the CLI's parser does) imports nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from common.errors import VitpipeError


class EngineError(VitpipeError, ValueError):
    """An unknown engine, or an option the chosen engine does not take."""


@dataclass(frozen=True)
class Engine:
    summary: str
    function: str  # "module:name"
    options: tuple[str, ...] = ()

    def run(self, *args, **kwargs) -> dict:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


ENGINES = {
    "local": Engine("this machine (--workers encoding processes), or part K of N with --part K/N",
                    "data_tools.shard:shard"),
    "ray": Engine("a Ray cluster: the job split into --parts N, each part a Ray task",
                  "data_tools.shard_ray:shard_on_ray", ("ray_address", "parts")),
}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise EngineError(f"--engine: unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    return ENGINES[name]


def run_engine(name: str, src: str, out, opts, *, workers: int | None = None, overwrite: bool = False,
               progress: bool = True, **options) -> dict:
    """Shard ``src`` into ``out`` with the named engine; ``workers`` and ``options`` left as None are not given."""
    engine = get_engine(name)
    given = {k: v for k, v in options.items() if v is not None}
    for option in given:
        if option not in engine.options:
            owners = [n for n, e in ENGINES.items() if option in e.options]
            raise EngineError(f"--{option.replace('_', '-')} is an option of --engine {' / '.join(owners) or '(none)'}, "
                              f"not of --engine {name}")
    if workers is not None:
        given["workers"] = workers
    return engine.run(src, out, opts, overwrite=overwrite, progress=progress, **given)
