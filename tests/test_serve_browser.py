"""The demo page in a real browser: Playwright for Python driving the system's Chromium.

Playwright's own browser downloads are not reachable in CI, so the test launches Debian's
``chromium`` (``.ci/run`` installs it with apt-get) through ``executable_path``. Without a
Chromium the tests skip, unless ``ALIGNDRAW_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes
that a failure. The server runs in a thread on a free port with a tiny random model.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
playwright_api = pytest.importorskip("playwright.sync_api")

import uvicorn  # noqa: E402

from aligndraw.serve.app import create_app  # noqa: E402

from test_serve import STEPS, tiny_pipeline  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
HELD_OUT_CAPTION = "the digit 2 is on the left of the digit 6 ."  # (left, 2) is held out


def find_chromium() -> str | None:
    candidates = [os.environ.get("ALIGNDRAW_CHROMIUM"), "/usr/bin/chromium",
                  shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


@pytest.fixture(scope="module")
def server_url():
    """uvicorn in a background thread, on a socket bound to a free port before it starts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_pipeline(), model_name="tiny"),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the demo server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    if path is None:
        message = "no Chromium found (apt-get install chromium, or set ALIGNDRAW_CHROMIUM)"
        if os.environ.get("ALIGNDRAW_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server_url)
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=15_000)
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


CANVAS_STATS = """(sel) => {
  const c = document.querySelector(sel);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let min = 255, max = 0, sum = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i + 1];  // green: the amber write box has it too, but the thumbnails have no box
    min = Math.min(min, v); max = Math.max(max, v); sum += v; n++;
  }
  return {min, max, mean: sum / n};
}"""


def test_type_a_caption_and_watch_it_drawn(page, tmp_path):
    page.fill("#caption", HELD_OUT_CAPTION)
    page.fill("#num", "3")
    page.fill("#seed", "5")
    page.fill("#temperature", "0.8")
    page.click("#draw")
    page.wait_for_function("document.body.dataset.state === 'done'", timeout=30_000)

    assert page.input_value("#slider") == str(STEPS)
    assert page.text_content("#step") == f"step {STEPS} / {STEPS}"
    assert page.locator("#thumbs canvas").count() == 3
    assert page.is_visible("#heldout")  # the page says the composition was held out
    for sel in ("#thumbs canvas:first-child", "#canvas"):
        stats = page.evaluate(CANVAS_STATS, sel)
        assert stats["max"] - stats["min"] > 50, f"{sel} is blank: {stats}"
    # Every word of the caption is shown, and the most attended one is lit up.
    words = page.locator("#words .word .text").all_text_contents()
    assert words == HELD_OUT_CAPTION.split()
    lit = page.locator("#words .word.top")
    assert lit.count() >= 1
    assert float(lit.first.evaluate("e => e.style.getPropertyValue('--lit')")) == 1.0
    assert page.get_attribute("#dl-gif", "href").startswith("/api/drawing.gif?")
    assert "temperature=0.8" in page.get_attribute("#dl-gif", "href")  # the form's temperature

    # Scrubbing back shows an earlier step, its box and its alignment.
    page.fill("#slider", "1")
    page.dispatch_event("#slider", "input")
    assert page.text_content("#step") == f"step 1 / {STEPS}"
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_unknown_word_is_shown_next_to_the_caption(page):
    page.fill("#caption", "the digit 3 is on the lefty of the digit 5 .")
    page.click("#draw")
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=15_000)
    message = page.text_content("#message")
    assert "lefty" in message and "Vocabulary" in message
    assert "invalid" in page.get_attribute("#caption", "class")
    # A vocabulary chip completes the word being typed.
    page.fill("#caption", "the digit 3 is on the le")
    page.click("#vocab [data-word='left']")
    assert page.input_value("#caption") == "the digit 3 is on the left "
