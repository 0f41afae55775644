"""Routes: where jobs are delivered (an HTTP webhook or a Redis key)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from timemachine.domain.errors import InvalidField
from timemachine.domain.names import MAX_ROUTE_ID, check_int, check_name

DEFAULT_TIMEOUT_MS = 5000
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BACKOFF_MS = 500
DEFAULT_MAX_IN_FLIGHT = 64
MAX_BACKOFF_MS = 5 * 60 * 1000

ROUTE_TYPES = ("http", "redis")
REDIS_MODES = ("xadd", "lpush", "publish")
DEFAULT_REDIS_PORT = 6379

# C0 controls, space, DEL and C1 controls: never part of a URL (RFC 3986 section 2),
# and urlsplit would silently drop a tab or newline rather than refuse it.
_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f-\x9f]")
# A registered name (RFC 3986 section 3.2.2): unreserved, percent-encoded, sub-delims.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=]+")


def _split_url(url, schemes: tuple[str, ...]) -> SplitResult:
    """``url`` split into its parts, each checked; raises ValueError saying what is wrong.

    The scheme is one of ``schemes``, the host a name or an IP address, the port (if
    any) 1-65535, and no character is a control character or a space.
    """
    if not isinstance(url, str):
        raise ValueError("must be a string")
    bad = _NOT_IN_URL.search(url)
    if bad is not None:
        raise ValueError(f"holds a control character or space at position {bad.start()}")
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
    host = parts.hostname
    if not host:
        raise ValueError("has no host")
    if ":" in host:
        ipaddress.IPv6Address(host.partition("%")[0])
    elif not _REG_NAME.fullmatch(host):
        raise ValueError(f"host {host!r} is not a host name or IP address")
    port = parts.port  # raises ValueError when not a number or above 65535
    if port == 0:
        raise ValueError("port must be between 1 and 65535")
    return parts


def check_webhook_url(url) -> None:
    """Raise ValueError unless ``url`` is a complete http:// or https:// URL."""
    _split_url(url, ("http", "https"))


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed ``redis://[[user]:password@]host[:port][/db]``."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url) -> RedisAddress:
        """The address ``url`` names; raises ValueError saying what is wrong."""
        parts = _split_url(url, ("redis",))
        db = parts.path.strip("/") or "0"
        if not (db.isascii() and db.isdigit()):
            raise ValueError(f"database {db!r} is not a number")
        if parts.query or parts.fragment:
            raise ValueError("takes no query or fragment")
        return cls(
            host=parts.hostname,
            port=parts.port or DEFAULT_REDIS_PORT,
            db=int(db),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Route:
    """Where jobs are delivered: an HTTP webhook or a Redis key."""

    id: str
    type: str
    webhook_url: str = ""
    redis_url: str = ""
    key: str = ""
    mode: str = "xadd"
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_ms: int = DEFAULT_BACKOFF_MS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self):
        check_name("id", self.id, MAX_ROUTE_ID)
        if self.type not in ROUTE_TYPES:
            raise InvalidField("type", "must be 'http' (or 'REST') or 'redis'")
        if self.type == "http":
            try:
                check_webhook_url(self.webhook_url)
            except ValueError as e:
                raise InvalidField("webhook_url", f"is not a usable URL: {e}") from None
        else:
            try:
                RedisAddress.parse(self.redis_url)
            except ValueError as e:
                raise InvalidField("redis_url", f"is not a redis://host:port/db URL: {e}") from None
            if not isinstance(self.key, str) or not self.key or len(self.key) > 1024:
                raise InvalidField("key", "must be a non-empty string of at most 1024 bytes")
            if self.mode not in REDIS_MODES:
                raise InvalidField("mode", "must be one of xadd, lpush, publish")
        check_int("timeout_ms", self.timeout_ms, 1, 10 * 60 * 1000)
        check_int("max_attempts", self.max_attempts, 1, 1000)
        check_int("backoff_ms", self.backoff_ms, 1, MAX_BACKOFF_MS)
        check_int("max_in_flight", self.max_in_flight, 1, 100_000)

    def to_json(self) -> dict:
        body = {"id": self.id, "type": self.type}
        if self.type == "http":
            body["webhook_url"] = self.webhook_url
        else:
            body.update(redis_url=self.redis_url, key=self.key, mode=self.mode)
        body.update(
            timeout_ms=self.timeout_ms,
            max_attempts=self.max_attempts,
            backoff_ms=self.backoff_ms,
            max_in_flight=self.max_in_flight,
        )
        return body
