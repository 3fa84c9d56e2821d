"""The viewer's HTML: the page (filled by ``static/viewer.js``) and the readable page a refused
launch or an ended session shows. Every value is escaped; no inline script or style, so the
Content Security Policy allows scripts and styles from the viewer's own files only.

The page carries its initial data (the session's context, the study it opens, its series and
the first series' images) as a JSON data block, ``<script type="application/json">``: a data
block is never executed, so the policy's ``script-src 'self'`` stands. Its first image is an
``<img>`` with the first frame's URL, so the browser asks for it while it still reads the page,
beside the script and the style, instead of after them and after four JSON requests (decision
record ``viewer-first-image-critical-path``).
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from ncp.viewer.i18n import labels

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""No inline script or style, nothing from another origin; images from the viewer itself or
from blobs the page made of them; the page may not be framed (clickjacking)."""


def data_block(value: Any) -> str:
    """``value`` as JSON safe inside a ``<script type="application/json">`` element: no ``<``,
    ``>`` or ``&`` (a header value holding ``</script>`` cannot end the block), no line or
    paragraph separators."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for raw, safe in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, safe)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def viewer_page(
    asset_version: str,
    *,
    language: str = "en",
    initial: dict[str, Any] | None = None,
    first_image: str | None = None,
) -> str:
    """The page the script fills: studies on the left, the image with its overlays, the
    toolbar; ``initial`` its data, ``first_image`` the URL of the first frame to show."""
    v = escape(asset_version)
    words = labels(language)
    image = (
        f'<img id="image" class="image" alt="" src="{escape(first_image)}" '
        'fetchpriority="high" elementtiming="first-image">'
        if first_image
        else '<img id="image" class="image hidden" alt="">'
    )
    return f"""<!DOCTYPE html>
<html lang="{escape(language)}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{escape(words["title"])}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static/viewer.css?v={v}">
<script src="static/viewer.js?v={v}" defer></script>
<script type="application/json" id="ncp-initial">{data_block(initial or {})}</script>
</head>
<body>
<div id="app" class="app" data-state="loading">
  <header class="toolbar" role="toolbar" aria-label="tools">
    <div class="brand" id="brand">ncp</div>
    <div class="tools" id="tools"></div>
    <div class="presets" id="presets"></div>
    <div class="end" id="end"></div>
  </header>
  <nav class="sidebar" aria-label="studies">
    <div class="session" id="session"></div>
    <div id="sidebar"></div>
  </nav>
  <main class="stage" id="stage">
    <div class="viewport" id="viewport" tabindex="0">
      {image}
      <div class="overlay tl" id="ov-tl"></div>
      <div class="overlay tr" id="ov-tr"></div>
      <div class="overlay bl" id="ov-bl"></div>
      <div class="overlay br" id="ov-br"></div>
      <div class="scrollbar" id="scrollbar"><div class="thumb" id="scrollthumb"></div></div>
      <div class="message" id="message" role="status" aria-live="polite"></div>
    </div>
    <aside class="info hidden" id="info" aria-label="information"></aside>
    <div class="dialog hidden" id="help" role="dialog" aria-modal="true"></div>
  </main>
</div>
</body>
</html>
"""


def refused_page(
    language: str,
    reason: str,
    *,
    status: int,
    request_id: str,
    original: str | None = None,
    asset_version: str | None = None,
) -> str:
    """A page a person can read when a launch (or a session) is refused: no stack trace, the
    reason in their language, what to do, and for the help desk the request id and the
    reason as the audit record words it (``original``, English) when it reads otherwise."""
    words = labels(language)
    css = "static/viewer.css" + (f"?v={escape(asset_version)}" if asset_version else "")
    desk = f"HTTP {status} · {escape(request_id)}"
    if original and original != reason:
        desk += f' · <span lang="en">{escape(original)}</span>'
    return f"""<!DOCTYPE html>
<html lang="{escape(language)}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{escape(words["refused_title"])}</title>
<link rel="stylesheet" href="{css}">
</head>
<body class="refused">
<main class="refusal" role="main">
  <h1>{escape(words["refused_title"])}</h1>
  <p class="reason"><strong>{escape(words["error_code"])}:</strong> {escape(reason)}</p>
  <p>{escape(words["refused_hint"])}</p>
  <p class="request">{escape(words["help_desk"])}: {desk}</p>
</main>
</body>
</html>
"""
