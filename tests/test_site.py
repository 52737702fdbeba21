"""The documentation site as a reader sees it: built with mkdocs (strict), served on 127.0.0.1,
rendered by headless Chromium in a 1280 px wide window.

A page is checked by a copy of it with a script appended that measures every code block of
the content column (``scrollWidth > clientWidth`` means a horizontal scrollbar) and writes
its findings into the DOM, which ``chromium --dump-dom`` prints. The script first adds a
control block with a 300-character line, which must be found overflowing: the measurement
itself is tested on every page. Search: the index loads, and Material's own search (opened
by ``?q=``) finds pages.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--virtual-time-budget=10000",
    "--dump-dom",
)
REPORT = re.compile(r'<pre id="gb-report">(.*?)</pre>', flags=re.DOTALL)

# Runs after the page has loaded (fonts and styles included); reports as JSON into the DOM.
OVERFLOW = """
window.addEventListener("load", () => {
  const column = document.querySelector(".md-content");
  const control = document.createElement("pre");
  control.innerHTML = "<code></code>";
  control.firstChild.textContent = "x = " + "1 + ".repeat(74) + "1";
  column.querySelector("article").appendChild(control);
  const overflows = (code) => code.scrollWidth > code.clientWidth;
  const blocks = [...column.querySelectorAll("pre > code")].filter((c) => c !== control.firstChild);
  const report = {
    column_width: column.clientWidth,
    blocks: blocks.length,
    control_overflows: overflows(control.firstChild),
    overflowing: blocks.filter(overflows).map((code) => ({
      scroll: code.scrollWidth,
      client: code.clientWidth,
      longest: code.textContent.split("\\n").reduce((a, b) => (a.length >= b.length ? a : b)),
    })),
  };
  control.remove();
  const out = document.createElement("pre");
  out.id = "gb-report";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
"""

# Material's search runs in a web worker, in real time: wait for its results by polling the
# test server's /__wait (virtual time stands still while a request is pending).
SEARCH = """
window.addEventListener("load", async () => {
  const base = JSON.parse(document.getElementById("__config").textContent).base;
  const index = await (await fetch(base + "/search/search_index.json")).json();
  let items = 0;
  for (let i = 0; i < 150 && items === 0; i++) {
    await fetch("/__wait");
    items = document.querySelectorAll(".md-search-result__item").length;
  }
  const out = document.createElement("pre");
  out.id = "gb-report";
  out.textContent = JSON.stringify({
    documents: index.docs.length,
    locations: index.docs.map((doc) => doc.location),
    results: items,
    first: (document.querySelector(".md-search-result__item a") || {}).href || null,
  });
  document.body.appendChild(out);
});
"""


def _install_chromium() -> str | None:
    """Debian's chromium, installed with apt-get where it is missing and we may."""
    if shutil.which("chromium") is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            subprocess.run(command, env=env, capture_output=True, timeout=1200, check=False)
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium():
    path = _install_chromium()
    if path is None:
        pytest.skip(
            "headless Chromium is missing and could not be installed "
            "(apt-get install -y chromium needs root and Debian's package index)"
        )
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One strict build of the site for this module."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)]
    built = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/__wait"):
            time.sleep(0.1)
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP, on 127.0.0.1 only."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def render(chromium, site, served, tmp_path, page: str, script: str, query: str = "") -> dict:
    """Load ``page`` with ``script`` appended; return the JSON the script wrote."""
    original = site / page
    probe = original.with_name("__probe.html")
    text = original.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", f"<script>{script}</script></body>"), "utf-8")
    url = f"{served}/{probe.relative_to(site).as_posix()}{query}"
    command = [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    match = REPORT.search(result.stdout)
    assert match, f"no report from {url}: {result.stderr[-2000:]}"
    return json.loads(html.unescape(match[1]))


PAGES = {"quickstart": "index.html", "mlb": "methods/mlb/index.html"}


@pytest.mark.parametrize("page", list(PAGES.values()), ids=list(PAGES))
def test_no_code_block_scrolls_sideways_at_1280px(chromium, site, served, tmp_path, page):
    report = render(chromium, site, served, tmp_path, page, OVERFLOW)
    assert report["control_overflows"], "the measurement misses a 300-character line"
    assert report["blocks"] >= 1
    assert report["overflowing"] == [], report


def test_search_index_loads_and_search_finds_pages(chromium, site, served, tmp_path):
    report = render(chromium, site, served, tmp_path, "index.html", SEARCH, "?q=nonfinite")
    assert report["documents"] > 50
    assert {"methods/mlb/", "logging/", "methods/common/"} <= set(report["locations"])
    assert report["results"] >= 1, report
    assert report["first"].startswith(served)
