"""The session store: one suite run against MemoryStore and RedisStore (a Redis at
127.0.0.1:6379, or a private redis-server when none answers there), then what
each does with time to live and an unreachable Redis."""
from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
import redis.asyncio as aioredis

from server.store import MemoryStore, RedisStore, StoreUnavailable

SHARED_REDIS = "redis://127.0.0.1:6379/0"


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def redis_url(request) -> str:
    """The shared Redis when one answers, else a private redis-server (skip when neither)."""
    if _port_answers(6379):
        return SHARED_REDIS
    url, _process = request.getfixturevalue("server_redis_process")
    return url


async def _prefixed_redis_store(url: str):
    """A RedisStore with a key prefix of its own; every key under it is deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    store = RedisStore(url, prefix)
    yield store
    await store.close()
    raw = aioredis.from_url(url)
    keys = [key async for key in raw.scan_iter(match=prefix + "*")]
    if keys:
        await raw.delete(*keys)
    await raw.aclose()


@pytest.fixture
async def redis_store(redis_url):
    async for store in _prefixed_redis_store(redis_url):
        yield store


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore(FakeClock())
    else:
        async for redis_store in _prefixed_redis_store(request.getfixturevalue("redis_url")):
            yield redis_store


async def test_bytes_round_trip_and_overwrite(store):
    assert await store.get("portrait:abc") is None
    await store.set("portrait:abc", b"\x00\x01npz", 60)
    assert await store.get("portrait:abc") == b"\x00\x01npz"
    await store.set("portrait:abc", b"second", 60)
    assert await store.get("portrait:abc") == b"second"


async def test_session_records_put_get_list_delete(store):
    first = {"id": "s1", "fps": 25.0, "motion": {"face": 0.5, "body": 0.3}}
    second = {"id": "s2", "fps": 30.0}
    await store.put_session(first, 30)
    await store.put_session(second, 30)
    await store.set("portrait:not-a-session", b"x", 30)
    assert await store.get_session("s1") == first
    assert sorted(r["id"] for r in await store.list_sessions()) == ["s1", "s2"]
    await store.delete_session("s1")
    await store.delete_session("never-existed")
    assert await store.get_session("s1") is None
    assert [r["id"] for r in await store.list_sessions()] == ["s2"]


async def test_session_record_needs_an_id(store):
    with pytest.raises(ValueError, match="id"):
        await store.put_session({"fps": 25}, 30)


async def test_ping_answers(store):
    assert await store.ping() is True


async def test_memory_store_expires_entries_by_its_clock():
    clock = FakeClock()
    store = MemoryStore(clock)
    await store.set("portrait:a", b"a", 10)
    await store.put_session({"id": "s"}, 5)
    clock.now += 4.9
    assert await store.get("portrait:a") == b"a"
    assert [r["id"] for r in await store.list_sessions()] == ["s"]
    clock.now += 0.2
    assert await store.get_session("s") is None
    assert await store.list_sessions() == []
    await store.put_session({"id": "s"}, 5)  # a refresh starts a new time to live
    clock.now += 4.9
    assert await store.get_session("s") == {"id": "s"}
    clock.now += 5.1
    assert await store.get("portrait:a") is None


async def test_redis_store_sets_the_time_to_live(redis_store, redis_url):
    await redis_store.set("portrait:a", b"a", 10)
    await redis_store.put_session({"id": "s"}, 2.5)
    raw = aioredis.from_url(redis_url)
    try:
        prefix = redis_store._prefix
        assert 9_000 < await raw.pttl(prefix + "portrait:a") <= 10_000
        assert 1_500 < await raw.pttl(prefix + "session:s") <= 2_500
    finally:
        await raw.aclose()


async def test_redis_keys_stay_under_the_prefix(redis_store, redis_url):
    await redis_store.put_session({"id": "mine"}, 30)
    other = RedisStore(redis_url, f"other-{uuid.uuid4().hex[:8]}:")
    try:
        assert await other.list_sessions() == []
        assert await other.get_session("mine") is None
    finally:
        await other.close()


async def test_unreachable_redis_fails_fast_with_a_clear_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisStore(f"redis://user:secret@127.0.0.1:{port}/0")
    try:
        assert await store.ping() is False
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(store.get("portrait:x"), 5)
        message = str(caught.value)
        assert "unreachable" in message and f"127.0.0.1:{port}" in message
        assert "secret" not in message
        with pytest.raises(StoreUnavailable):
            await store.put_session({"id": "s"}, 30)
    finally:
        await store.close()
