"""The admin API (SPEC "Admin API") and the health port.

    GET /healthz /readyz /metrics /config /status /events /queue /     POST /reload (loopback only)

The health port serves only /healthz and /readyz: it listens on the pod IP for the kubelet.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
from importlib import resources

from aiohttp import web

from sidecar.admin.events import EventHub
from sidecar.telemetry.signals import Signals

HEARTBEAT = 15.0


def _json(data, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=2, default=str), status=status,
                        content_type="application/json")


def _loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def health_routes(runtime) -> list[web.RouteDef]:
    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = runtime.ready and not runtime.draining
        return _json({"ready": ready, "draining": runtime.draining, "policy": runtime.policy.digest},
                     status=200 if ready else 503)
    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]


def admin_app(runtime, metrics, hub: EventHub, signals: Signals | None = None) -> web.Application:
    app = web.Application()
    app.add_routes(health_routes(runtime))
    # An SSE stream never ends by itself: without this, a graceful shutdown waits the runner's whole
    # shutdown_timeout (60 s) for every open dashboard (aiohttp: on_shutdown is for long-lived streams).
    streams: set[asyncio.Task] = set()

    async def close_streams(app: web.Application) -> None:
        for task in list(streams):
            task.cancel()
    app.on_shutdown.append(close_streams)

    async def metrics_handler(request: web.Request) -> web.Response:
        body, content_type = metrics.render(request.headers.get("accept"))
        resp = web.Response(body=body)
        resp.headers["content-type"] = content_type
        return resp

    async def config(request: web.Request) -> web.Response:
        return _json(runtime.policy.redacted)

    async def status(request: web.Request) -> web.Response:
        doc = runtime.status()
        if signals is not None:            # golden signals and fallback shares (telemetry/signals.py)
            doc["signals"] = signals.snapshot()
        return _json(doc)

    async def queue(request: web.Request) -> web.Response:
        if runtime.queue is None:
            return _json({"items": [], "depth": 0})
        return _json(await runtime.queue.listing())

    async def reload(request: web.Request) -> web.Response:
        if not _loopback(request):
            return _json({"error": "reload is only accepted from loopback"}, status=403)
        ok, error = await runtime.reload(trigger="admin")
        return _json({"reloaded": ok, "version": runtime.policy.digest, "error": error},
                     status=200 if ok else 400)

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                           "x-accel-buffering": "no"})
        await resp.prepare(request)
        client = hub.subscribe()
        streams.add(asyncio.current_task())
        try:
            for doc in list(hub.recent)[-20:]:
                await resp.write(f"event: decision\ndata: {json.dumps(doc)}\n\n".encode())
            while True:
                try:
                    await asyncio.wait_for(client.wake.wait(), HEARTBEAT)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                client.wake.clear()
                if client.dropped:
                    await resp.write(f"event: dropped\ndata: {client.dropped}\n\n".encode())
                    client.dropped = 0
                while client.items:
                    await resp.write(f"event: decision\ndata: {client.items.popleft()}\n\n".encode())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            streams.discard(asyncio.current_task())
            hub.unsubscribe(client)
        return resp

    async def dashboard(request: web.Request) -> web.Response:
        page = resources.files("sidecar.admin").joinpath("dashboard.html")
        return web.Response(text=page.read_text(encoding="utf-8"), content_type="text/html")

    app.add_routes([
        web.get("/metrics", metrics_handler), web.get("/config", config), web.get("/status", status),
        web.get("/queue", queue), web.post("/reload", reload), web.get("/events", events),
        web.get("/", dashboard),
    ])
    return app


def health_app(runtime) -> web.Application:
    app = web.Application()
    app.add_routes(health_routes(runtime))
    return app
