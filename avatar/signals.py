"""In-loop notification helpers of the session: a change signal and an event fan-out.

Both live on one asyncio event loop and are not thread-safe.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


class ChangeSignal:
    """Wakes every waiting task when ``notify`` is called (e.g. after any state
    change); waiters re-check their own condition, so no change is missed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake all current waiters."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        """Return at the next ``notify``."""
        await self._event.wait()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true (at once when it already is, without
        yielding to the loop)."""
        while not predicate():
            await self.wait()


class Broadcast(Generic[T]):
    """Fan-out of items to any number of subscribers, each with its own unbounded
    queue; ``close`` ends every subscription."""

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue] = []
        self._closed = False

    def subscribe(self) -> AsyncIterator[T]:
        """An async iterator of every item published from now on; it ends at ``close``."""
        queue: asyncio.Queue = asyncio.Queue()
        if self._closed:
            queue.put_nowait(_END)
        else:
            self._queues.append(queue)
        return self._drain(queue)

    def publish(self, item: T) -> None:
        """Give ``item`` to every subscriber (never blocks)."""
        for queue in self._queues:
            queue.put_nowait(item)

    def close(self) -> None:
        """End every subscription after the items already published."""
        self._closed = True
        for queue in self._queues:
            queue.put_nowait(_END)
        self._queues.clear()

    async def _drain(self, queue: asyncio.Queue) -> AsyncIterator[T]:
        try:
            while (item := await queue.get()) is not _END:
                yield item
        finally:
            if queue in self._queues:
                self._queues.remove(queue)
