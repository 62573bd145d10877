"""Headless Chromium (the Debian package, driven by playwright) renders the four modes in /ui."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server_util import load_pipeline, serve, write_tiny_models

ARTIFACTS = Path(os.environ.get("CCASERVE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


def test_ui_renders_four_modes(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    assert Path(CHROMIUM).exists(), "needs Debian's chromium: apt-get install -y chromium"
    server, engine = serve(load_pipeline(write_tiny_models(tmp_path)), ui=True, max_rows=8)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu",
                                           "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})  # a laptop screen
            page.goto(f"{server.url}/ui/", wait_until="networkidle", timeout=60000)
            page.click("#generate-button", timeout=30000)
            for mode in ("free", "cfg", "cca", "cca-cfg"):
                page.wait_for_selector(f"#image-{mode} img", state="visible", timeout=60000)
            images = page.locator("[id^=image-] img")
            assert images.count() == 4
            for i in range(4):  # really rendered, not just present
                assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
            # the live stats view catches up with the four images (it refreshes every 2 s)
            page.wait_for_function("/all\\s+4\\s/.test(document.querySelector('#stats-box').innerText)",
                                   timeout=30000)
            page.screenshot(path=str(ARTIFACTS / "ui_four_modes.png"), full_page=True)
        finally:
            browser.close()
    stats = engine.stats.snapshot()
    engine.close()
    assert {m: stats["modes"][m]["images"] for m in ("free", "cfg", "cca", "cca+cfg")} == \
        {"free": 1, "cfg": 1, "cca": 1, "cca+cfg": 1}
    assert (ARTIFACTS / "ui_four_modes.png").stat().st_size > 10000
    assert httpx  # the API keeps working beside the UI (checked in test_server)
