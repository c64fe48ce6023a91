#!/usr/bin/env bash
# The Debian packages the test suite talks to for real: Redis (shared cache), Chromium (dashboard),
# iptables + iproute2 (transparent mode in network namespaces), openssl (a TLS upstream's test
# certificate), curl and redis-cli (apps whose TLS and TCP pass the transparent listener), nginx, HAProxy, wrk and
# h2load from nghttp2-client (the benchmark harness's smoke tests). Installs only what is
# missing; needs root (or sudo). Without either it says what is missing and the tests that need it skip.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PATH="$PATH:/usr/sbin:/sbin"
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have redis-server || need+=(redis-server)
have redis-cli || need+=(redis-tools)
have curl || need+=(curl)
have chromium || need+=(chromium)
have iptables || need+=(iptables)
have ip || need+=(iproute2)
have openssl || need+=(openssl)
have nginx || need+=(nginx)
have haproxy || need+=(haproxy)
have wrk || need+=(wrk)
have h2load || need+=(nghttp2-client)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if have sudo; then SUDO="sudo"; else
    echo "system-deps: missing ${need[*]} and not root: the tests that need them will skip" >&2
    exit 0
  fi
fi
echo "system-deps: installing ${need[*]}" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts these as services; the tests run their own instances on free ports.
for svc in nginx haproxy redis-server; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
