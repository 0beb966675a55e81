"""Validate deploy/k8s against the Kubernetes schemas, offline.

What it does
    Every YAML document under the given folders is checked:
    - built-in kinds (Deployment, Service, PVC, NetworkPolicy, ...) against
      the Kubernetes JSON schemas bundled with ``kubernetes-validate``, in
      strict mode (unknown fields are errors), for each version in
      ``--kubernetes-version`` (default: 1.29.0 and 1.37.0);
    - ``RayCluster`` (KubeRay CRD, no schema in that bundle): structurally.
      Top-level, head-group and worker-group fields are checked against the
      field names and required fields of KubeRay's ``ray.io/v1`` CRD
      (``ray.io_rayclusters.yaml``, KubeRay 1.7), ``rayStartParams`` must map
      strings to strings, replicas must sit within [minReplicas,
      maxReplicas], and every pod template is validated as a core
      ``PodTemplate`` (strict), so the containers, probes, volumes and
      security contexts get the full Kubernetes schema check;
    - ``Kustomization``: every listed resource exists, and every manifest in
      the folder is listed (nothing silently left out of ``kubectl apply -k``).
    Any other kind with no bundled schema is an error, so nothing passes
    unchecked.

Usage
    python validate_k8s.py deploy/k8s [more folders] [-k 1.29.0 -k 1.37.0]
    Exit status 0 when everything validates, 1 otherwise (one line per error).

Needs ``kubernetes-validate`` and PyYAML (deploy/check.sh installs them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

DEFAULT_VERSIONS = ("1.29.0", "1.37.0")

# KubeRay ray.io/v1 RayCluster CRD (1.7): field names and required fields.
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "headServiceAnnotations",
    "historyServerOptions", "managedBy", "networkPolicy", "rayVersion",
    "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams",
    "resources", "serviceType", "template",
}
HEAD_GROUP_REQUIRED = {"template"}
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas",
    "numOfHosts", "priority", "rayStartParams", "replicas", "resources",
    "scaleStrategy", "suspend", "template",
}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
OVERWRITE_CMD = "ray.io/overwrite-container-cmd"


def documents(folder: Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    for path in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml")):
        with path.open() as fh:
            for index, doc in enumerate(yaml.safe_load_all(fh)):
                if doc is not None:
                    yield path, index, doc


def check_core(doc: dict, where: str, versions: list[str]) -> list[str]:
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{where}: Kubernetes {version}: {path}: {exc.message}")
    return errors


def check_pod_template(template: Any, where: str, versions: list[str]) -> list[str]:
    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "validate"},
        "template": template,
    }
    return check_core(wrapped, where, versions)


def check_fields(obj: Any, allowed: set[str], required: set[str], where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected a mapping, got {type(obj).__name__}"]
    errors = [f"{where}: unknown field {key!r}" for key in sorted(set(obj) - allowed)]
    errors += [f"{where}: missing required field {key!r}" for key in sorted(required - set(obj))]
    return errors


def check_start_params(params: Any, where: str) -> list[str]:
    if params is None:
        return []
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams: expected a mapping"]
    return [
        f"{where}.rayStartParams.{key}: value must be a string (quote it), got {value!r}"
        for key, value in params.items()
        if not isinstance(value, str)
    ]


def check_ray_container(template: dict, where: str, overwrite: bool) -> list[str]:
    containers = (template.get("spec") or {}).get("containers") or []
    if not containers:
        return [f"{where}: no containers"]
    # KubeRay treats containers[0] as the Ray container.
    if overwrite and not containers[0].get("command"):
        return [f"{where}: {OVERWRITE_CMD} is true but containers[0] has no command"]
    return []


def check_raycluster(doc: dict, where: str, versions: list[str]) -> list[str]:
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"{where}: apiVersion {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    errors += check_fields(doc, {"apiVersion", "kind", "metadata", "spec"}, {"metadata", "spec"}, where)
    if not (doc.get("metadata") or {}).get("name"):
        errors.append(f"{where}: metadata.name is missing")
    spec = doc.get("spec") or {}
    errors += check_fields(spec, RAYCLUSTER_SPEC_FIELDS, {"headGroupSpec"}, f"{where}.spec")
    if "rayVersion" in spec and not isinstance(spec["rayVersion"], str):
        errors.append(f"{where}.spec.rayVersion: must be a string (quote it)")
    overwrite = ((doc.get("metadata") or {}).get("annotations") or {}).get(OVERWRITE_CMD) == "true"

    head = spec.get("headGroupSpec") or {}
    hwhere = f"{where}.spec.headGroupSpec"
    errors += check_fields(head, HEAD_GROUP_FIELDS, HEAD_GROUP_REQUIRED, hwhere)
    errors += check_start_params(head.get("rayStartParams"), hwhere)
    if isinstance(head.get("template"), dict):
        errors += check_pod_template(head["template"], f"{hwhere}.template", versions)
        errors += check_ray_container(head["template"], f"{hwhere}.template", overwrite)

    groups = spec.get("workerGroupSpecs") or []
    if not isinstance(groups, list):
        return errors + [f"{where}.spec.workerGroupSpecs: expected a list"]
    names = set()
    for i, group in enumerate(groups):
        gwhere = f"{where}.spec.workerGroupSpecs[{i}]"
        errors += check_fields(group, WORKER_GROUP_FIELDS, WORKER_GROUP_REQUIRED, gwhere)
        if not isinstance(group, dict):
            continue
        name = group.get("groupName")
        if name in names:
            errors.append(f"{gwhere}: duplicate groupName {name!r}")
        names.add(name)
        errors += check_start_params(group.get("rayStartParams"), gwhere)
        counts = {k: group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
        if any(v is not None and (not isinstance(v, int) or v < 0) for v in counts.values()):
            errors.append(f"{gwhere}: replica counts must be non-negative integers: {counts}")
        elif None not in (counts["minReplicas"], counts["maxReplicas"]):
            replicas = counts["replicas"] if counts["replicas"] is not None else counts["minReplicas"]
            if not counts["minReplicas"] <= replicas <= counts["maxReplicas"]:
                errors.append(f"{gwhere}: need minReplicas <= replicas <= maxReplicas: {counts}")
        if isinstance(group.get("template"), dict):
            errors += check_pod_template(group["template"], f"{gwhere}.template", versions)
            errors += check_ray_container(group["template"], f"{gwhere}.template", overwrite)
    return errors


def check_kustomization(doc: dict, path: Path, where: str) -> list[str]:
    errors = []
    listed = set()
    for resource in doc.get("resources") or []:
        target = (path.parent / resource).resolve()
        listed.add(target)
        if not target.exists():
            errors.append(f"{where}: resource {resource!r} does not exist")
    for manifest in sorted(path.parent.glob("*.yaml")):
        if manifest.resolve() != path.resolve() and manifest.resolve() not in listed:
            errors.append(f"{where}: {manifest.name} is not listed in resources")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    args = parser.parse_args(argv)
    versions = args.versions or list(DEFAULT_VERSIONS)

    errors: list[str] = []
    counts: dict[str, int] = {}
    for folder in args.folders:
        for path, index, doc in documents(folder):
            kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
            where = f"{path}#{index} ({kind})"
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "RayCluster":
                errors += check_raycluster(doc, where, versions)
            elif kind == "Kustomization":
                errors += check_kustomization(doc, path, where)
            else:
                try:
                    errors += check_core(doc, where, versions)
                except SchemaNotFoundError:
                    errors.append(f"{where}: no schema for this kind and no structural check")
    for line in errors:
        print(f"ERROR {line}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"validate_k8s: {summary}; Kubernetes {', '.join(versions)}; {len(errors)} error(s)")
    return 1 if errors or not counts else 0


if __name__ == "__main__":
    sys.exit(main())
