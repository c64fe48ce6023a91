"""Helpers for the deploy tests: a small kustomize renderer and strict schema validation.

kustomize is not a test dependency, so `kustomize_build` renders the subset of kustomization.yaml the
repository uses (resources, configMapGenerator without hash suffix) and refuses anything else, so it
can never silently disagree with the real tool. Where `kubectl` is installed, a test compares the two.
"""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# 1.29: the first release with native sidecars (init containers with restartPolicy: Always) on by
# default; and the newest release the installed kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.29.0", latest_version())

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator"}
_GENERATOR_KEYS = {"name", "files", "literals", "options"}
_OPTION_KEYS = {"disableNameSuffixHash", "labels"}


def kustomize_build(directory: Path) -> list[dict]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the test renderer does not implement {sorted(unknown)}"
    docs: list[dict] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            docs += kustomize_build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for gen in spec.get("configMapGenerator", []):
        assert not set(gen) - _GENERATOR_KEYS, f"unsupported generator keys {set(gen) - _GENERATOR_KEYS}"
        options = gen.get("options", {})
        assert not set(options) - _OPTION_KEYS, f"unsupported options {set(options) - _OPTION_KEYS}"
        assert options.get("disableNameSuffixHash") is True, "the renderer implements unhashed names only"
        data: dict[str, str] = {}
        for entry in gen.get("files", []):
            key, rel = entry.split("=", 1) if "=" in entry else (Path(entry).name, entry)
            data[key] = (directory / rel).read_text()
        for entry in gen.get("literals", []):
            key, _, value = entry.partition("=")
            data[key] = value
        metadata: dict = {"name": gen["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    ids = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates, f"{directory}: resource ids appear twice: {duplicates}"
    return docs


def validate_strict(docs: list[dict], version: str) -> None:
    """kubernetes-validate --strict on each document; a kind without a schema is an error here."""
    assert docs, "nothing to validate"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')} against {version}: {path}: {exc.message}")


def pod_specs(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(kind/name, pod template metadata, pod spec) for every workload in `docs`."""
    from sidecar.podspec import POD_TEMPLATE
    found = []
    for doc in docs:
        if doc.get("kind") not in POD_TEMPLATE:
            continue
        template = doc
        for key in POD_TEMPLATE[doc["kind"]]:
            template = template[key]
        found.append((f"{doc['kind']}/{doc['metadata']['name']}", template.get("metadata", {}), template["spec"]))
    return found


def by_kind_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}
