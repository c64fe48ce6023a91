"""Active health checks (HAProxy/Envoy style): a GET of the upstream's `health_check.path`."""
from __future__ import annotations

from multidict import CIMultiDict

from sidecar.exchange.calls import host_header, upstream_url
from sidecar.policy.model import Upstream
from sidecar.transport.client import Transport
from sidecar.transport.errors import UpstreamFailure


async def probe(transport: Transport, up: Upstream) -> bool:
    """True when the upstream answered the check with a 2xx or 3xx within its timeout."""
    check = up.health_check
    headers = CIMultiDict({"Host": host_header(up), "User-Agent": "sidecar-health-check"})
    for key, value in up.headers:
        headers[key] = value
    try:
        resp = await transport.send(up, "GET", upstream_url(up, check.path), headers, None,
                                    timeout=check.timeout, read_idle=check.timeout,
                                    server_hostname=up.tls.server_name)
    except UpstreamFailure:
        return False
    try:
        return 200 <= resp.status < 400
    finally:
        resp.release()
