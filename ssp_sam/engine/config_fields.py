"""Typed run-config fields with a range or a set of choices, and their validation: one line naming the key.

The training configs (SSP-SAM's ``train_config.py``, OVSS's ``ovss/engine/train_config.py``) are
dataclasses whose numeric fields carry their range (:func:`number`) and whose named options carry their
choices (:func:`choice`). :func:`merge_config` merges a composed config into such a dataclass through
OmegaConf's structured configs (an unknown key or a value of the wrong type fails there);
:func:`check_fields` then checks ranges and choices. A dataclass built straight from command-line values,
with no structured config between (the pretraining settings), checks their types with
:func:`check_field_types` first. Every failure is one :class:`ConfigError` naming
the key and the value given (``train.batch_size=0: must be an integer >= 1``).
"""

from __future__ import annotations

import math
from dataclasses import field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ..errors import ConfigError

T = TypeVar("T")
MISSING = object()  # what :func:`lookup` returns for a key the raw config does not have


def number(default: Any, minimum: float, optional: bool = False, above: bool = False) -> Any:
    """A numeric field and its range: ``>= minimum`` (``> minimum`` with ``above``); ``optional``: null is allowed."""
    return field(default=default, metadata={"minimum": minimum, "optional": optional, "above": above})


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """A string field that must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices})


def lookup(raw: Mapping, key: str) -> Any:
    """The value at dotted ``key`` (e.g. "train.lr") of the raw config as given, or :data:`MISSING`."""
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def _wanted(spec: Mapping[str, Any], kind: Any) -> str:
    integer = kind in (int, Optional[int])  # else float
    relation = ">" if spec["above"] else ">="
    return f"{'an integer' if integer else 'a number'} {relation} {spec['minimum']:g}" + (" (or null)" if spec["optional"] else "")


def _range_spec(root: type, key: str) -> tuple[Mapping[str, Any], Any] | None:
    """The range metadata and type of the field at dotted ``key`` of dataclass ``root``, if it has a range."""
    section: Any = root
    *path, name = key.split(".")
    for part in path:
        section = {f.name: f for f in fields(section)}.get(part)
        section = section.default_factory if section is not None and callable(section.default_factory) else None
        if section is None:
            return None
    found = {f.name: f for f in fields(section)}.get(name)
    if found is None or "minimum" not in found.metadata:
        return None
    return found.metadata, get_type_hints(section)[name]


def merge_config(root: type[T], sections: Mapping, raw: Mapping, options: str, prefix: str = "") -> T:
    """``sections`` merged into dataclass ``root`` (OmegaConf structured config) and returned as a ``root``.

    ``raw``: the whole config as given (for the value in a message); ``options``: what an unknown key is
    not, e.g. "a training option (configs/train.yaml lists them)"; ``prefix``: where ``root`` sits in ``raw``
    (e.g. "eval." for a section merged alone).

    Raises:
        ConfigError: an unknown key, or a value of the wrong type (for a ranged number: its range).
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(root), sections))
    except OmegaConfBaseException as exc:
        inner = str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "")
        key = prefix + inner
        value = lookup(raw, key)
        given = f"{key}={value}" if value is not MISSING else key
        spec = _range_spec(root, inner)
        if spec is not None:
            raise ConfigError(f"{given}: must be {_wanted(*spec)}") from None
        if isinstance(exc, ConfigKeyError):
            raise ConfigError(f"{key}: not {options}") from None
        raise ConfigError(f"{given}: {str(getattr(exc, 'msg', exc)).splitlines()[0]}") from None


_KIND_WORDS = {bool: "true or false", str: "a string", Path: "a path", int: "an integer", float: "a number"}


def check_field_types(section: Any) -> None:
    """Each field of dataclass ``section`` holds a value of its declared type, in :func:`check_fields`' words.

    For values straight from the command line (``steps=abc`` is the string "abc"), where no structured
    config typed them: without this a range comparison raises a TypeError, and a string such as "false"
    is truthy. A bool is not a number here, nor an int a bool.

    Raises:
        ConfigError: one line naming the first field of the wrong type and its value (``lr=abc: must be a number >= 0``).
    """
    types = get_type_hints(type(section))
    for item in fields(section):
        value, kind = getattr(section, item.name), types[item.name]
        optional = get_origin(kind) is Union and type(None) in get_args(kind)
        if optional:
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
            if value is None:
                continue
        if kind in (int, float):
            right_type = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        else:
            right_type = isinstance(value, kind)
        if not right_type:
            spec = {**item.metadata, "optional": optional}
            wanted = _wanted(spec, kind) if "minimum" in spec else _KIND_WORDS.get(kind, f"a {getattr(kind, '__name__', kind)}")
            raise ConfigError(f"{item.name}={value}: must be {wanted}")


def check_fields(prefix: str, section: Any, raw: Mapping) -> None:
    """Choices and ranges of the fields of one section (``prefix`` names it, e.g. "train.").

    Raises:
        ConfigError: naming the first field out of its range or not one of its choices.
    """
    types = get_type_hints(type(section))
    for item in fields(section):
        value = getattr(section, item.name)
        key = prefix + item.name
        if "choices" in item.metadata and value not in item.metadata["choices"]:
            raise ConfigError(f"{key}: unknown value {value!r}; expected one of {', '.join(item.metadata['choices'])}")
        if "minimum" not in item.metadata or (value is None and item.metadata["optional"]):
            continue
        minimum = item.metadata["minimum"]
        in_range = value is not None and math.isfinite(value) and (value > minimum if item.metadata["above"] else value >= minimum)
        if not in_range:
            raise ConfigError(f"{key}={lookup(raw, key)}: must be {_wanted(item.metadata, types[item.name])}")
