"""charts/dchat-cluster: one DchatCluster plus its database Secret reference, rendered with
several value sets through the Helm SDK; the Secret validates against Kubernetes schemas,
the DchatCluster against the generated CRD."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import jsonschema
import pytest

from crd_schema import load_crd, validate_custom_resource
from delivery_lib import (CLUSTER_CHART, CRD_FILE, KUBE_VERSIONS, by_kind, dumps, kube_validate,
                          notes, one, render, strip)

PRODUCTION = {
    "version": "1.4.2",
    "database": {"existingSecret": "dchat-db-from-secrets-manager"},
    "spec": {
        "replicas": 3,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"},
                      "limits": {"cpu": "2", "memory": "4Gi"}},
        "storage": {"size": "50Gi", "storageClassName": "gp3"},
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 10,
                        "targetCPUUtilizationPercentage": 70},
        "disruptionBudget": {"minAvailable": 2},
        "ingress": {"enabled": True, "className": "alb", "host": "relay.example.com",
                    "annotations": {"alb.ingress.kubernetes.io/scheme": "internet-facing"}},
        "monitoring": {"serviceMonitor": True, "prometheusRule": True, "interval": "30s"},
        "pod": {"nodeSelector": {"dchat.network/pool": "relay"},
                "tolerations": [{"key": "dchat.network/pool", "operator": "Equal",
                                 "value": "relay", "effect": "NoSchedule"}],
                "serviceAccountAnnotations": {
                    "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/dchat"}},
    },
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "production-existing-secret": PRODUCTION,
    "dev-created-secret": {"nameOverride": "dev-relays", "version": "1.5.0-rc.1",
                           "keepOnUninstall": False,
                           "database": {"create": True, "host": "postgres.dev.svc",
                                        "password": "not-a-real-password"},
                           "spec": {"replicas": 2}},
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {n: render(CLUSTER_CHART, v, name="relays", namespace="chat") for n, v in VALUE_SETS.items()}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict(value_set: str, kube_version: str) -> None:
    report = helm.lint(CLUSTER_CHART, VALUE_SETS[value_set], strict=True, namespace="chat",
                       kube_version="v" + kube_version)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], \
        dumps(report)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_builtin_objects_validate(rendered, value_set: str, kube_version: str) -> None:
    for obj in rendered[value_set]:
        if obj["kind"] != "DchatCluster":
            kube_validate(obj, kube_version)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_dchatcluster_fits_the_crd(rendered, value_set: str) -> None:
    if not CRD_FILE.exists():
        pytest.skip("crds/dchatclusters.dchat.network.yaml is not generated yet")
    validate_custom_resource(strip(one(rendered[value_set], "DchatCluster")), load_crd(CRD_FILE))


def test_crd_validation_rejects_unknown_and_bad_fields(rendered) -> None:
    if not CRD_FILE.exists():
        pytest.skip("crds/dchatclusters.dchat.network.yaml is not generated yet")
    crd = load_crd(CRD_FILE)
    good = strip(one(rendered["production-existing-secret"], "DchatCluster"))
    for mutate in (lambda s: s.__setitem__("replicaz", 3),
                   lambda s: s.__setitem__("replicas", "three"),
                   lambda s: s["storage"].__setitem__("size", "lots")):
        bad = copy.deepcopy(good)
        mutate(bad["spec"])
        with pytest.raises(jsonschema.ValidationError):
            validate_custom_resource(bad, crd)


def test_embedded_store_by_default(rendered) -> None:
    objects = rendered["defaults"]
    assert [o["kind"] for o in objects] == ["DchatCluster"]
    cluster = objects[0]
    assert cluster["metadata"]["name"] == "relays"
    assert cluster["metadata"]["namespace"] == "chat"
    assert cluster["spec"] == {"version": "0.1.0", "replicas": 1}
    assert cluster["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "embedded store" in notes(CLUSTER_CHART, {}, name="relays", namespace="chat")


def test_existing_secret_is_referenced_not_created(rendered) -> None:
    objects = rendered["production-existing-secret"]
    assert not by_kind(objects, "Secret")
    spec = one(objects, "DchatCluster")["spec"]
    assert spec["database"] == {"secretRef": {"name": "dchat-db-from-secrets-manager"}, "port": 5432}
    assert spec["version"] == "1.4.2"
    assert spec["autoscaling"]["maxReplicas"] == 10
    assert spec["pod"]["tolerations"][0]["effect"] == "NoSchedule"


def test_created_secret_has_the_keys_the_relays_read(rendered) -> None:
    objects = rendered["dev-created-secret"]
    secret = one(objects, "Secret")
    cluster = one(objects, "DchatCluster")
    assert cluster["metadata"]["name"] == "dev-relays"
    assert secret["metadata"]["name"] == "dev-relays-db"
    assert cluster["spec"]["database"]["secretRef"]["name"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {"host", "port", "name", "username", "password"}
    assert secret["stringData"]["port"] == "5432"
    assert cluster["spec"]["version"] == "1.5.0-rc.1"
    assert "helm.sh/resource-policy" not in cluster["metadata"].get("annotations", {})
    wave = int(secret["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
    assert wave < int(cluster["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])


@pytest.mark.parametrize("bad", [
    {"version": ""},
    {"version": "1.0 beta"},
    {"database": {"create": True, "host": "db"}},          # no password
    {"spec": {"version": "1.2.3"}},                         # version belongs at top level
    {"spec": {"database": {"secretRef": {"name": "x"}}}},   # use database.existingSecret
    {"database": {"port": 0}},
    {"unknown": 1},
])
def test_values_schema_rejects(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CLUSTER_CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)


def test_existing_and_created_secret_conflict_fails_render() -> None:
    with helm.Chart.load(CLUSTER_CHART) as chart:
        with pytest.raises(helm.HelmError, match="not both"):
            chart.render(values={"database": {"existingSecret": "a", "create": True, "host": "h",
                                              "password": "p"}}, name="r", namespace="n")


def test_chart_targets_the_operator_release() -> None:
    import yaml as _yaml

    from delivery_lib import workspace_version

    chart = _yaml.safe_load((CLUSTER_CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == workspace_version()
    values = _yaml.safe_load((CLUSTER_CHART / "values.yaml").read_text())
    assert values["version"] == workspace_version(), "default relay version = this release"
