"""The session store: prepared-portrait cache entries and session records.

Two implementations behind one interface: ``MemoryStore`` (one process, the
default) and ``RedisStore`` (shared by several server processes). Values are
bytes with a time to live; session records are JSON objects with an ``id``,
stored under ``session:{id}``. Only ``RedisStore`` can fail: it raises
StoreUnavailable when Redis does not answer within its short timeouts, so a
request fails fast with a clear message instead of hanging.
"""
from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

#: Redis timeouts, seconds: connecting, and each command.
REDIS_CONNECT_TIMEOUT_S = 0.5
REDIS_COMMAND_TIMEOUT_S = 1.0


class StoreUnavailable(RuntimeError):
    """The store (Redis) cannot be reached; the message says which and why."""


class SessionStore(ABC):
    """Bytes with a time to live, plus JSON session records. ``ttl_s``: seconds (> 0).

    ``kind`` is "memory" or "redis". Every method may raise StoreUnavailable.
    """

    kind: str

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The bytes stored under ``key``, or None when absent or expired."""

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds (replacing any value)."""

    @abstractmethod
    async def put_session(self, record: dict, ttl_s: float) -> None:
        """Store (or refresh) a session record, a JSON-able dict with a str ``id``,
        for ``ttl_s`` seconds. Raises ValueError without an ``id``."""

    @abstractmethod
    async def get_session(self, session_id: str) -> dict | None:
        """The record of ``session_id``, or None when absent or expired."""

    @abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Remove a session record (no error when absent)."""

    @abstractmethod
    async def list_sessions(self) -> list[dict]:
        """Every live session record, in no particular order."""

    @abstractmethod
    async def ping(self) -> bool:
        """Whether the store answers now (never raises)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""


def session_key(session_id: str) -> str:
    """The store key of a session record."""
    return f"session:{session_id}"


def _session_id(record: dict) -> str:
    session_id = record.get("id")
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"a session record needs a non-empty str 'id', got {session_id!r}")
    return session_id


class MemoryStore(SessionStore):
    """An in-process store. ``clock``: monotonic seconds (default
    ``time.monotonic``; tests pass a fake to expire entries without waiting).
    Expired entries are dropped when read or listed."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[bytes, float]] = {}  # key -> (value, expiry time)

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        return entry[0]

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._entries[key] = (bytes(value), self._clock() + ttl_s)

    async def put_session(self, record: dict, ttl_s: float) -> None:
        await self.set(session_key(_session_id(record)), json.dumps(record).encode(), ttl_s)

    async def get_session(self, session_id: str) -> dict | None:
        value = self._live(session_key(session_id))
        return None if value is None else json.loads(value)

    async def delete_session(self, session_id: str) -> None:
        self._entries.pop(session_key(session_id), None)

    async def list_sessions(self) -> list[dict]:
        keys = [key for key in self._entries if key.startswith("session:")]
        values = (self._live(key) for key in keys)
        return [json.loads(value) for value in values if value is not None]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()


class RedisStore(SessionStore):
    """A store in Redis (``redis.asyncio``). ``url``: e.g. ``redis://host:6379/0``;
    ``prefix`` starts every key this store writes (several servers or test runs
    can share one Redis). Connect timeout REDIS_CONNECT_TIMEOUT_S, command
    timeout REDIS_COMMAND_TIMEOUT_S, no retries: an unreachable Redis raises
    StoreUnavailable within about a second. Must be used from one event loop.
    """

    kind = "redis"

    def __init__(self, url: str, prefix: str = "avatar:") -> None:
        self._url = url
        self._prefix = prefix
        self._client = aioredis.from_url(
            url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_COMMAND_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        logger.warning("redis at %s failed: %s: %s", self._redacted_url(), type(exc).__name__, exc)
        return StoreUnavailable(f"the session store (Redis at {self._redacted_url()}) is unreachable: {exc}")

    def _redacted_url(self) -> str:
        # Never echo a password from the URL into logs or error messages.
        scheme, sep, rest = self._url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    async def get(self, key: str) -> bytes | None:
        try:
            return await self._client.get(self._prefix + key)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            await self._client.set(self._prefix + key, value, px=max(1, round(ttl_s * 1000)))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def put_session(self, record: dict, ttl_s: float) -> None:
        await self.set(session_key(_session_id(record)), json.dumps(record).encode(), ttl_s)

    async def get_session(self, session_id: str) -> dict | None:
        value = await self.get(session_key(session_id))
        return None if value is None else json.loads(value)

    async def delete_session(self, session_id: str) -> None:
        try:
            await self._client.delete(self._prefix + session_key(session_id))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def list_sessions(self) -> list[dict]:
        try:
            keys = [key async for key in self._client.scan_iter(match=self._prefix + "session:*", count=500)]
            values = await self._client.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        # A record may expire between SCAN and MGET: skip the gaps.
        return [json.loads(value) for value in values if value is not None]

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError) as exc:
            logger.debug("redis ping failed: %s", exc)
            return False

    async def close(self) -> None:
        await self._client.aclose()
