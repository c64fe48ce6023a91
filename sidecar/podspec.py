"""What `sidecar inject` adds to a pod, and adding it to one workload in place.

The native sidecar container, the iptables init container (transparent mode), the volumes they mount,
the proxy variables for the app's containers (proxy mode) and the policy's ConfigMap. `inject.py` walks
the manifest and calls `_inject_workload` for each workload it finds.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ANNOTATION = "sidecar.io/injected"
OPT_OUT = "sidecar.io/inject"            # "false" on a workload or pod template: leave it alone
CONTAINER = "sidecar"
INIT_CONTAINER = "sidecar-init"
POLICY_VOLUME, STATE_VOLUME, TMP_VOLUME = "sidecar-policy", "sidecar-state", "sidecar-tmp"
# HTTPS interception: the sidecar publishes its CA certificate and a bundle (system CAs + it) here, never
# its key (that stays in state_dir); the app containers mount it read-only and trust the bundle.
CA_VOLUME, CA_DIR = "sidecar-ca", "/var/run/sidecar-ca"
CA_BUNDLE = f"{CA_DIR}/intercept-bundle.pem"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
POLICY_DIR, POLICY_KEY, STATE_DIR = "/etc/sidecar", "policy.yaml", "/var/lib/sidecar"
PROXY_PORT, TRANSPARENT_PORT, HEALTH_PORT = 15001, 15006, 15021
PROXY_UID = 1337                         # the image's USER; the iptables rules never redirect it
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
NO_PROXY = "localhost,127.0.0.1,.svc,.cluster.local"

# Path from each workload kind to its pod template (the mapping holding `metadata` and `spec`).
POD_TEMPLATE: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(Exception):
    """A manifest or policy the injector refuses; the message names the document."""


# --- the containers and volumes added to a pod --------------------------------------------------------

def _security_context() -> dict:
    # Passes the Pod Security Standards "restricted" profile.
    return {"runAsNonRoot": True, "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": HEALTH_PORT}, "periodSeconds": period,
            "timeoutSeconds": 1, "failureThreshold": failures}


def sidecar_container(image: str, *, service_name: str, transparent: bool,
                      otlp_endpoint: str | None = None, intercept: bool = False) -> dict:
    env = [{"name": "OTEL_SERVICE_NAME", "value": service_name}]
    if intercept:
        env.append({"name": "SIDECAR_CA_DIR", "value": CA_DIR})
    if otlp_endpoint:
        env.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": otlp_endpoint})
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        # Lets Jaeger tell replicas apart; $(VAR) is expanded by the kubelet from the entries above.
        {"name": "OTEL_RESOURCE_ATTRIBUTES",
         "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"},
    ]
    listener = ({"name": "sidecar-tproxy", "containerPort": TRANSPARENT_PORT} if transparent
                else {"name": "sidecar-proxy", "containerPort": PROXY_PORT})
    return {
        "name": CONTAINER,
        "image": image,
        "restartPolicy": "Always",       # what makes an init container a native sidecar
        "args": ["run", "-c", f"{POLICY_DIR}/{POLICY_KEY}"],
        "env": env,
        "ports": [listener, {"name": "sidecar-health", "containerPort": HEALTH_PORT}],
        # The kubelet starts the next init container, and then the app, only once this passes:
        # the app never sends its first request to a proxy that is not listening yet.
        "startupProbe": _probe("/readyz", 1, 60),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/healthz", 10, 3),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"cpu": "1", "memory": "256Mi"}},
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            # The whole directory, never subPath: the kubelet updates a ConfigMap volume by swapping a
            # symlink, which the sidecar watches to hot-reload; a subPath mount would never change.
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},   # the root filesystem is read-only
        ] + ([{"name": CA_VOLUME, "mountPath": CA_DIR}] if intercept else []),
    }


def iptables_init_container(image: str, exclude_ports: Iterable[int] = ()) -> dict:
    args = ["iptables", "--proxy-port", str(TRANSPARENT_PORT), "--proxy-uid", str(PROXY_UID)]
    for port in exclude_ports:
        args += ["--exclude-port", str(port)]
    return {
        "name": INIT_CONTAINER,
        "image": image,
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"cpu": "100m", "memory": "64Mi"}},
        # Like istio-init: root, but with only the two capabilities iptables needs.
        "securityContext": {
            "runAsNonRoot": False, "runAsUser": 0, "runAsGroup": 0,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # iptables-legacy takes its lock in /run/xtables.lock; the root filesystem is read-only.
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/run"}],
    }


def sidecar_volumes(configmap: str, intercept: bool = False) -> list[dict]:
    return [
        {"name": POLICY_VOLUME, "configMap": {"name": configmap}},
        # The durable write queue: survives sidecar restarts, not pod deletion (state_dir).
        {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ] + ([{"name": CA_VOLUME, "emptyDir": {"sizeLimit": "4Mi"}}] if intercept else [])


def _trust_ca(container: dict) -> None:
    """The app trusts the sidecar's CA bundle (never overriding what the manifest set)."""
    env = container.get("env") or []
    names = {e.get("name") for e in env}
    env += [{"name": name, "value": CA_BUNDLE} for name in CA_ENV if name not in names]
    container["env"] = env
    mounts = container.get("volumeMounts") or []
    mounts.append({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True})
    container["volumeMounts"] = mounts


