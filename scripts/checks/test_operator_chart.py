"""charts/dchat-operator: lint, render with several value sets, strict Kubernetes schema
validation, RBAC equal to what the operator uses, restricted security context."""

from __future__ import annotations

import filecmp
from typing import Any

import helm_python as helm
import pytest
import yaml

from delivery_lib import (
    CRDS,
    KUBE_VERSIONS,
    OPERATOR_CHART,
    RELEASE_NAMESPACE,
    by_kind,
    dumps,
    has_kube_schema,
    kube_validate,
    notes,
    one,
    operator_rbac_rules,
    render,
    rule_triples,
    workspace_version,
)

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"rbac": {"namespaced": True}},
    "namespaced-other-ns": {"rbac": {"namespaced": True, "watchNamespace": "chat-prod"}},
    "single-replica": {"replicaCount": 1},
    "everything": {
        "replicaCount": 3,
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "ghcr"}],
        "operator": {"logFormat": "text", "logLevel": "info,dchat_operator=debug",
                     "extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
        "serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/dchat-operator"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
        "networkPolicy": {"enabled": True,
                          "metricsNamespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "monitoring"}}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                         "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "platform"},
    },
}

RULES_FILE = OPERATOR_CHART / "files" / "rbac-rules.yaml"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(OPERATOR_CHART, values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def expected_rules() -> list[dict[str, Any]]:
    """The rules the chart ships (generated from `dchat-operator rbac`)."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    assert isinstance(rules, list) and rules, f"{RULES_FILE} holds no PolicyRules"
    return rules


def test_shipped_rules_are_what_the_operator_prints(expected_rules) -> None:
    from delivery_lib import OperatorRbacUnavailable
    try:
        printed = operator_rbac_rules()
    except OperatorRbacUnavailable as err:
        pytest.skip(f"`dchat-operator rbac` is not available in this tree: {err}")
    wanted = rule_triples(printed)
    shipped = rule_triples(expected_rules)
    assert shipped == wanted, (
        "charts/dchat-operator/files/rbac-rules.yaml differs from `dchat-operator rbac`:\n"
        f"missing {sorted(wanted - shipped)}\nextra {sorted(shipped - wanted)}\n"
        "regenerate with scripts/checks/sync-generated.sh"
        "")


def test_chart_metadata_matches_operator_crate() -> None:
    chart = yaml.safe_load((OPERATOR_CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "dchat-operator"
    assert chart["appVersion"] == workspace_version(), \
        "Chart.yaml appVersion must equal the operator crate version"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict_has_no_warnings(value_set: str, kube_version: str) -> None:
    report = helm.lint(OPERATOR_CHART, VALUE_SETS[value_set], strict=True,
                       namespace=RELEASE_NAMESPACE, kube_version="v" + kube_version)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, dumps(report)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_object_validates_strictly(rendered, value_set: str, kube_version: str) -> None:
    objects = rendered[value_set]
    assert objects
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD kind; checked by test_service_monitor_targets_metrics_port
        assert has_kube_schema(obj, kube_version), f"no schema for {obj['kind']}"
        kube_validate(obj, kube_version)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_shipped_crds_validate(kube_version: str) -> None:
    for path in sorted((OPERATOR_CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kube_validate(doc, kube_version)


def test_chart_crds_identical_to_generated() -> None:
    top = sorted(p.name for p in CRDS.glob("*.yaml"))
    chart_dir = OPERATOR_CHART / "crds"
    shipped = sorted(p.name for p in chart_dir.glob("*.yaml")) if chart_dir.exists() else []
    assert shipped == top, f"charts/dchat-operator/crds {shipped} != crds/ {top}; run scripts/checks/sync-generated.sh"
    for name in top:
        assert filecmp.cmp(CRDS / name, chart_dir / name, shallow=False), \
            f"charts/dchat-operator/crds/{name} differs from crds/{name}; run scripts/checks/sync-generated.sh"


def test_default_install_objects(rendered) -> None:
    kinds = sorted(o["kind"] for o in rendered["defaults"])
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                            "RoleBinding", "Deployment", "Service", "PodDisruptionBudget",
                            "NetworkPolicy"])
    everything = {o["kind"] for o in rendered["everything"]}
    assert {"ServiceMonitor", "NetworkPolicy"} <= everything
    no_netpol = render(OPERATOR_CHART, {"networkPolicy": {"enabled": False}})
    assert not by_kind(no_netpol, "NetworkPolicy")
    assert not by_kind(rendered["single-replica"], "PodDisruptionBudget"), \
        "a PDB on a single replica would block node drains"


def _granted(objects: list[dict[str, Any]]) -> set:
    roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
    return rule_triples(rule for role in roles for rule in role["rules"])


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rbac_grants_exactly_what_the_operator_uses(rendered, expected_rules, value_set) -> None:
    granted = _granted(rendered[value_set])
    wanted = rule_triples(expected_rules)
    missing = sorted(wanted - granted)
    extra = sorted(granted - wanted)
    assert not missing, f"rules the operator needs but the chart does not grant: {missing}"
    assert not extra, f"rules the chart grants but the operator does not use: {extra}"


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rbac_has_no_wildcards_or_escalation(rendered, value_set: str) -> None:
    for obj in rendered[value_set]:
        for rule in obj.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in (rule.get(field) or []), f"wildcard in {obj['kind']}: {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule.get("verbs", [])), rule


def test_rbac_bindings_point_at_the_service_account(rendered) -> None:
    for name, objects in rendered.items():
        sa = one(objects, "ServiceAccount")["metadata"]["name"]
        roles = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace"))
                 for o in by_kind(objects, "ClusterRole") + by_kind(objects, "Role")}
        for binding in by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding"):
            ref = binding["roleRef"]
            ns = binding["metadata"].get("namespace")
            assert (ref["kind"], ref["name"], ns) in roles, f"{name}: dangling {binding}"
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa,
                                            "namespace": RELEASE_NAMESPACE}], name


def test_cluster_install_is_cluster_wide_but_lease_is_namespaced(rendered) -> None:
    objects = rendered["defaults"]
    cluster_rules = rule_triples(one(objects, "ClusterRole")["rules"])
    assert not any(t[0] == "coordination.k8s.io" for t in cluster_rules), \
        "Lease access must be limited to the operator's namespace"
    role = one(objects, "Role")
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert {t[0] for t in rule_triples(role["rules"])} == {"coordination.k8s.io"}
    assert _env(objects)["DCHAT_WATCH_NAMESPACE"] == ""


def test_namespaced_install_has_no_cluster_scope(rendered) -> None:
    same = rendered["namespaced"]
    assert not by_kind(same, "ClusterRole") and not by_kind(same, "ClusterRoleBinding")
    assert [r["metadata"]["namespace"] for r in by_kind(same, "Role")] == [RELEASE_NAMESPACE]
    assert _env(same)["DCHAT_WATCH_NAMESPACE"] == RELEASE_NAMESPACE

    other = rendered["namespaced-other-ns"]
    assert not by_kind(other, "ClusterRole")
    roles = {r["metadata"]["namespace"]: rule_triples(r["rules"]) for r in by_kind(other, "Role")}
    assert set(roles) == {"chat-prod", RELEASE_NAMESPACE}
    assert {t[0] for t in roles[RELEASE_NAMESPACE]} == {"coordination.k8s.io"}
    assert not any(t[0] == "coordination.k8s.io" for t in roles["chat-prod"])
    assert _env(other)["DCHAT_WATCH_NAMESPACE"] == "chat-prod"


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(objects)["env"]}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_restricted_security_context(rendered, value_set: str) -> None:
    pod = one(rendered[value_set], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    for volume in pod.get("volumes", []):
        assert "hostPath" not in volume
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] in (65532, 1000)
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not sc.get("privileged")
        res = container["resources"]
        assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]


def test_deployment_runs_the_operator_contract(rendered) -> None:
    objects = rendered["defaults"]
    deploy = one(objects, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    c = _container(objects)
    assert c["image"] == f"ghcr.io/dchat/dchat-operator:{workspace_version()}"
    assert c["args"] == ["run"]
    env = _env(objects)
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["DCHAT_METRICS_ADDR"] == "0.0.0.0:8080"
    assert env["DCHAT_LOG_FORMAT"] == "json"
    assert env["RUST_LOG"] == "info"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    svc = one(objects, "Service")
    assert svc["spec"]["selector"] == selector
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


def test_everything_values_reach_the_objects(rendered) -> None:
    objects = rendered["everything"]
    c = _container(objects)
    assert c["image"] == "ghcr.io/dchat/dchat-operator@sha256:" + "a" * 64
    assert _env(objects)["AWS_REGION"] == "eu-west-1"
    assert _env(objects)["DCHAT_LOG_FORMAT"] == "text"
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/dchat-operator")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "ghcr"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["tolerations"][0]["key"] == "dedicated"
    netpol = one(objects, "NetworkPolicy")
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert netpol["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_operator_may_query_prometheus_for_rollout_analysis() -> None:
    egress = one(render(OPERATOR_CHART, {}), "NetworkPolicy")["spec"]["egress"]
    assert egress[-1] == {"to": [{"namespaceSelector": {}}],
                          "ports": [{"port": 9090, "protocol": "TCP"}]}
    custom = render(OPERATOR_CHART, {"networkPolicy": {"prometheus": {
        "port": 9091, "namespaceSelector": {"matchLabels": {"team": "obs"}}}}})
    rule = one(custom, "NetworkPolicy")["spec"]["egress"][-1]
    assert rule["ports"] == [{"port": 9091, "protocol": "TCP"}]
    assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]
    off = render(OPERATOR_CHART, {"networkPolicy": {"prometheus": {"enabled": False}}})
    ports = [p["port"] for r in one(off, "NetworkPolicy")["spec"]["egress"] for p in r["ports"]]
    assert 9090 not in ports


def test_service_monitor_targets_metrics_port(rendered) -> None:
    objects = rendered["everything"]
    sm = one(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    svc = one(objects, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("bad", [
    {"operator": {"logFormat": "xml"}},
    {"replicaCount": 0},
    {"rbac": {"namespaced": True, "watchNamespace": "Not_A_Namespace"}},
    {"securityContext": {"allowPrivilegeEscalation": True}},
    {"image": {"digest": "latest"}},
    {"unknownTopLevelKey": True},
])
def test_values_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(OPERATOR_CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)


def test_notes_tell_the_watch_scope() -> None:
    assert "all namespaces" in notes(OPERATOR_CHART, {})
    assert "namespace chat-prod only" in notes(
        OPERATOR_CHART, {"rbac": {"namespaced": True, "watchNamespace": "chat-prod"}})


def test_checkov_passes_on_the_rendered_chart(rendered, tmp_path) -> None:
    """checkov's Kubernetes checks on each value set's manifests separately (its graph checks
    look across files): no failure, and every suppression (checkov.io/skipN annotation) states
    its reason."""
    import json
    import os
    import subprocess

    from delivery_lib import ROOT, strip as _strip

    procs = {}
    for name, objects in rendered.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifests.yaml").write_text(yaml.safe_dump_all([_strip(o) for o in objects]))
        procs[name] = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "checkov"), "-d", str(folder), "--framework",
             "kubernetes", "--skip-download", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, BC_SKIP_MAPPING="TRUE"))
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        start = stdout.find("{")
        assert start >= 0, stderr[-2000:]
        report = json.loads(stdout[start:])
        assert report["summary"]["passed"] > 50, name
        failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
        assert not failed, f"{name}: {failed}"
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped["check_result"].get("suppress_comment", "")
            assert len(reason) >= 20, f"{name}: {skipped['check_id']} suppressed without a reason"


def test_deployment_env_matches_the_operator_cli(rendered) -> None:
    """Every variable the chart sets is one `dchat-operator run` reads (clap lists them as
    `[env: NAME=]`), so a renamed flag cannot silently fall back to its default."""
    import re

    from delivery_lib import OperatorRbacUnavailable, operator_cli

    try:
        help_text = operator_cli("run", "--help")
    except OperatorRbacUnavailable as err:
        pytest.skip(f"`dchat-operator run --help` is not available: {err}")
    known = set(re.findall(r"\[env: ([A-Z0-9_]+)=", help_text))
    assert known, "run --help lists no environment variables"
    # RUST_LOG is read by the tracing filter, not by clap.
    for name in set(_env(rendered["defaults"])) - {"RUST_LOG"}:
        assert name in known, f"the chart sets {name}, which `dchat-operator run` does not read"
    formats = re.search(r"--log-format.*?\[possible values: ([^\]]+)\]", help_text, re.S)
    assert formats, "run --help lists no log formats"
    schema_formats = json_schema_enum("operator", "logFormat")
    assert set(schema_formats) <= {v.strip() for v in formats.group(1).split(",")}


def json_schema_enum(*path: str) -> list[str]:
    import json

    node = json.loads((OPERATOR_CHART / "values.schema.json").read_text())
    for key in path:
        node = node["properties"][key]
    return node["enum"]
