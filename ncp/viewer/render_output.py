"""Display values to an image file: the PS3.18 rendered-resource parameters (``viewport``,
``quality``, the media type) and the placeholder shown for an image that cannot be rendered.

Media types: ``image/jpeg`` (the default, as PS3.18 8.7.4 makes it for rendered images),
``image/png`` (lossless: what the viewer shows once the user stops scrolling) and
``image/webp``. Encoding is Pillow's.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ncp.viewer.render import FUNCTIONS, Display, Window

MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp")
DEFAULT_QUALITY = 90
MAX_VIEWPORT = 4096
_PIL_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
_WINDOW_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
"""PS3.18 8.3.5.1.4 writes the VOI LUT functions in lower case with a hyphen."""
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\Z")


class BadParameter(ValueError):
    """A rendered-resource query parameter that cannot be honoured (400). ``template`` is the
    English text with ``{name}`` fields, ``params`` their values (translated for the person
    refused by :func:`ncp.viewer.i18n.reason_in`)."""

    def __init__(self, template: str, **params: object) -> None:
        super().__init__(template.format(**params) if params else template)
        self.template = template
        self.params = params


class NotAcceptable(BadParameter):
    """No media type the client accepts can be produced (406)."""


@dataclass(frozen=True, slots=True)
class Viewport:
    """PS3.18 8.3.5.1.3: the output fits ``width`` x ``height``; ``region`` (x, y, w, h) is the
    part of the image shown (from x, y over |w| x |h| pixels), a negative w or h flipping it."""

    width: int
    height: int
    region: tuple[int, int, int, int] | None = None


def parse_window(text: str) -> Window:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4)."""
    parts = text.split(",")
    if len(parts) not in (2, 3) or not all(_NUMBER.match(p.strip()) for p in parts[:2]):
        raise BadParameter("window must be center,width[,function] with numbers")
    function = _WINDOW_FUNCTIONS.get(parts[2].strip().lower(), "") if len(parts) == 3 else "LINEAR"
    if function not in FUNCTIONS:
        raise BadParameter("the window function must be linear, linear-exact or sigmoid")
    center, width = float(parts[0]), float(parts[1])
    if not (math.isfinite(center) and math.isfinite(width)):
        raise BadParameter("window centre and width must be finite numbers")
    # C.11.2.1.2: LINEAR needs a width of at least 1, the others a positive width.
    if function == "LINEAR" and width < 1:
        raise BadParameter("a linear window's width must be at least 1")
    if width <= 0:
        raise BadParameter("the window's width must be positive")
    return Window(center, width, function)


def parse_viewport(text: str) -> Viewport:
    """``viewport=vw,vh`` or ``vw,vh,sx,sy,sw,sh``."""
    parts = text.split(",")
    if len(parts) not in (2, 6) or not all(re.fullmatch(r"-?\d{1,6}", p.strip()) for p in parts):
        raise BadParameter("viewport must be vw,vh or vw,vh,sx,sy,sw,sh in whole pixels")
    values = [int(p) for p in parts]
    width, height = values[0], values[1]
    if not (0 < width <= MAX_VIEWPORT and 0 < height <= MAX_VIEWPORT):
        raise BadParameter("viewport width and height must be 1 to {largest}", largest=MAX_VIEWPORT)
    region = None
    if len(values) == 6:
        sx, sy, sw, sh = values[2:]
        if sx < 0 or sy < 0 or sw == 0 or sh == 0:
            raise BadParameter("the viewport's source region must start inside the image")
        region = (sx, sy, sw, sh)
    return Viewport(width, height, region)


def parse_quality(text: str) -> int:
    if not re.fullmatch(r"\d{1,3}", text) or not 1 <= int(text) <= 100:
        raise BadParameter("quality must be a whole number from 1 to 100")
    return int(text)


