"""WebRTC for one live session: the peer connection that sends the session's
tracks (``server.media_tracks``) and takes an optional microphone
(``server.microphone``).

ICE: no STUN/TURN servers (``RTCConfiguration(iceServers=[])``); host candidate
addresses can be pinned with ``pin_ice_host_addresses`` (aioice never offers
127.0.0.1 on its own, see /work/shared/notes/webrtc-testing.md). A peer that is
not connected ``CONNECT_TIMEOUT_S`` after its answer counts as ICE failed.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
from collections.abc import Awaitable, Callable

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from avatar.clock import Clock, SystemClock
from avatar.session import AvatarSession
from server.media_tracks import (
    OUT_AUDIO_RATE,
    VIDEO_CLOCK_RATE,
    AvatarAudioTrack,
    AvatarVideoTrack,
    MediaFeeder,
    MediaPacer,
    PacedTrack,
)
from server.microphone import MicrophoneInput, VadSettings
from server.video_encoder import install_video_encoder

logger = logging.getLogger(__name__)

#: Seconds a media peer may take to connect after its answer before it counts as ICE
#: failed (the server's default; AVATAR_ICE_TIMEOUT_S sets it).
CONNECT_TIMEOUT_S = 15.0


def pin_ice_host_addresses(addresses: list[str]) -> None:
    """Make aioice gather host candidates on exactly ``addresses`` (IPv4 or IPv6
    literals, e.g. ``["127.0.0.1"]``) in this process, for every peer connection
    created afterwards. ``[]`` changes nothing (aioice lists the machine's
    interfaces itself, skipping loopback).

    This is the one place that replaces ``aioice.ice.get_host_addresses``, the only
    hook aioice offers: loopback-only tests need 127.0.0.1, which aioice never
    offers, and a server behind NAT may want to pin its public interface.
    Raises ValueError for an entry that is not an IP address literal.
    """
    if not addresses:
        return
    parsed = []
    for address in addresses:
        try:
            parsed.append(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(f"ICE host address must be an IPv4 or IPv6 literal, got {address!r}") from None

    def pinned(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [str(ip) for ip in parsed if (ip.version == 4 and use_ipv4) or (ip.version == 6 and use_ipv6)]

    aioice.ice.get_host_addresses = pinned
    logger.info("ICE host candidates pinned to %s", ", ".join(map(str, parsed)))


class MediaPeer:
    """The server side of one WebRTC connection for a live AvatarSession.

    ``avatar``: the started session whose frames this peer sends (it reads the
    session's frame iterator in one task, from when every outgoing track's sender
    runs until ``close``; the session is not closed by the peer). ``on_closed``:
    called once with a reason (``"ice_failed"``, ``"closed"`` when the remote
    side closed, ``"media_error"`` when the frame stream failed); not called for
    ``close()`` itself; may return an awaitable. ``fps``: the session's frame
    rate (what counts as a late frame). ``clock``: paces the tracks (default
    SystemClock; must be the session's clock). ``vad``: microphone turn settings.
    ``connect_timeout_s``: a peer not connected this long after its answer
    ends with ``"ice_failed"`` (aioice itself keeps checking a dead candidate,
    or waits for candidates a client never sends, for over a minute).
    """

    def __init__(
        self,
        avatar: AvatarSession,
        *,
        on_closed: Callable[[str], Awaitable[None] | None],
        fps: float,
        clock: Clock | None = None,
        vad: VadSettings = VadSettings(),
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._avatar = avatar
        self._connect_timeout_s = connect_timeout_s
        self._connected = asyncio.Event()
        self._on_closed = on_closed
        self._fps = float(fps)
        self._vad = vad
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._pacer = MediaPacer(clock or SystemClock())
        self._video = AvatarVideoTrack(self._pacer, self._fps)
        self._audio = AvatarAudioTrack(self._pacer)
        self._senders: list[PacedTrack] = []
        self._tasks: set[asyncio.Task] = set()
        self._mic: MicrophoneInput | None = None
        self._closing = False
        self._notified = False
        self._flushes = 0
        self._flushed_frames = 0
        self._remote: dict = {}
        self._pc.on("connectionstatechange", self._on_connection_state)
        self._pc.on("track", self._on_track)

    @property
    def connected(self) -> bool:
        """Whether ICE and DTLS are connected (media flows)."""
        return self._pc.connectionState == "connected"

    async def answer(self, offer_sdp: str) -> str:
        """Answer a non-trickle SDP offer; returns the answer SDP with all of this
        side's ICE candidates. The offer must have a video m-line the client
        receives on; an audio m-line gets the avatar's voice, and a microphone
        if the client sends one. Raises ValueError with a one-line reason for SDP
        that cannot be parsed or offers no video, RuntimeError after ``close``."""
        if self._closing:
            raise RuntimeError("the media peer is closed")
        if not isinstance(offer_sdp, str) or "m=" not in offer_sdp:
            raise ValueError("malformed SDP offer: expected an SDP text with at least one m= line")
        try:
            media = SessionDescription.parse(offer_sdp).media
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises assorted errors for bad SDP; all mean the same to a client
            raise ValueError(f"malformed SDP offer: {_one_line(exc)}") from None
        # The client's direction: "recvonly"/"sendrecv" means it receives what we send.
        receives = {m.kind for m in media if m.direction in ("recvonly", "sendrecv")}
        if "video" not in receives:
            raise ValueError("SDP offer has no video m-line to receive the avatar on (add a recvonly video transceiver)")
        video_sender = self._pc.addTrack(self._video)
        self._senders.append(self._video)
        if "audio" in receives:
            self._pc.addTrack(self._audio)
            self._senders.append(self._audio)
        try:
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        except Exception as exc:  # e.g. no codec in common
            raise ValueError(f"SDP offer cannot be answered: {_one_line(exc)}") from None
        install_video_encoder(video_sender, self._pc.localDescription.sdp)
        self._spawn(self._pump_frames(), "media-pump")
        self._spawn(self._watch_connect(), "media-connect-watch")
        self._spawn(self._poll_remote_stats(), "media-stats")
        return self._pc.localDescription.sdp

    def flush(self) -> None:
        """Interrupt path: drop video frames queued in the track and silence the
        queued audio packets (called right after ``avatar.clear_buffer()``)."""
        frames = self._video.flush()
        self._audio.flush()
        self._flushes += 1
        self._flushed_frames += frames
        logger.debug("flushed %d queued video frames", frames)

    async def close(self) -> None:
        """Stop the media, close the connection. Idempotent; does not call
        ``on_closed`` and does not close the avatar session."""
        if self._closing:
            return
        self._closing = True
        # close() may run inside one of our tasks (on_closed from the pump): never await that one.
        others = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._video.stop()
        self._audio.stop()
        await self._pc.close()
        logger.info("media peer closed")

    def stats(self) -> dict:
        """Sender-side counts and the receiver's RTCP estimates:

        ``connection_state`` (aiortc's), ``video_frames_sent``,
        ``audio_packets_sent`` (20 ms each), ``late_frames`` (video sent more than
        one frame period after due), ``dropped_frames`` (video dropped because
        the sender fell behind), ``flushes`` and ``flushed_frames`` (interrupts),
        ``microphone_utterances``; from the latest receiver reports, per kind:
        ``{kind}_packets_lost``, ``{kind}_jitter_s`` and ``{kind}_round_trip_s``
        (absent until a report came).
        """
        return {
            "connection_state": self._pc.connectionState,
            "video_frames_sent": self._video.sent,
            "audio_packets_sent": self._audio.sent,
            "late_frames": self._video.late,
            "dropped_frames": self._video.dropped,
            "flushes": self._flushes,
            "flushed_frames": self._flushed_frames,
            "microphone_utterances": self._mic.utterances if self._mic else 0,
            **self._remote,
        }

    # -- internals -----------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump_frames(self) -> None:
        """The one reader of the session's frames: waits until every outgoing
        track's sender runs (so both tracks start on the same frame), then feeds
        each frame to the tracks."""
        await asyncio.gather(*(track.started.wait() for track in self._senders))
        feeder = MediaFeeder(self._pacer, self._video, self._audio if self._audio in self._senders else None)
        try:
            async for frame in self._avatar:
                feeder.feed(frame)
        except Exception as exc:  # RuntimeError: the session's generator failed for good
            logger.error("avatar frame stream failed: %s", _one_line(exc), exc_info=not isinstance(exc, RuntimeError))
            await self._notify_closed("media_error")

    async def _poll_remote_stats(self) -> None:
        """Refresh the receiver's RTCP figures once a second."""
        while True:
            await asyncio.sleep(1.0)
            for transceiver in self._pc.getTransceivers():
                if transceiver.sender.track is None:
                    continue
                report = await transceiver.sender.getStats()
                for stat in report.values():
                    if stat.type == "remote-inbound-rtp":
                        kind = transceiver.kind
                        self._remote[f"{kind}_packets_lost"] = stat.packetsLost
                        self._remote[f"{kind}_jitter_s"] = stat.jitter / (
                            VIDEO_CLOCK_RATE if kind == "video" else OUT_AUDIO_RATE
                        )
                        self._remote[f"{kind}_round_trip_s"] = stat.roundTripTime

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio" or self._mic is not None:
            return
        logger.info("microphone track received")
        self._mic = MicrophoneInput(track, self._avatar, self._vad)
        self._spawn(self._mic.run(), "media-microphone")

    async def _watch_connect(self) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self._connect_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("no media connection %g s after the answer", self._connect_timeout_s)
            await self._notify_closed("ice_failed")

    async def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        logger.info("connection state: %s", state)
        if state == "connected":
            self._connected.set()
        if self._closing:
            return
        if state == "failed":
            await self._notify_closed("ice_failed")
        elif state == "closed":
            await self._notify_closed("closed")

    async def _notify_closed(self, reason: str) -> None:
        if self._notified or self._closing:
            return
        self._notified = True
        logger.info("media peer ends: %s", reason)
        try:
            result = self._on_closed(reason)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the owner's bug must not kill the media tasks silently
            logger.exception("on_closed callback failed")


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for error messages that reach a client."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
