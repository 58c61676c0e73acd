"""Server settings, read once from environment variables.

Every setting has a default; ``Settings.from_env`` reads the variables named in
brackets in the field docs and raises SettingsError (one line naming the
variable, the bad value and what is accepted) for a value it cannot use.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from server.load import usable_cores

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORTRAIT = REPO_ROOT / "assets" / "portrait.png"


def default_max_sessions() -> int:
    """The default hard cap on live sessions: four per usable core (load admission,
    ``server.load``, usually refuses well before it on a CPU generator)."""
    return max(1, int(4 * usable_cores()))


#: AVATAR_GENERATOR values (the names ``SessionCreate.generator`` accepts).
GENERATORS = ("animator", "fantasytalking", "fantasytalking-tiny")


class SettingsError(ValueError):
    """An environment variable holds a value the server cannot use."""


@dataclass(frozen=True)
class Settings:
    """What the server is allowed to do and where it listens.

    host [AVATAR_HOST]: listen address. port [AVATAR_PORT]: TCP port, 0..65535.
    redis_url [REDIS_URL]: Redis for the session store and portrait cache; None:
    an in-process store. redis_prefix [AVATAR_REDIS_PREFIX]: prefix of every
    Redis key this server writes. api_key [AVATAR_API_KEY]: when set, needed to
    upload portraits and create sessions. cors_origins [AVATAR_CORS_ORIGINS]:
    comma list of browser origins allowed to call the API. max_sessions
    [AVATAR_MAX_SESSIONS]: most live sessions at once, whatever the load (>= 1;
    default four per usable CPU core). admit_by_load [AVATAR_ADMIT_BY_LOAD, 1
    or 0]: also refuse a session while the CPU cannot carry one more
    (``server.load.LoadAdmission``: a 512x512 animator session takes 0.3-0.7 of
    a core, by machine). cpu_headroom [AVATAR_CPU_HEADROOM]: cores load
    admission keeps free, 0..64. idle_timeout_s
    [AVATAR_IDLE_TIMEOUT_S]: seconds without WebSocket or media peer before a
    session ends. max_duration_s [AVATAR_MAX_DURATION_S]: seconds a session may
    live. max_upload_bytes [AVATAR_MAX_UPLOAD_BYTES]: largest portrait upload.
    max_pixels [AVATAR_MAX_PIXELS]: largest width x height of a portrait.
    ice_host_addresses [AVATAR_ICE_HOST_ADDRESSES]: comma list of addresses
    offered as ICE host candidates (empty: aioice's own choice).
    ice_timeout_s [AVATAR_ICE_TIMEOUT_S]: seconds a media connection may take
    after the answer before the session ends as ICE failed.
    portrait_ttl_s [AVATAR_PORTRAIT_TTL_S]: seconds a prepared portrait stays
    cached. ws_max_messages_per_s [AVATAR_WS_RATE]: WebSocket messages accepted
    per second per connection. say_max_chars [AVATAR_SAY_MAX_CHARS]: longest
    text of a ``say`` message. default_portrait [AVATAR_DEFAULT_PORTRAIT]: image
    used when a session names no portrait. generator_processes
    [AVATAR_GENERATOR_PROCESSES, 1 or 0]: run each session's generator in a
    worker process of its own (CPU generators: sessions then do not queue on
    one interpreter lock). generator [AVATAR_GENERATOR]: what every session runs,
    one of GENERATORS: ``animator`` (CPU face rig), ``fantasytalking`` (the
    diffusion model; needs ``weights``), ``fantasytalking-tiny`` (the same model
    on tiny random networks, for smoke tests); the fantasytalking generators run
    in the server process whatever generator_processes says (all sessions share
    one loaded model). weights [AVATAR_WEIGHTS]: the local FantasyTalking
    weights directory, required with ``fantasytalking``.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    redis_prefix: str = "avatar:"
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_sessions: int = field(default_factory=default_max_sessions)
    admit_by_load: bool = True
    cpu_headroom: float = 0.3
    idle_timeout_s: float = 120.0
    max_duration_s: float = 3600.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    ice_host_addresses: tuple[str, ...] = ()
    ice_timeout_s: float = 15.0
    portrait_ttl_s: float = 86400.0
    ws_max_messages_per_s: int = 200
    say_max_chars: int = 1000
    default_portrait: Path = field(default=DEFAULT_PORTRAIT)
    generator: str = "animator"
    weights: Path | None = None
    generator_processes: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); unset or empty
        variables keep their defaults. Raises SettingsError for a bad value."""
        env = _Env(os.environ if environ is None else environ)
        defaults = cls()
        generator = env.choice("AVATAR_GENERATOR", defaults.generator, GENERATORS)
        weights_text = env.text("AVATAR_WEIGHTS", None)
        if generator == "fantasytalking" and weights_text is None:
            raise SettingsError("AVATAR_WEIGHTS must name the FantasyTalking weights directory "
                                "when AVATAR_GENERATOR=fantasytalking")
        weights = None if weights_text is None else Path(weights_text)
        return cls(
            host=env.text("AVATAR_HOST", defaults.host),
            port=env.integer("AVATAR_PORT", defaults.port, 0, 65535),
            redis_url=env.text("REDIS_URL", None),
            redis_prefix=env.text("AVATAR_REDIS_PREFIX", defaults.redis_prefix),
            api_key=env.text("AVATAR_API_KEY", None),
            cors_origins=env.items("AVATAR_CORS_ORIGINS"),
            max_sessions=env.integer("AVATAR_MAX_SESSIONS", defaults.max_sessions, 1, 10_000),
            admit_by_load=env.flag("AVATAR_ADMIT_BY_LOAD", defaults.admit_by_load),
            cpu_headroom=env.number("AVATAR_CPU_HEADROOM", defaults.cpu_headroom, 0.0, 64.0, "cores"),
            idle_timeout_s=env.number("AVATAR_IDLE_TIMEOUT_S", defaults.idle_timeout_s, 1.0, 86400.0),
            max_duration_s=env.number("AVATAR_MAX_DURATION_S", defaults.max_duration_s, 1.0, 7 * 86400.0),
            max_upload_bytes=env.integer("AVATAR_MAX_UPLOAD_BYTES", defaults.max_upload_bytes, 1024, 1 << 30),
            # Up to PIL's own decompression-bomb threshold, which the header check relies on.
            max_pixels=env.integer("AVATAR_MAX_PIXELS", defaults.max_pixels, 16_384, Image.MAX_IMAGE_PIXELS),
            ice_host_addresses=env.items("AVATAR_ICE_HOST_ADDRESSES"),
            ice_timeout_s=env.number("AVATAR_ICE_TIMEOUT_S", defaults.ice_timeout_s, 1.0, 300.0),
            portrait_ttl_s=env.number("AVATAR_PORTRAIT_TTL_S", defaults.portrait_ttl_s, 1.0, 365 * 86400.0),
            ws_max_messages_per_s=env.integer("AVATAR_WS_RATE", defaults.ws_max_messages_per_s, 1, 100_000),
            say_max_chars=env.integer("AVATAR_SAY_MAX_CHARS", defaults.say_max_chars, 1, 100_000),
            default_portrait=Path(env.text("AVATAR_DEFAULT_PORTRAIT", str(defaults.default_portrait))),
            generator_processes=env.flag("AVATAR_GENERATOR_PROCESSES", defaults.generator_processes),
            generator=generator,
            weights=weights,
        )


class _Env:
    """Typed reads of environment variables with one-line errors."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str | None) -> str | None:
        raw = self._raw(name)
        return default if raw is None else raw

    def choice(self, name: str, default: str, accepted: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw not in accepted:
            raise SettingsError(f"{name} must be one of {', '.join(accepted)}, got {raw!r}")
        return raw

    def items(self, name: str) -> tuple[str, ...]:
        raw = self._raw(name)
        return () if raw is None else tuple(item.strip() for item in raw.split(",") if item.strip())

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() not in ("0", "1", "true", "false"):
            raise SettingsError(f"{name} must be 1 or 0 (true or false), got {raw!r}")
        return raw.lower() in ("1", "true")

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer in [{low}, {high}], got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(f"{name} must be an integer in [{low}, {high}], got {value}")
        return value

    def number(self, name: str, default: float, low: float, high: float, unit: str = "seconds") -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number of {unit} in [{low:g}, {high:g}], got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(f"{name} must be a number of {unit} in [{low:g}, {high:g}], got {raw}")
        return value
