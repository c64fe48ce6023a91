"""Configuration files for every system, generated into a per-run temp dir.

Overhead runs (one upstream, every system tuned for plain forwarding):
    upstream   nginx serving /small (86 B), /big (64 KiB) and /cached/* from memory/page cache
    nginx      proxy_pass with an upstream keepalive pool; /cached/ through proxy_cache
    haproxy    http-reuse always; /cached/ through its `cache` section
    sidecar    reverse listener; route `full` = retry + budget + breaker + concurrency, telemetry
               sampling 5 % (no endpoint, or a dummy OTLP/HTTP receiver); route `cached` = cache

Scenario runs (bench/upstream.py: primary = 3 replica ports, backup = 1 port), each system at the
best its features allow, one config for all five scenarios:
    nginx      proxy_next_upstream error/timeout/502-504 over the replicas (tries 3), `backup`
               server, passive failure marking (max_fails=1 fail_timeout=10s, the defaults),
               proxy_read_timeout 500ms per try, proxy_cache_use_stale on errors
    haproxy    retry-on conn-failure/empty-response/response-timeout/503 (retries 2, redispatch),
               active checks + `observe layer7` (error-limit 10, mark-down), `backup` server,
               timeout server 500ms per try, `cache` (which cannot serve stale)
    sidecar    retry (2, under a 20 % budget) + breaker (failures, and slow calls: over 2 % slower
               than the hedge delay) + hedge at 100 ms + fallback to the backup, then to a stale
               cache copy; health checks on both upstreams
"""
from __future__ import annotations

import os
from pathlib import Path

from bench.upstream import BIG, SMALL

PER_TRY_TIMEOUT_MS = 500     # nginx proxy_read_timeout / HAProxy timeout server in the scenarios
HEDGE_DELAY_MS = 100         # the sidecar's hedge delay in the scenarios
CACHE_TTL_S = 1              # every system caches scenario answers for 1 s (stale ones are kept)


def _nginx_common(d: Path) -> str:
    return f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log error;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; }}
"""


def _nginx_http_common(d: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    tcp_nodelay on;
"""


def upstream_nginx(d: Path, port: int, http2: bool = False) -> Path:
    """The static overhead upstream: no Python in the measured path beyond the system under test.
    `http2`: it speaks HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1."""
    www = d / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "big").write_bytes(BIG)
    small = SMALL.decode().rstrip("\n").replace("'", "")
    conf = d / ("upstream-nginx-h2.conf" if http2 else "upstream-nginx.conf")
    conf.write_text(_nginx_common(d) + f"""
http {{
{_nginx_http_common(d)}
    server {{
        listen 127.0.0.1:{port} backlog=4096{" http2" if http2 else ""};
        location = /small {{ default_type application/json; return 200 '{small}\\n'; }}
        location /cached/ {{ default_type application/json; add_header cache-control "max-age=3600";
                            return 200 '{small}\\n'; }}
        location = /big {{ default_type application/octet-stream; alias {www}/big; }}
    }}
}}
""")
    return conf


def nginx_proxy(d: Path, port: int, upstream: int) -> Path:
    conf = d / "nginx-proxy.conf"
    conf.write_text(_nginx_common(d) + f"""
http {{
{_nginx_http_common(d)}
    proxy_cache_path {d}/cache levels=1:2 keys_zone=hot:16m max_size=256m inactive=1h use_temp_path=off;
    upstream fast {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        location / {{ proxy_pass http://fast; }}
        location /cached/ {{ proxy_pass http://fast; proxy_cache hot; proxy_cache_valid 200 1h; }}
    }}
}}
""")
    return conf


def nginx_h2_proxy(d: Path, port: int, upstream: int) -> Path:
    """nginx as an HTTP/2 proxy: h2c in, and HTTP/2 to the upstream through `grpc_pass`, its only module
    that speaks HTTP/2 upstream (`proxy_pass` speaks HTTP/1.x). It forwards any request, not only gRPC,
    over a keep-alive pool of h2c connections."""
    conf = d / "nginx-h2-proxy.conf"
    conf.write_text(_nginx_common(d) + f"""
http {{
{_nginx_http_common(d)}
    upstream h2up {{ server 127.0.0.1:{upstream}; keepalive 64; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 http2;
        location / {{ grpc_pass grpc://h2up; }}
    }}
}}
""")
    return conf


