"""A config file's values with the command line's ``key=value`` overrides on top, as one mapping of sections.

The overrides win key by key, with three rules a plain merge would get wrong: a key given twice on one
command line is refused; an override that switches ``objective.name`` drops the file's objective section
(its keys belong to the other objective); a length given in steps (epochs) replaces the file's in epochs
(steps), and a length in epochs alone turns the default in steps off.
"""

from __future__ import annotations

from pretrain.fields import ConfigError


def overrides_tree(parsed: list[tuple[str, list[str], object]]) -> dict:
    """``(text, keys, value)`` of each override as nested sections: ``train.seed=1`` -> ``{"train": {"seed": 1}}``."""
    given: dict = {}
    seen: dict[str, str] = {}
    for text, keys, value in parsed:
        _refuse_repeats(seen, keys, text)
        _merge(given, keys, value)
    return given


def with_overrides(values: dict, given: dict, objective: str) -> dict:
    """The file's ``values`` (changed in place) with ``given`` on top; ``objective``: the name in force before
    either (the stage's default)."""
    switched = _section(given, "objective").get("name")
    if switched is not None and switched != _section(values, "objective").get("name", objective):
        values.pop("objective", None)
    _later_length_wins(values, given)
    _merge_all(values, given)
    _length_in_epochs_only(values)
    return values


# a length given in steps or in epochs: (section, key in steps, key in epochs)
LENGTHS = (("train", "max_steps", "epochs"), ("schedule", "warmup_steps", "warmup_epochs"))


def _later_length_wins(values: dict, given: dict) -> None:
    """An override's length in steps (epochs) replaces the file's in epochs (steps)."""
    for section, *keys in LENGTHS:
        asked = _section(given, section)
        for key, other in (keys, keys[::-1]):
            if asked.get(key) is not None and other not in asked:
                _section(values, section).pop(other, None)


def _length_in_epochs_only(values: dict) -> None:
    """A length given in epochs alone turns the default length in steps off."""
    for section, steps, epochs in LENGTHS:
        given = _section(values, section)
        if given.get(epochs) is not None and steps not in given:
            given[steps] = None if steps == "max_steps" else 0


def _refuse_repeats(seen: dict[str, str], keys: list[str], text: str) -> None:
    """A key given twice on one command line (or a key and its section) is a mistake, not a last-wins."""
    key = ".".join(keys)
    for other, earlier in seen.items():
        if other == key or other.startswith(key + ".") or key.startswith(other + "."):
            raise ConfigError(f"{key}: given twice on the command line ({earlier} and {text}); give it once")
    seen[key] = text


def _section(values: dict, key: str) -> dict:
    return values[key] if isinstance(values.get(key), dict) else {}


def _merge_all(values: dict, given: dict) -> None:
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            _merge_all(values[key], value)
        else:
            values[key] = value


def _merge(values: dict, keys: list[str], value) -> None:
    """Set ``values[k1][k2]... = value``, keeping sibling keys a YAML file set."""
    for k in keys[:-1]:
        if not isinstance(values.get(k), dict):
            values[k] = {}
        values = values[k]
    values[keys[-1]] = value
