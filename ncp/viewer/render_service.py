"""Rendering as a service of the viewer app: a frame source, a memory of decoded frames, and the
render and encode steps on a few worker threads.

Decoded frames (stored values, before any LUT) are kept in a bounded memory, so that changing
the window on a frame, or scrolling back through a series, costs the render and the encode
only. The render and encode run off the event loop (NumPy and Pillow release the GIL for most
of their work). An image that cannot be decoded or rendered becomes a placeholder that says
why (and the reason is logged), never an error answer.

The first pass over a series is what an HP waits for, so the service decodes ahead: once a
series opens or one of its frames is asked for, the next frames in the direction of travel
(and a few behind) are decoded in the background (:meth:`RenderService.read_ahead`), a few at
a time, newest wishes first, into the same bounded memory. A frame is loaded once however many
ask for it at the same moment (a request and the read-ahead share one load), and a study's
headers are read once however many requests wait for them (:meth:`RenderService.study`).
:meth:`RenderService.warm` starts both for a launch before the page asks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from ncp.errors import ArchiveError
from ncp.viewer.decode import Undecodable
from ncp.viewer.dicomjson import instance_json
from ncp.viewer.frames import FrameSource, ImageRef, StudyImages
from ncp.viewer.i18n import labels
from ncp.viewer.render import RenderError, Window, pixel_aspect, render
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

    def __contains__(self, key: tuple[str, str, int]) -> bool:
        """Whether ``key`` is held, without making it the most recently used."""
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

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
    """Frames of ``source`` rendered to image files.

    ``read_ahead``: how many frames of a series to decode ahead of the one asked for (0: none);
    at most a quarter of the memory's bytes are ever asked for ahead. ``parallel``: how many
    read-ahead loads run at once (default: the source's ``parallel_reads``, else 2).
    """

    def __init__(
        self,
        source: FrameSource,
        *,
        memory_bytes: int,
        threads: int = 4,
        read_ahead: int = 8,
        parallel: int | None = None,
    ) -> None:
        self.source = source
        self.memory = FrameMemory(memory_bytes)
        self.read_ahead_frames = max(0, read_ahead)
        self.parallel = max(1, parallel or int(getattr(source, "parallel_reads", 2)))
        self.loads = 0
        """Frames loaded from the source since the start (for tests and the benchmark)."""
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="viewer-render")
        self._loading: dict[tuple[str, str, int], asyncio.Task[NDArray[Any]]] = {}
        self._studies: dict[str, asyncio.Task[StudyImages | None]] = {}
        self._streams: dict[tuple[str, str], asyncio.Task[Any]] = {}
        """Series being read in one stream (a DICOMweb source), by (study, series)."""
        self._wanted: deque[tuple[ImageRef, int]] = deque()
        self._workers = 0
        self._orders: OrderedDict[
            tuple[int, str],
            tuple[StudyImages, list[tuple[ImageRef, int]], dict[tuple[str, int], int]],
        ] = OrderedDict()
        self._last: OrderedDict[str, int] = OrderedDict()
        """The position last asked for in each recent series: the direction of travel."""
        self._background: set[asyncio.Task[Any]] = set()

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        self._wanted.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.source.aclose()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def study(self, study: str) -> StudyImages | None:
        """The study's images; one read of the source however many ask at once."""
        known = getattr(self.source, "known", None)
        if known is not None:
            hit, images = known(study)
            if hit:  # in the source's memory: no task for it
                return images  # type: ignore[no-any-return]
        task = self._studies.get(study)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.get_running_loop().create_task(self.source.study(study))
            self._studies[study] = task
            task.add_done_callback(_retrieved)
            task.add_done_callback(lambda _: self._studies.pop(study, None))
        return await asyncio.shield(task)

    def _key(self, image: ImageRef, index: int) -> tuple[str, str, int]:
        return (self.source.name, image.sop, index)

    async def decoded(self, image: ImageRef, index: int) -> NDArray[Any]:
        frame = self.memory.get(self._key(image, index))
        if frame is not None:
            return frame
        # Shielded: a request that goes away does not cancel a load others wait for.
        return await asyncio.shield(self._load_task(image, index))

    def _load_task(self, image: ImageRef, index: int) -> asyncio.Task[NDArray[Any]]:
        """The one load of a frame: started now, or the one already under way."""
        key = self._key(image, index)
        task = self._loading.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.get_running_loop().create_task(self._load(key, image, index))
            self._loading[key] = task
            # A load nobody awaits any more (its request went away) still ends quietly.
            task.add_done_callback(_retrieved)
        return task

    async def _load(self, key: tuple[str, str, int], image: ImageRef, index: int) -> NDArray[Any]:
        try:
            frame = await self.source.frame(image, index)
            self.loads += 1
            self.memory.put(key, frame)
            return frame
        finally:
            self._loading.pop(key, None)

    # -- reading ahead -------------------------------------------------------------------------

    def read_ahead(
        self, images: StudyImages, image: ImageRef, index: int, *, this_one: bool = False
    ) -> None:
        """Decode the neighbours of frame ``index`` of ``image`` in its series, in the
        background: ``read_ahead`` frames in the direction of travel, half as many the other
        way, nearest first (``this_one``: that frame too, for a series just opened)."""
        if self.read_ahead_frames == 0 or self.memory.max_bytes == 0:
            return
        frames, where = self._series_frames(images, image.series)
        here = where.get((image.sop, index))
        if here is None:
            return
        if this_one and self._stream(
            images, image.series, sum(1 for m, f in frames if self._key(m, f) not in self.memory)
        ):
            # The series comes in one stream: only the frame asked for is loaded on its own.
            self._want([frames[here]])
            return
        if (images.study, image.series) in self._streams:
            return
        last = self._last.pop(image.series, None)
        self._last[image.series] = here
        while len(self._last) > 64:
            self._last.popitem(last=False)
        # Never ask ahead for more than a quarter of the memory: what is read ahead must
        # still be there when it is asked for.
        fits = self.memory.max_bytes // 4 // max(1, _frame_bytes(image))
        ahead = min(self.read_ahead_frames, fits)
        behind = ahead // 2
        step = -1 if last is not None and here < last else 1
        order: list[int] = [here] if this_one else []
        for d in range(1, ahead + 1):
            order.append(here + step * d)
            if d <= behind:
                order.append(here - step * d)
        self._want([frames[p] for p in order if 0 <= p < len(frames)])

    def _series_frames(
        self, images: StudyImages, series: str
    ) -> tuple[list[tuple[ImageRef, int]], dict[tuple[str, int], int]]:
        """The frames of a series in viewing order and where each is; made once per listed
        study and series (a request asks for its neighbours many times a second)."""
        key = (id(images), series)
        found = self._orders.get(key)
        if found is not None and found[0] is images:
            self._orders.move_to_end(key)
            return found[1], found[2]
        frames = [(m, f) for m in images.of_series(series) for f in range(m.frames)]
        where = {(m.sop, f): p for p, (m, f) in enumerate(frames)}
        # The entry holds the study itself, so its id() cannot name another one meanwhile.
        self._orders[key] = (images, frames, where)
        while len(self._orders) > 16:
            self._orders.popitem(last=False)
        return frames, where

    def _want(self, frames: list[tuple[ImageRef, int]]) -> None:
        wanted = [
            (image, index)
            for image, index in frames
            if self._key(image, index) not in self.memory
            and self._key(image, index) not in self._loading
        ]
        if not wanted:
            return
        # The newest wishes go first; old ones beyond a few screens are dropped.
        self._wanted.extendleft(reversed(wanted))
        while len(self._wanted) > 4 * max(self.read_ahead_frames, 1) + 1:
            self._wanted.pop()
        while self._workers < self.parallel and self._wanted:
            self._workers += 1
            self._spawn(self._read_ahead_worker())

    def _stream(self, images: StudyImages, series: str, missing: int) -> bool:
        """Start reading a whole series in one request when the source can (a DICOMweb
        archive: ``stream_series``) and it is worth it (more frames missing from the memory
        than a read-ahead asks for), up to a quarter of the memory. True while such a stream
        runs for the series."""
        stream = getattr(self.source, "stream_series", None)
        key = (images.study, series)
        if key in self._streams:
            return True
        if stream is None or missing <= self.read_ahead_frames:
            return False
        budget = self.memory.max_bytes // 4
        used = 0

        def keep(image: ImageRef, index: int, frame: NDArray[Any]) -> bool:
            nonlocal used
            held = self._key(image, index)
            if held not in self.memory:
                self.memory.put(held, frame)
                self.loads += 1
            used += frame.nbytes
            return used < budget

        while len(self._streams) >= 2:  # an older series' stream gives way
            self._streams.pop(next(iter(self._streams))).cancel()
        task = self._spawn(stream(images, series, keep))
        self._streams[key] = task
        task.add_done_callback(lambda _: self._streams.pop(key, None))
        return True

    async def _read_ahead_worker(self) -> None:
        try:
            while self._wanted:
                image, index = self._wanted.popleft()
                key = self._key(image, index)
                if key in self.memory or key in self._loading:
                    continue
                try:
                    await self.decoded(image, index)
                except (Undecodable, ArchiveError):
                    continue  # the request for it, if any, says why
                except Exception:
                    log.exception("reading a frame ahead failed")
        finally:
            self._workers -= 1

    def warm(self, studies: Sequence[str], *, first: str | None = None) -> None:
        """Read the headers of ``studies`` in the background, ``first`` first, and decode the
        first frames of its first series: what a page opened next will ask for."""
        order = ([first] if first else []) + [s for s in studies if s != first]
        if order:
            self._spawn(self._warm(order, first))

    async def _warm(self, order: list[str], first: str | None) -> None:
        for study in order:
            try:
                images = await self.study(study)
            except ArchiveError as exc:
                log.warning("warming study headers failed: %s", exc)
                return
            if study == first and images is not None and images.images:
                members = images.of_series(images.series_uids()[0])
                self.read_ahead(images, members[0], 0, this_one=True)
                # The first series' list, which the page asks for next, made meanwhile.
                await asyncio.to_thread(_listed, members)

    def stats(self) -> dict[str, int]:
        """What the service holds now: frames decoded since the start, frames and bytes kept."""
        return {
            "loads": self.loads,
            "frames_kept": len(self.memory),
            "bytes_kept": self.memory.used,
            "bytes_max": self.memory.max_bytes,
            "loading": len(self._loading),
        }

    async def render(
        self,
        image: ImageRef,
        index: int,
        *,
        media_type: str,
        window: Window | None = None,
        viewport: Viewport | None = None,
        quality: int | None = None,
        study: StudyImages | None = None,
        language: str = "en",
    ) -> Rendered:
        """Frame ``index`` (0-based) of ``image`` as ``media_type``, or a placeholder (its
        first line in ``language``). ``study``: the image's study, whose series is then read
        ahead from this frame."""
        kept = self.memory.get(self._key(image, index))
        # This frame's load starts before the read-ahead asks for its neighbours.
        loading = None if kept is not None else self._load_task(image, index)
        if study is not None:
            self.read_ahead(study, image, index)
        try:
            if loading is None:
                assert kept is not None
                frame = kept
            else:
                frame = await asyncio.shield(loading)
        except Undecodable as exc:
            return await self._placeholder(image, viewport, media_type, exc.reason, language)
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(
                self._pool, _render_encode, image, frame, window, viewport, media_type, quality
            )
        except RenderError as exc:
            log.warning("frame %d of an image not rendered: %s", index + 1, exc)
            return await self._placeholder(image, viewport, media_type, str(exc), language)
        return Rendered(body, media_type)

    async def _placeholder(
        self,
        image: ImageRef,
        viewport: Viewport | None,
        media_type: str,
        reason: str,
        language: str = "en",
    ) -> Rendered:
        rows = _int(image.header.get("Rows"), 256)
        cols = _int(image.header.get("Columns"), 256)
        if viewport is not None:
            cols, rows = viewport.width, viewport.height
        # The decoder's reason stays as it says it (it is for the help desk and the log).
        lines = [labels(language)["placeholder"], reason]
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
    aspect = pixel_aspect(image.header) if viewport is not None else 1.0
    return encode(fit(shown, viewport, aspect), media_type, quality)


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


def _frame_bytes(image: ImageRef) -> int:
    """About how many bytes one decoded frame of ``image`` takes."""
    rows = _int(image.header.get("Rows"), 512)
    cols = _int(image.header.get("Columns"), 512)
    samples = _int(image.header.get("SamplesPerPixel"), 1)
    bits = _int(image.header.get("BitsAllocated"), 16)
    return rows * cols * samples * max(1, bits // 8)


def _listed(members: list[ImageRef]) -> None:
    for image in members:
        instance_json(image)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
