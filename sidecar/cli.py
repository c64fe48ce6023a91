"""argv and environment -> commands. No logic of its own: each command lives in its module."""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_POLICY = "policies/default.yaml"


def _policy_path(arg: str | None) -> str:
    return arg or os.environ.get("SIDECAR_POLICY") or DEFAULT_POLICY


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="A resilience sidecar for outbound HTTP.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the listeners and the admin API")
    run.add_argument("-c", "--config", help="policy file (default: $SIDECAR_POLICY, else policies/default.yaml)")
    run.add_argument("--workers", type=int, default=1, help="processes sharing the listeners (SO_REUSEPORT)")
    run.add_argument("--drain-timeout", type=float, default=20.0, help="seconds in-flight requests get on SIGTERM")
    run.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "info"))

    val = sub.add_parser("validate", help="check policy files; exit 1 with FILE:LINE:COL errors")
    val.add_argument("files", nargs="+")

    exp = sub.add_parser("explain", help="which route matches a request, and its effective policy")
    exp.add_argument("-c", "--config")
    exp.add_argument("method")
    exp.add_argument("url")
    exp.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")

    inj = sub.add_parser("inject", help="add the sidecar to Kubernetes manifests")
    inj.add_argument("-c", "--config", help="policy file to embed as the ConfigMap")
    inj.add_argument("manifest", help="YAML file, or - for stdin")
    inj.add_argument("--image", default=os.environ.get("SIDECAR_IMAGE", "ghcr.io/sidecar/sidecar:0.1.0"))
    inj.add_argument("--transparent", action="store_true", help="add the iptables init container")
    inj.add_argument("--intercept", action="store_true",
                     help="HTTPS interception: mount the sidecar's CA bundle into the app and point "
                          "SSL_CERT_FILE, REQUESTS_CA_BUNDLE and NODE_EXTRA_CA_CERTS at it")
    inj.add_argument("--configmap", default="sidecar-policy", help="name of the policy ConfigMap")
    inj.add_argument("--otlp-endpoint", help="set OTEL_EXPORTER_OTLP_ENDPOINT on the sidecar (default: the policy's)")
    inj.add_argument("--exclude-port", type=int, action="append", default=[],
                     help="transparent mode: outbound TCP port never redirected (repeatable)")

    ipt = sub.add_parser("iptables", help="install transparent-mode nat rules (init container)")
    ipt.add_argument("--proxy-port", type=int, default=15006)
    ipt.add_argument("--proxy-uid", type=int, default=1337, help="the sidecar's UID, never redirected")
    ipt.add_argument("--exclude-port", type=int, action="append", default=[])
    ipt.add_argument("--dry-run", action="store_true", help="print the commands, change nothing")
    ipt.add_argument("--clean", action="store_true", help="remove the rules instead")
    ipt.add_argument("--iptables", default="iptables", help="iptables binary (e.g. iptables-legacy)")

    demo = sub.add_parser("demo", help="a self-contained demo on loopback")
    demo.add_argument("--requests", type=int, default=200)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from sidecar.app import serve
        return serve(_policy_path(args.config), workers=args.workers,
                     drain_timeout=args.drain_timeout, log_level=args.log_level)
    if args.command == "validate":
        from sidecar.policy.load import validate_files
        problems = validate_files(args.files)
        for line in problems:
            print(line)
        return 1 if problems else 0
    if args.command == "explain":
        from sidecar.explain import explain_command
        return explain_command(_policy_path(args.config), args.method, args.url, args.header)
    if args.command == "inject":
        from sidecar.inject import inject_command
        return inject_command(args)
    if args.command == "iptables":
        from sidecar.iptables import iptables_command
        return iptables_command(args)
    if args.command == "demo":
        from sidecar.demo import run_demo
        return run_demo(requests=args.requests)
    return 2


if __name__ == "__main__":
    sys.exit(main())
