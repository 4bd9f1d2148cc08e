"""Typed config fields: what a recipe file may set, and the domain the tuner may search.

Every stage and pass is configured by a frozen dataclass. A field that the tuner
may vary is declared with `tunable`, which records its domain (the discrete
values a search tries) in the field's metadata; every other field is fixed by
the user or by the backend. `from_mapping` builds a config from plain data (a
TOML or JSON table), checking each key and type against the annotations, and
`to_mapping` writes one back, so ``from_mapping(cls, to_mapping(c)) == c``.

TOML has no null, so a field typed ``X | None`` is written as the string
``"none"`` when it is None, and both ``"none"`` and JSON's ``null`` read back as None.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

from compressor.errors import ConfigError, UsageError

NONE = "none"  # how None is spelt in a recipe file (TOML has no null)


def tunable(default: Any, domain: tuple[Any, ...]) -> Any:
    """A dataclass field with ``default`` whose values the tuner searches over ``domain``."""
    if default not in domain:
        raise ValueError(f"default {default!r} is not in its domain {domain!r}")
    return dataclasses.field(default=default, metadata={"domain": tuple(domain)})


def search_space(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name -> domain, for every tunable field of the config class ``cls``, in declaration order."""
    return {f.name: f.metadata["domain"] for f in dataclasses.fields(cls) if "domain" in f.metadata}


def from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """An instance of the config dataclass ``cls`` from ``data``; missing keys take the defaults.

    ``where`` names the table in errors (``stages[0]``). Raises `ConfigError` naming the key for an
    unknown key, a wrong type, or a value the config itself rejects.
    """
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(hints)}")
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_mapping(config: Any) -> dict[str, Any]:
    """Every field of the config dataclass instance as plain data (lists, no sets), None as ``"none"``."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init}


def _plain(value: Any) -> Any:
    if value is None:
        return NONE
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` names, or a `ConfigError` naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None or (value == NONE and str not in options):
            return None
        if len(options) == 1:
            return _coerce(value, options[0], where)
        raise TypeError(f"{where}: unsupported annotation {hint}")
    if origin in (frozenset, tuple):
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise ConfigError(f"{where}: expected a list of {_name(args[0])}, got {value!r}")
        ordered = sorted(value) if isinstance(value, (set, frozenset)) else value
        items = [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(ordered)]
        return frozenset(items) if origin is frozenset else tuple(items)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"{where}: unsupported annotation {hint}")
    if not ok:
        raise ConfigError(f"{where}: expected {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
