"""The viewer's HTML: the page shell (filled by ``static/viewer.js``) and the readable page a
refused launch or an ended session shows. Every value is escaped; no inline script or style,
so the Content Security Policy allows scripts and styles from the viewer's own files only.
"""

from __future__ import annotations

from html import escape

from ncp.viewer.i18n import labels

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""No inline script or style, nothing from another origin; images from the viewer itself or
from blobs the page made of them; the page may not be framed (clickjacking)."""


def viewer_page(asset_version: str) -> str:
    """The shell the script fills: studies on the left, the image with its overlays, the
    toolbar. The language and every label come with the session's context."""
    v = escape(asset_version)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>ncp viewer</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static/viewer.css?v={v}">
<script src="static/viewer.js?v={v}" defer></script>
</head>
<body>
<div id="app" class="app" data-state="loading">
  <header class="toolbar" role="toolbar" aria-label="tools">
    <div class="brand" id="brand">ncp</div>
    <div class="tools" id="tools"></div>
    <div class="presets" id="presets"></div>
  </header>
  <nav class="sidebar" aria-label="studies">
    <div class="session" id="session"></div>
    <div id="sidebar"></div>
  </nav>
  <main class="stage" id="stage">
    <div class="viewport" id="viewport" tabindex="0">
      <img id="image" class="image" alt="">
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


def refused_page(language: str, reason: str, *, status: int, request_id: str) -> str:
    """A page a person can read when a launch (or a session) is refused: no stack trace, the
    reason, what to do, the request id for the help desk."""
    words = labels(language)
    return f"""<!DOCTYPE html>
<html lang="{escape(language)}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{escape(words["refused_title"])}</title>
<link rel="stylesheet" href="static/viewer.css">
</head>
<body class="refused">
<main class="refusal" role="main">
  <h1>{escape(words["refused_title"])}</h1>
  <p class="reason"><strong>{escape(words["error_code"])}:</strong> {escape(reason)}</p>
  <p>{escape(words["refused_hint"])}</p>
  <p class="request">HTTP {status} · {escape(request_id)}</p>
</main>
</body>
</html>
"""