def haproxy_proxy(d: Path, port: int, upstream: int) -> Path:
    conf = d / "haproxy-proxy.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
cache hot
    total-max-size 256
    max-object-size 100000
    max-age 3600
frontend fe
    bind 127.0.0.1:{port}
    use_backend cached if {{ path_beg /cached/ }}
    default_backend fast
backend fast
    server up 127.0.0.1:{upstream} maxconn 1000
backend cached
    http-request cache-use hot
    http-response cache-store hot
    server up 127.0.0.1:{upstream} maxconn 1000
""")
    return conf


def _sidecar_head(d: Path, port: int, admin: int, health: int, otlp: int | None) -> str:
    endpoint = f"http://127.0.0.1:{otlp}" if otlp else "null"
    return f"""version: 1
listeners:
  - {{name: bench, mode: reverse, port: {port}, upstream: primary}}
admin: {{bind: 127.0.0.1, port: {admin}}}
health: {{bind: 127.0.0.1, port: {health}}}
telemetry:
  service_name: bench
  traces: {{endpoint: {endpoint}, protocol: http/protobuf, sample_ratio: 0.05}}
unmatched: passthrough
state_dir: {d}/state
"""


def sidecar_overhead(d: Path, name: str, port: int, admin: int, health: int, upstream: int,
                     otlp: int | None = None, cache: bool = True, endpoints: int = 1,
                     tokens_per_minute: int | None = None, protocol: str = "auto") -> Path:
    """The "full" route every request of the overhead runs takes, plus the cache-hit route.
    `tokens_per_minute`: the route also limits LLM tokens (bench/llm_stream.py), so every LLM answer
    goes through the admission and has its usage settled. `protocol`: the upstream's (`h2c` for
    bench/h2_throughput.py)."""
    cached = """  - name: cached
    match: {path_prefix: /cached/}
    upstream: primary
    cache: {ttl: 1h, max_entries: 20000, max_bytes: 256MiB}
""" if cache else ""
    url = f'"http://127.0.0.1:{upstream}"'
    target = f"url: {url}" if endpoints == 1 else \
        "endpoints: [" + ", ".join(f"{{url: {url}}}" for _ in range(endpoints)) + "]"
    conf = d / f"{name}.yaml"
    conf.write_text(_sidecar_head(d, port, admin, health, otlp) + f"""
upstreams:
  primary: {{{target}, protocol: {protocol}, connect_timeout: 1s, max_connections: 256}}
defaults:
  timeout: 10s
  retry: null
  breaker: null
routes:
{cached}  - name: full
    match: {{path_prefix: /}}
    upstream: primary
    timeout: 10s
    retry:
      max_retries: 2
      when: [connect-failure, reset, 502, 503, 504]
      backoff: {{base: 25ms, max: 250ms}}
      budget: {{ratio: 0.2, min_per_second: 10, window: 10s}}
    breaker: {{consecutive_failures: 5, failure_rate: 0.5, min_requests: 20, window: 30s, open_for: 10s}}
    concurrency: {{max: 1000}}
""" + (f"    rate_limit: {{tokens_per_minute: {tokens_per_minute}}}\n" if tokens_per_minute else ""))
    return conf


def nginx_scenario(d: Path, port: int, primary: list[int], backup: int) -> Path:
    # max_fails: a replica with 3 failed tries (errors, timeouts, 5xx per proxy_next_upstream) within
    # fail_timeout is taken out for fail_timeout: nginx's passive health check, the sidecar's outlier.
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=30s;" for p in primary)
    conf = d / "nginx-scenario.conf"
    conf.write_text(_nginx_common(d) + f"""
