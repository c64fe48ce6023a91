"""`sidecar inject`: every workload kind gets the native sidecar; everything else passes through."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml

from manifest_helpers import DEPLOY, K8S_VERSIONS, pod_specs, validate_strict
from sidecar.cli import main
from sidecar.inject import InjectError, inject_documents
from sidecar.podspec import NO_PROXY, PROXY_URL

IMAGE = "registry.example/sidecar:1.2.3"

SERVICE = """\
---
# The web front end. This comment, the flow style and the quoting must survive untouched.
apiVersion: v1
kind: Service
metadata: {name: web, labels: {tier: "front"}}
spec:
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080}
"""

SAMPLE = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      initContainers:
        - name: migrate
          image: registry.example/web:1
          command: [web, migrate]
      containers:
        - name: web
          image: registry.example/web:1
          env:
            - {name: HTTP_PROXY, value: "http://corp-proxy:3128"}
            - {name: LOG_LEVEL, value: info}
""" + SERVICE + """\
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db-cache, namespace: shop}
spec:
  serviceName: db-cache
  selector: {matchLabels: {app: db-cache}}
  template:
    metadata: {labels: {app: db-cache}}
    spec:
      containers: [{name: cache, image: "registry.example/cache:2"}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-agent, namespace: shop}
spec:
  selector: {matchLabels: {app: node-agent}}
  template:
    metadata: {labels: {app: node-agent}}
    spec:
      containers: [{name: agent, image: "registry.example/agent:3"}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: import, namespace: shop}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: import, image: "registry.example/import:4"}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly, namespace: shop}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: "registry.example/report:5"}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop}
spec:
  containers: [{name: shell, image: "registry.example/shell:6"}]
"""

