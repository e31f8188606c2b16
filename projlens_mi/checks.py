"""Field types with ranges, and one strict validator for the dataclasses a study config fills.

A study config sets the fields of an analysis's ``Params`` (and of a trigger) from TOML. pydantic's
default (lax) mode turns ``"yes"`` into ``True`` and ``true`` into ``1``, and a plain ``int`` takes
``n = -5``: ``build`` validates each given value in strict mode against the field's annotation, so a
wrong type is refused and the ranges declared with these types hold. TOML has no tuples: a list
given for a ``tuple[...]`` field is read as a tuple.

A dataclass that derives from ``Checked`` checks its ranges however it is built, also from Python
(``NormParams(n=-5)`` is an error there too); from Python the types are lax (``numpy`` integers,
``True`` for 1 are accepted), only the config is strict.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from .errors import ProjLensError

Count = Annotated[int, Field(gt=0)]              # how many (inputs, resamples, tokens, units, pixels)
Seed = Annotated[int, Field(ge=0)]               # numpy seeds are non-negative
Fraction = Annotated[float, Field(gt=0, lt=1)]   # an open fraction (a confidence level, a test share)
NonNegative = Annotated[float, Field(ge=0)]      # a scale or a threshold


def _takes_tuple(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _takes_tuple(typing.get_args(hint)[0])
    return origin is tuple or (origin in (typing.Union, types.UnionType) and any(map(_takes_tuple, typing.get_args(hint))))


@functools.cache
def _adapters(cls) -> dict:
    """Field name -> TypeAdapter of its annotation (None where pydantic cannot describe the type)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        try:
            out[f.name] = TypeAdapter(hints.get(f.name, typing.Any)), hints.get(f.name, typing.Any)
        except Exception:  # noqa: BLE001 - a type pydantic cannot describe (a plugin's own class)
            out[f.name] = None
    return out


class Checked:
    """Base of a parameter dataclass: its annotated types and ranges are checked when it is built."""

    def __post_init__(self):
        for name, entry in _adapters(type(self)).items():
            if entry is None:
                continue
            value = getattr(self, name)
            try:
                _validate(entry, value, strict=False)
            except ValidationError as exc:
                raise ProjLensError(f"{type(self).__name__}({name}={value!r}) is invalid: {exc.errors()[0]['msg']}") from None


def _validate(entry: tuple, value, *, strict: bool):
    """``value`` validated against one field's (adapter, annotation); a list given for a tuple is read as one."""
    adapter, hint = entry
    return adapter.validate_python(tuple(value) if isinstance(value, list) and _takes_tuple(hint) else value,
                                   strict=strict)


def build(cls, given: dict, key: str):
    """``cls(**given)`` after strict, range-checked validation of each given field; errors name ``key.field``."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    adapters = _adapters(cls)
    kw = {}
    for name, value in given.items():
        if name not in fields:
            raise ProjLensError(f"unknown key {key}.{name}; allowed: {', '.join(fields)}")
        if adapters[name] is None:   # a type pydantic cannot describe (a plugin's own class): taken as given
            kw[name] = value
            continue
        try:
            kw[name] = _validate(adapters[name], value, strict=True)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ProjLensError(f"{key}.{name} = {given[name]!r} is invalid: {err['msg']}") from None
    try:
        return cls(**kw)
    except (ValueError, TypeError) as err:
        raise ProjLensError(f"{key}: {str(err).splitlines()[0]}") from None
