"""A dummy OTLP/HTTP receiver: answers every POST /v1/traces with an empty 200 (ExportTraceServiceResponse
is all-optional, so an empty protobuf body is a valid success). Counts what it received.
Run: python -m bench.otlp_sink PORT
"""
import sys

from aiohttp import web

received = {"requests": 0, "bytes": 0}


async def traces(request: web.Request) -> web.Response:
    body = await request.read()
    received["requests"] += 1
    received["bytes"] += len(body)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(received)


if __name__ == "__main__":
    import uvloop
    uvloop.install()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
