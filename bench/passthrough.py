"""The baseline: the least an aiohttp server + ClientSession forwarder can do (uvloop, pooled keep-alive).

No policy, no hop-by-hop filtering beyond what aiohttp does itself, body streamed back in chunks.
Run: python -m bench.passthrough PORT UPSTREAM_PORT
"""
import asyncio
import logging
import sys

import aiohttp
from aiohttp import web

DROP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


async def main(port: int, upstream: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
                                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
    base = f"http://127.0.0.1:{upstream}"

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read() if request.body_exists else None
        async with session.request(request.method, base + request.raw_path, headers=request.headers,
                                   data=body, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items()
                                                                 if k.lower() not in DROP})
            resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)   # wrk cutting connections at the end
    server = web.Server(forward, access_log=None)
    await asyncio.get_running_loop().create_server(server, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
