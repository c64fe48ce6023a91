"""Secrets never leave in logs (every logger, aiohttp's own included), traces, /config, /status,
/events or error bodies: `${VAR}` values from the policy, and `Authorization`, `Proxy-Authorization`,
`Cookie` and API-key header values from the app, in well-formed and malformed requests alike."""
import asyncio
import io
import json
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.telemetry.otel import OtelSink
from sidecar.telemetry.redact import redact

from .kit import RawUpstream, assert_healthy, exchange, get, policy_text

POLICY_KEY = "sk-live-POLICYSECRET-7f3a9c21"
BEARER = "app-bearer-Zq81Xk"
COOKIE = "sessid-Pp02Lm9"
PROXY_AUTH = "cHJveHk6UFJPWFlTRUNSRVQ="
API_KEY = "apikey-Kk77Jw3"
URL_PASSWORD = "urlpass-Hh55Rt"
APP_SECRETS = [BEARER, COOKIE, PROXY_AUTH, API_KEY, URL_PASSWORD]
ALL_SECRETS = [POLICY_KEY, *APP_SECRETS]

SECRET_HEADERS = (f"Authorization: Bearer {BEARER}\r\nCookie: a=1; session={COOKIE}\r\n"
                  f"Proxy-Authorization: Basic {PROXY_AUTH}\r\nX-Api-Key: {API_KEY}\r\n")

LOGGERS = ["", "aiohttp", "aiohttp.server", "aiohttp.access", "aiohttp.client", "aiohttp.web", "asyncio",
           "sidecar", "sidecar.proxy", "sidecar.guard", "sidecar.telemetry"]


