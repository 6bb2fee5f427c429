"""Command-line pieces every entry point shares: range-checked numbers and options that may be given once.

argparse turns a ``type`` that raises ``ArgumentTypeError`` into one line (``argument --quality: ...``) and
exit 2, the same as the other user errors.
"""

from __future__ import annotations

import argparse
import math


def int_in(low: int | None = None, high: int | None = None):
    """An argparse ``type``: an integer in [low, high] (either bound may be open)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if low is not None and value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {_range(low, high)}, got {value}")
        return value
    parse.__name__ = "integer"  # what argparse names in its own messages
    return parse


def float_in(low: float | None = None, high: float | None = None):
    """An argparse ``type``: a finite number in [low, high] (nan and inf are refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or low is not None and value < low or high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be a finite number {_range(low, high)}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def _range(low, high) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"in [{low}, {high}]"


class Once(argparse.Action):
    """An option that may be given once: a second ``--config`` is an error, not a silent last-wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}); "
                         "give it once")
        setattr(namespace, self.dest, values)


def differing_keys(recorded: dict, now: dict) -> list[str]:
    """The keys whose values differ between a run's recorded arguments and the ones given now (missing counts as
    different), sorted: what a resumed shard run or a resumed training run compares before it continues."""
    return sorted(key for key in recorded.keys() | now.keys() if recorded.get(key) != now.get(key))
