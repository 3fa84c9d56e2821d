"""Rendering as a service of the viewer app: a frame source, a memory of decoded frames, and the
render and encode steps on a few worker threads.

Decoded frames (stored values, before any LUT) are kept in a bounded memory, so that changing
the window on a frame, or scrolling back through a series, costs the render and the encode
only. The render and encode run off the event loop (NumPy and Pillow release the GIL for most
of their work). An image that cannot be decoded or rendered becomes a placeholder that says
why (and the reason is logged), never an error answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from ncp.viewer.decode import Undecodable
from ncp.viewer.frames import FrameSource, ImageRef, StudyImages
from ncp.viewer.render import RenderError, Window, render
from ncp.viewer.render_output import Viewport, encode, fit, placeholder

log = logging.getLogger(__name__)

THUMBNAIL = Viewport(128, 128)
"""The size of a thumbnail when the client names none (PS3.18 leaves it to the server)."""


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    media_type: str
    placeholder: str | None = None
    """Why a placeholder was drawn instead of the image; None for the image itself."""


class FrameMemory:
    """Decoded frames by (source, SOP Instance UID, frame), least recently used dropped first
    once their bytes exceed ``max_bytes``. Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[tuple[str, str, int], NDArray[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int]) -> NDArray[Any] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str, int], frame: NDArray[Any]) -> None:
        if frame.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old.nbytes
            self._items[key] = frame
            self.used += frame.nbytes
            while self.used > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self.used -= dropped.nbytes


class RenderService:
    """Frames of ``source`` rendered to image files."""

    def __init__(self, source: FrameSource, *, memory_bytes: int, threads: int = 4) -> None:
        self.source = source
        self.memory = FrameMemory(memory_bytes)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="viewer-render")

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.source.aclose()

    async def study(self, study: str) -> StudyImages | None:
        return await self.source.study(study)

    async def decoded(self, image: ImageRef, index: int) -> NDArray[Any]:
        key = (self.source.name, image.sop, index)
        frame = self.memory.get(key)
        if frame is None:
            frame = await self.source.frame(image, index)
            self.memory.put(key, frame)
        return frame

    async def render(
        self,
        image: ImageRef,
        index: int,
        *,
        media_type: str,
        window: Window | None = None,
        viewport: Viewport | None = None,
        quality: int | None = None,
    ) -> Rendered:
        """Frame ``index`` (0-based) of ``image`` as ``media_type``, or a placeholder."""
        try:
            frame = await self.decoded(image, index)
        except Undecodable as exc:
            return await self._placeholder(image, viewport, media_type, exc.reason)
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(
                self._pool, _render_encode, image, frame, window, viewport, media_type, quality
            )
        except RenderError as exc:
            log.warning("frame %d of an image not rendered: %s", index + 1, exc)
            return await self._placeholder(image, viewport, media_type, str(exc))
        return Rendered(body, media_type)

    async def _placeholder(
        self, image: ImageRef, viewport: Viewport | None, media_type: str, reason: str
    ) -> Rendered:
        rows = _int(image.header.get("Rows"), 256)
        cols = _int(image.header.get("Columns"), 256)
        if viewport is not None:
            cols, rows = viewport.width, viewport.height
        lines = ["This image cannot be displayed", reason]
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(
            self._pool, lambda: encode(placeholder(cols, rows, lines), media_type)
        )
        return Rendered(body, media_type, placeholder=reason)


def _render_encode(
    image: ImageRef,
    frame: NDArray[Any],
    window: Window | None,
    viewport: Viewport | None,
    media_type: str,
    quality: int | None,
) -> bytes:
    try:
        shown = render(image.header, frame, window)
    except RenderError:
        raise
    except Exception as exc:  # a header pydicom cannot apply: say so on the placeholder
        raise RenderError(f"{type(exc).__name__}: {exc}"[:240]) from None
    return encode(fit(shown, viewport), media_type, quality)


def representative(images: StudyImages, series: str | None = None) -> tuple[ImageRef, int] | None:
    """The image a thumbnail shows: of ``series``, or of the study's largest series that is not
    a localizer; its middle instance, and that instance's middle frame."""
    if series is not None:
        candidates = images.of_series(series)
    else:
        groups = [images.of_series(uid) for uid in images.series_uids()]
        plain = [g for g in groups if not any(_is_localizer(i) for i in g)] or groups
        candidates = max(plain, key=len) if plain else []
    if not candidates:
        return None
    chosen = candidates[len(candidates) // 2]
    return chosen, chosen.frames // 2


def _is_localizer(image: ImageRef) -> bool:
    kinds = image.header.get("ImageType") or []
    values = [str(v).upper() for v in (kinds if isinstance(kinds, list | tuple) else list(kinds))]
    return "LOCALIZER" in values


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