def policy_configmap(name: str, policy_text: str, namespace: str | None) -> dict:
    metadata: dict = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/name": "sidecar", "app.kubernetes.io/component": "policy"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {POLICY_KEY: policy_text}}


def _add_proxy_env(container: dict) -> None:
    env = container.get("env") or []
    names = {e.get("name") for e in env}
    for upper, lower, value in (("HTTP_PROXY", "http_proxy", PROXY_URL), ("NO_PROXY", "no_proxy", NO_PROXY)):
        # Both spellings, since clients disagree (curl reads only lower-case http_proxy). A value the
        # user set in either spelling stands, and then we add neither, so the two never disagree.
        if upper not in names and lower not in names:
            env += [{"name": upper, "value": value}, {"name": lower, "value": value}]
    container["env"] = env


def _put_before(mapping: dict, key: str, value: object, before: str) -> None:
    """Set `key`, placing a new key just before `before` so the output reads in pod-start order."""
    if key in mapping or before not in mapping:
        mapping[key] = value
        return
    items = list(mapping.items())
    mapping.clear()
    for k, v in items:
        if k == before:
            mapping[key] = value
        mapping[k] = v


# --- one workload -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Options:
    image: str
    configmap: str
    transparent: bool
    otlp_endpoint: str | None
    exclude_ports: tuple[int, ...]
    intercept: bool = False


def _annotations(meta: dict) -> dict:
    return meta.get("annotations") or {}


def _list_of_mappings(value: object, label: str, where: str) -> list[dict]:
    """A field that must be a list of mappings (containers, env, volumes); absent means empty."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InjectError(f"{label}: {where} must be a list of mappings")
    return value


def _inject_workload(obj: dict, label: str, opts: _Options, notes: list[str]) -> bool:
    """Add the sidecar to one workload in place. False when it is deliberately left alone."""
    meta = obj.get("metadata") or {}
    template = obj
    for key in POD_TEMPLATE[obj["kind"]]:
        template = template.get(key) if isinstance(template, dict) else None
    spec = template.get("spec") if isinstance(template, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list) or not spec["containers"]:
        where = ".".join(POD_TEMPLATE[obj["kind"]] + ("spec", "containers"))
        raise InjectError(f"{label}: no containers at {where}")
    tmeta = meta if obj["kind"] == "Pod" else template.setdefault("metadata", {})

    if any(str(_annotations(m).get(OPT_OUT, "")).lower() == "false" for m in (meta, tmeta)):
        notes.append(f"{label}: skipped ({OPT_OUT}: \"false\")")
        return False
    containers = _list_of_mappings(spec["containers"], label, "containers")
    inits = _list_of_mappings(spec.get("initContainers"), label, "initContainers")
    for c in containers + inits:
        _list_of_mappings(c.get("env"), label, f"env of container {c.get('name')!r}")
    names = {c.get("name") for c in containers + inits}
    if any(ANNOTATION in _annotations(m) for m in (meta, tmeta)) or {CONTAINER, INIT_CONTAINER} & names:
        raise InjectError(f"{label}: already has the sidecar (annotation {ANNOTATION} or a container "
                          f"named {CONTAINER!r}); refusing to inject twice")
    if spec.get("hostNetwork"):
        # The sidecar would bind, and the iptables rules rewrite, the node's own network namespace.
        notes.append(f"{label}: skipped (hostNetwork: true)")
        return False
    volumes = _list_of_mappings(spec.get("volumes"), label, "volumes")
    ours = sidecar_volumes(opts.configmap, opts.intercept)
    clash = {v["name"] for v in ours} & {v.get("name") for v in volumes}
    if clash:
        raise InjectError(f"{label}: already has a volume named {sorted(clash)[0]!r}")

    if not opts.transparent:   # transparent mode captures traffic without the app's cooperation
        for container in containers + inits:
            _add_proxy_env(container)
    if opts.intercept:
        for container in containers + inits:
            _trust_ca(container)
    labels = tmeta.get("labels") or {}
    base = (labels.get("app.kubernetes.io/name") or labels.get("app") or meta.get("name")
            or str(meta.get("generateName") or "app").rstrip("-"))
    added = [sidecar_container(opts.image, service_name=f"{base}-sidecar", transparent=opts.transparent,
                               otlp_endpoint=opts.otlp_endpoint, intercept=opts.intercept)]
    if opts.transparent:
        added.insert(0, iptables_init_container(opts.image, opts.exclude_ports))
    # First, so the user's own init containers already have a running proxy (and, in transparent
    # mode, are not redirected into a port nobody listens on yet).
    _put_before(spec, "initContainers", added + inits, "containers")
    spec["volumes"] = volumes + ours
    for m in {id(meta): meta, id(tmeta): tmeta}.values():
        m["annotations"] = {**_annotations(m), ANNOTATION: "true"}
    obj["metadata"] = meta
    return True