def choose_media_type(accept: str | None) -> str:
    """The media type to answer from an Accept header or ``accept`` parameter (q-values
    honoured; ``image/*`` and ``*/*`` give JPEG); NotAcceptable when none can be made."""
    if not accept or not accept.strip():
        return MEDIA_TYPES[0]
    ranked: list[tuple[float, int, str]] = []
    for order, item in enumerate(accept.split(",")):
        fields = [f.strip() for f in item.split(";")]
        kind = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if kind in MEDIA_TYPES:
            ranked.append((-q, order, kind))
        elif kind in ("image/*", "*/*"):
            ranked.append((-q, order, MEDIA_TYPES[0]))
    if not ranked:
        raise NotAcceptable(
            "rendered images are offered as {types} only, never as DICOM",
            types=", ".join(MEDIA_TYPES),
        )
    return min(ranked)[2]


def fit(image: Display, viewport: Viewport | None, aspect: float = 1.0) -> Display:
    """``image`` cut to the viewport's region and scaled to fit it, keeping the aspect ratio
    of what it shows: ``aspect`` is how much taller than wide a pixel is
    (:func:`~ncp.viewer.render.pixel_aspect`), so non-square pixels come out square."""
    if viewport is None:
        return image
    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        rows, cols = image.shape[:2]
        if sx >= cols or sy >= rows:
            raise BadParameter("the viewport's source region starts outside the image")
        # The region starts at (sx, sy) and spans |sw| x |sh|; a negative size flips it.
        cut = image[sy : min(sy + abs(sh), rows), sx : min(sx + abs(sw), cols)]
        if cut.size == 0:
            raise BadParameter("the viewport's source region holds no pixels")
        if sw < 0:
            cut = cut[:, ::-1]
        if sh < 0:
            cut = cut[::-1]
        image = np.ascontiguousarray(cut)
    rows, cols = image.shape[:2]
    scale = min(viewport.width / cols, viewport.height / (rows * aspect))
    size = (max(1, round(cols * scale)), max(1, round(rows * aspect * scale)))
    if size == (cols, rows):
        return image
    shrinks = size[0] < cols or size[1] < rows
    resample = Image.Resampling.LANCZOS if shrinks else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, resample))


def encode(image: Display, media_type: str, quality: int | None = None) -> bytes:
    """``image`` as a file of ``media_type``. PNG is lossless whatever the quality; WebP with
    quality 100 is lossless too."""
    picture = Image.fromarray(image)
    out = io.BytesIO()
    kind = _PIL_FORMATS[media_type]
    q = DEFAULT_QUALITY if quality is None else quality
    if kind == "JPEG":
        # No chroma subsampling at high quality: colour edges (ultrasound overlays) stay sharp.
        picture.save(out, kind, quality=q, subsampling=0 if q >= 90 else 2)
    elif kind == "PNG":
        # Level 1: most of the size gain at a fraction of the default level's time.
        picture.save(out, kind, compress_level=1)
    else:
        picture.save(out, kind, quality=q, lossless=q == 100, method=0)
    return out.getvalue()


def placeholder(width: int, height: int, lines: list[str]) -> Display:
    """A dark image saying why nothing can be shown (an image that cannot be decoded)."""
    width, height = max(64, min(width, 1024)), max(64, min(height, 1024))
    picture = Image.new("L", (width, height), 40)
    draw = ImageDraw.Draw(picture)
    size = max(9, min(16, width // 24))
    font = ImageFont.load_default(size=size)
    draw.rectangle((2, 2, width - 3, height - 3), outline=110, width=2)
    y = max(6, height // 2 - len(lines) * (size + 4) // 2)
    for line in lines:
        text = _printable(line)
        # Long reasons are cut to the width (a few characters per font size).
        limit = max(8, int(width / (size * 0.55)))
        text = text if len(text) <= limit else text[: limit - 1] + "…"
        box = draw.textbbox((0, 0), text, font=font)
        draw.text(((width - (box[2] - box[0])) / 2, y), text, fill=220, font=font)
        y += size + 4
    return np.asarray(picture)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:300]
