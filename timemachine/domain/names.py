"""Names and numbers a client may use: ids, collections, route ids, bounded integers."""

from __future__ import annotations

import re

from timemachine.domain.errors import InvalidField

ID_ALPHABET = re.compile(r"\A[A-Za-z0-9._:@-]+\Z")
MAX_JOB_ID = 256
MAX_COLLECTION = 128
MAX_ROUTE_ID = 128
def check_name(field_name: str, value: object, max_length: int) -> str:
    """Return ``value`` if it is a valid id-like name, else raise `InvalidField`."""
    if not isinstance(value, str) or not value:
        raise InvalidField(field_name, "must be a non-empty string")
    if len(value) > max_length:
        raise InvalidField(field_name, f"must be at most {max_length} characters")
    if not ID_ALPHABET.match(value):
        raise InvalidField(field_name, "may contain only A-Z a-z 0-9 . _ : @ -")
    return value


def check_int(field_name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field_name, "must be an integer")
    if not low <= value <= high:
        raise InvalidField(field_name, f"must be between {low} and {high}")
    return value
