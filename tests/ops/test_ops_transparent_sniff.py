"""Transparent mode sniffs, for real (two network namespaces, the nat rules of `sidecar iptables`, no port
excluded): from the app's UID, `curl https://` reaches a TLS server with its own CA and the server sees the
app's SNI; `redis-cli` talks to a redis-server; a server-speaks-first banner protocol works once
`sniff_timeout` passed; plain HTTP is still governed. The relayed ones show in the sidecar's metrics
with their bytes (each is a span; tests/proxy/test_sniff.py asserts the records)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from test_ops_transparent import (  # noqa: F401 - fixtures
    APP_UID, PROXY_PORT, SIDECAR_UID, as_uid, interpreter_caps, netns, refused_by_kernel, run, wait_for_line,
    workdir,
)

pytestmark = pytest.mark.skipif(not all(shutil.which(b) for b in ("curl", "redis-server", "redis-cli", "openssl")),
                                reason="needs curl, redis-server, redis-cli and openssl (scripts/system-deps.sh)")

TLS_SERVER = textwrap.dedent("""
    import socket, ssl, sys
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    ctx.sni_callback = lambda sock, name, c: print("SNI " + str(name), flush=True)
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("READY", flush=True)
    while True:
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 6\\r\\nconnection: close\\r\\n\\r\\ntls ok")
        except (OSError, ssl.SSLError) as exc:
            print("ERR " + repr(exc), flush=True)
""")

BANNER_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("READY", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"220 banner.test ready\\r\\n")
            line = conn.makefile("rb").readline()
            conn.sendall(b"250 got " + line)
""")

BANNER_CLIENT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        f = s.makefile("rwb")
        banner = f.readline()            # the server speaks first: the app sends nothing before it
        f.write(b"HELO app\\r\\n"); f.flush()
        print(banner.decode().strip() + " | " + f.readline().decode().strip())
""")


def make_ca_and_leaf(d, host: str) -> tuple[str, str, str]:
    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "leaf.key",
         "-out", "leaf.csr", "-subj", f"/CN={host}")
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{host}\n")
    ossl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "2", "-out", "leaf.pem", "-extfile", "ext.cnf")
    for name in ("ca.pem", "leaf.pem", "leaf.key"):
        (d / name).chmod(0o644)
    return str(d / "ca.pem"), str(d / "leaf.pem"), str(d / "leaf.key")


def test_tls_redis_banner_and_http_all_pass_the_transparent_listener(netns, workdir):
    caps = interpreter_caps()
    nat = run(*netns.exec(netns.app, "iptables", "-t", "nat", "-S", "OUTPUT"), check=False)
    if nat.returncode != 0:
        (pytest.skip if refused_by_kernel(nat) else pytest.fail)(f"iptables nat table refused: {nat.stderr.strip()}")
    from test_ops_transparent import SERVER
    srv = netns.srv_ip
    ca, leaf, key = make_ca_and_leaf(workdir, "tls.test")
    for name, text in (("tls_server.py", TLS_SERVER), ("banner_server.py", BANNER_SERVER),
                       ("banner_client.py", BANNER_CLIENT), ("http_server.py", SERVER)):
        (workdir / name).write_text(text)
        (workdir / name).chmod(0o644)
    logs = {}
    for name, argv in (("tls", [sys.executable, str(workdir / "tls_server.py"), srv, "8443", leaf, key]),
                       ("banner", [sys.executable, str(workdir / "banner_server.py"), srv, "2525"]),
                       ("http", [sys.executable, str(workdir / "http_server.py"), srv, "8080"])):
        logs[name] = workdir / f"{name}.log"
        wait_for_line(logs[name], netns.spawn(netns.srv, argv, logs[name], workdir), "READY")
    logs["redis"] = workdir / "redis.log"
    netns.spawn(netns.srv, ["redis-server", "--bind", srv, "--port", "6379", "--protected-mode", "no",
                            "--save", "", "--appendonly", "no"], logs["redis"], workdir)
    wait_for_line(logs["redis"], netns.procs[-1], "Ready to accept connections")

    done = run(*netns.exec(netns.app, sys.executable, "-m", "sidecar", "iptables",
                           "--proxy-port", str(PROXY_PORT), "--proxy-uid", str(SIDECAR_UID)), check=False)
    if done.returncode != 0:
        (pytest.skip if refused_by_kernel(done) else pytest.fail)(f"`sidecar iptables` failed: {done.stderr.strip()}")
    policy = workdir / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        listeners:
          - {{name: outbound, mode: transparent, bind: 0.0.0.0, port: {PROXY_PORT}, sniff_timeout: 200ms}}
        admin: {{bind: 127.0.0.1, port: 15000}}
        health: {{bind: 127.0.0.1, port: 15021}}
        routes:
          - name: tls-by-sni
            match: {{host: tls.test}}
          - name: by-ip
            match: {{host: "{srv}"}}
        """))
    policy.chmod(0o644)
    sc_log = workdir / "sidecar.log"
    sidecar = netns.spawn(netns.app, as_uid(SIDECAR_UID, caps, sys.executable, "-m", "sidecar", "run",
                                            "-c", str(policy)), sc_log, workdir)
    wait_for_line(sc_log, sidecar, "sidecar ready")

    def app(*argv: str) -> str:
        return run(*netns.exec(netns.app, *as_uid(APP_UID, caps, *argv)), timeout=30).stdout

    # TLS: the app's own ClientHello reaches the server (its SNI), and the app verifies the server's CA
    body = app("curl", "-sS", "--max-time", "10", "--cacert", ca, "--resolve", f"tls.test:8443:{srv}",
               "https://tls.test:8443/")
    assert body == "tls ok", sc_log.read_text()
    assert "SNI tls.test" in logs["tls"].read_text()
    # a client-speaks-first protocol that is not HTTP
    assert app("redis-cli", "-h", srv, "-p", "6379", "PING").strip() == "PONG"
    assert app("redis-cli", "-h", srv, "-p", "6379", "SET", "k", "v" * 1000).strip() == "OK"
    # a server-speaks-first one: nothing from the app until the banner came, after sniff_timeout
    assert app(sys.executable, str(workdir / "banner_client.py"), srv, "2525").strip() == \
        "220 banner.test ready | 250 got HELO app"
    # plain HTTP is governed as before
    out = app("curl", "-sS", "-i", "--max-time", "10", f"http://{srv}:8080/hello")
    assert re.search(r"(?im)^x-sidecar-route: by-ip", out), out

    metrics = app("curl", "-sS", "http://127.0.0.1:15000/metrics")

    def series(name: str) -> dict[frozenset, float]:
        return {frozenset(re.findall(r'(\w+)="([^"]*)"', labels)): float(value)
                for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", metrics, re.M)}
    connections = series("sidecar_relayed_connections_total")
    assert connections[frozenset({("route", "tls-by-sni"), ("kind", "tls")})] == 1.0, metrics
    assert connections[frozenset({("route", "by-ip"), ("kind", "tcp")})] == 3.0, metrics   # redis-cli twice, banner
    sent = series("sidecar_relayed_bytes_total")
    # the ClientHello alone is a few hundred bytes; the SET's value 1,000
    assert sent[frozenset({("route", "tls-by-sni"), ("kind", "tls"), ("direction", "up")})] > 200, metrics
    assert sent[frozenset({("route", "by-ip"), ("kind", "tcp"), ("direction", "up")})] > 1000, metrics
    assert "Traceback" not in sc_log.read_text()
