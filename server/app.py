"""The HTTP and WebSocket API (FastAPI): portraits, sessions, WebRTC offers, health, metrics.

``create_app(settings)`` builds the app; everything that needs the event loop
(the store, the session manager, the reaper) is created in its lifespan and
closed at shutdown, which also ends every session. Every 4xx/5xx answer has
the body ``{"error": {"code", "message"}}``; no traceback ever reaches a client.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Security, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from avatar.clock import Clock, SystemClock
from avatar.generator_process import factory_module, preparation_executor
from model.animator import CpuAnimator
from model.base import Generator, MotionSettings
from server.config import REPO_ROOT, Settings, SettingsError
from server.load import CpuMeter, LoadAdmission
from server.metrics import ServerMetrics
from server.portraits import PortraitCache, PortraitRejected, UploadTooLarge, read_image_field
from server.schemas import (
    ErrorBody,
    Health,
    PortraitCreated,
    SdpAnswer,
    SdpOffer,
    SessionCreate,
    SessionCreated,
)
from server.sessions import (
    REAP_INTERVAL_S,
    RETRY_AFTER_S,
    LiveSession,
    PeerConflict,
    SessionLimitReached,
    SessionManager,
)
from server.store import MemoryStore, RedisStore, SessionStore, StoreUnavailable
from server.tts import EspeakTts
from server.ws import serve_events

logger = logging.getLogger(__name__)

CLIENT_DEMO = REPO_ROOT / "client_demo"


class ApiError(Exception):
    """An error answer: HTTP ``status``, short ``code``, one-line ``message``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error={"code": code, "message": message})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _responses(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorBody} for status in statuses}


@dataclass
class _Server:
    """What the routes use, created in the lifespan (inside the event loop)."""

    store: SessionStore
    manager: SessionManager
    portraits: PortraitCache
    default_portrait: bytes


def _default_store(settings: Settings, monotonic: Callable[[], float]) -> SessionStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.redis_prefix)
    return MemoryStore(monotonic)


def default_generator_factory(settings: Settings) -> Callable[[], Generator]:
    """The generator factory of ``settings.generator``: the CPU animator, or FantasyTalking
    on the weights in ``settings.weights`` (loaded here, once: every session's generator
    shares the networks) or on tiny random networks. Raises WeightsError (an OSError)
    naming the missing file of an incomplete weights directory."""
    if settings.generator == "animator":
        return CpuAnimator
    from model.fantasytalking.generator import (
        TINY_CONFIG,
        WEIGHTS_CONFIG,
        FantasyTalkingGenerator,
        load_models,
        tiny_models,
    )

    if settings.generator == "fantasytalking":
        config = WEIGHTS_CONFIG
        models = load_models(settings.weights, config)
    else:
        config = TINY_CONFIG
        models = tiny_models(0, config)
    return functools.partial(FantasyTalkingGenerator, models, config)


def create_app(
    settings: Settings | None = None,
    *,
    generator_factory: Callable[[], Generator] | None = None,
    clock_factory: Callable[[], Clock] = SystemClock,
    store_factory: Callable[[Settings], SessionStore] | None = None,
    tts: EspeakTts | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    reaper_interval_s: float = REAP_INTERVAL_S,
    cpu_meter: CpuMeter | None = None,
) -> FastAPI:
    """The server app.

    ``settings``: default ``Settings.from_env()``. ``generator_factory``: a new
    Generator per session (and one for preparing portraits); default
    ``default_generator_factory(settings)``; ``clock_factory``:
    each session's pacing clock (VirtualClock for fast tests); ``store_factory``:
    default RedisStore when ``settings.redis_url`` is set, else MemoryStore;
    ``tts``: default espeak-ng found on PATH; ``monotonic``: seconds for
    timeouts, rate limits and the memory store's TTLs (injectable for tests);
    ``cpu_meter``: what load admission reads (default CpuMeter()). Raises
    SettingsError when the default portrait file is missing, WeightsError (an
    OSError) for incomplete FantasyTalking weights.
    """
    settings = settings or Settings.from_env()
    if not settings.default_portrait.is_file():
        raise SettingsError(f"AVATAR_DEFAULT_PORTRAIT: no such file: {settings.default_portrait}")
    if settings.generator != "animator" and settings.generator_processes:
        # One loaded diffusion model serves every session; a worker process per session
        # would load its own copy of the weights.
        settings = dataclasses.replace(settings, generator_processes=False)
    generator_factory = generator_factory or default_generator_factory(settings)
    tts = tts or EspeakTts()
    metrics = ServerMetrics()
    preparing_generator = generator_factory()
    make_store = store_factory or (lambda s: _default_store(s, monotonic))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = make_store(settings)
        if settings.generator_processes:
            executor = preparation_executor(factory_module(generator_factory))
        else:
            executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="portrait-prepare")
        manager = SessionManager(
            settings, store, metrics,
            generator_factory=generator_factory, clock_factory=clock_factory, monotonic=monotonic,
            admission=LoadAdmission(cpu_meter or CpuMeter(), settings.cpu_headroom),
        )
        portraits = PortraitCache(
            store, preparing_generator,
            ttl_s=settings.portrait_ttl_s, max_pixels=settings.max_pixels, executor=executor,
        )
        app.state.server = _Server(store, manager, portraits, settings.default_portrait.read_bytes())
        reaper = asyncio.create_task(manager.run_reaper(reaper_interval_s), name="session-reaper")
        logger.info("serving with the %s store, at most %d sessions%s", store.kind, settings.max_sessions,
                    ", fewer while the CPU is busy" if settings.admit_by_load else "")
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await manager.close_all()
            await store.close()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Talking-portrait avatar server",
        version="0.1.0",
        description="One portrait photo plus speech in; a talking video out over WebRTC, in real time.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    _add_error_handlers(app)
    _add_routes(app, settings, metrics, tts, monotonic)
    return app


