"""The scenario upstream: one aiohttp process (uvloop) serving the roles of a small service fleet.

    primary   REPLICAS ports sharing one behaviour (nginx and HAProxy balance over them; the sidecar,
              like an app behind a Kubernetes Service, calls the first)
    backup    one port, always healthy
    control   GET /mode?role=primary&fail=0.2&slow=0.05&slow_ms=2000&down=0   set a role's behaviour
              GET /stats        {"primary": n, "backup": n}  requests served (health checks excluded)
              GET /reset        zero the counters

`fail` answers that share of requests with 503, `slow` delays that share by `slow_ms`, `down` closes the
role's listening sockets (connection refused) until it is set back to 0, `bad=N` makes the role's N-th
port (from 0; -1 for none) answer every request and health check with 503 (one bad replica of three). Decisions come from a seeded
RNG so every system meets the same sequence of faults. `/health` answers 503 only when the role fails
every request, so active health checks (HAProxy, the sidecar) see what a real probe would.

The overhead runs use nginx as a static upstream instead (see bench/configs.py): it costs a few
microseconds per request, so the numbers measure the proxy, not the upstream.

Run: python -m bench.upstream --primary P1,P2,P3 --backup B --control C
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random

from aiohttp import web

SMALL = b'{"ok":true,"payload":"' + b"x" * 64 + b'"}\n'
BIG = b"y" * (64 * 1024)
HEADERS = {"content-type": "application/json", "cache-control": "max-age=1"}


class Role:
    def __init__(self, name: str, ports: list[int], seed: int) -> None:
        self.name = name
        self.ports = ports
        self.fail = 0.0
        self.slow = 0.0
        self.slow_ms = 2000
        self.bad = -1                       # index of the port that fails everything; -1: none
        self.served = 0
        self.served_bad = 0
        self.rng = random.Random(seed)
        self.runners: list[web.AppRunner] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def _on_bad(self, request: web.Request) -> bool:
        if self.bad < 0:
            return False
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return sock is not None and self.bad < len(self.ports) and sock[1] == self.ports[self.bad]

    async def health(self, request: web.Request) -> web.Response:
        failing = self.fail >= 1.0 or self._on_bad(request)
        return web.Response(status=503 if failing else 200, text="ok\n")

    async def handle(self, request: web.Request) -> web.Response:
        self.served += 1
        if request.can_read_body:
            await request.read()
        if self._on_bad(request):
            self.served_bad += 1
            return web.Response(status=503, body=b'{"error":"bad replica"}\n', headers=HEADERS)
        if self.slow and self.rng.random() < self.slow:
            await asyncio.sleep(self.slow_ms / 1000)
        if self.fail and (self.fail >= 1.0 or self.rng.random() < self.fail):
            return web.Response(status=503, body=b'{"error":"injected"}\n', headers=HEADERS)
        body = BIG if request.path.startswith("/big") else SMALL
        return web.Response(body=body, headers={**HEADERS, "x-served-by": self.name})

    async def up(self) -> None:
        if self.runners:
            return
        for port in self.ports:
            runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=1024).start()
            self.runners.append(runner)

    async def down(self) -> None:
        runners, self.runners = self.runners, []
        for runner in runners:
            await runner.cleanup()


async def serve(primary: list[int], backup: int, control: int, seed: int = 7) -> None:
    roles = {"primary": Role("primary", primary, seed), "backup": Role("backup", [backup], seed + 1)}

    async def mode(request: web.Request) -> web.Response:
        q = request.query
        role = roles[q.get("role", "primary")]
        role.fail = float(q.get("fail", role.fail))
        role.slow = float(q.get("slow", role.slow))
        role.slow_ms = int(q.get("slow_ms", role.slow_ms))
        role.bad = int(q.get("bad", role.bad))
        if "down" in q:
            await (role.down() if q["down"] == "1" else role.up())
        return web.json_response({"fail": role.fail, "slow": role.slow, "down": not role.runners})

    async def stats(request: web.Request) -> web.Response:
        out = {name: r.served for name, r in roles.items()}
        out["bad"] = roles["primary"].served_bad
        return web.json_response(out)

    async def reset(request: web.Request) -> web.Response:
        for r in roles.values():
            r.served = r.served_bad = 0
        return web.json_response({})

    ctl = web.Application()
    ctl.router.add_get("/mode", mode)
    ctl.router.add_get("/stats", stats)
    ctl.router.add_get("/reset", reset)
    runner = web.AppRunner(ctl, access_log=None, handle_signals=False)
    await runner.setup()
    for role in roles.values():
        await role.up()
    await web.TCPSite(runner, "127.0.0.1", control, reuse_address=True).start()
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--primary", required=True, help="comma-separated ports")
    p.add_argument("--backup", type=int, required=True)
    p.add_argument("--control", type=int, required=True)
    args = p.parse_args()
    import uvloop
    uvloop.install()
    try:
        asyncio.run(serve([int(x) for x in args.primary.split(",")], args.backup, args.control))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
