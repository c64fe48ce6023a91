"""`sidecar inject`: add the sidecar to Kubernetes manifests, like `istioctl kube-inject`.

Every workload (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod, and the items of a
`List`) gets the sidecar as a *native sidecar* (KEP-753, Kubernetes 1.29+): an init container with
`restartPolicy: Always`. That gives the order apps need: it starts before the app and before the user's
own init containers (its startup probe gates them), it is stopped after the app, and a Job completes when
its main containers do.

Only documents that change are re-serialised; every other document is copied through byte for byte,
comments included, in its place. Errors (bad YAML, a workload already injected) raise `InjectError`
before anything is printed, so a failed run never leaves half a manifest on stdout.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from sidecar.iptables import rules as iptables_rules

ANNOTATION = "sidecar.io/injected"
OPT_OUT = "sidecar.io/inject"            # "false" on a workload or pod template: leave it alone
CONTAINER = "sidecar"
INIT_CONTAINER = "sidecar-init"
POLICY_VOLUME, STATE_VOLUME, TMP_VOLUME = "sidecar-policy", "sidecar-state", "sidecar-tmp"
POLICY_DIR, POLICY_KEY, STATE_DIR = "/etc/sidecar", "policy.yaml", "/var/lib/sidecar"
PROXY_PORT, TRANSPARENT_PORT, HEALTH_PORT = 15001, 15006, 15021
PROXY_UID = 1337                         # the image's USER; the iptables rules never redirect it
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
NO_PROXY = "localhost,127.0.0.1,.svc,.cluster.local"
_LOOPBACK = {"localhost", "::1"}

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
                      otlp_endpoint: str | None = None) -> dict:
    env = [{"name": "OTEL_SERVICE_NAME", "value": service_name}]
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
        ],
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


def sidecar_volumes(configmap: str) -> list[dict]:
    return [
        {"name": POLICY_VOLUME, "configMap": {"name": configmap}},
        # The durable write queue: survives sidecar restarts, not pod deletion (state_dir).
        {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]


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
    ours = sidecar_volumes(opts.configmap)
    clash = {v["name"] for v in ours} & {v.get("name") for v in volumes}
    if clash:
        raise InjectError(f"{label}: already has a volume named {sorted(clash)[0]!r}")

    if not opts.transparent:   # transparent mode captures traffic without the app's cooperation
        for container in containers + inits:
            _add_proxy_env(container)
    labels = tmeta.get("labels") or {}
    base = (labels.get("app.kubernetes.io/name") or labels.get("app") or meta.get("name")
            or str(meta.get("generateName") or "app").rstrip("-"))
    added = [sidecar_container(opts.image, service_name=f"{base}-sidecar", transparent=opts.transparent,
                               otlp_endpoint=opts.otlp_endpoint)]
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


def _inject_object(obj: object, label: str, opts: _Options, notes: list[str], namespaces: list) -> bool:
    if not isinstance(obj, dict):
        return False
    kind = obj.get("kind")
    if kind == "List" and isinstance(obj.get("items"), list):
        results = [_inject_object(item, f"{label} item {i}", opts, notes, namespaces)
                   for i, item in enumerate(obj["items"])]
        return any(results)
    if kind not in POD_TEMPLATE:
        return False
    meta = obj.get("metadata") or {}
    name = f"{kind}/{meta.get('name') or meta.get('generateName') or '<unnamed>'}"
    if not _inject_workload(obj, f"{name} ({label})", opts, notes):
        return False
    if meta.get("namespace") not in namespaces:
        namespaces.append(meta.get("namespace"))
    return True


# --- the YAML stream ----------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)   # kubectl-style indented lists

    def ignore_aliases(self, data: object) -> bool:
        return True                                     # never emit &anchors into a manifest


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line strings (an embedded policy, a shell script) as readable `|` blocks.
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str)


def _dump(obj: object) -> str:
    return "---\n" + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def _yaml_error(exc: yaml.YAMLError, source: str) -> InjectError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    return InjectError(f"{where}: invalid YAML: {problem}")


def _split(text: str, source: str) -> list[tuple[object, str, bool]]:
    """(parsed document, its exact source text, whether it began with an explicit `---`)."""
    try:
        objs = list(yaml.load_all(text, Loader=yaml.SafeLoader))
        starts = [(e.start_mark.index, e.explicit) for e in yaml.parse(text, Loader=yaml.SafeLoader)
                  if isinstance(e, yaml.DocumentStartEvent)]
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    bounds = [0] + [index for index, _ in starts[1:]] + [len(text)]
    return [(obj, text[bounds[i]:bounds[i + 1]], starts[i][1]) for i, obj in enumerate(objs)]


def _check_policy(policy_text: str, transparent: bool) -> None:
    """What the injected pod relies on (on top of a valid policy): its listener and the probed port."""
    try:
        policy = yaml.safe_load(policy_text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, "policy") from None
    if not isinstance(policy, dict):
        raise InjectError("policy: not a YAML mapping")
    mode, port = ("transparent", TRANSPARENT_PORT) if transparent else ("proxy", PROXY_PORT)
    listeners = policy.get("listeners") or []
    if not any(isinstance(l, dict) and l.get("mode") == mode and l.get("port") == port for l in listeners):
        raise InjectError(f"policy: no {mode!r} listener on port {port}, where the injected pod sends its "
                          f"traffic; add `- {{name: egress, mode: {mode}, port: {port}}}` to listeners")
    health = policy.get("health")
    if isinstance(health, dict) and (health.get("port", HEALTH_PORT) != HEALTH_PORT
                                     or str(health.get("bind", "0.0.0.0")) in _LOOPBACK
                                     or str(health.get("bind")).startswith("127.")):
        raise InjectError(f"policy: the kubelet probes /readyz at the pod IP, port {HEALTH_PORT}; "
                          f"set health: {{bind: 0.0.0.0, port: {HEALTH_PORT}}}")


def inject_documents(text: str, *, image: str, configmap: str, transparent: bool, policy_text: str | None,
                     otlp_endpoint: str | None = None, exclude_ports: Iterable[int] = (),
                     source: str = "<manifest>", notes: list[str] | None = None) -> str:
    """The manifest with the sidecar added to every workload; raises InjectError, never half-done."""
    notes = [] if notes is None else notes
    exclude_ports = tuple(exclude_ports)
    if exclude_ports and not transparent:
        raise InjectError("--exclude-port applies only with --transparent")
    try:
        iptables_rules(TRANSPARENT_PORT, PROXY_UID, exclude_ports)
    except ValueError as exc:
        raise InjectError(str(exc)) from None
    if policy_text is not None:
        _check_policy(policy_text, transparent)
    opts = _Options(image, configmap, transparent, otlp_endpoint, exclude_ports)

    docs = _split(text, source)
    namespaces: list[str | None] = []
    changed: list[object | None] = []
    for i, (obj, _, _) in enumerate(docs):
        new = copy.deepcopy(obj)
        changed.append(new if _inject_object(new, f"document {i + 1}", opts, notes, namespaces) else None)
        if (policy_text is not None and isinstance(obj, dict) and obj.get("kind") == "ConfigMap"
                and (obj.get("metadata") or {}).get("name") == configmap):
            raise InjectError(f"ConfigMap/{configmap} (document {i + 1}): already in the manifest; "
                              f"drop -c or choose another --configmap")
    if not namespaces:
        notes.append("no workload to inject")

    parts: list[str] = []
    if policy_text is not None:
        parts += [_dump(policy_configmap(configmap, policy_text, ns)) for ns in namespaces]
    for (_, chunk, explicit), new in zip(docs, changed):
        if parts and not parts[-1].endswith("\n"):
            parts[-1] += "\n"
        if new is not None:
            parts.append(_dump(new))
        else:
            # Verbatim, comments and all. A document that began implicitly (first in the file, or after
            # `...`) needs a `---` once something precedes it, or it would merge into that document.
            parts.append(chunk if explicit or not parts else "---\n" + chunk)
    if not docs:
        parts.append(text)
    return "".join(parts)


def _policy_problems(path: str) -> list[str]:
    """`sidecar validate`'s findings, minus unset ${VAR}s: those come from the pod, not this machine."""
    from sidecar.policy.load import PolicyError, load_policy
    try:
        load_policy(path)
    except PolicyError as exc:
        return [str(p) for p in exc.problems if not p.message.startswith("environment variable ")]
    return []


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InjectError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InjectError(f"cannot read {path}: not UTF-8 text") from None


def inject_command(args) -> int:
    source = "<stdin>" if args.manifest == "-" else args.manifest
    try:
        text = _read(args.manifest)
        policy_text = _read(args.config) if args.config else None
    except InjectError as exc:
        print(f"sidecar inject: {exc}", file=sys.stderr)
        return 1
    if args.config:
        problems = _policy_problems(args.config)
        if problems:
            print(*problems, sep="\n", file=sys.stderr)
            print(f"sidecar inject: {args.config} is not a valid policy; not embedding it", file=sys.stderr)
            return 1
    notes: list[str] = []
    try:
        out = inject_documents(text, image=args.image, configmap=args.configmap, transparent=args.transparent,
                               policy_text=policy_text, otlp_endpoint=args.otlp_endpoint,
                               exclude_ports=args.exclude_port, source=source, notes=notes)
    except InjectError as exc:
        print(f"sidecar inject: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"sidecar inject: {note}", file=sys.stderr)
    sys.stdout.write(out)
    return 0
