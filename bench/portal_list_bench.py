"""The portal's list page in headless Chromium against a real node A: time to show the list of
300 and of 1,000 studies after the HP asks, and to apply a filter or a sort, with references
measured in the same run.

    python bench/portal_list_bench.py [--sizes 300,1000] [--repeat 9]

1. Per size, starts an A/B pair (``tests/support/pair.py``): node A over TLS with one generated
   patient of that many studies and their reports (``ncp.examples``, indexed and loaded as A's
   national systems send them), B's portal over HTTPS with the real peer client (mutual TLS to
   A). No retrieval worker: nothing is pulled.
2. Logs an HP in with password + TOTP in Debian's Chromium (Playwright, never
   ``playwright install``), identifies the patient at A and confirms the treatment relationship.
3. ``--repeat`` times each, interleaved:

   - ``show``: the HP asks for the list (navigation to ``/patients/{key}/list``) until the page's
     script has rendered it (``window.ncpList.ready``): B asks A for every page of the metadata
     list and of the manifests over mutual TLS, builds the view model, sends the page, the
     browser runs the script; ``server`` is the part until the page's first byte (B and A),
     ``script`` the list script's own part;
   - ``peer_fetch`` (reference): the same two questions to A by B's peer client in this process,
     without a page (what asking A costs);
   - ``filter``: modality = CT plus a word, applied and laid out, every row in view placed (a
     forced layout after); ``sort``: by size, ascending, likewise;
   - ``reference_rows``: a fresh table of the same number of rows and cells of plain text
     inserted and laid out in the same page (the browser's bare cost of that many rows).

Prints one JSON object: p50 and p95 in ms of each, and ratios. Goal (issue 17): a filter or a
sort of 1,000 rows under 100 ms, to the last row shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyotp  # noqa: E402
from sqlalchemy import select  # noqa: E402

from ncp.portal.patients import Confirmed, confirmed_entry  # noqa: E402
from ncp.portal.peering import PortalPeers  # noqa: E402
from ncp.store.portal import PortalSession  # noqa: E402
from tests.support.pair import running_pair  # noqa: E402
from tests.support.portal import PASSWORD  # noqa: E402

FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

MEASURE = """async (kind) => {
  const layout = () => document.body.offsetHeight;
  const t0 = performance.now();
  const change = {
    filter: {modality: 'CT', text: 'contrast'},
    sort: {sort: 'size', dir: 1},
    reset: {modality: '', text: '', sort: 'started', dir: -1},
  }[kind];
  if (change) {
    window.ncpList.set(change); layout();
    return performance.now() - t0;
  }
  if (kind === 'reference_rows') {
    const n = window.ncpList.rows, table = document.createElement('table');
    const body = table.createTBody();
    for (let i = 0; i < n; i++) {
      const tr = document.createElement('tr');
      for (let c = 0; c < 12; c++) { const td = document.createElement('td');
        td.textContent = 'cell ' + i + ' ' + c; tr.appendChild(td); }
      body.appendChild(tr);
    }
    document.body.appendChild(table); layout();
    const took = performance.now() - t0; table.remove(); return took;
  }
}"""

TIMING = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  return {show: window.ncpList.readyAt - nav.startTime, server: nav.responseStart - nav.startTime,
          script: window.ncpList.renderMs};
}"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 2), "p95": pct(values, 0.95)}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def measure(size: int, repeat: int, work: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    with running_pair(work / f"pair-{size}", studies=size, worker=False) as pair:
        setup_s = time.monotonic() - started
        secret = pair.add_hp("dr.bench", name="Dr. Bench Mark", language="en-BE")
        found: dict[str, list[float]] = {
            k: [] for k in ("show", "server", "script", "peer_fetch", "filter", "sort",
                            "reference_rows")
        }  # fmt: skip
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1366, "height": 768}
            ).new_page()
            page.goto(f"{pair.url}/login")
            page.fill("#username", "dr.bench")
            page.fill("#password", PASSWORD)
            page.click("form[action='/login'] button[type=submit]")
            page.wait_for_url(f"{pair.url}/login/totp")
            page.fill("#code", pyotp.TOTP(secret).now())
            page.click("form[action='/login/totp'] button[type=submit]")
            page.wait_for_url(f"{pair.url}/")
            patient = pair.patient
            page.fill("#identifier", patient.patient_id)
            page.fill("#family", patient.family)
            page.fill("#birth_date", patient.birth_date.isoformat())
            page.click("form[action='/identify'] button[type=submit]")
            page.locator("input[name=relationship]").check()
            page.locator("input[name=informed]").check()
            page.click("form[action='/confirm'] button[type=submit]")
            page.wait_for_url(re.compile(r".*/list$"), timeout=120_000)
            list_url = page.url
            key = list_url.split("/")[-2]
            peers = PortalPeers.from_node(pair.b, pair.b.clock)
            confirmed = _confirmed(pair, key)
            for _ in range(repeat):
                page.goto(list_url, timeout=120_000)
                while not page.evaluate("() => Boolean(window.ncpList && window.ncpList.ready)"):
                    time.sleep(0.01)
                assert page.evaluate("() => window.ncpList.rows") == size
                timing = page.evaluate(TIMING)
                for k in ("show", "server", "script"):
                    found[k].append(timing[k])
                t0 = time.perf_counter()
                peers.patient_list(confirmed)
                found["peer_fetch"].append((time.perf_counter() - t0) * 1000)
                for kind in ("filter", "reset", "sort", "reset", "reference_rows"):
                    took = page.evaluate(MEASURE, kind)
                    if kind != "reset":
                        found[kind].append(took)
            peers.close()
            browser.close()
    stats: dict[str, Any] = {k: summary(v) for k, v in found.items()}
    ref = stats["reference_rows"]["p50"] or 1
    stats["ratio_filter_to_reference"] = round(stats["filter"]["p50"] / ref, 3)
    stats["ratio_sort_to_reference"] = round(stats["sort"]["p50"] / ref, 3)
    stats["ratio_show_to_peer_fetch"] = round(
        stats["show"]["p50"] / (stats["peer_fetch"]["p50"] or 1), 2
    )
    stats["pair_setup_s"] = round(setup_s, 1)
    return stats


def _confirmed(pair: Any, key: str) -> Confirmed:
    """The confirmation the HP's session holds (the portal keeps it server-side)."""
    with pair.b.sessions() as session:
        for row in session.scalars(select(PortalSession).where(PortalSession.state == "active")):
            entry = (row.data or {}).get("patients", {}).get(key)
            if entry is not None:
                return confirmed_entry(key, entry)
    raise AssertionError("no session holds the confirmation")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="300,1000")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
            "python": platform.python_version(),
        },
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            out["sizes"][str(n)] = measure(n, args.repeat, Path(tmp))
    out["machine"]["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
