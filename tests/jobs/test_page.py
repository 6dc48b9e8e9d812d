"""The page at ``/`` in a real browser (Debian's Chromium, headless, driven by Playwright): a job
submitted by clicking, its preview seen changing, the final image's colours checked, a cancel."""
from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def _requests(page) -> Iterator[list]:
    """The requests the page makes meanwhile (Playwright's Request objects)."""
    seen: list = []

    def record(request) -> None:
        seen.append(request)

    page.on("request", record)
    try:
        yield seen
    finally:
        page.remove_listener("request", record)


def _ended(page) -> str:
    page.wait_for_function("!['queued', 'running'].includes(document.querySelector('#status').textContent)"
                           " && document.querySelector('#job').textContent !== '-'")
    return page.text_content("#status")


def _shown_result(page) -> Image.Image:
    """The image the page shows (its blob URL read in the page), as PIL reads it."""
    shown = page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('#result').src)).blob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        let text = ''; for (const b of bytes) text += String.fromCharCode(b);
        return btoa(text);
    }""")
    return Image.open(io.BytesIO(base64.b64decode(shown)))


def test_a_job_clicked_shows_its_preview_forming_then_its_image(page, apps):
    _open(page, apps.jobs.url)
    assert page.input_value("#model") == "tiny-shapes" and page.input_value("#sampler") == "Euler"
    _fill(page, prompt="a yellow circle on a blue background", seed="3", steps="30")
    page.click("#generate")
    previews: list[str] = []
    statuses, steps = [], []
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:  # one read of the page per pass: the job may end between two reads
        status, step, src, error = page.evaluate(
            "['status', 'step', 'preview', 'error'].map((id) => id === 'preview'"
            " ? document.getElementById(id).getAttribute('src') : document.getElementById(id).textContent)")
        statuses += [status] if not statuses or statuses[-1] != status else []
        steps += [step] if not steps or steps[-1] != step else []
        previews += [src] if src and (not previews or previews[-1] != src) else []
        if status == "succeeded":
            break
        assert status in ("queued", "running", "idle"), error
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    assert "running" in statuses, statuses
    assert len([s for s in steps if s != "-"]) >= 2, steps  # the step count moved
    assert len(previews) >= 2  # the preview changed as the steps went
    assert page.is_visible("#result") and not page.is_visible("#preview")
    image = _shown_result(page)
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
    job = httpx.get(f"{apps.jobs.url}/v1/jobs/{page.text_content('#job')}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < 100, job
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


def test_under_a_route_prefix_every_call_stays_under_it(page, apps):
    # The capped app is mounted at /capped: the page's calls, the final image's included, are
    # relative to where the page is.
    with _requests(page) as seen:
        _open(page, apps.capped.url)
        _fill(page, prompt="a red circle on a blue background", seed="1", steps="3")
        page.click("#generate")
        assert _ended(page) == "succeeded", page.text_content("#error")
    assert _shown_result(page).size == (64, 64)
    calls = [r.url for r in seen if not r.url.startswith(("data:", "blob:"))]
    assert any("/images/0" in url for url in calls), calls
    assert all(url.startswith(f"{apps.capped.url}/") for url in calls), calls


def test_the_api_key_is_remembered_and_sent_with_every_call(page, apps):
    # The test apps have no keys configured: any key passes, and what matters is that it is sent
    # (EventSource could not send it: the page reads the events with fetch()).
    _open(page, apps.jobs.url)
    page.fill("#apikey", "page-test-key")
    try:
        with _requests(page) as seen:
            _open(page, apps.jobs.url)  # a reload: the key comes back from localStorage
            assert page.input_value("#apikey") == "page-test-key"
            _fill(page, prompt="a white triangle on a black background", seed="2", steps="3")
            page.click("#generate")
            assert _ended(page) == "succeeded", page.text_content("#error")
    finally:
        page.fill("#apikey", "")  # the other tests run without one
    calls = {r.url: r.headers.get("authorization") for r in seen
             if r.url.startswith(apps.jobs.url) and r.url != f"{apps.jobs.url}/"}
    paths = " ".join(calls)
    assert "/v1/models" in paths and "/sdapi/v1/samplers" in paths and "/events" in paths
    assert "/images/0" in paths and set(calls.values()) == {"Bearer page-test-key"}, calls
    assert page.evaluate("localStorage.getItem('raydiance-key')") == ""
