"""Load-aware admission: start a session only while the CPU can carry one more.

What a session costs differs from machine to machine: bench/server_latency.py
measured a speaking 512x512 animator session (server process plus its worker) at
0.30 of a core on one 2-core VM and at 0.52-0.73 on another of the same kind. A
fixed session count either leaves a fast machine half idle or lets a slow one
take a session that makes every running session drop frames.

``CpuMeter`` reads cumulative CPU time: how busy the CPUs this server may use
are (the cgroup's own usage under a CPU quota, else /proc/stat over the CPUs in
this process's affinity mask), and how much of it this server's process tree
(the server and its generator workers) used. ``LoadAdmission`` keeps readings
over WINDOW_S and, from stretches where the set of sessions did not change,
learns what one session costs. A new session is admitted when

    other_busy + (sessions + 1) * session_cores + headroom <= cores

(``free_sessions`` counts how many more fit, for the /metrics gauge a load
balancer can route by), where ``other_busy`` is the busy CPU that is not this server's (a co-located
TTS or LLM, the benchmark's receivers) and ``session_cores`` the median
per-session cost over the last COST_MEMORY_S (a median, so a portrait being
prepared in the server's preparation process for a few seconds does not count
as session cost). A listening session costs what a speaking one does (same
frames rendered, encoded and sent: 0.32-0.35 of a core each on the fast machine
either way), so the figure holds whatever the sessions are doing.
"""
from __future__ import annotations

import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

logger = logging.getLogger(__name__)

#: Seconds of readings the busy figures average over.
WINDOW_S = 5.0
#: Seconds of per-session cost measurements the median is taken over.
COST_MEMORY_S = 60.0
#: Cores one session is assumed to take until one has been measured (the slower
#: machine's figure above, rounded up).
PRIOR_SESSION_CORES = 0.7

_CGROUP = Path("/sys/fs/cgroup")


