"""Opt-in HTTPS interception on the proxy listener. The `openai` package, with only HTTPS_PROXY and
SSL_CERT_FILE (the bundle the sidecar wrote) set, calls https://provider.test: the sidecar terminates
TLS with a leaf from its generated CA, the primary provider answers 503, and the completion comes from
the backup with the model mapped. A host not listed stays an opaque tunnel (the app sees the real
server's certificate); a client that does not trust the CA fails cleanly, and the sidecar logs one line."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import stat
import shutil
import subprocess
import sys
import textwrap

import pytest
from aiohttp import web

from harness import ports, start_sidecar

HANG_GUARD = 20.0


@pytest.fixture(scope="module")
def provider_tls(tmp_path_factory):
    """A CA of the providers' own, and a server certificate for 127.0.0.1 signed by it."""
    d = tmp_path_factory.mktemp("provider-tls")

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=provider CA")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "srv.key",
         "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ossl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
         "-out", "srv.pem", "-extfile", "ext.cnf")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "srv.pem", d / "srv.key")
    return d / "ca.pem", ctx


async def primary(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "overloaded"}}, status=503)


async def backup(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": f"backup answered as {body['model']}"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})


def policy(p, state_dir, ca_file, primary_url, backup_url) -> str:
    return f"""
    version: 1
    state_dir: {state_dir}
    listeners:
      - {{name: egress, mode: proxy, port: {p['proxy']}, intercept: {{hosts: [provider.test, "*.intercepted.test"]}}}}
    admin: {{bind: 127.0.0.1, port: {p['admin']}}}
    health: {{bind: 127.0.0.1, port: {p['health']}}}
    upstreams:
      primary: {{url: "{primary_url}", tls: {{ca_file: "{ca_file}"}}}}
      backup: {{url: "{backup_url}", tls: {{ca_file: "{ca_file}"}}}}
    routes:
      - name: chat
        match: {{host: provider.test, path_prefix: /v1/chat/}}
        upstream: primary
        fallback:
          when: [5xx]
          targets:
            - upstream: backup
              rewrite: {{json_map: {{model: {{gpt-4o: backup-large, "*": backup-small}}}}}}
      - name: opaque
        match: {{host: 127.0.0.1}}
        allow_internal: true
    """


APP = textwrap.dedent("""
    import json, sys, openai
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=20)
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    done = r.parse()
    print(json.dumps({"model": done.model, "content": done.choices[0].message.content,
                      "degraded": r.headers.get("x-sidecar-degraded"), "route": r.headers.get("x-sidecar-route"),
                      "upstream": r.headers.get("x-sidecar-upstream")}))
""")


@pytest.fixture
async def intercepting(tmp_path, upstream_factory, provider_tls):
    ca_file, server_ctx = provider_tls
    up1 = await upstream_factory(primary, ssl_context=server_ctx)
    up2 = await upstream_factory(backup, ssl_context=server_ctx)
    p = ports()
    state = tmp_path / "state"
    sc = await start_sidecar(tmp_path, policy(p, state, ca_file, up1.url, up2.url))
    yield p, sc, state, up1, up2
    await sc.stop()


async def test_openai_through_https_proxy_gets_the_backup_with_the_model_mapped(intercepting, tmp_path):
    p, sc, state, up1, up2 = intercepting
    key = state / "intercept-ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600          # generated on first start, ours alone
    bundle = state / "intercept-bundle.pem"
    app = tmp_path / "app.py"
    app.write_text(APP)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("SSL_")}
    env.update(HTTPS_PROXY=f"http://127.0.0.1:{p['proxy']}", SSL_CERT_FILE=str(bundle))
    done = await asyncio.create_subprocess_exec(sys.executable, str(app), "https://provider.test/v1", env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err.decode()[-3000:]
    got = json.loads(out)
    assert got == {"model": "backup-large", "content": "backup answered as backup-large",
                   "degraded": "fallback", "route": "chat", "upstream": "backup"}
    assert up1.hits == 1 and up2.hits == 1
    assert key.read_bytes() not in sc.runtime.status().__repr__().encode()


async def test_a_host_not_listed_stays_an_opaque_tunnel(intercepting, provider_tls):
    p, sc, state, up1, up2 = intercepting
    ca_file, _ = provider_tls
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(f"CONNECT 127.0.0.1:{up2.port} HTTP/1.1\r\nHost: 127.0.0.1:{up2.port}\r\n\r\n".encode())
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)).startswith(b"HTTP/1.1 200")
    # the app verifies the provider's own certificate end to end: only its CA is trusted here
    ctx = ssl.create_default_context(cafile=str(ca_file))
    await writer.start_tls(ctx, server_hostname="127.0.0.1")
    issuer = dict(x[0] for x in writer.get_extra_info("peercert")["issuer"])
    assert issuer["commonName"] == "provider CA"
    writer.close()


