"""Transparent mode for real: two network namespaces joined by a veth pair, the nat rules installed by
`sidecar iptables` (as the init container would), the sidecar running as its own UID in the app
namespace, and an application under another UID calling a server in the other namespace by its IP.

    sc-app-XXXX  10.199.N.1  app (uid 1000) --REDIRECT--> sidecar :15006 (uid 1337) --+
                                                                                     | veth
    sc-srv-XXXX  10.199.N.2  server :8080  <-----------------------------------------+

Skipped, with the kernel's own words, only where the kernel or sandbox refuses namespaces, veth pairs
or the iptables nat table.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

SIDECAR_UID = 1337
APP_UID = 1000
PROXY_PORT = 15006
REFUSALS = ("operation not permitted", "permission denied", "not supported", "unknown device type",
            "no such file or directory", "protocol not available", "can't initialize", "table does not exist")

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="network namespaces and iptables are Linux-only"),
    pytest.mark.skipif(os.name == "posix" and os.geteuid() != 0,
                       reason="needs root (CAP_NET_ADMIN) to create network namespaces and nat rules"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("ip", "iptables", "setpriv")),
                       reason="needs ip (iproute2), iptables and setpriv (util-linux); .ci/run installs them"),
]

SERVER = textwrap.dedent("""
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen = {"path": self.path, "host": self.headers.get("host"), "peer": self.client_address[0],
                    "traceparent": self.headers.get("traceparent")}
            print("HIT " + json.dumps(seen), flush=True)
            body = json.dumps(seen).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    print("READY", flush=True)
    server.serve_forever()