@pytest.fixture
def log_capture():
    """Everything any logger writes, formatted as a handler would (exceptions included)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    saved = {}
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield stream
    logging.getLogger().removeHandler(handler)
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


class Records:
    def __init__(self):
        self.requests, self.decisions = [], []

    def decision(self, record):
        self.decisions.append(record)

    def request_finished(self, record):
        self.requests.append(record)


async def reset_upstream(reader, writer):
    writer.transport.abort()


async def test_no_secret_reaches_logs_traces_admin_or_error_bodies(monkeypatch, tmp_path, log_capture,
                                                                   sidecar_factory, ports, upstream):
    monkeypatch.setenv("HARDEN_API_KEY", POLICY_KEY)
    broken = await RawUpstream(reset_upstream).start()
    try:
        text = policy_text(ports, upstream.url, """
            routes:
              - name: broken
                match: {path_prefix: /broken/}
                upstream: broken
                retry: {max_retries: 1, when: [reset], backoff: {base: 1ms, max: 2ms}}
              - name: keyed
                match: {path_prefix: /}
                upstream: app
            """).replace("upstreams:\n", "upstreams:\n"
                         f"  broken: {{url: '{broken.url}', headers: {{x-api-key: '${{HARDEN_API_KEY}}'}}}}\n")
        text = text.replace(f'app: {{url: "{upstream.url}"}}',
                            f'app: {{url: "{upstream.url}", headers: {{authorization: "Bearer ${{HARDEN_API_KEY}}"}}}}')
        sc = await sidecar_factory(text)
        records = Records()
        exporter = InMemorySpanExporter()
        otel = OtelSink(exporter, sampler=lambda *args: True)
        sc.runtime.sink.sinks.extend([records, otel])
        bodies: list[bytes] = []

        async def send(port: int, data: bytes, **kwargs):
            answer = await exchange(port, data, close_wait=0, **kwargs)
            bodies.append(answer.body + json.dumps(answer.headers).encode())
            return answer

        # 1. well-formed requests carrying every kind of secret, through both listeners
        assert (await send(ports.reverse, get("/ok", extra=SECRET_HEADERS))).status == 200
        assert (await send(ports.proxy, get(f"{upstream.url}/ok", extra=SECRET_HEADERS))).status == 200
        assert upstream.seen[0]["headers"]["Authorization"] == f"Bearer {POLICY_KEY}"   # it was used
        assert "Proxy-Authorization" not in upstream.seen[1]["headers"]                 # hop-by-hop
        # 2. an upstream that fails (retried, then a JSON error): reasons, decisions, error body
        assert (await send(ports.reverse, get("/broken/x", extra=SECRET_HEADERS))).status == 503
        # credentials in a proxied URL, to a target that fails
        dead = f"http://user:{URL_PASSWORD}@127.0.0.1:{broken.port}/broken/y"
        assert (await send(ports.proxy, get(dead, extra=SECRET_HEADERS))).status in (502, 503)
        # 3. malformed lines that carry the secrets, to the listeners (our guard) ...
        malformed = [
            f"GET /m HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {BEARER}\x01\r\n\r\n",
            f"GET /m HTTP/1.1\r\nHost: a\r\nCookie: session={COOKIE}\r\n folded\r\n\r\n",
            f"GET /m HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic {PROXY_AUTH}\x7f\r\n\r\n",
            f"GET /m HTTP/1.1\r\nHost: a\r\nX-Api-Key: {API_KEY}{'z' * 9000}\r\n\r\n",
            f"GET /m HTTP/1.1\r\nHost: a\r\nX-Api-Key : {API_KEY}\r\n\r\n",
            f"GET /m?token={API_KEY} HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            f"POST /m HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {BEARER}\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{POLICY_KEY}\r\n",
        ]
        for raw in malformed:
            for port in (ports.reverse, ports.proxy):
                assert 400 <= (await send(port, raw.encode("latin-1"))).status < 500
        # ... and to the admin port (guarded too: plain aiohttp would echo the line in its 400 body)
        for raw in malformed[:3]:
            assert (await send(ports.admin, raw.encode("latin-1"))).status == 400
        # aiohttp's own logging of a bad request, exactly as web_protocol does it (the parse error
        # quotes the raw line), and credentials in arguments to other aiohttp loggers
        try:
            raise BadHttpMessage(f"Invalid header value char:\n\n  b'Authorization: Bearer {BEARER}\\x01'\n  ^")
        except BadHttpMessage as exc:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1",
                                                          exc_info=exc)
        logging.getLogger("aiohttp.access").info('%s "%s" %s', "127.0.0.1", f"Cookie: session={COOKIE}", 400)
        logging.getLogger("aiohttp.client").debug("headers %r", {"X-Api-Key": API_KEY, "Host": "a"})
        logging.getLogger("sidecar.proxy").warning("upstream key %s", POLICY_KEY)
        # 4. a rejected reload whose error would quote the secret
        bad = text.replace("routes:\n", "bogus_key: 'x${HARDEN_API_KEY}'\nroutes:\n", 1)
        (tmp_path / "policy.yaml").write_text(bad)
        ok, error = await sc.runtime.reload()
        assert not ok and error
        # 5. what an operator reads
        for path in ("/config", "/status", "/metrics", "/events"):
            if path == "/events":
                reader, writer = await asyncio.open_connection("127.0.0.1", ports.admin)
                writer.write(get(path, "127.0.0.1"))
                await asyncio.sleep(0.3)
                events = await reader.read(1 << 20)
                writer.close()
                bodies.append(events)
            else:
                answer = await send(ports.admin, get(path, "127.0.0.1"))
                assert answer.status == 200, path
        await asyncio.sleep(0.1)
        otel.processor.force_flush()
        spans = exporter.get_finished_spans()
        assert spans, "spans were exported (the trace check is not vacuous)"
        span_text = "\n".join(json.dumps({"name": s.name, "attributes": dict(s.attributes or {}),
                                          "events": [dict(e.attributes or {}) for e in s.events],
                                          "status": str(s.status.description)}, default=str) for s in spans)
        record_text = repr(records.requests) + repr(records.decisions)
        logs = log_capture.getvalue()
        everything = {"logs": logs, "spans": span_text, "records": record_text,
                      "bodies": b"\n".join(bodies).decode("latin-1")}
        for where, content in everything.items():
            for secret in ALL_SECRETS:
                assert secret not in content, f"{secret!r} leaked into {where}"
        # The scan saw what it had to see: our refusals, aiohttp's own error records, the reload error.
        assert "refused a request" in logs
        assert "aiohttp.server" in logs and "<redacted>" in logs
        assert "policy reload" in logs
        await assert_healthy(sc, ports, upstream.url)
        otel.shutdown()
    finally:
        await broken.stop()


def test_redact_covers_the_shapes_secrets_take_in_text():
    cases = {
        "b'Authorization: Bearer abc.def-123\\x01'": "abc.def-123",
        "{'Cookie': 'a=1; session=xyz789'}": "xyz789",
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\nHost: a": "dXNlcjpwYXNz",
        "x-api-key=KEY12345&b=1": "KEY12345",
        "X-Goog-Api-Key: goog-1234": "goog-1234",
        "X-Auth-Token: tok-9999": "tok-9999",
        "http://bob:hunter22@example.com/": "hunter22",
        "sent Bearer eyJhbGciOi.xyz upstream": "eyJhbGciOi.xyz",
        "value POLICYVALUE here": "POLICYVALUE",
    }
    for text, secret in cases.items():
        assert secret not in redact(text, ["POLICYVALUE"]), text
    # prose survives
    for prose in ("retry budget has 3 tokens left", "basic auth is configured", "breaker for api:443 opened"):
        assert redact(prose) == prose