async def test_a_client_not_trusting_the_ca_fails_cleanly_with_one_log_line(intercepting, caplog):
    p, sc, state, up1, up2 = intercepting
    caplog.set_level(logging.WARNING)
    reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"])
    writer.write(b"CONNECT api.intercepted.test:443 HTTP/1.1\r\nHost: api.intercepted.test:443\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)).startswith(b"HTTP/1.1 200")
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(writer.start_tls(ssl.create_default_context(), server_hostname="api.intercepted.test"),
                               HANG_GUARD)
    writer.close()
    for _ in range(200):
        if any("intercept" in r.name for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    lines = [r for r in caplog.records if r.name.startswith("sidecar")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "api.intercepted.test" in lines[0].getMessage() and lines[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records)


async def test_leaves_are_cached_and_short_lived(intercepting):
    p, sc, state, up1, up2 = intercepting
    interceptor = sc.runtime.gen.interceptors["egress"]
    assert interceptor.leaves.context("a.intercepted.test") is interceptor.leaves.context("a.intercepted.test")
    leaf = interceptor.leaves.leaf("a.intercepted.test")
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() <= 25 * 3600
    assert interceptor.wants("x.intercepted.test") and not interceptor.wants("intercepted.test")
    assert not interceptor.wants("provider.test.evil")


async def test_transparent_listener_intercepts_a_listed_sni(tmp_path, upstream_factory, provider_tls, monkeypatch):
    """A ClientHello for a listed host on the transparent listener is terminated too; the request inside
    meets its route (here: answered by the backup provider)."""
    from sidecar.proxy import passthrough, sniff
    ca_file, server_ctx = provider_tls
    up = await upstream_factory(backup, ssl_context=server_ctx)
    monkeypatch.setattr(sniff, "original_destination", lambda transport: ("127.0.0.1", 443))
    monkeypatch.setattr(passthrough, "original_destination", lambda transport: ("127.0.0.1", up.port))
    p = ports()
    state = tmp_path / "state"
    sc = await start_sidecar(tmp_path, f"""
    version: 1
    state_dir: {state}
    listeners:
      - {{name: mesh, mode: transparent, port: {p['proxy']}, intercept: {{hosts: [provider.test]}}}}
    admin: {{bind: 127.0.0.1, port: {p['admin']}}}
    health: {{bind: 127.0.0.1, port: {p['health']}}}
    upstreams:
      backup: {{url: "{up.url}", tls: {{ca_file: "{ca_file}"}}}}
    routes:
      - name: chat
        match: {{host: provider.test}}
        upstream: backup
    """)
    try:
        ctx = ssl.create_default_context(cafile=str(state / "intercept-bundle.pem"))
        reader, writer = await asyncio.open_connection("127.0.0.1", p["proxy"], ssl=ctx,
                                                       server_hostname="provider.test")
        body = json.dumps({"model": "m", "messages": []}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: provider.test\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        answer = await asyncio.wait_for(reader.read(), HANG_GUARD)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b"x-sidecar-route: chat" in answer.lower() and b"backup answered as m" in answer
    finally:
        await sc.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("flag, version", [("--http2", "2"), ("--http1.1", "1.1")])
async def test_intercepted_https_speaks_the_http_version_alpn_agreed(intercepting, tmp_path, flag, version):
    """The sidecar offers h2 and http/1.1 by ALPN on an intercepted CONNECT: curl --http2 gets its answer
    over HTTP/2 (each stream through the route policy), curl --http1.1 over HTTP/1.1."""
    p, sc, state, up1, up2 = intercepting
    done = await asyncio.create_subprocess_exec(
        "curl", "-sS", flag, "-x", f"http://127.0.0.1:{p['proxy']}", "--cacert",
        str(state / "intercept-bundle.pem"), "-D", str(tmp_path / "head"), "-o", str(tmp_path / "body"),
        "-w", "%{http_version}", "-H", "content-type: application/json",
        "--data", '{"model": "gpt-4o", "messages": []}', "https://provider.test/v1/chat/completions",
        env={"PATH": os.environ.get("PATH", "")}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err.decode()[-2000:]
    assert out.decode() == version
    head = (tmp_path / "head").read_bytes().decode().lower()
    assert head.startswith(f"http/1.1 200 connection established\r\n\r\nhttp/{version} 200"), head
    assert "x-sidecar-route: chat" in head and "x-sidecar-upstream: backup" in head
    assert json.loads((tmp_path / "body").read_text())["model"] == "backup-large"
    assert up1.hits == 1 and up2.hits == 1
