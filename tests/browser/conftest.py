"""Fixtures for the browser test: the built book served on 127.0.0.1 and Debian's Chromium, offline.

The book is read from ``GRADSTAB_BOOK_HTML`` (default: ``_build/html`` of this repository).
"""
from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def html_root() -> Path:
    root = Path(os.environ.get("GRADSTAB_BOOK_HTML", REPO / "_build" / "html"))
    if not (root / "index.html").is_file():
        pytest.skip(f"no built book at {root}: run `make book` first (or set GRADSTAB_BOOK_HTML)")
    return root


@pytest.fixture(scope="session")
def pages(html_root) -> list[str]:
    """Every built page, as a path relative to the root (Sphinx's own folders and redirects left out)."""
    found = sorted(p.relative_to(html_root).as_posix() for p in html_root.rglob("*.html")
                   if not any(part.startswith("_") for part in p.relative_to(html_root).parts)
                   and 'http-equiv="Refresh"' not in p.read_text(encoding="utf-8")[:2000])
    assert found, f"no pages under {html_root}"
    return found


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def base_url(html_root):
    """Serve the book over http on a free local port for the whole session."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html_root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: install Debian's chromium: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class OfflinePage:
    """A page in a fresh browser context that records console errors and aborts non-local requests."""

    def __init__(self, browser, base_url: str, width: int = 1200):
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.blocked: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.context.route("**/*", functools.partial(self._route, base_url))

    def _route(self, base_url: str, route):
        url = route.request.url
        if url.startswith((base_url, "data:", "blob:", "about:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def close(self):
        self.context.close()


@pytest.fixture
def offline_page(browser, base_url):
    page = OfflinePage(browser, base_url)
    yield page
    page.close()


@pytest.fixture(params=[1400, 400], ids=["desktop-1400px", "phone-400px"])
def sized_page(request, browser, base_url):
    """An offline page at a desktop width and at a phone width."""
    page = OfflinePage(browser, base_url, width=request.param)
    yield page
    page.close()
