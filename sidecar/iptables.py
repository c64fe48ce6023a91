"""`sidecar iptables`: the nat rules behind the transparent listener, run by an init container.

Like Istio's istio-init, every outbound TCP connection of the pod is REDIRECTed to the transparent
listener (15006), except:
  - connections made by the sidecar's own UID, or its upstream calls would loop back into itself;
  - loopback traffic (`-o lo`, `-d 127.0.0.1/32`): the app reaching the sidecar's proxy/admin ports,
    or anything else in the pod, must not be captured;
  - ports the operator excludes (`--exclude-port`, e.g. a database the sidecar cannot speak).

All rules live in one chain, SIDECAR_OUTPUT, jumped to from OUTPUT, so removing them is three commands
and re-running is idempotent: the old jump and chain are removed first, then rebuilt. The jump from
OUTPUT is added last, so no connection ever sees a half-built chain.

`rules()` and `clean_rules()` are pure (argv lists); only `iptables_command()` touches the system.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

CHAIN = "SIDECAR_OUTPUT"
_NAT = ["iptables", "-t", "nat"]
_JUMP = ["OUTPUT", "-p", "tcp", "-j", CHAIN]


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be a TCP port (1-65535), got {value!r}")
    return value


def rules(proxy_port: int, proxy_uid: int, exclude_ports: Iterable[int] = ()) -> list[list[str]]:
    """The argv lists that build the chain from scratch (run `clean_rules()` first to re-run)."""
    _port(proxy_port, "proxy port")
    if not isinstance(proxy_uid, int) or proxy_uid < 0:
        raise ValueError(f"proxy uid must be a non-negative integer, got {proxy_uid!r}")
    excluded = list(dict.fromkeys(_port(p, "excluded port") for p in exclude_ports))
    chain = [*_NAT, "-A", CHAIN]
    out = [
        [*_NAT, "-N", CHAIN],
        # The sidecar's own upstream connections: redirecting them would loop forever.
        [*chain, "-m", "owner", "--uid-owner", str(proxy_uid), "-j", "RETURN"],
        # In-pod traffic (app -> sidecar on 127.0.0.1:15001, app -> itself) stays as addressed.
        [*chain, "-o", "lo", "-j", "RETURN"],
        [*chain, "-d", "127.0.0.1/32", "-j", "RETURN"],
    ]
    out += [[*chain, "-p", "tcp", "--dport", str(p), "-j", "RETURN"] for p in excluded]
    out += [
        [*chain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(proxy_port)],
        # Hooked last: until this rule exists nothing is redirected, so there is no half-built window.
        [*_NAT, "-A", *_JUMP],
    ]
    return out


def clean_rules() -> list[list[str]]:
    """The argv lists that remove everything `rules()` added. Each fails harmlessly when absent."""
    return [
        [*_NAT, "-D", *_JUMP],
        [*_NAT, "-F", CHAIN],
        [*_NAT, "-X", CHAIN],
    ]


def _with_binary(argvs: list[list[str]], binary: str) -> list[list[str]]:
    return [[binary, *argv[1:]] for argv in argvs]


def _script(clean: list[list[str]], build: list[list[str]]) -> str:
    """Dry-run output: a shell script with the same semantics as a real run."""
    lines = [f"{shlex.join(argv)} 2>/dev/null || true" for argv in clean]
    lines += [shlex.join(argv) for argv in build]
    return "\n".join(lines) + "\n"


class _Failed(Exception):
    pass


def _run(argv: Sequence[str], *, check: bool) -> None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as exc:
        raise _Failed(f"cannot execute {argv[0]}: {exc}") from exc
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        hint = ""
        if "denied" in detail.lower() or "must be root" in detail.lower() or "not permitted" in detail.lower():
            hint = " (run as root with the NET_ADMIN and NET_RAW capabilities)"
        raise _Failed(f"`{shlex.join(argv)}` failed: {detail}{hint}")


def iptables_command(args) -> int:
    binary = getattr(args, "iptables", None) or "iptables"
    try:
        build = [] if args.clean else rules(args.proxy_port, args.proxy_uid, args.exclude_port)
    except ValueError as exc:
        print(f"sidecar iptables: {exc}", file=sys.stderr)
        return 2
    clean = _with_binary(clean_rules(), binary)
    build = _with_binary(build, binary)

    if args.dry_run:
        sys.stdout.write(_script(clean, build))
        return 0

    if shutil.which(binary) is None:
        print(f"sidecar iptables: {binary!r} not found on PATH; the sidecar image ships it "
              f"(use --dry-run to only print the rules)", file=sys.stderr)
        return 1
    try:
        # A read-only listing first: a missing capability is reported here, clearly, rather than
        # swallowed by the cleanup commands below, whose failures are expected and ignored.
        _run([binary, "-t", "nat", "-S", "OUTPUT"], check=True)
        for argv in clean:
            _run(argv, check=False)
        for argv in build:
            _run(argv, check=True)
    except _Failed as exc:
        print(f"sidecar iptables: {exc}", file=sys.stderr)
        return 1
    action = "removed" if args.clean else f"installed: outbound TCP -> 127.0.0.1:{args.proxy_port}"
    print(f"sidecar iptables: chain {CHAIN} {action}", file=sys.stderr)
    return 0
