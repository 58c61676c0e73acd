"""Clocks that pace the session's frame stream.

The session asks a clock two things: the time now, and to wait until a time.
``SystemClock`` uses the event loop's monotonic time, for live sessions;
``VirtualClock`` jumps to the requested time at once, so tests and offline
renders run as fast as the generator allows while every timestamp stays exact.
"""
from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)


class Clock(ABC):
    """Monotonic time in seconds and a way to wait for it."""

    @abstractmethod
    def now(self) -> float:
        """Current time, seconds; never decreases. The origin is arbitrary."""

    @abstractmethod
    async def sleep_until(self, t: float) -> None:
        """Return once ``now() >= t`` (seconds, same origin as ``now``); returns
        after one pass of the event loop when ``t`` is already past."""


class SystemClock(Clock):
    """The running event loop's monotonic clock (``loop.time()``, seconds).

    ``now`` and ``sleep_until`` must be called from inside the loop.
    """

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))


class VirtualClock(Clock):
    """Simulated time for tests and offline rendering: ``sleep_until(t)`` sets the
    time to ``t`` at once (never backwards) and yields to the event loop once, so
    other tasks run but no real time passes waiting.

    ``start``: the initial time, seconds.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    async def sleep_until(self, t: float) -> None:
        self._now = max(self._now, float(t))
        await asyncio.sleep(0)
