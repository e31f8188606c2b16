"""Field types with ranges, and one strict validator for the dataclasses a study config fills.

A study config sets the fields of an analysis's ``Params`` (and of a trigger) from TOML. pydantic's
default (lax) mode turns ``"yes"`` into ``True`` and ``true`` into ``1``, and a plain ``int`` takes
``n = -5``: ``build`` validates each given value in strict mode against the field's annotation, so a
wrong type is refused and the ranges declared with these types hold. TOML has no tuples: a list
given for a ``tuple[...]`` field is read as a tuple.
"""

from __future__ import annotations

import dataclasses
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


def build(cls, given: dict, key: str):
    """``cls(**given)`` after strict, range-checked validation of each given field; errors name ``key.field``."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    hints = typing.get_type_hints(cls, include_extras=True)
    kw = {}
    for name, value in given.items():
        if name not in fields:
            raise ProjLensError(f"unknown key {key}.{name}; allowed: {', '.join(fields)}")
        hint = hints.get(name, typing.Any)
        if isinstance(value, list) and _takes_tuple(hint):
            value = tuple(value)
        try:
            adapter = TypeAdapter(hint)
        except Exception:  # noqa: BLE001 - a type pydantic cannot describe (a plugin's own class): taken as given
            kw[name] = value
            continue
        try:
            kw[name] = adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ProjLensError(f"{key}.{name} = {given[name]!r} is invalid: {err['msg']}") from None
    try:
        return cls(**kw)
    except (ValueError, TypeError) as err:
        raise ProjLensError(f"{key}: {str(err).splitlines()[0]}") from None
