"""Which of this process's sockets are still open: the kernel's view, from /proc (Linux)."""
from __future__ import annotations

import os


def _hexport(text: str) -> int:
    return int(text.rsplit(":", 1)[1], 16)


def inodes(local_port: int | None = None, remote_port: int | None = None) -> set[int]:
    """Inodes of TCP sockets (v4 and v6) with these ports, in any state."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = _hexport(fields[1]), _hexport(fields[2]), int(fields[9])
            if inode and (local_port is None or local == local_port) \
                    and (remote_port is None or remote == remote_port):
                found.add(inode)
    return found


def open_socket_inodes() -> set[int]:
    """Inodes of the sockets this process holds a descriptor for."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out
