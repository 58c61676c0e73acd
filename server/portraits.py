"""Portrait uploads: bounded reading, header checks, preparation and the cache.

A prepared portrait depends only on the image bytes and the generator's name
and version, so it is cached in the session store under
``portrait:{sha256}:{generator}:{version}`` as ``PreparedPortrait.to_bytes``
(an .npz of plain arrays, never pickle) and never prepared twice while the
cache holds it. Preparation (MediaPipe, about a second) runs in an executor so
the event loop keeps serving live sessions: a worker process when generators
run in worker processes (in a thread it holds the interpreter lock for up to
0.2 s at a time and stalls every live session), else a thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import logging
import warnings
from collections.abc import AsyncIterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from model.base import Generator, PreparedPortrait
from model.errors import NoFaceError, PortraitError
from model.portrait import MIN_SIDE, load_portrait

logger = logging.getLogger(__name__)

#: Room for the multipart boundaries and part headers around the image, bytes.
MULTIPART_OVERHEAD = 16 * 1024
ACCEPTED_IMAGES = "PNG, JPEG, WebP or BMP"


class UploadTooLarge(ValueError):
    """The request body is larger than the upload limit."""


class PortraitRejected(ValueError):
    """The upload is not a usable portrait. ``code``: ``not_multipart``,
    ``missing_image``, ``not_an_image``, ``too_many_pixels``, ``too_small``,
    ``no_face`` or ``unusable_portrait`` (the generator refused it, e.g. a face
    too small); the message says what was wrong and what is accepted."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PortraitInfo:
    """An accepted portrait: ``portrait_id`` the sha256 hex of its bytes, its
    size in pixels as uploaded."""

    portrait_id: str
    width: int
    height: int


async def read_image_field(
    headers: Headers, body: AsyncIterator[bytes], max_image_bytes: int
) -> bytes:
    """The bytes of the ``image`` field of a multipart/form-data request.

    Reads at most ``max_image_bytes + MULTIPART_OVERHEAD`` bytes of ``body``
    and stops reading as soon as that is passed (a declared Content-Length over
    it is refused before reading anything). Raises UploadTooLarge, or
    PortraitRejected (``not_multipart``, ``missing_image``) for a body that is
    not a form with an image part.
    """
    limit = max_image_bytes + MULTIPART_OVERHEAD
    too_large = UploadTooLarge(f"the upload is larger than the limit of {max_image_bytes} bytes")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise PortraitRejected(
            "not_multipart", "send the image as multipart/form-data with the file in a field named 'image'"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)

    async def replay() -> AsyncIterator[bytes]:
        yield b"".join(chunks)

    try:
        form = await MultiPartParser(headers, replay(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise PortraitRejected("not_multipart", f"the multipart form cannot be parsed: {exc.message}") from None
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise PortraitRejected("missing_image", "the form has no file field named 'image'")
        data = await image.read()
    finally:
        await form.close()
    if len(data) > max_image_bytes:
        raise too_large
    return data


def check_image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Width and height (pixels) of encoded image bytes, read from the header
    only: nothing is decoded, so a huge image costs nothing here. Raises
    PortraitRejected ``not_an_image``, ``too_many_pixels`` (over ``max_pixels``
    = width x height) or ``too_small`` (short side under
    ``model.portrait.MIN_SIDE`` pixels)."""
    too_many = f"at most {max_pixels} pixels (width x height) are accepted"
    try:
        with warnings.catch_warnings():
            # PIL warns about decompression bombs; the pixel limit below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError:
        # Over twice PIL's own limit, which is above any max_pixels the settings allow.
        raise PortraitRejected("too_many_pixels", f"the image is a decompression bomb; {too_many}") from None
    except Exception as exc:  # PIL raises many types for malformed headers; any of them means "not an image"
        logger.debug("upload is not an image: %s: %s", type(exc).__name__, exc)
        raise PortraitRejected(
            "not_an_image", f"the upload is not a readable image; accepted: {ACCEPTED_IMAGES}"
        ) from None
    if width * height > max_pixels:
        raise PortraitRejected(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height} pixels; {too_many}",
        )
    if min(width, height) < MIN_SIDE:
        raise PortraitRejected(
            "too_small", f"the image is {width}x{height} pixels; the short side must be at least {MIN_SIDE} pixels"
        )
    return width, height


class PortraitCache:
    """Prepares portraits with ``generator`` and caches them in ``store``.

    ``executor``: where decoding and ``generator.prepare`` run (default: the
    loop's default thread pool; a process pool needs a picklable generator).
    Concurrent requests for the same portrait share one preparation. Store
    failures propagate as StoreUnavailable.
    """

    def __init__(
        self,
        store,
        generator: Generator,
        *,
        ttl_s: float,
        max_pixels: int,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self._store = store
        self._generator = generator
        self._ttl_s = ttl_s
        self._max_pixels = max_pixels
        self._executor = executor
        self._locks: dict[str, asyncio.Lock] = {}

    def key(self, portrait_id: str) -> str:
        """The store key of a portrait prepared by this cache's generator."""
        return f"portrait:{portrait_id}:{self._generator.name}:{self._generator.version}"

    async def add(self, data: bytes) -> PortraitInfo:
        """Check, prepare (unless cached) and cache encoded image bytes.

        Raises PortraitRejected (``not_an_image``, ``too_many_pixels``,
        ``too_small``, ``no_face``, ``unusable_portrait``) and StoreUnavailable.
        """
        width, height = check_image_header(data, self._max_pixels)
        info = PortraitInfo(hashlib.sha256(data).hexdigest(), width, height)
        key = self.key(info.portrait_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if await self._store.get(key) is None:
                    prepared = await self._prepare(data)
                    await self._store.set(key, prepared.to_bytes(), self._ttl_s)
                    logger.info("prepared portrait %s (%dx%d)", info.portrait_id[:12], width, height)
                else:
                    logger.debug("portrait %s already prepared", info.portrait_id[:12])
        finally:
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]
        return info

    async def get(self, portrait_id: str) -> PreparedPortrait | None:
        """The cached prepared portrait, or None when not cached (or expired).
        Raises StoreUnavailable."""
        data = await self._store.get(self.key(portrait_id))
        if data is None:
            return None
        try:
            return PreparedPortrait.from_bytes(data)
        except ValueError:
            logger.error("cache entry of portrait %s is corrupt; treated as absent", portrait_id[:12])
            return None

    async def _prepare(self, data: bytes) -> PreparedPortrait:
        loop = asyncio.get_running_loop()
        try:
            try:
                return await loop.run_in_executor(self._executor, prepare_image_bytes, self._generator, data)
            except BrokenProcessPool:
                # The preparation process died (it is not restarted): prepare in a thread,
                # which stalls live sessions for a moment but keeps uploads working.
                logger.error("the portrait preparation process died; preparing in a thread from now on")
                self._executor = None
                return await loop.run_in_executor(None, prepare_image_bytes, self._generator, data)
        except NoFaceError as exc:
            raise PortraitRejected("no_face", str(exc)) from None
        except PortraitError as exc:
            raise PortraitRejected("unusable_portrait", str(exc)) from None


def prepare_image_bytes(generator: Generator, data: bytes) -> PreparedPortrait:
    """Decode encoded image bytes and prepare them with ``generator`` (a module
    function, so a process pool can run it). Raises PortraitError / NoFaceError."""
    return generator.prepare(load_portrait(data))