KINDS = ["Deployment", "Service", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"]
WORKLOADS = ["Deployment/web", "StatefulSet/db-cache", "DaemonSet/node-agent", "Job/import",
             "CronJob/nightly", "Pod/debug"]


def inject(text=SAMPLE, **kw):
    kw = {"image": IMAGE, "configmap": "sidecar-policy", "transparent": False, "policy_text": None} | kw
    return inject_documents(text, **kw)


def docs_of(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["inject", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def manifest(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text(SAMPLE)
    return path


def test_every_workload_kind_gets_the_native_sidecar():
    out = docs_of(inject())
    assert [d["kind"] for d in out] == KINDS
    specs = pod_specs(out)
    assert [name for name, _, _ in specs] == WORKLOADS
    for name, meta, spec in specs:
        sidecar = spec["initContainers"][0]
        assert (sidecar["name"], sidecar["image"], sidecar["restartPolicy"]) == ("sidecar", IMAGE, "Always"), name
        assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15021}, name
        assert {m["mountPath"] for m in sidecar["volumeMounts"]} >= {"/etc/sidecar", "/var/lib/sidecar"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["sidecar-policy"] == {"name": "sidecar-policy", "configMap": {"name": "sidecar-policy"}}
        assert "emptyDir" in volumes["sidecar-state"]
        assert meta["annotations"]["sidecar.io/injected"] == "true", name
    for doc in out:
        if doc["kind"] != "Service":
            assert doc["metadata"]["annotations"]["sidecar.io/injected"] == "true"


def test_sidecar_starts_before_the_users_init_containers():
    _, _, spec = pod_specs(docs_of(inject()))[0]
    assert [c["name"] for c in spec["initContainers"]] == ["sidecar", "migrate"]


def test_service_passes_through_byte_for_byte():
    out = inject()
    assert SERVICE in out
    assert out.count("This comment") == 1


def test_documents_without_workloads_are_untouched():
    text = "# leading comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: 'on'}\n" + SERVICE
    assert inject(text) == text


@pytest.mark.parametrize("transparent", [False, True])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_output_validates_strictly(version, transparent):
    policy = (DEPLOY / "base" / "policy.yaml").read_text()
    validate_strict(docs_of(inject(transparent=transparent, policy_text=policy)), version)


def test_app_env_points_at_the_proxy_without_overriding_the_user():
    specs = pod_specs(docs_of(inject()))
    _, _, web = specs[0]
    env = {e["name"]: e["value"] for e in web["containers"][0]["env"]}
    # The user's HTTP_PROXY stands, and no lower-case http_proxy is added to contradict it.
    assert env == {"HTTP_PROXY": "http://corp-proxy:3128", "LOG_LEVEL": "info",
                   "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY}
    migrate = {e["name"]: e["value"] for e in web["initContainers"][1]["env"]}
    assert migrate["HTTP_PROXY"] == migrate["http_proxy"] == PROXY_URL
    for _, _, spec in specs[1:]:
        env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
        assert env == {"HTTP_PROXY": PROXY_URL, "http_proxy": PROXY_URL, "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY}


def test_transparent_adds_the_iptables_init_container_first():
    for name, _, spec in pod_specs(docs_of(inject(transparent=True))):
        init, sidecar = spec["initContainers"][:2]
        assert init["name"] == "sidecar-init" and sidecar["name"] == "sidecar", name
        assert init["args"] == ["iptables", "--proxy-port", "15006", "--proxy-uid", "1337"]
        assert "restartPolicy" not in init                  # a plain init container: runs once, first
        sc = init["securityContext"]
        assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
        assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sidecar["securityContext"]["runAsUser"] == 1337
        assert 15006 in {p["containerPort"] for p in sidecar["ports"]}
        for c in spec["containers"]:
            names = {e["name"] for e in c.get("env") or []}
            assert not names & {"http_proxy", "no_proxy"}, name   # traffic is captured, not proxied


def test_transparent_passes_excluded_ports_to_iptables():
    _, _, spec = pod_specs(docs_of(inject(transparent=True, exclude_ports=[5432, 6379])))[0]
    assert spec["initContainers"][0]["args"][-4:] == ["--exclude-port", "5432", "--exclude-port", "6379"]
    with pytest.raises(InjectError, match="only with --transparent"):
        inject(exclude_ports=[5432])


def test_policy_configmap_comes_first_in_each_namespace():
    policy = (DEPLOY / "base" / "policy.yaml").read_text()
    text = SAMPLE + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: ops}\n" \
                    "spec: {containers: [{name: x, image: 'x:1'}]}\n"
    out = docs_of(inject(text, policy_text=policy, configmap="shop-policy"))
    first, second = out[:2]
    assert (first["kind"], first["metadata"]["name"], first["metadata"]["namespace"]) == ("ConfigMap", "shop-policy", "shop")
    assert second["metadata"]["namespace"] == "ops"
    assert first["data"] == {"policy.yaml": policy}
    assert [d["kind"] for d in out[2:]] == KINDS + ["Pod"]
    assert all(v["configMap"]["name"] == "shop-policy"
               for _, _, s in pod_specs(out) for v in s["volumes"] if "configMap" in v)


def test_policy_without_the_listener_the_pod_needs_is_refused():
    with pytest.raises(InjectError, match="no 'transparent' listener on port 15006"):
        inject(transparent=True, policy_text="version: 1\nlisteners: [{name: e, mode: proxy, port: 15001}]\n")
    with pytest.raises(InjectError, match="health"):
        inject(policy_text="version: 1\nlisteners: [{name: e, mode: proxy, port: 15001}]\n"
                           "health: {bind: 127.0.0.1, port: 15021}\n")


def test_refuses_to_inject_twice(tmp_path, capsys):
    once = tmp_path / "once.yaml"
    once.write_text(inject())
    rc, out, err = run_cli(capsys, str(once))
    assert rc == 1 and out == ""
    assert "Deployment/web (document 1)" in err and "refusing to inject twice" in err
    assert "Traceback" not in err


def test_refuses_a_workload_with_a_container_named_sidecar():
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: sidecar, image: 'x:1'}]\n"
    with pytest.raises(InjectError, match=r"Pod/p \(document 1\): already has the sidecar"):
        inject(SERVICE + text)


def test_bad_yaml_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p\nspec: {}\n")
    rc, out, err = run_cli(capsys, str(bad))
    assert rc == 1 and out == ""
    assert err.startswith(f"sidecar inject: {bad}:") and "invalid YAML" in err
    assert "Traceback" not in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    rc, out, err = run_cli(capsys, str(tmp_path / "nope.yaml"))
    assert rc == 1 and out == "" and "cannot read" in err and "nope.yaml" in err


def test_cli_reads_stdin_and_embeds_the_policy(capsys, monkeypatch):
    policy = DEPLOY / "base" / "policy.yaml"
    rc, out, err = run_cli(capsys, "-c", str(policy), "--image", IMAGE, "-", stdin=SAMPLE, monkeypatch=monkeypatch)
    assert rc == 0, err
    assert [d["kind"] for d in docs_of(out)] == ["ConfigMap"] + KINDS


def test_python_dash_m_entry_point(manifest):
    done = subprocess.run([sys.executable, "-m", "sidecar", "inject", "--transparent", str(manifest)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(pod_specs(docs_of(done.stdout))) == 6


def test_opt_out_and_host_network_are_left_alone():
    text = ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: {sidecar.io/inject: 'false'}}\n"
            "spec: {containers: [{name: x, image: 'x:1'}]}\n"
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\n"
            "spec: {hostNetwork: true, containers: [{name: x, image: 'x:1'}]}\n")
    notes: list[str] = []
    assert inject(text, notes=notes) == text
    assert any("Pod/a" in n and "sidecar.io/inject" in n for n in notes)
    assert any("Pod/b" in n and "hostNetwork" in n for n in notes)


def test_list_items_are_injected():
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": docs_of(SAMPLE)})
    out = docs_of(inject(text))
    assert len(pod_specs(out[0]["items"])) == 6


def test_an_implicit_first_document_stays_separate_from_what_precedes_it():
    # A ConfigMap now goes before a first document that had no `---`: the two must not merge.
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n" \
           "...\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: x, image: 'x:1'}]}\n"
    out = inject(text, policy_text=(DEPLOY / "base" / "policy.yaml").read_text())
    assert [d["kind"] for d in docs_of(out)] == ["ConfigMap", "Service", "Pod"]
    assert "---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n...\n" in out


