"""A real, throwaway redis-server on a free loopback port, for tests that need Redis.

No persistence by default; `aof_dir` turns on the append-only file with `appendfsync always` (what the
README asks of a Redis holding the shared queue), so `restart()` shows what survives a Redis restart.
`stop()` then `start()` brings it back on the same port (clients reconnect to the same address)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from harness import free_port


class RedisServer:
    def __init__(self, aof_dir: str | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
        self.port = free_port()
        self.aof_dir = aof_dir
        self.start()

    def start(self) -> None:
        persistence = ["--appendonly", "no"] if self.aof_dir is None else [
            "--appendonly", "yes", "--appendfsync", "always", "--dir", self.aof_dir]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