def _server(request: Request) -> _Server:
    return request.app.state.server


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error_response(exc.status_code, codes.get(exc.status_code, f"http_{exc.status_code}"),
                               str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal_error", "internal server error; the details are in the server log")


def _describe_validation(exc: RequestValidationError) -> str:
    """One line: 'where: problem; ...' for the first few errors."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


# Security schemes (documented in the OpenAPI schema; errors are raised by the dependencies below).
_api_key_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKeyBearer", description="the server's API key")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKeyHeader")
_session_bearer = HTTPBearer(auto_error=False, scheme_name="SessionToken", description="the session's token")


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_api_key_bearer)],
    header: Annotated[str | None, Security(_api_key_header)],
) -> None:
    """401 unless the API key (when one is set) comes as ``Authorization: Bearer``
    or ``X-API-Key``."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = header or (bearer.credentials if bearer else None)
    challenge = {"WWW-Authenticate": "Bearer"}
    if not given:
        raise ApiError(401, "missing_api_key", "this server needs an API key: send 'Authorization: Bearer <key>' "
                       "or 'X-API-Key: <key>'", challenge)
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "bad_api_key", "the API key is not valid", challenge)


async def session_from_token(
    request: Request,
    session_id: str,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_session_bearer)],
) -> LiveSession:
    """The session named in the path, when the request carries its token:
    401 without a token, 404 unknown session, 403 wrong token."""
    if bearer is None or not bearer.credentials:
        raise ApiError(401, "missing_token", "send the session token as 'Authorization: Bearer <token>'",
                       {"WWW-Authenticate": "Bearer"})
    live = _server(request).manager.get(session_id)
    if live is None:
        raise ApiError(404, "session_not_found", f"no live session {session_id!r}")
    if not live.authorized(bearer.credentials):
        raise ApiError(403, "bad_token", "the token does not belong to this session")
    return live


_IMAGE_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


