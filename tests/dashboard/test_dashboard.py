"""The admin dashboard (`GET /`) in a real headless Chromium, against a real sidecar and upstream on
loopback (STYLE habit 7). Waits are Playwright expectations with bounded timeouts, never fixed sleeps.

Only an absent /usr/bin/chromium skips; a Chromium that is present but cannot start fails the test.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import time
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import async_playwright, expect

from sidecar.core.decisions import Decision, DecisionRecord

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = "/tmp/dashboard.png"
JAEGER = "http://127.0.0.1:16686"
WAIT = 10_000                               # ms: the page polls /status every 1.5 s

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} is absent (Debian package `chromium`); "
                                       "these tests never download a browser")


def policy(port, upstream_url: str) -> str:
    return f"""
    version: 1
    listeners:
      - {{name: app, mode: reverse, port: {port['reverse']}, upstream: flaky}}
    admin: {{bind: 127.0.0.1, port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    upstreams:
      flaky: {{url: "{upstream_url}"}}
    routes:
      - name: orders
        match: {{path_prefix: /}}
        upstream: flaky
        retry: {{max_retries: 2, when: [502, 503], budget: {{ratio: 0.2, min_per_second: 1, window: 10s}}}}
        breaker: {{consecutive_failures: 3, open_for: 30s}}
        concurrency: {{max: 16}}
    """


async def always_500(request: web.Request) -> web.Response:
    return web.json_response({"error": "boom"}, status=500)


class Page:
    """A page plus what it did: every request URL, and any script error."""

    def __init__(self, page) -> None:
        self.page = page
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda req: self.urls.append(req.url))
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))

    def off_loopback(self) -> list[str]:
        bad = []
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about"):
                continue
            host = parts.hostname or ""
            try:
                if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                    continue
            except ValueError:
                pass
            bad.append(url)
        return bad


@pytest.fixture
async def browser():
    async with async_playwright() as pw:
        # No try/skip here: a browser that is installed but will not start is a failure.
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_dashboard(browser, port, query: str = "") -> Page:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = Page(await context.new_page())
    await page.page.goto(f"http://127.0.0.1:{port['admin']}/{query}")
    await expect(page.page.locator("#conn")).to_have_attribute("data-state", "live", timeout=WAIT)
    return page


def traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


async def fail_until_open(port, n: int = 3) -> list[str]:
    """n failing calls through the reverse listener; returns their trace ids."""
    trace_ids = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            trace_id, header = traceparent()
            async with s.get(f"http://127.0.0.1:{port['reverse']}/orders/42", headers={"traceparent": header}) as r:
                assert r.status == 500
                assert r.headers["x-sidecar-route"] == "orders"
                if "x-sidecar-trace-id" in r.headers:
                    assert r.headers["x-sidecar-trace-id"] == trace_id
            trace_ids.append(trace_id)
    return trace_ids


async def test_breaker_opening_shows_live(browser, upstream_factory, sidecar_factory, port):
    up = await upstream_factory(always_500)
    await sidecar_factory(policy(port, up.url))
    view = await open_dashboard(browser, port, f"?jaeger={JAEGER}")
    page = view.page

    await expect(page.locator("#policy-version")).not_to_have_text("…", timeout=WAIT)
    await expect(page.locator("#ready")).to_have_text("ready")
    state = page.locator('#routes [data-route="orders"] [data-upstream="flaky"] .breaker-state')
    await expect(state).to_have_text("closed", timeout=WAIT)
    await expect(state).to_have_attribute("data-state", "closed")

    trace_ids = await fail_until_open(port, 3)
    assert up.hits == 3

    await expect(state).to_have_text("open", timeout=WAIT)
    await expect(state).to_have_attribute("data-state", "open")
    breaker = page.locator('#routes [data-route="orders"] [data-upstream="flaky"]')
    await expect(breaker).to_contain_text("3 consecutive")

    opened = page.locator('#feed .decision[data-decision="breaker_opened"]')
    await expect(opened).to_have_count(1, timeout=WAIT)
    await expect(opened.locator(".route")).to_have_text("orders")
    await expect(opened.locator(".upstream")).to_have_text("flaky")
    # The decision belongs to the call that tripped the breaker: the third, with our traceparent.
    link = opened.locator(".trace-id")
    await expect(link).to_have_text(trace_ids[2])
    await expect(link).to_have_attribute("href", f"{JAEGER}/trace/{trace_ids[2]}")

    count = page.locator('#rates [data-route="orders"] [data-decision="breaker_opened"] .count')
    await expect(count).to_have_text("1", timeout=WAIT)

    await page.screenshot(path=SCREENSHOT, full_page=True)
    assert view.off_loopback() == []
    assert any(urlsplit(u).path == "/events" for u in view.urls)
    assert any(urlsplit(u).path == "/status" for u in view.urls)
    assert view.errors == []


async def test_trace_id_is_copyable_without_jaeger(browser, upstream_factory, sidecar_factory, port):
    up = await upstream_factory(always_500)
    await sidecar_factory(policy(port, up.url))
    view = await open_dashboard(browser, port)
    trace_ids = await fail_until_open(port, 3)
    opened = view.page.locator('#feed .decision[data-decision="breaker_opened"]')
    await expect(opened.locator("code.trace-id")).to_have_text(trace_ids[2], timeout=WAIT)
    await expect(opened.locator("a")).to_have_count(0)
    await expect(opened.locator("button.copy")).to_be_visible()
    assert view.errors == []


async def test_reload_error_is_prominent_and_escaped(browser, upstream_factory, sidecar_factory, port, tmp_path):
    up = await upstream_factory(always_500)
    sc = await sidecar_factory(policy(port, up.url))
    view = await open_dashboard(browser, port)
    page = view.page
    await expect(page.locator("#reload-error")).to_be_hidden(timeout=WAIT)

    hostile = "<img src=x onerror=window.__pwned=1>"
    text = policy(port, up.url).replace("upstream: flaky\n        retry", f'upstream: flaky\n        "{hostile}": 1\n        retry')
    (tmp_path / "policy.yaml").write_text(__import__("textwrap").dedent(text))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port['admin']}/reload") as r:
            assert r.status == 400

    banner = page.locator("#reload-error")
    await expect(banner).to_be_visible(timeout=WAIT)
    await expect(page.locator("#reload-error-text")).to_contain_text(hostile)
    await expect(page.locator("#reload-error-version")).to_have_text(sc.runtime.policy.digest)
    await expect(banner.locator("img")).to_have_count(0)
    assert await page.evaluate("window.__pwned") is None
    rejected = page.locator('#feed .decision[data-decision="config_rejected"]')
    await expect(rejected).to_have_count(1, timeout=WAIT)
    await expect(rejected.locator("img")).to_have_count(0)
    assert view.errors == []


async def test_dropped_notice_and_bounded_feed(browser, upstream_factory, sidecar_factory, port):
    up = await upstream_factory(always_500)
    sc = await sidecar_factory(policy(port, up.url))
    view = await open_dashboard(browser, port)
    # Synchronously, so the SSE writer cannot run in between: the client's 256-slot buffer overflows
    # and the stream says how many were lost (sidecar/admin/events.py).
    for i in range(600):
        sc.hub.decision(DecisionRecord(Decision.RETRY, "orders", "flaky", f"burst {i}", time.time()))
    await expect(view.page.locator("#dropped")).to_be_visible(timeout=WAIT)
    await expect(view.page.locator("#dropped-text")).to_contain_text("344 decisions were dropped")
    await expect(view.page.locator("#feed .decision")).to_have_count(200, timeout=WAIT)
    await expect(view.page.locator("#feed .decision").first).to_contain_text("burst 599")
    assert view.errors == []


async def test_reconnects_after_the_admin_api_restarts(browser, upstream_factory, sidecar_factory, port):
    up = await upstream_factory(always_500)
    first = await sidecar_factory(policy(port, up.url))
    view = await open_dashboard(browser, port)
    page = view.page
    await first.stop()
    await expect(page.locator("#conn")).not_to_have_attribute("data-state", "live", timeout=WAIT)
    await expect(page.locator("#status-error")).to_be_visible(timeout=WAIT)

    await sidecar_factory(policy(port, up.url))                 # same ports, fresh state
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=15_000)
    await expect(page.locator("#status-error")).to_be_hidden(timeout=WAIT)
    trace_ids = await fail_until_open(port, 3)
    opened = page.locator('#feed .decision[data-decision="breaker_opened"]')
    await expect(opened.locator(".trace-id")).to_have_text(trace_ids[2], timeout=WAIT)
    # Connection errors while the API was down are expected console noise; script errors are not.
    assert [e for e in view.errors if e.startswith("pageerror")] == []


async def test_endpoints_of_a_balanced_upstream_show_state_and_share(browser, upstream_factory, sidecar_factory,
                                                                      port):
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")
    good = await upstream_factory(ok)
    bad = await upstream_factory(always_500)
    text = policy(port, good.url).replace(
        f'flaky: {{url: "{good.url}"}}',
        f'flaky: {{balance: round-robin, outlier: {{consecutive_failures: 2}}, '
        f'endpoints: [{{url: "{good.url}"}}, {{url: "{bad.url}"}}]}}')
    await sidecar_factory(text)
    view = await open_dashboard(browser, port)
    page = view.page
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(f"http://127.0.0.1:{port['reverse']}/x") as r:
                await r.read()
    rows = page.locator('#endpoints tr[data-upstream="flaky"]')
    await expect(rows).to_have_count(2, timeout=WAIT)
    bad_row = page.locator(f'#endpoints tr[data-endpoint="127.0.0.1:{bad.port}"]')
    await expect(bad_row).to_have_attribute("data-state", "ejected", timeout=WAIT)
    good_row = page.locator(f'#endpoints tr[data-endpoint="127.0.0.1:{good.port}"]')
    await expect(good_row).to_have_attribute("data-state", "active")
    await expect(good_row).to_contain_text("%")
    assert view.errors == []
