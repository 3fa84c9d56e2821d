"""The portal's list page in headless Chromium: time to show 300 and 1,000 studies from the
view model, and to apply a filter or a sort, against the browser's bare time to insert the
same number of plain table rows, measured in the same run.

    python bench/portal_list_bench.py [--sizes 300,1000] [--repeat 15] [--cache DIR]

1. Generates one patient per size (``tests/support/portal_data.py``: ``ncp.examples``, indexed
   and listed by country A's own search and entry renderer) and builds the view model
   (``ncp.portal.listview.build_list``) in English.
2. Serves B's portal over HTTPS (``tests/support/portal.py``), logs in with password + TOTP in
   Debian's Chromium (Playwright, never ``playwright install``).
3. Per size, ``--repeat`` times each, interleaved:

   - ``show``: navigation to the list page until its script has rendered every row
     (``window.ncpList.ready``), timed by the browser (navigation start to ready, from the
     Navigation Timing entry and ``performance.now()``: request, HTML, parse, script);
   - ``script``: the list script's own part of it (building every row from the view model,
     sorting, first render);
   - ``filter``: modality = CT plus a text word, applied and laid out (a forced layout after):
     the first screenful of rows, what the HP sees; ``filter_all_rows``: until every matching
     row is in the table (the rest is appended in chunks on the next animation frames);
   - ``sort``: by size (ascending), likewise, and ``sort_all_rows``;
   - ``reference_rows``: a fresh table of the same number of rows and cells of plain text
     inserted and laid out in the same page (the browser's bare cost of that many rows).

Prints one JSON object: p50 and p95 in ms of each, and the ratios of filter and sort to the
reference. Goal (issue 17): filter and sort under 100 ms for 1,000 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncp.portal.i18n import Translator  # noqa: E402
from ncp.portal.listview import ListContext, build_list  # noqa: E402
from tests.support.portal import (  # noqa: E402
    PASSWORD,
    Clock,
    add_hp,
    portal_node,
    serve_portal,
    totp_now,
)
from tests.support.portal_data import generated_list  # noqa: E402

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
    const first = performance.now() - t0;
    await window.ncpList.whenComplete(); layout();
    return [first, performance.now() - t0];
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
    const took = performance.now() - t0; table.remove(); return [took, took];
  }
}"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 2), "p95": pct(values, 0.95)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="300,1000")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--cache", type=Path, help="keep the generated lists here between runs (default: none)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
            "python": platform.python_version(),
        },
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {}
        cache = args.cache or work
        cache.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            g = generated_list(cache, studies=n)
            models[str(n)] = build_list(
                g.document_references,
                g.imaging_studies,
                Translator("en-BE"),
                ListContext(peer="AT", throughput=40e6, report_url=lambda r: f"/reports/{r}"),
            )

        def source(hp: Any, key: str, t: Translator) -> dict[str, Any] | None:
            return models.get(key)

        clock = Clock()
        node = portal_node(work / "b", clock=clock)
        secret = add_hp(node)
        assert secret is not None
        with serve_portal(node, list_source=source) as portal, sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1366, "height": 768}
            ).new_page()
            page.goto(f"{portal.url}/login")
            page.fill("#username", "dr.peeters")
            page.fill("#password", PASSWORD)
            page.click("form[action='/login'] button[type=submit]")
            page.wait_for_url(f"{portal.url}/login/totp")
            page.fill("#code", totp_now(secret, clock))
            page.click("form[action='/login/totp'] button[type=submit]")
            page.wait_for_url(f"{portal.url}/")
            for n in sizes:
                found: dict[str, list[float]] = {
                    k: []
                    for k in (
                        "show", "script", "filter", "filter_all_rows", "sort", "sort_all_rows",
                        "reference_rows",
                    )
                }  # fmt: skip
                for _ in range(args.repeat):
                    page.goto(f"{portal.url}/patients/{n}/list")
                    page.wait_for_selector("#list-table tbody tr")
                    shown = page.evaluate(
                        "() => performance.now() - "
                        "performance.getEntriesByType('navigation')[0].startTime"
                    )
                    assert page.evaluate("() => window.ncpList.rows") == n
                    found["show"].append(shown)
                    found["script"].append(page.evaluate("() => window.ncpList.renderMs"))
                    for kind in ("filter", "reset", "sort", "reset", "reference_rows"):
                        first, complete = page.evaluate(MEASURE, kind)
                        if kind == "reference_rows":
                            found[kind].append(first)
                        elif kind != "reset":
                            found[kind].append(first)
                            found[f"{kind}_all_rows"].append(complete)
                stats = {k: summary(v) for k, v in found.items()}
                ref = stats["reference_rows"]["p50"] or 1
                stats["ratio_filter_to_reference"] = round(stats["filter"]["p50"] / ref, 2)
                stats["ratio_sort_to_reference"] = round(stats["sort"]["p50"] / ref, 2)
                out["sizes"][str(n)] = stats
            browser.close()
        node.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
