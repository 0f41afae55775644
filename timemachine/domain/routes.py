"""Routes: where jobs are delivered (an HTTP webhook or a Redis key)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from timemachine.domain.errors import InvalidField
from timemachine.domain.names import MAX_ROUTE_ID, check_int, check_name

DEFAULT_TIMEOUT_MS = 5000
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BACKOFF_MS = 500
DEFAULT_MAX_IN_FLIGHT = 64
MAX_BACKOFF_MS = 5 * 60 * 1000

ROUTE_TYPES = ("http", "redis")
REDIS_MODES = ("xadd", "lpush", "publish")


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
            if not isinstance(self.webhook_url, str) or not re.match(
                r"\Ahttps?://[^\s/]+", self.webhook_url
            ):
                raise InvalidField("webhook_url", "must be an http:// or https:// URL")
        else:
            if not isinstance(self.redis_url, str) or not re.match(
                r"\Aredis://[^\s/]+", self.redis_url
            ):
                raise InvalidField("redis_url", "must be a redis://host:port/db URL")
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
