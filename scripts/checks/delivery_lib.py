"""Shared helpers for the delivery checks: repository paths, Helm rendering through the
Helm v4 SDK (helm-python-sdk), Kubernetes schema validation (kubernetes-validate) and the
operator's RBAC contract."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterable

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
OPERATOR_CHART = CHARTS / "dchat-operator"
CLUSTER_CHART = CHARTS / "dchat-cluster"
CRDS = ROOT / "crds"
CRD_FILE = CRDS / "dchatclusters.dchat.network.yaml"

# Lowest and highest Kubernetes minor versions the charts support (docs/upgrading.md).
# 1.33 is the operator's floor (k8s-openapi feature v1_33); 1.37 is the newest schema set
# kubernetes-validate ships.
KUBE_VERSIONS = ("1.33.0", "1.37.0")

RELEASE_NAMESPACE = "dchat-system"


def workspace_version() -> str:
    """The `[workspace.package] version` every crate inherits."""
    data = tomllib.loads((ROOT / "Cargo.toml").read_text())
    return str(data["workspace"]["package"]["version"])


def render(chart: Path, values: dict[str, Any] | None, *, name: str = "dchat",
           namespace: str = RELEASE_NAMESPACE) -> list[dict[str, Any]]:
    """Render a chart offline (like `helm template`) and return every Kubernetes object,
    each annotated with the template it came from under the key `__template__`."""
    objects: list[dict[str, Any]] = []
    with helm.Chart.load(chart) as loaded:
        loaded.validate_schema(values or {})
        manifests = loaded.render(values=values or {}, name=name, namespace=namespace,
                                  is_install=True)
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{template}: a document is not a mapping"
            doc["__template__"] = template
            objects.append(doc)
    return objects


def notes(chart: Path, values: dict[str, Any] | None, *, name: str = "dchat",
          namespace: str = RELEASE_NAMESPACE) -> str:
    """The rendered NOTES.txt."""
    with helm.Chart.load(chart) as loaded:
        manifests = loaded.render(values=values or {}, name=name, namespace=namespace,
                                  is_install=True)
    return next(text for template, text in manifests.items() if template.endswith("NOTES.txt"))


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without the helper's bookkeeping keys."""
    return {k: v for k, v in obj.items() if k != "__template__"}


def kube_validate(obj: dict[str, Any], version: str) -> None:
    """Validate one object against the Kubernetes OpenAPI schema of `version`, strictly
    (unknown fields are errors). Raises on failure, including a missing schema."""
    kubernetes_validate.validate(strip(obj), version, strict=True)


def has_kube_schema(obj: dict[str, Any], version: str) -> bool:
    """Whether kubernetes-validate knows the object's kind (built-in kinds only)."""
    try:
        kubernetes_validate.validate(strip(obj), version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - a validation error still means the schema exists
        return True
    return True


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """All objects of one kind."""
    return [o for o in objects if o.get("kind") == kind]


def one(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of a kind; fails when there is none or more than one."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


Triple = tuple[str, str, str, tuple[str, ...]]


def rule_triples(rules: Iterable[dict[str, Any]]) -> set[Triple]:
    """Expand PolicyRules into (apiGroup, resource, verb, resourceNames) tuples so two rule
    lists compare equal exactly when they grant the same permissions."""
    out: set[Triple] = set()
    for rule in rules:
        names = tuple(sorted(rule.get("resourceNames") or ()))
        assert not rule.get("nonResourceURLs"), f"unexpected nonResourceURLs rule: {rule}"
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    out.add((group, resource, verb, names))
    return out


class OperatorRbacUnavailable(RuntimeError):
    """The operator CLI could not be run, or printed nothing usable."""


def operator_cli(*args: str) -> str:
    """Stdout of `dchat-operator ARGS...`: a prebuilt binary when DCHAT_OPERATOR_BIN names
    one, otherwise `cargo run -q -p dchat-operator -- ARGS` (scripts/test-all.sh has built
    the workspace before this runs, so it does not compile again)."""
    binary = os.environ.get("DCHAT_OPERATOR_BIN")
    cmd = [binary, *args] if binary else ["cargo", "run", "-q", "-p", "dchat-operator", "--", *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OperatorRbacUnavailable(f"{' '.join(cmd)}: {err}") from err
    if proc.returncode != 0:
        raise OperatorRbacUnavailable(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def operator_rbac_rules() -> list[dict[str, Any]]:
    """The PolicyRules the operator says it needs, from `dchat-operator rbac`."""
    parsed = yaml.safe_load(operator_cli("rbac"))
    if isinstance(parsed, dict) and "rules" in parsed:
        parsed = parsed["rules"]
    if not isinstance(parsed, list) or not parsed:
        raise OperatorRbacUnavailable("`dchat-operator rbac` printed no list of PolicyRules")
    return parsed


def load_yaml_file(path: Path) -> Any:
    """Parse a single-document YAML file."""
    return yaml.safe_load(path.read_text())


def dumps(obj: Any) -> str:
    """Stable JSON for assertion messages."""
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
