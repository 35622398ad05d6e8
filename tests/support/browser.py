"""Headless Chromium for the web page's tests: the system's Chromium (Debian's `chromium`
package, which `make test` installs where it can) driven by Playwright from PyPI. Never
`playwright install`: no browser is downloaded. Where either is missing the tests skip
and say which and how to get it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_ENV = "BASTION_CHROMIUM"  # a Chromium binary elsewhere than on PATH
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def launch() -> Iterator[object]:
    """A Playwright Browser (generator: a fixture body), or pytest.skip with the reason."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` package is missing: pip install -e '.[dev]' (make test does)")
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium binary: apt-get install chromium (make test does as root), or set {CHROMIUM_ENV}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