""")

CLIENT = textwrap.dedent("""
    import json, sys, urllib.request
    out = []
    for url, host in json.loads(sys.argv[1]):
        req = urllib.request.Request(url, headers={"Host": host} if host else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out.append({"status": r.status, "headers": {k.lower(): v for k, v in r.headers.items()},
                            "body": r.read().decode()})
        except urllib.error.HTTPError as e:
            out.append({"status": e.code, "headers": {k.lower(): v for k, v in e.headers.items()},
                        "body": e.read().decode()})
    print(json.dumps(out))
""")


def run(*argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return done


def refused_by_kernel(done: subprocess.CompletedProcess) -> bool:
    return done.returncode != 0 and any(word in done.stderr.lower() for word in REFUSALS)


def as_uid(uid: int, caps: list[str], *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *caps, *argv]


def interpreter_caps() -> list[str]:
    """What a non-root UID needs to run this interpreter with the sidecar importable.

    Normally nothing. When the interpreter lives under a directory only root may enter (pyenv under
    /root, as on some dev machines), CAP_DAC_READ_SEARCH as an ambient capability lets the process
    read it: it stays an ordinary UID for the owner match in the nat rules, which is what matters."""
    probe = [sys.executable, "-c", "import sidecar.app"]   # everything `sidecar run` imports
    attempts = [[], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]]
    errors = []
    for caps in attempts:
        done = run(*as_uid(SIDECAR_UID, caps, *probe), check=False)
        if done.returncode == 0:
            return caps
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    pytest.skip(f"uid {SIDECAR_UID} cannot run {sys.executable} with the sidecar importable: {errors}")


class Namespaces:
    """Two namespaces and the veth pair between them; `close()` kills what ran inside and deletes both."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(1000):03d}"
        self.app, self.srv = f"sc-app-{tag}", f"sc-srv-{tag}"
        self.subnet = random.randrange(1, 255)
        self.app_ip, self.srv_ip = f"10.199.{self.subnet}.1", f"10.199.{self.subnet}.2"
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []

    def setup(self) -> None:
        for ns in (self.app, self.srv):
            done = run("ip", "netns", "add", ns, check=False)
            if done.returncode != 0:
                self.close()
                reason = f"`ip netns add` refused: {done.stderr.strip()}"
                pytest.skip(reason) if refused_by_kernel(done) else pytest.fail(reason)
            self.created.append(ns)
        done = run("ip", "-n", self.app, "link", "add", "sc-veth-a", "type", "veth", "peer", "name", "sc-veth-s",
                   "netns", self.srv, check=False)
        if done.returncode != 0:
            self.close()
            reason = f"veth pair refused: {done.stderr.strip()}"
            pytest.skip(reason) if refused_by_kernel(done) else pytest.fail(reason)
        for ns, dev, ip in ((self.app, "sc-veth-a", self.app_ip), (self.srv, "sc-veth-s", self.srv_ip)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def exec(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def spawn(self, ns: str, argv: list[str], log: Path, cwd: Path) -> subprocess.Popen:
        proc = subprocess.Popen(self.exec(ns, *argv), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for ns in self.created:
            run("ip", "netns", "del", ns, check=False)


@pytest.fixture
def netns():
    spaces = Namespaces()
    spaces.setup()
    try:
        yield spaces
    finally:
        spaces.close()


@pytest.fixture
def workdir():
    """World-readable (pytest's tmp_path is not): the sidecar reads its policy as an unprivileged UID."""
    path = Path(tempfile.mkdtemp(prefix="sidecar-netns-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_for_line(log: Path, proc: subprocess.Popen, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} within {timeout}s:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def hits(log: Path) -> list[dict]:
    return [json.loads(line[4:]) for line in log.read_text().splitlines() if line.startswith("HIT ")]


def test_app_traffic_is_intercepted_routed_by_host_and_does_not_loop(netns, workdir):
    caps = interpreter_caps()
    nat = run(*netns.exec(netns.app, "iptables", "-t", "nat", "-S", "OUTPUT"), check=False)
    if nat.returncode != 0:
        (pytest.skip if refused_by_kernel(nat) else pytest.fail)(f"iptables nat table refused: {nat.stderr.strip()}")

    # the server in the other namespace
    (workdir / "server.py").write_text(SERVER)
    (workdir / "client.py").write_text(CLIENT)
    for name in ("server.py", "client.py"):
        (workdir / name).chmod(0o644)
    srv_log = workdir / "server.log"
    server = netns.spawn(netns.srv, [sys.executable, str(workdir / "server.py"), netns.srv_ip, "8080"],
                         srv_log, workdir)
    wait_for_line(srv_log, server, "READY")

    # the init container's job
    done = run(*netns.exec(netns.app, sys.executable, "-m", "sidecar", "iptables",
                           "--proxy-port", str(PROXY_PORT), "--proxy-uid", str(SIDECAR_UID)), check=False)
    if done.returncode != 0:
        (pytest.skip if refused_by_kernel(done) else pytest.fail)(f"`sidecar iptables` failed: {done.stderr.strip()}")

    # the sidecar, as its own UID, with routes matched on Host
    policy = workdir / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        listeners:
          - {{name: outbound, mode: transparent, bind: 0.0.0.0, port: {PROXY_PORT}}}
        admin: {{bind: 127.0.0.1, port: 15000}}
        health: {{bind: 127.0.0.1, port: 15021}}
        routes:
          - name: by-ip
            match: {{host: "{netns.srv_ip}", path_prefix: /hello}}
          - name: by-name
            match: {{host: svc.test}}
        """))
    policy.chmod(0o644)
    sc_log = workdir / "sidecar.log"
    sidecar = netns.spawn(netns.app, as_uid(SIDECAR_UID, caps, sys.executable, "-m", "sidecar", "run",
                                            "-c", str(policy)), sc_log, workdir)
    wait_for_line(sc_log, sidecar, "sidecar ready")

    def call(uid: int, *targets: tuple[str, str | None]) -> list[dict]:
        argv = as_uid(uid, caps, sys.executable, str(workdir / "client.py"), json.dumps(targets))
        return json.loads(run(*netns.exec(netns.app, *argv)).stdout)

    url = f"http://{netns.srv_ip}:8080/hello"
    by_ip, by_name = call(APP_UID, (url, None), (url, "svc.test"))

    # intercepted: the sidecar's headers are on the server's own answer
    assert by_ip["status"] == 200, (by_ip, sc_log.read_text())
    assert by_ip["headers"]["x-sidecar-route"] == "by-ip"
    assert by_ip["headers"]["x-sidecar-upstream"] == f"{netns.srv_ip}:8080"
    assert by_ip["headers"]["x-sidecar-attempts"] == "1"
    assert json.loads(by_ip["body"])["path"] == "/hello"
    # the Host header picks the route; the connection still goes where the app connected (a name the
    # sidecar could not even resolve)
    assert by_name["status"] == 200, (by_name, sc_log.read_text())
    assert by_name["headers"]["x-sidecar-route"] == "by-name"
    assert json.loads(by_name["body"])["host"] == "svc.test"

    # no loop: the server saw each request exactly once, from the app namespace, traced by the sidecar
    seen = hits(srv_log)
    assert len(seen) == 2, seen
    assert all(h["peer"] == netns.app_ip and h["traceparent"] for h in seen), seen

    # the sidecar's own UID is never redirected, nor is loopback (the app reaching the admin port)
    own, = call(SIDECAR_UID, (url, None))
    assert own["status"] == 200 and "x-sidecar-route" not in own["headers"]
    admin, = call(APP_UID, ("http://127.0.0.1:15000/healthz", None))
    assert admin["status"] == 200 and json.loads(admin["body"]) == {"status": "ok"}
    assert "x-sidecar-route" not in admin["headers"]
    assert len(hits(srv_log)) == 3

    # `sidecar iptables --clean` takes the rules out again: the app goes direct
    run(*netns.exec(netns.app, sys.executable, "-m", "sidecar", "iptables", "--clean"))
    direct, = call(APP_UID, (url, None))
    assert direct["status"] == 200 and "x-sidecar-route" not in direct["headers"]
    assert "SIDECAR_OUTPUT" not in run(*netns.exec(netns.app, "iptables", "-t", "nat", "-S")).stdout
