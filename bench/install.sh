#!/bin/sh
# Installs what `make bench` needs beyond the venv: nginx, HAProxy, wrk and h2load (Debian packages).
# Idempotent: does nothing when all are on PATH. Needs root (or sudo) only when something is missing.
set -e
missing=""
for tool in nginx haproxy wrk h2load taskset; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[ -z "$missing" ] && exit 0
echo "bench: installing$missing" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
pkgs=""
for tool in $missing; do
    case "$tool" in
        taskset) pkgs="$pkgs util-linux" ;;
        h2load) pkgs="$pkgs nghttp2-client" ;;
        *) pkgs="$pkgs $tool" ;;
    esac
done
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
# The Debian packages start system services; the benchmark runs its own instances on free ports.
for svc in nginx haproxy; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