def test_workload_without_containers_is_an_error():
    with pytest.raises(InjectError, match=r"Deployment/x \(document 1\): no containers at spec.template.spec.containers"):
        inject("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {template: {spec: {}}}\n")


@pytest.mark.parametrize("spec, where", [
    ("{containers: web}", "no containers at spec.containers"),
    ("{containers: [web]}", "containers must be a list of mappings"),
    ("{containers: [{name: a, image: 'x:1', env: {A: b}}]}", "env of container 'a'"),
    ("{containers: [{name: a, image: 'x:1'}], volumes: {a: b}}", "volumes must be a list"),
])
def test_malformed_pod_specs_are_errors_not_tracebacks(spec, where):
    with pytest.raises(InjectError, match=where):
        inject(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {spec}\n")


def test_non_objects_pass_through():
    text = "- just\n- a list\n---\nplain scalar\n---\n" + SERVICE.removeprefix("---\n")
    assert inject(text) == text


def test_an_invalid_policy_is_not_embedded(tmp_path, capsys, manifest):
    policy = tmp_path / "policy.yaml"
    policy.write_text((DEPLOY / "base" / "policy.yaml").read_text().replace("listeners:", "listenrs:"))
    rc, out, err = run_cli(capsys, "-c", str(policy), str(manifest))
    assert rc == 1 and out == ""
    assert f"{policy}:" in err and "did you mean 'listeners'" in err


def test_a_policy_reading_the_pods_environment_is_embedded(tmp_path, capsys, manifest, monkeypatch):
    # ${VAR}s are filled from the pod's environment (a Secret, say), not from the machine running inject.
    monkeypatch.delenv("CATALOG_TOKEN", raising=False)
    text = (DEPLOY / "base" / "policy.yaml").read_text().replace(
        "    max_connections: 50\n", "    max_connections: 50\n    headers: {authorization: \"Bearer ${CATALOG_TOKEN}\"}\n", 1)
    assert "CATALOG_TOKEN" in text
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    rc, out, err = run_cli(capsys, "-c", str(policy), str(manifest))
    assert rc == 0, err
    assert docs_of(out)[0]["data"]["policy.yaml"] == text


@pytest.mark.parametrize("transparent", [False, True])
def test_intercept_mounts_the_ca_bundle_and_points_the_app_at_it(transparent):
    policy = (DEPLOY / "base" / "policy.yaml").read_text()
    docs = docs_of(inject(transparent=transparent, intercept=True, policy_text=policy))
    validate_strict(docs, K8S_VERSIONS[-1])
    bundle = "/var/run/sidecar-ca/intercept-bundle.pem"
    for name, _, spec in pod_specs(docs):
        sidecar = next(c for c in spec["initContainers"] if c["name"] == "sidecar")
        assert {"name": "SIDECAR_CA_DIR", "value": "/var/run/sidecar-ca"} in sidecar["env"]
        assert {"name": "sidecar-ca", "mountPath": "/var/run/sidecar-ca"} in sidecar["volumeMounts"]
        # the key stays in the sidecar's own state volume, which no app container mounts
        for c in spec["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["NODE_EXTRA_CA_CERTS"] == bundle, name
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
            assert mounts["sidecar-ca"] == {"name": "sidecar-ca", "mountPath": "/var/run/sidecar-ca", "readOnly": True}
            assert "sidecar-state" not in mounts
        assert {"name": "sidecar-ca", "emptyDir": {"sizeLimit": "4Mi"}} in spec["volumes"]


def test_without_intercept_nothing_about_a_ca_is_added():
    for _, _, spec in pod_specs(docs_of(inject())):
        assert all(v["name"] != "sidecar-ca" for v in spec["volumes"])
        for c in spec["containers"]:
            assert "SSL_CERT_FILE" not in {e["name"] for e in c.get("env", [])}
