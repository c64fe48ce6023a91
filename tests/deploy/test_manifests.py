"""deploy/: the kustomizations render, validate strictly, hang together, and stay hardened."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import yaml

from manifest_helpers import DEPLOY, K8S_VERSIONS, ROOT, by_kind_name, kustomize_build, pod_specs, validate_strict
from sidecar.inject import _check_policy
from sidecar.podspec import (HEALTH_PORT, NO_PROXY, POLICY_DIR, PROXY_URL, STATE_DIR, sidecar_container,
                             sidecar_volumes)

KUSTOMIZATIONS = ["base", "jaeger", "overlays/example-app"]
POLICY = DEPLOY / "base" / "policy.yaml"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_validates_strictly(name, version):
    validate_strict(kustomize_build(DEPLOY / name), version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_cli_accepts_the_overlay(overlay, tmp_path, version):
    rendered = tmp_path / "overlay.yaml"
    rendered.write_text(yaml.safe_dump_all(overlay, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(rendered)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # A kind without a schema is only a WARN for the CLI; every kind here must have one.
    assert "WARN" not in done.stdout and "ERROR" not in done.stdout, done.stdout
    assert done.stdout.count("passed") == len(overlay)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(name):
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    def key(d):
        return d["kind"], d["metadata"]["name"]
    real = sorted((d for d in yaml.safe_load_all(done.stdout) if d), key=key)
    assert real == sorted(kustomize_build(DEPLOY / name), key=key)


def test_overlay_has_the_app_the_policy_and_jaeger(overlay):
    objs = by_kind_name(overlay)
    assert set(objs) == {
        ("ServiceAccount", "sidecar"), ("ConfigMap", "sidecar-policy"), ("Deployment", "shop"),
        ("Deployment", "jaeger"), ("Service", "jaeger-collector"), ("Service", "jaeger-query"),
    }
    # Generated without a hash suffix (the fixed name is what lets the mounted file update in place).
    assert objs["ConfigMap", "sidecar-policy"]["data"] == {"policy.yaml": POLICY.read_text()}
    ports = {p["port"] for p in objs["Service", "jaeger-collector"]["spec"]["ports"]}
    assert ports == {4317, 4318}
    assert [p["port"] for p in objs["Service", "jaeger-query"]["spec"]["ports"]] == [16686]
    image = objs["Deployment", "jaeger"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", image)


def test_shop_runs_the_sidecar_as_a_native_sidecar(overlay):
    spec = by_kind_name(overlay)["Deployment", "shop"]["spec"]["template"]["spec"]
    sidecar = spec["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTH_PORT}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": HEALTH_PORT}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": HEALTH_PORT}
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger-collector:4317"
    assert env["OTEL_SERVICE_NAME"] == "shop-sidecar"
    # The hand-written example and `sidecar inject` are one definition, not two drifting copies.
    assert sidecar == sidecar_container(sidecar["image"], service_name="shop-sidecar", transparent=False,
                                        otlp_endpoint="http://jaeger-collector:4317")
    assert spec["volumes"] == sidecar_volumes("sidecar-policy")


def test_shop_app_goes_through_the_proxy(overlay):
    spec = by_kind_name(overlay)["Deployment", "shop"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    assert env == {"HTTP_PROXY": PROXY_URL, "http_proxy": PROXY_URL, "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY}
    assert NO_PROXY == "localhost,127.0.0.1,.svc,.cluster.local"


def test_policy_is_mounted_as_a_directory_and_state_is_an_emptydir(overlay):
    spec = by_kind_name(overlay)["Deployment", "shop"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in spec["initContainers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[POLICY_DIR]["name"]]["configMap"]["name"] == "sidecar-policy"
    assert "emptyDir" in volumes[mounts[STATE_DIR]["name"]]
    assert yaml.safe_load(POLICY.read_text())["state_dir"] == STATE_DIR


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_no_subpath_anywhere_in_deploy(overlay):
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "subPath" not in path.read_text(), f"{path}: a subPath mount never sees ConfigMap updates"
    assert not [n for n in _walk(overlay) if "subPath" in n or "subPathExpr" in n]


def test_every_container_is_hardened_and_bounded(overlay):
    for name, _, spec in pod_specs(overlay):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            where = f"{name} {c['name']}"
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            assert ":" in c["image"] and not c["image"].endswith(":latest"), where


def test_references_resolve(overlay):
    objs = by_kind_name(overlay)
    pods = pod_specs(overlay)
    for name, meta, spec in pods:
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in objs, name
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in objs, name
    for (kind, svc_name), svc in objs.items():
        if kind != "Service":
            continue
        selector = svc["spec"]["selector"].items()
        targets = [spec for _, meta, spec in pods if selector <= meta.get("labels", {}).items()]
        assert targets, f"Service {svc_name} selects no pod"
        named = {p.get("name") for s in targets for c in s["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in named, f"Service {svc_name}: no container port {port['targetPort']}"


def test_policy_sends_traces_to_the_jaeger_service(overlay):
    endpoint = urlsplit(yaml.safe_load(POLICY.read_text())["telemetry"]["traces"]["endpoint"])
    collector = by_kind_name(overlay)["Service", endpoint.hostname]
    assert endpoint.port in {p["port"] for p in collector["spec"]["ports"]}


def test_policy_fits_the_pod():
    text = POLICY.read_text()
    policy = yaml.safe_load(text)
    proxy = [l for l in policy["listeners"] if l["mode"] == "proxy"]
    assert proxy == [{"name": "egress", "mode": "proxy", "port": 15001}]   # loopback: the default bind
    assert policy["health"] == {"bind": "0.0.0.0", "port": HEALTH_PORT}
    _check_policy(text, transparent=False)
    _check_policy(text, transparent=True)


def test_policy_is_valid_for_the_loader():
    from sidecar.policy.load import validate_files
    assert validate_files([str(POLICY)]) == []


def _stages(dockerfile: str) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", dockerfile)
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multistage_slim_and_non_root():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    final = "\n".join(stages[-1])
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users and users[-1] == "1337:1337"          # numeric: runAsNonRoot can verify it
    assert 'ENTRYPOINT ["sidecar"]' in final
    assert 'CMD ["run", "-c", "/etc/sidecar/policy.yaml"]' in final
    exposed = set(" ".join(re.findall(r"^EXPOSE\s+(.*)$", final, re.M)).split())
    assert {"15000", "15001", "15006", "15021"} <= exposed
    assert not re.search(r"build-essential|gcc|\bmake\b", final), "build tools in the final stage"
    assert "COPY --from=build /opt/sidecar /opt/sidecar" in final
    assert "pip install ." in "\n".join(stages[0])


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(line.split()[1:-1])
    assert copied and copied <= allowed
    for name in copied:
        assert (ROOT / name).exists(), name
