"""Prometheus metrics of one server app, in a registry of its own (several apps
can live in one process, as in the tests)."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

# Latency buckets, seconds: the contract's targets sit between 0.05 and 1 s.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """The server's metrics.

    ``sessions`` gauge: live sessions. Histograms (seconds):
    ``time_to_first_frame`` from session start to its first frame out;
    ``audio_to_lip`` from the first audio of an utterance to its first frame;
    ``interrupt_latency`` of an interrupt (dropping queued speech and frames
    down to the media tracks). ``rtf`` gauge: the highest real-time factor
    (generation time / media time) among live sessions, 0 with none.
    ``dropped_frames`` counter: generated frames discarded by truncations.
    ``session_cores`` gauge: the CPU cores load admission counts one session at;
    ``free_sessions`` gauge: how many more sessions the CPU can carry by its rule
    (whether or not it refuses sessions), for routing sessions across servers.
    """

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("avatar_sessions", "Live sessions", registry=self.registry)
        self.time_to_first_frame = Histogram(
            "avatar_time_to_first_frame_seconds",
            "Seconds from session start to its first video frame",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audio_to_lip = Histogram(
            "avatar_audio_to_lip_seconds",
            "Seconds from the first audio of an utterance to its first frame",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.interrupt_latency = Histogram(
            "avatar_interrupt_latency_seconds",
            "Seconds to drop queued speech and frames on an interrupt",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rtf = Gauge(
            "avatar_rtf", "Highest real-time factor of generation among live sessions", registry=self.registry
        )
        self.session_cores = Gauge(
            "avatar_session_cpu_cores", "CPU cores load admission counts one session at", registry=self.registry
        )
        self.free_sessions = Gauge(
            "avatar_free_sessions", "More sessions the CPU can carry, by load admission's rule",
            registry=self.registry,
        )
        self.dropped_frames = Counter(
            "avatar_dropped_frames", "Generated frames discarded before display", registry=self.registry
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