def _add_routes(app: FastAPI, settings: Settings, metrics: ServerMetrics, tts: EspeakTts,
                monotonic: Callable[[], float]) -> None:
    webrtc_ready = False

    @app.post(
        "/v1/portraits", status_code=201, response_model=PortraitCreated,
        responses=_responses(401, 413, 422, 503), openapi_extra=_IMAGE_UPLOAD_BODY,
        dependencies=[Depends(require_api_key)],
    )
    async def upload_portrait(request: Request) -> PortraitCreated:
        """Upload a portrait (multipart field ``image``); it is prepared once and cached."""
        try:
            data = await read_image_field(request.headers, request.stream(), settings.max_upload_bytes)
            info = await _server(request).portraits.add(data)
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client went away during the upload") from None
        except UploadTooLarge as exc:
            raise ApiError(413, "upload_too_large", str(exc)) from None
        except PortraitRejected as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        except StoreUnavailable as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from None
        return PortraitCreated(portrait_id=info.portrait_id, width=info.width, height=info.height)

    @app.post(
        "/v1/sessions", status_code=201, response_model=SessionCreated,
        responses=_responses(401, 404, 422, 503), dependencies=[Depends(require_api_key)],
    )
    async def create_session(request: Request, body: SessionCreate) -> SessionCreated:
        """Start a session; connect media with the offer URL and control with the events URL."""
        server = _server(request)
        busy = {"Retry-After": str(RETRY_AFTER_S)}
        if body.generator is not None and body.generator != settings.generator:
            raise ApiError(422, "generator_unavailable",
                           f"this server runs the {settings.generator!r} generator, not {body.generator!r}; "
                           "ask for it or leave 'generator' out")
        try:
            server.manager.check_capacity()
            if body.portrait_id is None:
                portrait_id = (await server.portraits.add(server.default_portrait)).portrait_id
            else:
                portrait_id = body.portrait_id
            prepared = await server.portraits.get(portrait_id)
            if prepared is None:
                raise ApiError(404, "portrait_not_found",
                               f"portrait {portrait_id} is not in the cache (never uploaded, or expired); upload it again")
            live = await server.manager.create(
                prepared, portrait_id=portrait_id,
                motion=MotionSettings(face=body.motion.face, body=body.motion.body), fps=body.fps,
            )
        except SessionLimitReached as exc:
            raise ApiError(503, exc.code, str(exc), busy) from None
        except StoreUnavailable as exc:
            raise ApiError(503, "store_unavailable", f"cannot start a session: {exc}") from None
        except PortraitRejected as exc:
            raise ApiError(500, "default_portrait_unusable", f"the bundled portrait cannot be used: {exc}") from None
        base = f"/v1/sessions/{live.id}"
        return SessionCreated(session_id=live.id, token=live.token, generator=settings.generator, fps=live.fps,
                              offer_url=f"{base}/offer", events_url=f"{base}/events", ice_servers=[])

    @app.post(
        "/v1/sessions/{session_id}/offer", response_model=SdpAnswer,
        responses=_responses(400, 401, 403, 404, 409, 422, 503),
    )
    async def offer(request: Request, body: SdpOffer,
                    live: Annotated[LiveSession, Depends(session_from_token)]) -> SdpAnswer:
        """Connect media: a WebRTC offer with all candidates in, the answer with all of ours out."""
        nonlocal webrtc_ready
        if not body.sdp.lstrip().startswith("v=0"):
            raise ApiError(400, "bad_sdp", "the offer is not SDP: it must start with 'v=0'")
        if live.peer is not None and live.peer.connected:
            raise ApiError(409, "peer_connected", "a media peer is already connected to this session")
        try:
            # Imported here: aiortc is heavy, and sessions work without media (tests, WebSocket-only use).
            from server import webrtc
        except ImportError as exc:
            logger.error("WebRTC is unavailable: %s", exc)
            raise ApiError(503, "webrtc_unavailable", "WebRTC media is not available on this server") from None
        if not webrtc_ready:
            webrtc.pin_ice_host_addresses(list(settings.ice_host_addresses))
            webrtc_ready = True
        manager = _server(request).manager
        try:
            answer = await manager.connect_peer(
                live, body.sdp, functools.partial(webrtc.MediaPeer, connect_timeout_s=settings.ice_timeout_s)
            )
        except PeerConflict:
            raise ApiError(409, "peer_connected", "a media peer is already connected to this session") from None
        except ValueError as exc:
            raise ApiError(400, "bad_sdp", f"the offer cannot be used: {exc}") from None
        return SdpAnswer(sdp=answer)

    @app.delete(
        "/v1/sessions/{session_id}", status_code=204, response_class=Response,
        responses=_responses(401, 403, 404),
    )
    async def delete_session(request: Request, live: Annotated[LiveSession, Depends(session_from_token)]) -> Response:
        """End the session and free everything it holds."""
        await _server(request).manager.end(live.id, "deleted by the client")
        return Response(status_code=204)

    @app.websocket("/v1/sessions/{session_id}/events")
    async def events(websocket: WebSocket, session_id: str, token: Annotated[str | None, Query()] = None) -> None:
        server: _Server = websocket.app.state.server
        await serve_events(websocket, session_id, token, manager=server.manager, settings=settings, tts=tts,
                           monotonic=monotonic)

    @app.get("/healthz", response_model=Health)
    async def healthz(request: Request) -> Health:
        """Liveness, live sessions and whether the store answers."""
        server = _server(request)
        return Health(sessions=len(server.manager), store=server.store.kind, store_ok=await server.store.ping())

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics_text() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        page = CLIENT_DEMO / "index.html"
        if not page.is_file():
            raise ApiError(404, "not_found", "the browser demo is not installed")
        return FileResponse(page)

    app.mount("/client_demo", StaticFiles(directory=CLIENT_DEMO, check_dir=False), name="client_demo")
