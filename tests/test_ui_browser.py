"""Headless Chromium (the Debian package, driven by playwright) renders the four modes in /ui."""
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server_util import load_pipeline, serve, write_tiny_models

ARTIFACTS = Path(os.environ.get("CCASERVE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


INSTALL = "apt-get install -y chromium && pip install playwright (never `playwright install`)"


def browser_api():
    """playwright's sync API and a chromium to drive. Missing either fails the test under the test
    script and CI (CCASERVE_REQUIRE_BROWSER=1) and skips it, with the install line, when run by hand."""
    required = os.environ.get("CCASERVE_REQUIRE_BROWSER") == "1"
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    problem = None if sync_api is not None else "the playwright package is not installed"
    if problem is None and not Path(CHROMIUM).exists():
        problem = f"no chromium at {CHROMIUM}"
    if problem:
        message = f"browser test needs chromium and playwright: {problem}. Install: {INSTALL}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return sync_api


def test_ui_renders_four_modes(tmp_path):
    sync_api = browser_api()
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
            # each panel says its relative compute and its own time; the heading names the class
            labels = page.locator("[id^=image-] label, [id^=image-] [data-testid=block-label]").all_inner_texts()
            text = " ".join(labels)
            assert "1x compute" in text and "2x compute" in text and text.count("compute · ") == 4, text
            assert "0: thing 0" in page.locator("#heading").inner_text()
            assert "one forward pass per token" in page.content()
            # the live stats view catches up with the sixteen images (it refreshes every 2 s)
            page.wait_for_function("/all\\s+16\\s/.test(document.querySelector('#stats-box').innerText)",
                                   timeout=30000)
            page.screenshot(path=str(ARTIFACTS / "ui_four_modes.png"), full_page=True)
            # a changed input clears the heading; a bad one is shown in the panels, not a vanishing toast
            page.get_by_label("first seed").fill("5")
            page.get_by_label("first seed").press("Enter")
            page.wait_for_function("!document.querySelector('#heading').innerText.includes('thing 0')",
                                   timeout=30000)
            class_box = page.get_by_label("class (type an id, a name or words)")
            class_box.fill("purple unicorn")
            class_box.press("Enter")
            page.click("#generate-button")
            page.wait_for_function("document.querySelector('#heading').innerText.includes('no class named')",
                                   timeout=30000)
        finally:
            browser.close()
    stats = engine.stats.snapshot()
    engine.close()
    assert {m: stats["modes"][m]["images"] for m in ("free", "cfg", "cca", "cca+cfg")} == \
        {"free": 4, "cfg": 4, "cca": 4, "cca+cfg": 4}
    assert (ARTIFACTS / "ui_four_modes.png").stat().st_size > 10000
    assert httpx  # the API keeps working beside the UI (checked in test_server)


def test_api_docs_render_offline_and_root_leads_to_the_ui(tmp_path):
    """Swagger UI's files come from the server itself; the browser gets no network beyond it."""
    sync_api = browser_api()
    server, engine = serve(load_pipeline(write_tiny_models(tmp_path)), ui=True, max_rows=8)
    with server:
        html = httpx.get(f"{server.url}/docs").text
        assert "cdn." not in html and "unpkg" not in html
        r = httpx.get(f"{server.url}/", follow_redirects=False)
        assert r.status_code in (302, 307) and r.headers["location"].rstrip("/") == "/ui"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--headless", "--no-sandbox", "--disable-gpu",
                                               "--disable-background-networking"])
            try:
                page = browser.new_page()
                outside = []
                page.on("request", lambda req: outside.append(req.url) if not req.url.startswith(server.url)
                        else None)
                page.goto(f"{server.url}/docs", wait_until="networkidle", timeout=60000)
                page.wait_for_selector(".swagger-ui .opblock", timeout=30000)
                assert page.locator(".opblock-summary-path", has_text="/generate").count() >= 1
                assert not outside, outside
            finally:
                browser.close()
    engine.close()


def test_ui_model_picker_runs_the_shipped_var():
    """What `ccaserve serve` puts behind one UI (the registry's served models: the default and the
    small VAR); picking the VAR renders its four modes."""
    from samplers import Pipeline, Registry
    from server.app import ModelServer, create_app
    from server.engine import Engine
    from tests.server_util import LiveServer
    from ui.app import mount_ui

    sync_api = browser_api()
    registry = Registry()
    served = registry.served
    var_name = next(n for n in served if registry.get(n).family == "var")
    engines = {name: Engine(Pipeline.from_registry(name), max_rows=8) for name in served}
    app = create_app(ModelServer(engines, default=served[0]))
    mount_ui(app, engines)
    with LiveServer(app) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu",
                                           "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"{server.url}/ui/", wait_until="networkidle", timeout=60000)
            picker = page.get_by_label("model")
            picker.click()
            page.get_by_role("option", name=var_name).click()
            page.wait_for_function("document.querySelector('#model-info').innerText.includes('var family')",
                                   timeout=30000)
            page.click("#generate-button")
            page.wait_for_function("document.querySelector('#heading').innerText.includes('(var)')",
                                   timeout=60000)
            for mode in ("free", "cfg", "cca", "cca-cfg"):
                page.wait_for_selector(f"#image-{mode} img", state="visible", timeout=60000)
            # each guided mode at its own validated scale, the sliders set by the picked model
            var_entry = registry.get(var_name)
            labels = " ".join(page.locator("[id^=image-] label, [id^=image-] [data-testid=block-label]")
                              .all_inner_texts())
            assert f"cfg s={var_entry.default_cfg_scale:g} ·" in labels, labels
            assert f"cca+cfg s={var_entry.default_cca_cfg_scale:g} ·" in labels, labels
            page.screenshot(path=str(ARTIFACTS / "ui_var_model.png"), full_page=True)
        finally:
            browser.close()
    assert engines[var_name].stats.snapshot()["overall"]["images"] == 16
    for engine in engines.values():
        engine.close()
