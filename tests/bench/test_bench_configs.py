"""The configs the benchmark generates stay valid as the policy format and the proxies move on."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # `bench/` lives at the repo root
from bench import configs  # noqa: E402
from sidecar.policy.load import load_policy


def test_sidecar_policies_load(tmp_path: Path) -> None:
    overhead = load_policy(str(configs.sidecar_overhead(tmp_path, "o", 18001, 18002, 18003, 18004, otlp=18005)))
    assert [r.name for r in overhead.routes] == ["cached", "full"]
    full = overhead.routes[1]
    assert full.retry.budget is not None and full.breaker is not None and full.concurrency is not None
    assert overhead.telemetry.traces.sample_ratio == 0.05
    scenario = load_policy(str(configs.sidecar_scenario(tmp_path, 18010, 18011, 18012, [18013, 18014, 18015], 18016)))
    (route,) = scenario.routes
    assert route.hedge is not None and route.fallback is not None and route.cache is not None
    assert [t.kind for t in route.fallback.targets] == ["upstream", "cache"]
    h2 = load_policy(str(configs.sidecar_overhead(tmp_path, "h2", 18001, 18002, 18003, 18004, cache=False,
                                                  protocol="h2c")))
    assert [r.name for r in h2.routes] == ["full"] and h2.upstreams["primary"].protocol == "h2c"


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="no nginx")
def test_nginx_configs_parse(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for conf in (configs.upstream_nginx(tmp_path, 18020), configs.nginx_proxy(tmp_path, 18021, 18020),
                 configs.nginx_scenario(tmp_path, 18022, [18023, 18024, 18025], 18026),
                 configs.upstream_nginx(tmp_path, 18027, http2=True), configs.nginx_h2_proxy(tmp_path, 18028, 18027)):
        proc = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(), reason="no haproxy")
def test_haproxy_configs_parse(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    for conf in (configs.haproxy_proxy(tmp_path, 18030, 18031),
                 configs.haproxy_scenario(tmp_path, 18032, [18033, 18034, 18035], 18036)):
        proc = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
