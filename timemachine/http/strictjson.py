"""Reading a request body as strict JSON, keeping chosen members as the client's text.

A job's ``meta`` is delivered as the client wrote it (API.md): numbers such as ``1.0e2``
or ``0.10``, escapes and key order must survive. Decoding it to Python values and
encoding it again rewrites all three, so the reader finds the span of such a member's
value in the body and keeps that text (`JSONText`), while the value is still decoded,
which checks it against the same rules as the rest of the body.

The rules, for the whole body: UTF-8, one JSON value, no ``NaN``/``Infinity``
literals, no number too large for a float (``1e400`` would become ``Infinity``), no
integer literal too long to convert, and no unpaired UTF-16 surrogate escape (text
that cannot be stored or delivered as UTF-8). Every violation is `BadJSON`.

Pure: bytes in, values out; no request, no I/O.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from json.decoder import scanstring
from typing import Any

from timemachine.domain.errors import BadJSON

# JSON's insignificant whitespace (RFC 8259 section 2), exactly: not str.isspace().
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# The start of an object's first member and of each next one, up to its value, when
# the name holds no escape or control character.
_FIRST_MEMBER = re.compile(r'\{[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_NEXT_MEMBER = re.compile(r'[ \t\n\r]*,[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_OBJECT_END = re.compile(r"[ \t\n\r]*\}")
# Only a body with a \uD800-\uDFFF escape can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class JSONText:
    """A JSON value as the client's text (already checked to be valid JSON)."""

    text: str


def _refuse_constant(name: str):
    raise BadJSON(f"{name} is not valid JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise BadJSON(f"the number {literal[:40]} is too large (it is not finite)")
    return value


def _integer(literal: str) -> int:
    try:
        return int(literal)
    except ValueError:
        # Past the interpreter's limit on digits converted (CVE-2020-10735).
        raise BadJSON(f"an integer literal of {len(literal)} digits is too long") from None


_DECODER = json.JSONDecoder(
    parse_float=_finite_float, parse_int=_integer, parse_constant=_refuse_constant
)


def decode_json(data: bytes, raw_members: frozenset[str] = frozenset()) -> Any:
    """The JSON value of ``data``; raises `BadJSON`.

    A member named in ``raw_members`` of the top-level object, or of an object
    directly inside a top-level array (a batch), is a `JSONText` of its value.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadJSON(f"request body is not UTF-8: {e}") from None
    if not text.strip(" \t\n\r"):
        raise BadJSON("request body is empty: a JSON value is expected")
    try:
        value, end = _document(text, _skip(text, 0), raw_members)
        end = _skip(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        if _SURROGATE_ESCAPE.search(text):
            # The members kept as text were decoded but not kept: check the whole body.
            json.dumps(_DECODER.decode(text), ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        raise BadJSON(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadJSON("request body is nested too deeply") from None
    except UnicodeEncodeError:
        raise BadJSON("request body holds an unpaired UTF-16 surrogate escape") from None
    return value


def _skip(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _document(text: str, pos: int, raw_members: frozenset[str]) -> tuple[Any, int]:
    if raw_members and text.startswith("{", pos):
        return _object(text, pos, raw_members)
    if raw_members and text.startswith("[", pos):
        return _array(text, pos, raw_members)
    return _value(text, pos)


def _value(text: str, pos: int) -> tuple[Any, int]:
    return _DECODER.raw_decode(text, pos)


def _array(text: str, pos: int, raw_members: frozenset[str]) -> tuple[list, int]:
    """The array at ``pos`` (its ``[``); its objects keep ``raw_members`` as text."""
    items: list = []
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        if text.startswith("{", pos):
            item, pos = _object(text, pos, raw_members)
        else:
            item, pos = _value(text, pos)
        items.append(item)
        pos, ended = _after_item(text, pos, "]")
        if ended:
            return items, pos


def _object(text: str, pos: int, raw_members: frozenset[str]) -> tuple[dict, int]:
    """The object at ``pos`` (its ``{``), with ``raw_members`` as `JSONText`.

    As `json.loads`, a repeated name keeps its last value. Member names without
    escapes, and the separators around them, are matched in one step each: a batch
    of 10,000 jobs is read in a few times what `json.loads` takes, not tens of
    times. Anything else (an escaped name, an empty object, an error) is read by
    `_object_carefully`.
    """
    members: dict = {}
    scan = _DECODER.scan_once
    member = _FIRST_MEMBER.match(text, pos)
    while member is not None:
        name = member.group(1)
        start = member.end()
        try:
            value, end = scan(text, start)
        except StopIteration:
            break
        members[name] = JSONText(text[start:end]) if name in raw_members else value
        closed = _OBJECT_END.match(text, end)
        if closed is not None:
            return members, closed.end()
        member = _NEXT_MEMBER.match(text, end)
    return _object_carefully(text, pos, raw_members)


def _object_carefully(text: str, pos: int, raw_members: frozenset[str]) -> tuple[dict, int]:
    """`_object`, one token at a time, with the decoder's error for what is wrong."""
    members: dict = {}
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        return members, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, pos
            )
        name, pos = scanstring(text, pos + 1, True)
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        start = _skip(text, pos + 1)
        value, pos = _value(text, start)
        members[name] = JSONText(text[start:pos]) if name in raw_members else value
        pos, ended = _after_item(text, pos, "}")
        if ended:
            return members, pos


def _after_item(text: str, pos: int, close: str) -> tuple[int, bool]:
    """Past the ``,`` after an item (False), or past ``close`` (True: the last one)."""
    pos = _skip(text, pos)
    if text.startswith(",", pos):
        return _skip(text, pos + 1), False
    if text.startswith(close, pos):
        return pos + 1, True
    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
