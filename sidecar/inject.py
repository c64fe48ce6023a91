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
from pathlib import Path

import yaml

from sidecar.iptables import rules as iptables_rules
from sidecar.podspec import (
    HEALTH_PORT, POD_TEMPLATE, PROXY_PORT, PROXY_UID, TRANSPARENT_PORT, InjectError, _inject_workload, _Options, policy_configmap,
)

_LOOPBACK = {"localhost", "::1"}


# --- the workloads in a document ----------------------------------------------------------------------

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
                     source: str = "<manifest>", notes: list[str] | None = None, intercept: bool = False) -> str:
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
    opts = _Options(image, configmap, transparent, otlp_endpoint, exclude_ports, intercept)

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
                               exclude_ports=args.exclude_port, source=source, notes=notes,
                               intercept=getattr(args, "intercept", False))
    except InjectError as exc:
        print(f"sidecar inject: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"sidecar inject: {note}", file=sys.stderr)
    sys.stdout.write(out)
    return 0
