"""Names and numbers a client may use: ids, collections, route ids, bounded integers."""

from __future__ import annotations

import re

from timemachine.domain.errors import InvalidField

ID_ALPHABET = re.compile(r"\A[A-Za-z0-9._:@-]+\Z")
MAX_JOB_ID = 256
MAX_COLLECTION = 128
MAX_ROUTE_ID = 128
MAX_NODE_ID = 128
# A host name (RFC 1123 labels) or a dotted IPv4 address.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST = re.compile(rf"\A{_LABEL}(?:\.{_LABEL})*\Z")


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


def check_address(field_name: str, value: object) -> str:
    """Return ``value`` if it is ``host:port`` (a host name or IPv4 address and a port
    1-65535), else raise `InvalidField`."""
    if not isinstance(value, str) or not value:
        raise InvalidField(field_name, "must be a non-empty host:port string")
    host, sep, port = value.rpartition(":")
    if not sep or not HOST.match(host) or len(host) > 253:
        raise InvalidField(field_name, f"must be host:port, not {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidField(field_name, f"must end in a port between 1 and 65535, not {value!r}")
    return value
