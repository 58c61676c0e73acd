"""Every request, response and WebSocket message of the server, as pydantic models.

HTTP bodies are JSON; WebSocket text frames are JSON objects with a ``type``
field (binary frames carry PCM16LE audio and have no model). Client messages
are parsed with ``parse_client_message``; server messages are built from the
``*Event`` models and sent with ``model_dump(mode="json")``.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

logger = logging.getLogger(__name__)

#: Frame rates a session may ask for, frames per second (inclusive).
MIN_FPS, MAX_FPS = 10.0, 60.0

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the image bytes, lowercase hex")]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors -------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """``code``: a short machine-readable word; ``message``: one sentence for people."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


# -- HTTP ---------------------------------------------------------------------


class PortraitCreated(BaseModel):
    """Answer to a portrait upload: its id and its size in pixels (as uploaded)."""

    portrait_id: Sha256Hex
    width: int
    height: int


class Motion(_Strict):
    """Motion intensities in [0, 1]; 0.5 neutral, 0 nearly still, 1 lively."""

    face: Unit = 0.5
    body: Unit = 0.5


class SessionCreate(_Strict):
    """Request for a new session. ``portrait_id`` None: the bundled portrait.
    ``generator``: must be the server's (AVATAR_GENERATOR); None: the server's.
    ``fps``: frames per second in [10, 60]; None: the generator's own (25 for the
    animator, 23 for fantasytalking)."""

    portrait_id: Sha256Hex | None = None
    generator: Literal["animator", "fantasytalking", "fantasytalking-tiny"] | None = None
    motion: Motion = Motion()
    fps: float | None = Field(None, ge=MIN_FPS, le=MAX_FPS)


class IceServer(BaseModel):
    """A STUN/TURN server for the client's RTCPeerConnection."""

    urls: list[str]
    username: str | None = None
    credential: str | None = None


class SessionCreated(BaseModel):
    """A new session. ``token`` authorises the offer, events and delete calls
    (256 random bits, URL-safe base64); the URLs are paths on this server;
    ``generator``: the server's generator (AVATAR_GENERATOR); ``fps``: the
    session's frame rate."""

    session_id: str
    token: str
    generator: str
    fps: float
    offer_url: str
    events_url: str
    ice_servers: list[IceServer]


class SdpOffer(_Strict):
    """A WebRTC offer with all ICE candidates gathered (non-trickle)."""

    sdp: str = Field(max_length=100_000)
    type: Literal["offer"]


class SdpAnswer(BaseModel):
    """The server's WebRTC answer, with all its ICE candidates."""

    sdp: str
    type: Literal["answer"] = "answer"


class Health(BaseModel):
    """Liveness: live sessions in this process and whether the store answers."""

    status: Literal["ok"] = "ok"
    sessions: int
    store: Literal["redis", "memory"]
    store_ok: bool


# -- WebSocket: client to server ------------------------------------------------


class AudioFormatMessage(_Strict):
    """Sample rate (Hz) of the binary PCM16LE frames that follow."""

    type: Literal["audio_format"]
    sample_rate: Literal[16000, 24000, 48000]


class SpeechEndMessage(_Strict):
    """The utterance being pushed is complete."""

    type: Literal["speech_end"]


class InterruptMessage(_Strict):
    """Drop all queued speech and frames; the avatar goes idle."""

    type: Literal["interrupt"]


class SetMotionMessage(_Strict):
    """New motion intensities, each in [0, 1]."""

    type: Literal["set_motion"]
    face: Unit
    body: Unit


class SayMessage(_Strict):
    """Text to speak (synthesised on the server); its length limit is a setting."""

    type: Literal["say"]
    text: str = Field(min_length=1)


class PingMessage(_Strict):
    """Keep-alive; answered with a pong."""

    type: Literal["ping"]


ClientMessage = Annotated[
    AudioFormatMessage | SpeechEndMessage | InterruptMessage | SetMotionMessage | SayMessage | PingMessage,
    Field(discriminator="type"),
]
CLIENT_MESSAGE_TYPES = ("audio_format", "speech_end", "interrupt", "set_motion", "say", "ping")
_client_message = TypeAdapter(ClientMessage)


def parse_client_message(data: Any) -> ClientMessage:
    """Validate a decoded JSON value as a client message; raises pydantic's
    ValidationError when it is not one (callers check ``type`` first to tell an
    unknown type from bad fields)."""
    return _client_message.validate_python(data)


# -- WebSocket: server to client ------------------------------------------------


class StateEvent(BaseModel):
    """The avatar's state changed."""

    type: Literal["state"] = "state"
    state: Literal["idle", "listening", "speaking"]


class PlaybackStartedEvent(BaseModel):
    """The first frame of an utterance was handed to the media tracks; ``pts``
    in 1/16000 s of the session's media clock."""

    type: Literal["playback_started"] = "playback_started"
    pts: int


class PlaybackFinishedEvent(BaseModel):
    """An utterance ended (``position``: seconds of it played) or was cut."""

    type: Literal["playback_finished"] = "playback_finished"
    position: float
    interrupted: bool


class StatsEvent(BaseModel):
    """Once a second: the keys of ``AvatarSession.stats()`` (None where unknown)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["stats"] = "stats"


class ErrorEvent(BaseModel):
    """A message was refused or something failed; the session goes on unless
    the connection is closed right after."""

    type: Literal["error"] = "error"
    code: str
    message: str


class PongEvent(BaseModel):
    """Answer to a ping."""

    type: Literal["pong"] = "pong"
