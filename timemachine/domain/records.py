"""Domain values rebuilt from durable records, without their constructors' checks.

A command's constructor validates what a client sends. A record in a log or a store
was validated when it was written, under the rules of that day; rules tighten (a
stricter URL check, a smaller size limit), and a log written before must still replay
and a store still load. So decoding goes through `from_record`, and validation stays
at the boundary (STYLE.md, "Klein").
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


@cache
def _fields(cls) -> tuple[tuple[str, Any], ...]:
    """(name, default maker) of each field of dataclass ``cls``, in order."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default

            def make(default=default):
                return default
        elif f.default_factory is not dataclasses.MISSING:
            make = f.default_factory
        else:
            make = None
        out.append((f.name, make))
    return tuple(out)


def from_record(cls: type[T], *args, **kwargs) -> T:
    """``cls(*args, **kwargs)`` for a frozen dataclass, without running ``__post_init__``.

    Arguments are taken as the constructor takes them; a field left out gets its
    default, and one without a default is a `TypeError`, as in the constructor.
    """
    fields = _fields(cls)
    if not kwargs and len(args) == len(fields):
        # Every field, in order: how the log's commands decode, 500 jobs to an entry.
        value = object.__new__(cls)
        for (name, _), field_value in zip(fields, args, strict=True):
            object.__setattr__(value, name, field_value)
        return value
    if len(args) > len(fields):
        raise TypeError(f"{cls.__name__} takes {len(fields)} fields, not {len(args)}")
    given = dict(zip((name for name, _ in fields[: len(args)]), args, strict=True))
    for name in kwargs:
        if name in given:
            raise TypeError(f"{cls.__name__} got {name!r} twice")
    given.update(kwargs)
    value = object.__new__(cls)
    for name, make in fields:
        if name in given:
            field_value = given.pop(name)
        elif make is not None:
            field_value = make()
        else:
            raise TypeError(f"a {cls.__name__} record lacks {name!r}")
        # Frozen: the dataclass's own __init__ sets its fields this way too.
        object.__setattr__(value, name, field_value)
    if given:
        raise TypeError(f"{cls.__name__} has no field {', '.join(map(repr, given))}")
    return value