http {{
{_nginx_http_common(d)}
    proxy_cache_path {d}/cache levels=1:2 keys_zone=sc:16m max_size=256m inactive=1h use_temp_path=off;
    upstream svc {{
{servers}
        server 127.0.0.1:{backup} backup;
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            proxy_pass http://svc;
            proxy_connect_timeout 1s;
            proxy_read_timeout {PER_TRY_TIMEOUT_MS}ms;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
            proxy_cache sc;
            proxy_cache_valid 200 {CACHE_TTL_S}s;
            proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504 updating;
        }}
    }}
}}
""")
    return conf


def haproxy_scenario(d: Path, port: int, primary: list[int], backup: int) -> Path:
    servers = "\n".join(f"    server p{i} 127.0.0.1:{p}" for i, p in enumerate(primary, 1))
    conf = d / "haproxy-scenario.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server {PER_TRY_TIMEOUT_MS}ms
    option http-keep-alive
    http-reuse always
cache sc
    total-max-size 64
    max-object-size 100000
    max-age {CACHE_TTL_S}
frontend fe
    bind 127.0.0.1:{port}
    default_backend svc
backend svc
    balance roundrobin
    option httpchk GET /health
    retries 2
    retry-on conn-failure empty-response response-timeout 503
    option redispatch 1
    http-request cache-use sc
    http-response cache-store sc
    default-server check inter 500ms fall 2 rise 2 observe layer7 error-limit 10 on-error mark-down
{servers}
    server b1 127.0.0.1:{backup} backup
""")
    return conf


def haproxy_l4_service(d: Path, port: int, primary: list[int]) -> Path:
    """What an app calling a Kubernetes Service gets without a sidecar: kube-proxy deals each new TCP
    connection to a random pod and knows nothing of HTTP (no checks, no retries). HAProxy in `mode
    tcp` with `balance random` is that L4 balancer here."""
    servers = "\n".join(f"    server p{i} 127.0.0.1:{p}" for i, p in enumerate(primary, 1))
    conf = d / "haproxy-l4.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend svc
backend svc
    balance random
{servers}
""")
    return conf


def sidecar_scenario(d: Path, port: int, admin: int, health: int, primary: list[int], backup: int,
                     cache: bool = True) -> Path:
    cache_cfg = f"    cache: {{ttl: {CACHE_TTL_S}s, stale_if_error: 1h, max_entries: 20000}}\n" if cache else ""
    stale = ", {cache: stale}" if cache else ""
    conf = d / "sidecar-scenario.yaml"
    conf.write_text(_sidecar_head(d, port, admin, health, None) + f"""
upstreams:
  primary:                          # the replicas nginx and HAProxy balance over, one endpoint each
    endpoints: [{", ".join(f'{{url: "http://127.0.0.1:{p}"}}' for p in primary)}]
    outlier: {{consecutive_failures: 3, eject_for: 30s}}
    connect_timeout: 1s
    max_connections: 512
    health_check: {{path: /health, interval: 500ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 2}}
  backup:
    url: "http://127.0.0.1:{backup}"
    connect_timeout: 1s
    max_connections: 512
    health_check: {{path: /health, interval: 500ms, timeout: 500ms, unhealthy_after: 2, healthy_after: 2}}
defaults:
  timeout: 10s
  retry: null
  breaker: null
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: primary
    timeout: 10s
    retry:
      max_retries: 2
      when: [connect-failure, reset, timeout, 502, 503, 504]
      backoff: {{base: 5ms, max: 50ms}}
      budget: {{ratio: 0.2, min_per_second: 5, window: 10s}}
    breaker:
      consecutive_failures: 10
      failure_rate: 0.5
      min_requests: 20
      window: 10s
      open_for: 5s
      max_open_for: 30s
      half_open_requests: 2
      slow_call: {{duration: {HEDGE_DELAY_MS}ms, rate: 0.02}}
    concurrency: {{max: 1000}}
    hedge: {{delay: {HEDGE_DELAY_MS}ms, max_extra: 1}}
{cache_cfg}    fallback:
      when: [breaker-open, retries-exhausted, timeout, connect-failure, reset, 5xx, concurrency-full]
      targets: [{{upstream: backup}}{stale}]
""")
    return conf


def bare_env() -> dict:
    """The environment for systems under test: no OTEL_* leaking in from the caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
