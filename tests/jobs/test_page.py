"""The page at ``/`` in a real browser (Debian's Chromium, headless, driven by Playwright): a job
submitted by clicking, its preview seen changing, the final image's colours checked, a cancel."""
from __future__ import annotations

import base64
import io
import shutil
import time

import httpx
import pytest
from PIL import Image

from tools.tiny_shapes.world import classify

playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="Debian's chromium is not installed (.ci/run installs it as root)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def page(apps):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


def _open(page, url: str) -> None:
    page.goto(f"{url}/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def _fill(page, **fields: str) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", value)


def test_a_job_clicked_shows_its_preview_forming_then_its_image(page, apps):
    _open(page, apps.jobs.url)
    assert page.input_value("#model") == "tiny-shapes" and page.input_value("#sampler") == "Euler"
    _fill(page, prompt="a yellow circle on a blue background", seed="3", steps="30")
    page.click("#generate")
    previews: list[str] = []
    deadline = time.monotonic() + WAIT_MS / 1000
    while page.text_content("#status") != "succeeded":
        assert time.monotonic() < deadline, page.text_content("#status")
        assert page.text_content("#status") in ("queued", "running", "idle"), page.text_content("#error")
        src = page.get_attribute("#preview", "src")
        if src and (not previews or previews[-1] != src):
            previews.append(src)
        time.sleep(0.02)
    assert len(previews) >= 2  # the preview changed as the steps went
    assert page.is_visible("#result") and not page.is_visible("#preview")
    shown = page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('#result').src)).blob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        let text = ''; for (const b of bytes) text += String.fromCharCode(b);
        return btoa(text);
    }""")
    image = Image.open(io.BytesIO(base64.b64decode(shown)))
    assert image.size == (64, 64) and classify(image) == ("yellow", "blue")
    assert page.text_content("#seed-out") == "3"
    computed, cached = (int(n) for n in page.text_content("#steps-out").split(" / "))
    assert computed + cached == 30 and cached > 0  # the cache at its default skipped some
    assert page.text_content("#step") == "30 of 30"


def test_cancel_stops_a_running_job(page, apps):
    _open(page, apps.jobs.url)
    _fill(page, prompt="a green square on a black background", seed="5", steps="100", width="256",
          height="256", threshold="0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent === 'running'")
    page.wait_for_function("document.querySelector('#step').textContent !== '-'")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#status').textContent === 'cancelled'")
    jobs = httpx.get(f"{apps.jobs.url}/v1/jobs", params={"status": "cancelled", "limit": 1}).json()
    (job,) = jobs["jobs"]
    assert job["status"] == "cancelled" and job["progress"]["step"] < 100
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_a_bad_value_shows_the_servers_error_and_starts_nothing(page, apps):
    _open(page, apps.jobs.url)
    def newest() -> list[str]:
        return [j["id"] for j in httpx.get(f"{apps.jobs.url}/v1/jobs", params={"limit": 1}).json()["jobs"]]

    before = newest()
    _fill(page, prompt="a red circle on a blue background", steps="0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent !== ''")
    assert "steps" in page.text_content("#error")
    assert newest() == before
    assert page.is_enabled("#generate")