def cpu_quota_cores(root: Path = _CGROUP) -> float | None:
    """Cores this process's cgroup may use under a CPU quota (``docker run
    --cpus``; cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cores(root: Path = _CGROUP) -> float:
    """CPU cores this process may use: its affinity mask (a container's CPU set)
    or the machine's count, capped by a cgroup CPU quota; fractional under a
    fractional quota, at least 1."""
    try:
        cores: float = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        cores = os.cpu_count() or 1
    quota = cpu_quota_cores(root)
    return float(max(1.0, cores if quota is None else min(cores, quota)))


@dataclass(frozen=True)
class CpuReading:
    """Cumulative CPU time at one moment: ``at`` monotonic seconds; ``busy``
    CPU-seconds the usable CPUs (or the cgroup) spent working; ``server``
    CPU-seconds of this process and its live descendants."""

    at: float
    busy: float
    server: float


class CpuMeter:
    """Reads CpuReadings. ``cores``: the usable cores (``usable_cores()``)."""

    def __init__(self, root: Path = _CGROUP) -> None:
        self.cores = usable_cores(root)
        self._usage_file = self._cgroup_usage_file(root) if cpu_quota_cores(root) is not None else None
        try:
            self._cpus: list[int] | None = sorted(os.sched_getaffinity(0))
        except AttributeError:
            self._cpus = None
        self._process = psutil.Process()

    @staticmethod
    def _cgroup_usage_file(root: Path) -> Path | None:
        for path in (root / "cpu.stat", root / "cpuacct" / "cpuacct.usage"):
            if path.exists():
                return path
        return None

    def _busy(self) -> float:
        if self._usage_file is not None:
            text = self._usage_file.read_text()
            if self._usage_file.name == "cpu.stat":  # v2: "usage_usec N" among other lines
                fields = dict(line.split() for line in text.splitlines() if line.strip())
                return int(fields["usage_usec"]) / 1e6
            return int(text) / 1e9  # v1: nanoseconds
        per_cpu = psutil.cpu_times(percpu=True)
        cpus = self._cpus if self._cpus is not None and max(self._cpus) < len(per_cpu) else range(len(per_cpu))
        return sum(_busy_seconds(per_cpu[i]) for i in cpus)

    def _server(self) -> float:
        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            processes = [self._process]
        return sum(filter(None, map(cpu_seconds, processes)))

    def read(self, at: float) -> CpuReading:
        """A reading stamped ``at`` (the caller's monotonic seconds). Reads /proc
        (a few milliseconds: call it off the event loop)."""
        return CpuReading(at, self._busy(), self._server())


def cpu_seconds(process: psutil.Process) -> float | None:
    """User + system CPU seconds of ``process`` (all its threads); None once it has ended."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _busy_seconds(times) -> float:
    # Idle and waiting on I/O are the only states in which a CPU could take more
    # work; guest time is already counted in user time on Linux.
    not_busy = times.idle + sum(getattr(times, name, 0.0) for name in ("iowait", "guest", "guest_nice"))
    return sum(times) - not_busy


class LoadAdmission:
    """Decides whether one more session fits, from CpuMeter readings (the rule
    in the module docstring).

    ``meter``: the CpuMeter (a subclass in tests); ``headroom``: cores left free
    for the scheduling slack frames due every 40 ms need (>= 0).
    """

    def __init__(self, meter: CpuMeter, headroom: float) -> None:
        self.meter = meter
        self.headroom = float(headroom)
        self._readings: deque[CpuReading] = deque()
        self._costs: deque[tuple[float, float]] = deque()  # (at, cores per session)
        self._session_cores = PRIOR_SESSION_CORES
        self._sessions_since: tuple[int, float] | None = None  # (count, since when)

    @property
    def cores(self) -> float:
        """Usable cores."""
        return self.meter.cores

    def observe(self, reading: CpuReading, sessions: int) -> None:
        """Add a reading taken while ``sessions`` sessions were live (and
        started); learns the per-session cost once that count held a whole window."""
        if self._sessions_since is None or self._sessions_since[0] != sessions:
            self._sessions_since = (sessions, reading.at)
        self._readings.append(reading)
        while len(self._readings) > 2 and reading.at - self._readings[1].at >= WINDOW_S:
            self._readings.popleft()
        while self._costs and reading.at - self._costs[0][0] > COST_MEMORY_S:
            self._costs.popleft()
        span = self._span()
        if sessions > 0 and span is not None and self._readings[0].at >= self._sessions_since[1]:
            self._costs.append((reading.at, span[1] / sessions))
            self._session_cores = float(np.median([cost for _, cost in self._costs]))

    def _span(self) -> tuple[float, float] | None:
        """(busy cores, server cores) averaged over the readings held, None
        before two readings half a window apart."""
        first, last = self._readings[0], self._readings[-1]
        seconds = last.at - first.at
        if seconds < WINDOW_S / 2:
            return None
        return max(0.0, (last.busy - first.busy) / seconds), max(0.0, (last.server - first.server) / seconds)

    @property
    def session_cores(self) -> float:
        """Cores one session is counted at: the median measured over the last
        COST_MEMORY_S of measurements (the last one taken when sessions were
        starting and ending since), PRIOR_SESSION_CORES before any."""
        return self._session_cores

    def other_cores(self) -> float:
        """Busy cores that are not this server's, averaged over the window (0
        before there is one)."""
        span = self._span() if self._readings else None
        return 0.0 if span is None else max(0.0, span[0] - span[1])

    def free_sessions(self, sessions: int) -> int:
        """How many sessions could start next to ``sessions`` live (or
        starting) ones by the rule above, >= 0."""
        room = self.cores - self.headroom - self.other_cores()
        return max(0, math.floor(room / self.session_cores + 1e-9) - sessions)

    def refusal(self, sessions: int) -> str | None:
        """Why a session may not start next to ``sessions`` live (or starting)
        ones, in words for the client; None when it may. The first session is
        always admitted (nothing runs that it could slow down)."""
        if sessions == 0 or self.free_sessions(sessions) > 0:
            return None
        return (f"the server's CPU is fully booked: {sessions} session(s) at about {self.session_cores:.2f} "
                f"core each, {self.other_cores():.2f} core of other work and {self.headroom:g} core kept free, "
                f"of {self.cores:g} cores; try again later")
