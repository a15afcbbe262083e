"""Typed schemas for the Hydra configs.

Hydra composes YAML; these dataclasses validate the result. ``from_mapping`` rejects unknown keys, wrong types
and values outside a ``Literal`` with a ``ValueError`` that names the field and the allowed values, so a typo in
an override never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def _check_value(path: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ValueError(f"{path}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ValueError(f"{path} must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, option, value)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}={value!r}: " + "; ".join(errors))
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list, got {value!r}")
        (item_hint, *_) = get_args(hint) or (Any,)
        return [_check_value(f"{path}[{i}]", item_hint, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path} must be {hint.__name__}, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ValueError(f"{path} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_mapping(cls: type[T], mapping: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, validating every field (see module docstring)."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{path or cls.__name__} must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        where = path or "config"
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _check_value(f"{path}.{name}" if path else name, hints[name], value)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{path or cls.__name__} is missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def from_section(cls: type[T], cfg: Any, key: str) -> T:
    """Build dataclass ``cls`` from the section ``key`` of a composed Hydra config (interpolations resolved)."""
    from omegaconf import OmegaConf

    return from_mapping(cls, OmegaConf.to_container(cfg[key], resolve=True), key)


def require(condition: bool, field: str, message: str) -> None:
    """Range checks in ``__post_init__``: raise a ValueError naming the field."""
    if not condition:
        raise ValueError(f"{field}: {message}")
