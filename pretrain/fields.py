"""A config field declared in one place, its default, help text and allowed values; and a value checked against it.

``field(0.5, help="...", range="[0, 1)")`` is a ``dataclasses.field`` whose metadata carries the help
(``--help`` prints it after the key's type) and the range (``out_of_range`` names the key of a value
outside it). Choices need no range: they are the field's ``Literal`` type. A check that spans fields
(``warmup_steps`` or ``warmup_epochs``) stays in the config's ``validate``.

The type check (``checked``) is our own, not OmegaConf's or pydantic's: both convert silently where we
refuse (``data.augment=1`` becomes true, ``train.seed="7"`` 7), OmegaConf resolves ``${...}`` inside any
string (a ``pipe:`` shard command's shell variables), and their multi-line messages would have to be
translated back into ``key: expected TYPE, got VALUE``, which needs the same walk over the types.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

from common.errors import VitpipeError


class ConfigError(VitpipeError, ValueError):
    """A config problem; the message names the key."""


_INTERVAL = re.compile(r"([\[(])(-?[\d.]+|-?inf), (-?[\d.]+|-?inf)([\])])")


@dataclasses.dataclass(frozen=True)
class Range:
    """``>= LOW``, or an interval: ``[0, 1)`` (a bracket includes its end, a parenthesis does not;
    ``inf`` for no bound). The text is what an error says: ``must be >= 1``, ``must be in [0, 1)``."""

    text: str

    def __post_init__(self):
        self._bounds()  # a malformed range fails where the field is declared, not at the first check

    def _bounds(self) -> tuple[float, bool, float, bool]:
        """(low, low included, high, high included)."""
        if self.text.startswith(">= "):
            return float(self.text[3:]), True, math.inf, False
        found = _INTERVAL.fullmatch(self.text)
        if not found:
            raise ValueError(f"range {self.text!r}: expected '>= N' or an interval such as '[0, 1)'")
        opening, low, high, closing = found.groups()
        return float(low), opening == "[", float(high), closing == "]"

    def __contains__(self, value: float) -> bool:
        low, with_low, high, with_high = self._bounds()
        return (low <= value if with_low else low < value) and (value <= high if with_high else value < high)

    def refusal(self, key: str, value) -> str:
        return f"{key}: must be {'' if self.text.startswith('>=') else 'in '}{self.text}, got {value}"


def field(default: Any = dataclasses.MISSING, *, help: str = "", range: str | None = None,
          default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text and, for a number, the range it must lie in (None passes)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "range": Range(range) if range else None})


def help_text(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def out_of_range(obj, prefix: str) -> Iterator[str]:
    """One line per field of the dataclass ``obj`` (and of the dataclasses inside it, keys under ``prefix``)
    whose value lies outside its range, in field order."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from out_of_range(value, key + ".")
        elif (allowed := f.metadata.get("range")) and value is not None and value not in allowed:
            yield allowed.refusal(key, value)


def checked(value, hint, key: str):
    """Return ``value`` converted to ``hint`` (int -> float only) or raise naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return checked(value, option, key)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(hint))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off (yes/on) as a bool: mixed_precision=no
            value = next((w for w in (("no", "off", "false") if not value else ("yes", "on", "true"))
                          if w in typing.get_args(hint)), value)
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, typing.get_args(hint)))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [checked(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")  # nan passes every < and > check
    if hint is bool and not isinstance(value, bool) or not isinstance(value, hint) or \
            hint is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
