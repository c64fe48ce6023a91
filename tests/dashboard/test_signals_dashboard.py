"""The golden-signals table and the fallback analytics view in a real headless Chromium: a route's
success rate falls when its upstream starts failing, and the share of answers from the fallback rises.

Screenshots go to $SIDECAR_SCREENSHOT_DIR when set (the README's come from `docs/`), else to tmp_path.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import expect

from test_dashboard import CHROMIUM, WAIT, browser, open_dashboard  # noqa: F401 - the browser fixture

sys.path.insert(0, str(Path(__file__).parent.parent / "llm"))
from llm_upstreams import LlmApi  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent")


def policy(port, primary: str, backup: str) -> str:
    return f"""
    version: 1
    listeners: [{{name: app, mode: reverse, port: {port['reverse']}, upstream: primary}}]
    admin: {{bind: 127.0.0.1, port: {port['admin']}}}
    health: {{bind: 127.0.0.1, port: {port['health']}}}
    llm: {{prices: {{gpt-4o-mini: {{input_per_million: 0.15, output_per_million: 0.6}}}}}}
    upstreams:
      primary: {{url: "{primary}"}}
      backup: {{url: "{backup}"}}
    routes:
      - name: chat
        match: {{path_prefix: /v1/}}
        upstream: primary
        breaker: {{consecutive_failures: 6, open_for: 5m}}
        fallback: {{when: [breaker-open], targets: [{{upstream: backup}}]}}
    """


async def test_success_rate_falls_and_fallback_share_rises(browser, upstream_factory, sidecar_factory, port,  # noqa: F811
                                                           tmp_path):
    shots = Path(os.environ.get("SIDECAR_SCREENSHOT_DIR") or tmp_path)
    failing = {"on": False}
    api = LlmApi(model="gpt-4o-mini", input_tokens=120, output_tokens=80)

    async def primary_handler(request: web.Request) -> web.StreamResponse:
        if failing["on"]:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        return await api(request)
    primary = await upstream_factory(primary_handler)
    backup = await upstream_factory(LlmApi(model="gpt-4o-mini", input_tokens=120, output_tokens=80))
    await sidecar_factory(policy(port, primary.url, backup.url))
    view = await open_dashboard(browser, port)
    page = view.page

    async def calls(n: int) -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                async with s.post(f"http://127.0.0.1:{port['reverse']}/v1/chat/completions",
                                  json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}) as r:
                    await r.read()
                    statuses.append(r.status)
        return statuses

    assert await calls(20) == [200] * 20
    route_row = page.locator('#signals tr[data-kind="route"][data-name="chat"]')
    await expect(route_row).to_have_attribute("data-success", "1", timeout=WAIT)
    await expect(route_row).to_contain_text("100%")
    await expect(route_row.locator("td").nth(5)).not_to_have_text("—")          # tokens/min
    shares = page.locator('#fallback tr[data-route="chat"]')
    await expect(shares).to_have_attribute("data-primary", "1", timeout=WAIT)
    await page.screenshot(path=str(shots / "golden-signals-healthy.png"), full_page=False)

    failing["on"] = True
    statuses = await calls(20)
    assert statuses == [503] * 6 + [200] * 14           # six failures open the breaker; the backup answers
    await expect(route_row).to_have_attribute("data-success", "0.85", timeout=WAIT)   # 34 of 40
    await expect(route_row.locator("td.rate")).to_have_class("num rate bad")
    primary_row = page.locator('#signals tr[data-kind="upstream"][data-name="primary"]')
    await expect(primary_row).to_have_attribute("data-success", "0.7692")             # 20 of 26 tries
    # the primary's six 503s were its answers too: 26 of 40; the backup's 14 are the fallback's share
    await expect(shares).to_have_attribute("data-primary", "0.65")
    await expect(shares.locator('[data-source="upstream:backup"]')).to_have_attribute("data-share", "0.35")
    await page.screenshot(path=str(shots / "golden-signals-degraded.png"), full_page=False)
    assert view.errors == []
    assert view.off_loopback() == []
